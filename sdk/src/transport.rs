//! The fallback transport: the same frames over TLS 1.3 on TCP, directly
//! or through an HTTP CONNECT or SOCKS5 proxy (with credentials), for
//! networks that block or throttle UDP. [`Transport`] says which the
//! client may use; in `Auto` QUIC goes first and TCP starts after a short
//! head start (happy eyeballs, RFC 8305), and a network where TCP won
//! keeps using it, with QUIC tried again later.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::ConnectError;
use crate::tls::{self, CipherSuite, Protection};

/// The TLS stream of a TCP connection to the relay.
pub(crate) type TcpTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Which transport the client uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// QUIC first; TLS over TCP if QUIC has not connected within the head
    /// start (or on a network where TCP won before); back to QUIC when it
    /// works again. The default.
    #[default]
    Auto,
    /// QUIC only.
    Quic,
    /// TLS over TCP only (e.g. through a proxy).
    Tcp,
}

/// A proxy for TCP connections: `http://[user:password@]host:port`
/// (HTTP CONNECT, Basic credentials) or `socks5://[user:password@]host:port`
/// (SOCKS5, username/password authentication, the relay's name resolved by
/// the proxy).
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    kind: ProxyKind,
    host: String,
    port: u16,
    credentials: Option<(String, String)>,
    no_proxy: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyKind {
    Http,
    Socks5,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("Proxy")
            .field("kind", &self.kind)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.credentials.as_ref().map(|c| &c.0))
            .finish_non_exhaustive()
    }
}

impl Proxy {
    /// Parses a proxy URL (see [`Proxy`]).
    pub fn parse(url: &str) -> Result<Self, ConnectError> {
        let bad = |why: &str| ConnectError::Config(format!("proxy {:?}: {why}", redact(url)));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| bad("no scheme"))?;
        let kind = match scheme.to_ascii_lowercase().as_str() {
            "http" => ProxyKind::Http,
            "socks5" | "socks5h" => ProxyKind::Socks5,
            other => return Err(bad(&format!("scheme {other:?} is not http or socks5"))),
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let credentials = match userinfo {
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                Some((percent_decode(user), percent_decode(pass)))
            }
            None => None,
        };
        let (host, port) = hostport.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self {
            kind,
            host: host.to_owned(),
            port,
            credentials,
            no_proxy: Vec::new(),
        })
    }

    /// The proxy of the `HTTPS_PROXY` / `ALL_PROXY` convention (either
    /// case), minus the hosts `NO_PROXY` lists; `None` if unset. `env` is
    /// passed in (`std::env::vars()` in an app) so it can be tested.
    pub fn from_env(
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Option<Self>, ConnectError> {
        let vars: std::collections::HashMap<String, String> = env.into_iter().collect();
        let get = |name: &str| {
            vars.get(name)
                .or_else(|| vars.get(&name.to_ascii_lowercase()))
                .filter(|v| !v.trim().is_empty())
                .cloned()
        };
        let Some(url) = get("HTTPS_PROXY").or_else(|| get("ALL_PROXY")) else {
            return Ok(None);
        };
        let mut proxy = Self::parse(url.trim())?;
        if let Some(list) = get("NO_PROXY") {
            proxy.no_proxy = list
                .split(',')
                .map(|h| h.trim().trim_start_matches('.').to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect();
        }
        Ok(Some(proxy))
    }

    /// Whether `NO_PROXY` exempts `host` (an exact name, a domain suffix,
    /// or `*`).
    pub(crate) fn bypasses(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.no_proxy
            .iter()
            .any(|n| n == "*" || host == *n || host.ends_with(&format!(".{n}")))
    }
}

fn redact(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
        _ => url.to_owned(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Opens a TLS-over-TCP connection to the relay at `target` (`name` is the
/// host:port the app gave, for the proxy and the TLS server name), through
/// `proxy` unless it exempts the host; checks ALPN and the suite.
pub(crate) async fn connect(
    tls_config: Arc<rustls::ClientConfig>,
    name: &str,
    addr: SocketAddr,
    server_name: &str,
    proxy: Option<&Proxy>,
    min: Protection,
    timeout: Duration,
) -> Result<(TcpTls, CipherSuite), ConnectError> {
    let host = crate::client::host_of(name);
    let connect = async {
        let stream = match proxy.filter(|p| !p.bypasses(&host)) {
            Some(p) => through(p, &host, addr.port()).await?,
            None => TcpStream::connect(addr)
                .await
                .map_err(|e| ConnectError::Unreachable(format!("TCP to {addr}: {e}")))?,
        };
        let _ = stream.set_nodelay(true);
        let sni = rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| {
            ConnectError::Config(format!("invalid server name {server_name:?}: {e}"))
        })?;
        let tls = tokio_rustls::TlsConnector::from(tls_config)
            .connect(sni, stream)
            .await
            .map_err(tls_error)?;
        let (_, session) = tls.get_ref();
        let suite = tls::check_protection(
            session.negotiated_cipher_suite().and_then(tls::suite_of),
            session.alpn_protocol(),
            min,
        )?;
        Ok((tls, suite))
    };
    tokio::time::timeout(timeout, connect).await.map_err(|_| {
        ConnectError::TimedOut(format!(
            "no TLS handshake over TCP with {name} within {timeout:?}"
        ))
    })?
}

fn tls_error(e: std::io::Error) -> ConnectError {
    let text = e.to_string();
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(c)) => {
            ConnectError::TlsCertificateInvalid(format!("{c:?}"))
        }
        Some(_) => ConnectError::TlsHandshake(text),
        None => ConnectError::ConnectionLost(format!("TLS over TCP: {text}")),
    }
}

/// A TCP stream to `host:port` through the proxy.
async fn through(p: &Proxy, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
    let mut s = TcpStream::connect((p.host.as_str(), p.port))
        .await
        .map_err(|e| ConnectError::Proxy(format!("cannot reach {}:{}: {e}", p.host, p.port)))?;
    match p.kind {
        ProxyKind::Http => http_connect(&mut s, p, host, port).await?,
        ProxyKind::Socks5 => socks5(&mut s, p, host, port).await?,
    }
    Ok(s)
}

/// Longest proxy reply head read (an HTTP status line and headers).
const MAX_PROXY_REPLY: usize = 8 * 1024;

async fn http_connect(
    s: &mut TcpStream,
    p: &Proxy,
    host: &str,
    port: u16,
) -> Result<(), ConnectError> {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some((user, pass)) = &p.credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    req.push_str("\r\n");
    let io = |e: std::io::Error| ConnectError::Proxy(format!("HTTP CONNECT: {e}"));
    s.write_all(req.as_bytes()).await.map_err(io)?;
    // Read the reply head byte by byte: nothing of the tunnel may be eaten.
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_REPLY {
            return Err(ConnectError::Proxy(
                "HTTP CONNECT: reply head too long".into(),
            ));
        }
        let b = s.read_u8().await.map_err(io)?;
        head.push(b);
    }
    let text = String::from_utf8_lossy(&head);
    let status_line = text.lines().next().unwrap_or_default().to_owned();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ConnectError::Proxy(format!("HTTP CONNECT: bad reply {status_line:?}")))?;
    match code {
        200..=299 => Ok(()),
        // 407 is the standard answer; some proxies (tinyproxy) send 401.
        401 | 407 => Err(ConnectError::ProxyAuth(format!(
            "HTTP proxy {}:{} answered {status_line:?}{}",
            p.host,
            p.port,
            if p.credentials.is_some() {
                " (credentials refused)"
            } else {
                " (credentials required)"
            }
        ))),
        _ => Err(ConnectError::Proxy(format!(
            "HTTP proxy {}:{} refused the tunnel: {status_line:?}",
            p.host, p.port
        ))),
    }
}

async fn socks5(s: &mut TcpStream, p: &Proxy, host: &str, port: u16) -> Result<(), ConnectError> {
    let io = |e: std::io::Error| ConnectError::Proxy(format!("SOCKS5: {e}"));
    // Greeting: no authentication, or username/password (RFC 1929).
    let methods: &[u8] = if p.credentials.is_some() {
        &[0x00, 0x02]
    } else {
        &[0x00]
    };
    let mut hello = vec![0x05, methods.len() as u8];
    hello.extend_from_slice(methods);
    s.write_all(&hello).await.map_err(io)?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await.map_err(io)?;
    if choice[0] != 0x05 {
        return Err(ConnectError::Proxy("SOCKS5: not a SOCKS5 proxy".into()));
    }
    match choice[1] {
        0x00 => {}
        0x02 => {
            let (user, pass) = p.credentials.clone().unwrap_or_default();
            if user.len() > 255 || pass.len() > 255 {
                return Err(ConnectError::Config(
                    "SOCKS5 credentials longer than 255 bytes".into(),
                ));
            }
            let mut auth = vec![0x01, user.len() as u8];
            auth.extend_from_slice(user.as_bytes());
            auth.push(pass.len() as u8);
            auth.extend_from_slice(pass.as_bytes());
            s.write_all(&auth).await.map_err(io)?;
            let mut status = [0u8; 2];
            s.read_exact(&mut status).await.map_err(io)?;
            if status[1] != 0x00 {
                return Err(ConnectError::ProxyAuth(format!(
                    "SOCKS5 proxy {}:{} refused the username and password",
                    p.host, p.port
                )));
            }
        }
        0xff => {
            return Err(ConnectError::ProxyAuth(format!(
                "SOCKS5 proxy {}:{} accepts none of our authentication methods{}",
                p.host,
                p.port,
                if p.credentials.is_none() {
                    " (it wants credentials)"
                } else {
                    ""
                }
            )))
        }
        other => {
            return Err(ConnectError::Proxy(format!(
                "SOCKS5: unexpected method {other:#x}"
            )))
        }
    }
    // CONNECT to the relay by name (the proxy resolves it) or address.
    let mut req = vec![0x05, 0x01, 0x00];
    match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            req.push(0x01);
            req.extend_from_slice(&a.octets());
        }
        Ok(std::net::IpAddr::V6(a)) => {
            req.push(0x04);
            req.extend_from_slice(&a.octets());
        }
        Err(_) => {
            if host.len() > 255 {
                return Err(ConnectError::Config(
                    "relay host name longer than 255 bytes".into(),
                ));
            }
            req.push(0x03);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await.map_err(io)?;
    let mut reply = [0u8; 4];
    s.read_exact(&mut reply).await.map_err(io)?;
    if reply[1] != 0x00 {
        return Err(ConnectError::Proxy(format!(
            "SOCKS5 proxy {}:{} could not connect to the relay (reply {:#x})",
            p.host, p.port, reply[1]
        )));
    }
    // Skip the bound address.
    let skip = match reply[3] {
        0x01 => 4,
        0x04 => 16,
        0x03 => usize::from(s.read_u8().await.map_err(io)?),
        other => {
            return Err(ConnectError::Proxy(format!(
                "SOCKS5: unknown address type {other:#x}"
            )))
        }
    } + 2;
    let mut rest = vec![0u8; skip];
    s.read_exact(&mut rest).await.map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_and_never_print_the_password() {
        let p = Proxy::parse("http://alice:s%40cret@proxy.example:3128").unwrap();
        assert_eq!(p.kind, ProxyKind::Http);
        assert_eq!((p.host.as_str(), p.port), ("proxy.example", 3128));
        assert_eq!(p.credentials, Some(("alice".into(), "s@cret".into())));
        assert!(!format!("{p:?}").contains("s@cret"));
        let s = Proxy::parse("socks5://[::1]:1080").unwrap();
        assert_eq!(
            (s.kind, s.host.as_str(), s.credentials),
            (ProxyKind::Socks5, "::1", None)
        );
        for bad in [
            "proxy:3128",
            "ftp://x:1",
            "http://x",
            "http://:1",
            "http://x:99999",
        ] {
            let e = Proxy::parse(bad).unwrap_err();
            assert!(matches!(e, ConnectError::Config(_)), "{bad}: {e}");
        }
        let e = Proxy::parse("gopher://bob:pw@x:1").unwrap_err().to_string();
        assert!(!e.contains("pw"), "{e}");
    }

    #[test]
    fn the_environment_convention_with_no_proxy() {
        let env = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(Proxy::from_env(env(&[])).unwrap(), None);
        let p = Proxy::from_env(env(&[
            ("https_proxy", "http://proxy:3128"),
            ("NO_PROXY", "localhost, .internal.example"),
        ]))
        .unwrap()
        .unwrap();
        assert!(p.bypasses("localhost"));
        assert!(p.bypasses("relay.internal.example"));
        assert!(!p.bypasses("relay.example"));
        let all = Proxy::from_env(env(&[("ALL_PROXY", "socks5://s:1080"), ("no_proxy", "*")]))
            .unwrap()
            .unwrap();
        assert!(all.bypasses("anything"));
    }
}
