//! Devices behind proxies with credentials, with real proxies from
//! Debian's packages (`.ci/run` installs them): tinyproxy (HTTP CONNECT,
//! Basic authentication) and microsocks (SOCKS5, username/password).
//! Right credentials connect over TCP and get wakes; wrong ones are a
//! typed, non-retryable proxy error, not a relay one; a proxy that is down
//! is a retryable one.

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use wakewire_api::pb::DeliveryStatus;
use wakewire_sdk::{ConnectError, Proxy, Transport};
use wakewire_test_support::{recv, wake_sink, TestRelay};

fn binary(name: &str) -> anyhow::Result<std::path::PathBuf> {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin"] {
        let p = std::path::Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    anyhow::bail!("{name} not found: install it (apt-get install {name}); .ci/run does")
}

/// Whether the proxy `name` is installed (else the test is skipped; see
/// `tool_or_skip`).
fn have(name: &str) -> bool {
    wakewire_test_support::tool_or_skip(name, binary(name).map(|_| ()).map_err(|e| e.to_string()))
}

/// Waits (bounded) until something accepts on 127.0.0.1:`port`.
async fn listening(port: u16) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("proxy did not listen on {port}"))
}

struct Running {
    _child: Child,
    _dir: tempfile::TempDir,
    port: u16,
}

async fn tinyproxy(user: &str, pass: &str) -> anyhow::Result<Running> {
    let dir = tempfile::tempdir()?;
    let port = wakewire_test_support::free_port()?;
    let conf = dir.path().join("tinyproxy.conf");
    // No ConnectPort line: CONNECT to any port (the relay's is ephemeral).
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 60\nAllow 127.0.0.1\nBasicAuth {user} {pass}\nMaxClients 20\nLogLevel Error\n"
        ),
    )?;
    let child = Command::new(binary("tinyproxy")?)
        .args(["-d", "-c"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    listening(port).await?;
    Ok(Running {
        _child: child,
        _dir: dir,
        port,
    })
}

async fn microsocks(user: &str, pass: &str) -> anyhow::Result<Running> {
    let port = wakewire_test_support::free_port()?;
    let child = Command::new(binary("microsocks")?)
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-u",
            user,
            "-P",
            pass,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    listening(port).await?;
    Ok(Running {
        _child: child,
        _dir: tempfile::tempdir()?,
        port,
    })
}

/// Connects `device` through `proxy` (TCP to the relay's TCP port),
/// registers and takes one wake.
async fn wake_through(relay: &TestRelay, device: &str, proxy: &str) -> Result<(), ConnectError> {
    let tcp = relay.relay().tcp_addr().expect("TCP on").port();
    let client = relay
        .client(device)
        .tcp_port(tcp)
        .proxy(Proxy::parse(proxy)?)
        .connect()
        .await?;
    assert_eq!(
        client.info().expect("connected").transport,
        "TLS 1.3 over TCP"
    );
    let (cb, mut wakes) = wake_sink();
    let ch = client
        .channel("c")
        .on_wake(cb)
        .register()
        .await
        .expect("register")
        .into_string();
    let r = relay
        .publish_to(&ch, b"through the proxy")
        .await
        .expect("publish");
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    assert_eq!(recv(&mut wakes).await.expect("wake").event_id, r.event_id);
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn through_tinyproxy_with_basic_credentials() -> anyhow::Result<()> {
    if !have("tinyproxy") {
        return Ok(());
    }
    let relay = TestRelay::start().await?;
    let proxy = tinyproxy("dev", "s3cret").await?;
    let p = proxy.port;
    wake_through(&relay, "a", &format!("http://dev:s3cret@127.0.0.1:{p}")).await?;
    for wrong in [
        format!("http://dev:wrong@127.0.0.1:{p}"),
        format!("http://127.0.0.1:{p}"),
    ] {
        let e = wake_through(&relay, "b", &wrong)
            .await
            .expect_err("refused");
        assert!(matches!(e, ConnectError::ProxyAuth(_)), "{wrong}: {e:?}");
        assert!(!e.is_retryable());
        assert!(!e.to_string().contains("wrong"), "the password is in {e}");
    }
    drop(proxy);
    let down = wake_through(&relay, "c", &format!("http://dev:s3cret@127.0.0.1:{p}"))
        .await
        .expect_err("proxy down");
    assert!(matches!(down, ConnectError::Proxy(_)), "{down:?}");
    assert!(down.is_retryable());
    Ok(())
}

#[tokio::test]
async fn through_microsocks_with_username_and_password() -> anyhow::Result<()> {
    if !have("microsocks") {
        return Ok(());
    }
    let relay = TestRelay::start().await?;
    let proxy = microsocks("dev", "s3cret").await?;
    let p = proxy.port;
    wake_through(&relay, "a", &format!("socks5://dev:s3cret@127.0.0.1:{p}")).await?;
    for wrong in [
        format!("socks5://dev:wrong@127.0.0.1:{p}"),
        format!("socks5://127.0.0.1:{p}"),
    ] {
        let e = wake_through(&relay, "b", &wrong)
            .await
            .expect_err("refused");
        assert!(matches!(e, ConnectError::ProxyAuth(_)), "{wrong}: {e:?}");
        assert!(!e.is_retryable());
    }
    Ok(())
}

#[tokio::test]
async fn a_proxy_is_taken_from_the_environment_and_no_proxy_bypasses_it() -> anyhow::Result<()> {
    let relay = TestRelay::start().await?;
    let tcp = relay.relay().tcp_addr().expect("TCP on").port();
    // A proxy that does not exist: only NO_PROXY lets this connect.
    let env = |no_proxy: &str| {
        vec![
            ("HTTPS_PROXY".to_string(), "http://127.0.0.1:9".to_string()),
            ("NO_PROXY".to_string(), no_proxy.to_string()),
        ]
    };
    let proxied = relay
        .client("d")
        .tcp_port(tcp)
        .transport(Transport::Tcp)
        .proxy(Proxy::from_env(env("other.example"))?.expect("set"))
        .connect()
        .await
        .expect_err("through a dead proxy");
    assert!(matches!(proxied, ConnectError::Proxy(_)), "{proxied:?}");
    let direct = relay
        .client("d")
        .tcp_port(tcp)
        .transport(Transport::Tcp)
        .proxy(Proxy::from_env(env("localhost,127.0.0.1"))?.expect("set"))
        .connect()
        .await?;
    assert_eq!(
        direct.info().expect("connected").transport,
        "TLS 1.3 over TCP"
    );
    direct.close().await;
    Ok(())
}
