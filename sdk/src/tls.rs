//! The SDK's TLS settings, and how it learns what was negotiated.
//!
//! quinn does not expose the negotiated cipher suite, so each connection
//! attempt gets its own rustls config whose `KeyLog` records the length of
//! the client handshake traffic secret: 48 bytes means a SHA-384 suite,
//! 32 bytes a SHA-256 one. The SDK offers exactly one suite of each hash
//! (TLS13_AES_256_GCM_SHA384 and TLS13_AES_128_GCM_SHA256), so the length
//! names the suite. Nothing is assumed: if the secret was never seen, the
//! connection is refused.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{KeyLog, RootCertStore, SupportedCipherSuite};
use wakewire_proto::ALPN;

use crate::error::ConnectError;

/// Minimum protection a connection must have. Every level is TLS 1.3 (the
/// floor: QUIC cannot run on less).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Protection {
    /// TLS 1.3 with AES-128-GCM or AES-256-GCM.
    #[default]
    Tls13,
    /// TLS 1.3 with AES-256-GCM only.
    Tls13Aes256,
}

/// A negotiated TLS 1.3 cipher suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CipherSuite {
    /// TLS13_AES_128_GCM_SHA256.
    Aes128GcmSha256,
    /// TLS13_AES_256_GCM_SHA384.
    Aes256GcmSha384,
}

impl CipherSuite {
    /// IANA name.
    pub fn name(self) -> &'static str {
        match self {
            CipherSuite::Aes128GcmSha256 => "TLS13_AES_128_GCM_SHA256",
            CipherSuite::Aes256GcmSha384 => "TLS13_AES_256_GCM_SHA384",
        }
    }

    /// The protection level this suite provides.
    pub fn protection(self) -> Protection {
        match self {
            CipherSuite::Aes128GcmSha256 => Protection::Tls13,
            CipherSuite::Aes256GcmSha384 => Protection::Tls13Aes256,
        }
    }
}

/// Records the handshake secret length of one connection attempt.
#[derive(Debug, Default)]
pub(crate) struct SuiteProbe {
    secret_len: Mutex<Option<usize>>,
}

impl KeyLog for SuiteProbe {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if label == "CLIENT_HANDSHAKE_TRAFFIC_SECRET" {
            if let Ok(mut l) = self.secret_len.lock() {
                *l = Some(secret.len());
            }
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == "CLIENT_HANDSHAKE_TRAFFIC_SECRET"
    }
}

impl SuiteProbe {
    /// Forgets the previous attempt's secret (before a new attempt).
    pub(crate) fn reset(&self) {
        if let Ok(mut l) = self.secret_len.lock() {
            *l = None;
        }
    }

    /// The suite, if the handshake has derived its secrets.
    pub(crate) fn negotiated(&self) -> Option<CipherSuite> {
        match *self.secret_len.lock().ok()? {
            Some(48) => Some(CipherSuite::Aes256GcmSha384),
            Some(32) => Some(CipherSuite::Aes128GcmSha256),
            _ => None,
        }
    }
}

/// The crypto provider (ring), installed as the process default on first
/// use, restricted to the two AES-GCM suites, in the order `min` asks for.
///
/// By default AES-128-GCM-SHA256 comes first: its key schedule runs on
/// SHA-256, which CPUs accelerate, where SHA-384 runs in software (it was
/// ~6% of a relay's CPU per handshake). A minimum of AES-256 offers
/// AES-256-GCM-SHA384 first; the relay follows the client's order.
pub(crate) fn provider(min: Protection) -> Arc<CryptoProvider> {
    let base = rustls::crypto::ring::default_provider();
    let _ = CryptoProvider::install_default(base.clone());
    use rustls::crypto::ring::cipher_suite as cs;
    // QUIC needs TLS13_AES_128_GCM_SHA256 to be available (Initial packets)
    // even when the minimum is AES-256: the negotiated suite is checked
    // against the minimum after the handshake instead.
    let suites: Vec<SupportedCipherSuite> = match min {
        Protection::Tls13 => vec![cs::TLS13_AES_128_GCM_SHA256, cs::TLS13_AES_256_GCM_SHA384],
        Protection::Tls13Aes256 => {
            vec![cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_AES_128_GCM_SHA256]
        }
    };
    Arc::new(CryptoProvider {
        cipher_suites: suites,
        ..base
    })
}

/// How the device proves itself in the TLS handshake.
#[derive(Debug, Clone, Default)]
pub(crate) enum ClientAuth {
    /// No client certificate (the device token does it).
    #[default]
    None,
    /// A certificate chain and its key (PEM files, read at build time).
    Chain(PathBuf, PathBuf),
    /// A resolver that signs with a key the SDK never sees (hardware).
    Resolver(Arc<dyn rustls::client::ResolvesClientCert>),
}

impl ClientAuth {
    pub(crate) fn is_some(&self) -> bool {
        !matches!(self, ClientAuth::None)
    }
}

/// QUIC client config for one connection attempt, and its suite probe.
/// The TLS settings of both transports: QUIC's (with the suite probe and
/// 0-RTT) and TLS over TCP's (same roots, client authentication and ALPN;
/// rustls reports the suite itself there).
pub(crate) struct ClientTls {
    pub(crate) quic: quinn::ClientConfig,
    pub(crate) probe: Arc<SuiteProbe>,
    pub(crate) tcp: Arc<rustls::ClientConfig>,
}

/// The suite rustls negotiated on a TLS-over-TCP connection.
pub(crate) fn suite_of(s: SupportedCipherSuite) -> Option<CipherSuite> {
    match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => Some(CipherSuite::Aes128GcmSha256),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => Some(CipherSuite::Aes256GcmSha384),
        _ => None,
    }
}

pub(crate) fn client_config(
    roots: &RootCertStore,
    auth: &ClientAuth,
    min: Protection,
) -> Result<ClientTls, ConnectError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider(min))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ConnectError::Config(e.to_string()))?
        .with_root_certificates(roots.clone());
    let mut tls = match auth {
        ClientAuth::None => builder.with_no_client_auth(),
        ClientAuth::Resolver(r) => builder.with_client_cert_resolver(r.clone()),
        ClientAuth::Chain(cert, key) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    ConnectError::Config(format!(
                        "cannot read the client certificate {}: {e}",
                        cert.display()
                    ))
                })?;
            let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
                ConnectError::Config(format!("cannot read the client key {}: {e}", key.display()))
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| ConnectError::Config(format!("client certificate: {e}")))?
        }
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let tcp = Arc::new(tls.clone());
    // Reconnects resume the TLS session and send the Hello in 0-RTT.
    tls.enable_early_data = true;
    let probe = Arc::new(SuiteProbe::default());
    tls.key_log = probe.clone();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| ConnectError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport_config()));
    Ok(ClientTls {
        quic: config,
        probe,
        tcp,
    })
}

/// The SDK's QUIC transport settings: no QUIC keepalive (the app-level
/// Ping/Pong keeps the path alive and learns from it), the idle timeout left
/// to the relay (the lower of both sides applies), no streams opened by the
/// relay, small windows, no datagrams, no path MTU discovery. Public so the
/// load tester's raw-QUIC floor client uses exactly these.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(None)
        .max_idle_timeout(None)
        .max_concurrent_bidi_streams(0u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .stream_receive_window(65_536u32.into())
        .receive_window(131_072u32.into())
        .datagram_receive_buffer_size(None)
        .mtu_discovery_config(None);
    transport
}

/// Adds the certificates of a PEM file to `roots`.
pub(crate) fn add_pem_roots(roots: &mut RootCertStore, path: &Path) -> Result<(), ConnectError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            ConnectError::Config(format!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(ConnectError::Config(format!(
            "no certificate in {}",
            path.display()
        )));
    }
    for c in certs {
        roots.add(c).map_err(|e| {
            ConnectError::Config(format!("bad certificate in {}: {e}", path.display()))
        })?;
    }
    Ok(())
}

/// A QUIC client config with exactly the SDK's TLS and transport settings,
/// trusting the certificates in `ca_pem`: for tools and tests that speak raw
/// QUIC to a relay (the load tester's floor client, negative tests).
#[cfg(feature = "testing")]
pub fn quic_client_config(ca_pem: &Path) -> Result<quinn::ClientConfig, ConnectError> {
    let mut roots = RootCertStore::empty();
    add_pem_roots(&mut roots, ca_pem)?;
    client_config(&roots, &ClientAuth::None, Protection::default()).map(|t| t.quic)
}

/// Checks what a connection negotiated against the minimum.
pub(crate) fn check_protection(
    negotiated: Option<CipherSuite>,
    alpn: Option<&[u8]>,
    min: Protection,
) -> Result<CipherSuite, ConnectError> {
    if alpn != Some(ALPN) {
        return Err(ConnectError::ProtectionTooLow(format!(
            "ALPN {:?} negotiated, wakewire/1 required",
            alpn.map(String::from_utf8_lossy)
        )));
    }
    let suite = negotiated.ok_or_else(|| {
        ConnectError::ProtectionTooLow("the negotiated cipher suite could not be determined".into())
    })?;
    if suite.protection() < min {
        return Err(ConnectError::ProtectionTooLow(format!(
            "{} negotiated, {min:?} required",
            suite.name()
        )));
    }
    Ok(suite)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protection_check_refuses_below_minimum_and_unknowns() {
        let ok = check_protection(
            Some(CipherSuite::Aes128GcmSha256),
            Some(ALPN),
            Protection::Tls13,
        );
        assert_eq!(ok.unwrap(), CipherSuite::Aes128GcmSha256);
        assert!(matches!(
            check_protection(
                Some(CipherSuite::Aes128GcmSha256),
                Some(ALPN),
                Protection::Tls13Aes256
            ),
            Err(ConnectError::ProtectionTooLow(_))
        ));
        assert!(check_protection(
            Some(CipherSuite::Aes256GcmSha384),
            Some(ALPN),
            Protection::Tls13Aes256
        )
        .is_ok());
        assert!(check_protection(None, Some(ALPN), Protection::Tls13).is_err());
        assert!(check_protection(
            Some(CipherSuite::Aes256GcmSha384),
            Some(b"h3"),
            Protection::Tls13
        )
        .is_err());
        let probe = SuiteProbe::default();
        assert_eq!(probe.negotiated(), None);
        probe.log("CLIENT_HANDSHAKE_TRAFFIC_SECRET", &[], &[0; 48]);
        assert_eq!(probe.negotiated(), Some(CipherSuite::Aes256GcmSha384));
    }
}
