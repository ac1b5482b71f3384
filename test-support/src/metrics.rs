//! Reading a relay's Prometheus endpoint in tests.

use std::collections::BTreeSet;

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

/// Every `wakewire_relay_*` name a text mentions.
pub fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("wakewire_relay_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}
