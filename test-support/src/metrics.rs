//! Reading a relay's Prometheus endpoint in tests.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The relay's `/metrics` page on 127.0.0.1:`port` (with the HTTP head).
pub async fn scrape(port: u16) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

pub use wakewire_server::metrics::metric_names;
