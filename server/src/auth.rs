//! Publisher authentication, run as a gRPC interceptor: on the request's
//! headers, **before** its body is read, so an unauthenticated client can
//! make the relay buffer nothing. The verified claims travel to the
//! handler in the request's extensions, with a permit of the global limit
//! on requests in flight.

use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};
use wakewire_proto::token::{Claims, TokenKind};

use crate::publish::PublishError;
use crate::state::{clock, Shared};

/// Most publisher tokens whose verification is remembered.
const TOKEN_CACHE: usize = 4096;

/// A request that passed the interceptor: its publisher and its share of
/// the requests in flight (held until the handler is done).
#[derive(Debug, Clone)]
pub(crate) struct Authed {
    pub(crate) claims: Arc<Claims>,
    /// Held until the handler is done.
    pub(crate) _permit: Arc<OwnedSemaphorePermit>,
}

/// Verifies publisher tokens (with a cache) and bounds requests in flight.
#[derive(Debug, Clone)]
pub(crate) struct Authenticator {
    shared: Arc<Shared>,
    /// Publisher tokens already verified: a backend sends the same token
    /// with every request, and an Ed25519 verification costs more than the
    /// rest of a publish. The signature binds the claims to the exact token
    /// text, so a hit needs only the expiry and revocation checked again.
    verified: Arc<DashMap<String, Arc<Claims>>>,
    in_flight: Arc<Semaphore>,
}

impl Authenticator {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        let limit = shared.config.grpc.max_in_flight;
        Self {
            shared,
            verified: Arc::default(),
            in_flight: Arc::new(Semaphore::new(limit)),
        }
    }

    /// The interceptor: authenticates, takes an in-flight permit.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    pub(crate) fn intercept(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let claims = self.publisher(req.metadata())?;
        let permit = self.in_flight.clone().try_acquire_owned().map_err(|_| {
            metrics::counter!(crate::metrics::THROTTLED, "limit" => "in_flight").increment(1);
            Status::from(PublishError::Overloaded)
        })?;
        req.extensions_mut().insert(Authed {
            claims,
            _permit: Arc::new(permit),
        });
        Ok(req)
    }

    /// The claims of the request's publisher token.
    pub(crate) fn publisher(&self, md: &MetadataMap) -> Result<Arc<Claims>, PublishError> {
        let token = bearer(md)?;
        let now = clock::unix_secs();
        if let Some(claims) = self.verified.get(token) {
            if claims.exp > now {
                self.shared.check_revoked(&claims)?;
                return Ok(claims.clone());
            }
        }
        let claims = Arc::new(self.shared.keys.verifier.verify(
            token,
            TokenKind::Publisher,
            now,
        )?);
        self.shared.check_revoked(&claims)?;
        if self.verified.len() >= TOKEN_CACHE {
            self.verified.clear();
        }
        self.verified.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }
}

/// The token of `authorization: Bearer <token>` (the scheme is
/// case-insensitive, RFC 7235).
fn bearer(md: &MetadataMap) -> Result<&str, PublishError> {
    let value = md
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or(PublishError::MissingCredential)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(PublishError::MissingCredential)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(PublishError::MissingCredential);
    }
    Ok(token.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let mut md = MetadataMap::new();
        for (value, ok) in [
            ("Bearer ww1.x", true),
            ("BEARER ww1.x", true),
            ("bearer   ww1.x ", true),
            ("Basic ww1.x", false),
            ("ww1.x", false),
        ] {
            md.insert("authorization", value.parse().unwrap());
            assert_eq!(bearer(&md).ok(), ok.then_some("ww1.x"), "{value}");
        }
    }
}
