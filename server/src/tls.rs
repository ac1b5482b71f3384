//! TLS and QUIC transport settings of the device endpoint.
//!
//! One rustls crypto provider (ring) is used everywhere and installed
//! explicitly as the process default. Only TLS 1.3 is offered (QUIC needs
//! it anyway) and only the `wakewire/1` ALPN. The transport is tuned for a
//! control channel: one bidirectional stream, no unidirectional streams, no
//! datagrams, small flow-control windows, and no server-side keepalive (the
//! device keeps the path alive; both sides pinging wastes radio wakes).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;
use wakewire_proto::ALPN;

/// Resumable TLS sessions kept by the relay in `cache` mode (a few hundred
/// bytes each, once used).
pub const SESSION_CACHE: usize = 262_144;

/// How devices resume TLS sessions.
#[derive(Debug, Clone)]
pub enum Resumption {
    /// Stateless tickets sealed with the data directory's rotated key
    /// ([`crate::tickets`]): nothing kept per device, resumption survives
    /// restarts; no 0-RTT (rustls allows it only with server-side state).
    Tickets(Arc<dyn rustls::server::ProducesTickets>),
    /// A server-side cache of [`SESSION_CACHE`] single-use sessions: 0-RTT
    /// Hello, memory per device, empty after a restart.
    Cache,
}

impl Resumption {
    fn apply(&self, tls: &mut rustls::ServerConfig) {
        // A device holds one connection at a time: one ticket per handshake
        // is enough (rustls sends two by default), half the sealing work and
        // the bytes on the radio.
        tls.send_tls13_tickets = 1;
        match self {
            Resumption::Tickets(t) => {
                tls.ticketer = t.clone();
                // Tickets only: no session cache on the side.
                tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            }
            Resumption::Cache => {
                tls.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
            }
        }
    }
}

/// A certificate or key problem.
#[derive(Debug, Error)]
pub enum TlsError {
    /// The PEM file could not be read or holds nothing usable.
    #[error("cannot load {what} from {path}: {message}")]
    Load {
        /// "certificate" or "private key".
        what: &'static str,
        /// File.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls or quinn refused the configuration.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// The crypto provider, installed as the process default on first use.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Already installed (by us or an embedding app) is fine.
    let _ = CryptoProvider::install_default((*provider).clone());
    provider
}

/// A verifier of client certificates issued by `cas`; `optional` lets
/// clients present none.
fn client_verifier(
    cas: Vec<CertificateDer<'static>>,
    optional: bool,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in cas {
        roots
            .add(c)
            .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        crypto_provider(),
    );
    let builder = if optional {
        builder.allow_unauthenticated()
    } else {
        builder
    };
    builder
        .build()
        .map_err(|e| TlsError::Config(format!("client CA: {e}")))
}

/// TLS for the publisher API (HTTP/2 over TLS 1.3 or 1.2), its certificate
/// resolved through `cert`; with `client_ca`, backends must present a
/// client certificate from it (mTLS) besides their token.
pub fn grpc_tls_config(
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
    client_ca: Option<Vec<CertificateDer<'static>>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(cas) => builder.with_client_cert_verifier(client_verifier(cas, false)?),
    };
    let mut tls = builder.with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"h2".to_vec()];
    Ok(tls)
}

/// Prefix of the SAN URI naming the device a client certificate is for:
/// `wakewire:device:<device id>`.
pub const DEVICE_URI_PREFIX: &str = "wakewire:device:";

/// What a device's client certificate says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertIdentity {
    /// No client certificate.
    None,
    /// The device id of its `wakewire:device:` SAN URI.
    Device(String),
    /// A certificate (valid: the handshake checked it) naming no device,
    /// or more than one.
    Unusable(String),
}

/// The device a connection's client certificate names.
pub fn certificate_identity(conn: &quinn::Connection) -> CertIdentity {
    let Some(chain) = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
    else {
        return CertIdentity::None;
    };
    let Some(leaf) = chain.first() else {
        return CertIdentity::None;
    };
    device_of_certificate(leaf)
}

/// TLS 1.3 for devices (ALPN wakewire/1, the device certificate, optional
/// client certificates), shared by the QUIC and the TCP endpoint.
fn device_tls(
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
    device_client_ca: Option<Vec<CertificateDer<'static>>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match device_client_ca {
        None => builder.with_no_client_auth(),
        Some(cas) => builder.with_client_cert_verifier(client_verifier(cas, true)?),
    };
    let mut tls = builder.with_cert_resolver(cert);
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// The device endpoint over TLS on TCP: the same certificate, client
/// certificates, ALPN and resumption as QUIC, no early data (a TCP
/// fallback is not where radio round trips are saved).
pub fn tcp_server_config(
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
    device_client_ca: Option<Vec<CertificateDer<'static>>>,
    resumption: &Resumption,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut tls = device_tls(cert, device_client_ca)?;
    resumption.apply(&mut tls);
    Ok(Arc::new(tls))
}

/// The device a certificate's `wakewire:device:` SAN URI names.
pub fn device_of_certificate(der: &CertificateDer<'_>) -> CertIdentity {
    let cert = match webpki::EndEntityCert::try_from(der) {
        Ok(c) => c,
        Err(e) => return CertIdentity::Unusable(format!("unparsable certificate: {e:?}")),
    };
    let ids: Vec<&str> = cert
        .valid_uri_names()
        .filter_map(|u| u.strip_prefix(DEVICE_URI_PREFIX))
        .collect();
    match ids.as_slice() {
        [one] => CertIdentity::Device((*one).to_owned()),
        [] => CertIdentity::Unusable(format!(
            "the client certificate has no {DEVICE_URI_PREFIX}<id> subject alternative name"
        )),
        _ => CertIdentity::Unusable("the client certificate names several devices".into()),
    }
}

/// Reads the certificates of a PEM file.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let load = |message: String| TlsError::Load {
        what: "certificates",
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| load(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load(e.to_string()))?;
    if certs.is_empty() {
        return Err(load("no CERTIFICATE block".into()));
    }
    Ok(certs)
}

/// Reads a PEM certificate chain and private key.
pub fn load_pem(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let load = |what, path: &Path, message: String| TlsError::Load {
        what,
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| load("certificate", cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| load("certificate", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(load("certificate", cert, "no CERTIFICATE block".into()));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| load("private key", key, e.to_string()))?;
    Ok((certs, key_der))
}

/// QUIC transport settings for device connections.
pub fn transport_config(idle_timeout: Duration) -> Result<quinn::TransportConfig, TlsError> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .max_idle_timeout(Some(
            idle_timeout
                .try_into()
                .map_err(|_| TlsError::Config("idle timeout too large".into()))?,
        ))
        .keep_alive_interval(None)
        .stream_receive_window(32_768u32.into())
        .receive_window(65_536u32.into())
        .send_window(65_536)
        .datagram_receive_buffer_size(None)
        .datagram_send_buffer_size(0)
        // Control frames are small: path MTU discovery would cost probes
        // per connection and memory for no gain.
        .mtu_discovery_config(None);
    Ok(t)
}

/// Server configuration for the device endpoint, its certificate resolved
/// through `cert` (renewable at run time). With `device_client_ca`,
/// devices may present a client certificate issued by one of those CAs
/// (an invalid or untrusted one fails the handshake; none at all is left
/// to the relay's authentication mode).
pub fn server_config(
    cert: Arc<dyn rustls::server::ResolvesServerCert>,
    idle_timeout: Duration,
    device_client_ca: Option<Vec<CertificateDer<'static>>>,
    resumption: &Resumption,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = device_tls(cert, device_client_ca)?;
    // A resuming device skips the certificate signature and check. With
    // the cache (single use, so a replayed resumption fails at the TLS
    // layer) it also sends its Hello in the first flight (0-RTT): rustls
    // allows early data only with stateful resumption (RFC 8446 section
    // 8.1), and ignores this setting with tickets. QUIC requires exactly
    // u32::MAX here.
    resumption.apply(&mut tls);
    tls.max_early_data_size = match resumption {
        Resumption::Cache => u32::MAX,
        Resumption::Tickets(_) => 0,
    };
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport_config(idle_timeout)?));
    Ok(config)
}
