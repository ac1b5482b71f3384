//! What every task of a relay shares, and the relay's one clock source.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use std::sync::Arc;

use wakewire_proto::token::{Claims, TokenError};

use crate::certs::ReloadableCert;
use crate::cluster::Cluster;
use crate::config::RelayConfig;
use crate::data_dir::Keys;
use crate::publish::PublishError;
use crate::quota::Quotas;
use crate::registry::Registry;
use crate::revocation::Revocations;
use crate::store::Store;

/// State shared by every task of a relay.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: RelayConfig,
    pub(crate) keys: Keys,
    pub(crate) registry: Registry,
    pub(crate) store: Store,
    /// Cluster mode: JetStream holds the state instead of `store`.
    pub(crate) cluster: Option<Arc<Cluster>>,
    pub(crate) revocations: Revocations,
    pub(crate) quotas: Arc<Quotas>,
    /// Certificates in service (renewable).
    pub(crate) certificates: Vec<Arc<ReloadableCert>>,
    conn_ids: AtomicU64,
    /// Handshakes in progress (admission control).
    pub(crate) handshaking: AtomicUsize,
    /// Established connections.
    pub(crate) connections: AtomicUsize,
    /// Set when the relay drains: no new device connection (TCP; QUIC
    /// drops its server configuration instead).
    pub(crate) draining: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(crate) fn new(
        config: RelayConfig,
        keys: Keys,
        registry: Registry,
        store: Store,
        cluster: Option<Arc<Cluster>>,
        revocations: Revocations,
        certificates: Vec<Arc<ReloadableCert>>,
    ) -> Self {
        Self {
            certificates,
            quotas: Arc::new(Quotas::new(config.quotas.clone())),
            config,
            keys,
            registry,
            store,
            cluster,
            revocations,
            conn_ids: AtomicU64::new(1),
            handshaking: AtomicUsize::new(0),
            connections: AtomicUsize::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Refuses a token the operator revoked.
    pub(crate) fn check_revoked(&self, claims: &Claims) -> Result<(), PublishError> {
        match &claims.jti {
            Some(jti) if self.revocations.is_revoked(jti) => Err(PublishError::BadCredential(
                TokenError::Revoked(jti.clone()),
            )),
            _ => Ok(()),
        }
    }

    /// Whether a new connection may start its handshake now.
    pub(crate) fn admit(&self) -> bool {
        self.handshaking.load(Ordering::Relaxed) < self.config.max_pending_handshakes
            && self.connections.load(Ordering::Relaxed) < self.config.max_connections
    }
}

/// The relay's clock: the only place its drivers read the time. Monotonic
/// time comes from tokio, so tests can run the relay on a paused clock.
pub(crate) mod clock {
    use super::*;

    /// Monotonic now.
    #[allow(clippy::disallowed_methods)] // the one clock source
    pub(crate) fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }

    /// Wall clock, Unix milliseconds.
    #[allow(clippy::disallowed_methods)] // the one clock source
    pub(crate) fn unix_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    /// Wall clock, Unix seconds.
    pub(crate) fn unix_secs() -> u64 {
        unix_ms() / 1000
    }
}
