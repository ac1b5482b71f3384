//! Device client certificates (mTLS), as ControlChannelTrigger's
//! client-certificate sockets: an rcgen-made CA issues device certificates
//! naming the device with a `wakewire:device:<id>` SAN URI; the relay's
//! `device_auth` mode decides what a device must present.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    SanType,
};
use wakewire_api::pb::DeliveryStatus;
use wakewire_sdk::ConnectError;
use wakewire_server::config::DeviceAuth;
use wakewire_test_support::TestRelay;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn new_ca() -> anyhow::Result<Ca> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key)?;
    Ok(Ca { cert, key })
}

/// A client certificate for `device` (or no SAN if `None`), valid from
/// `days_from` to `days_to` days from now, written as PEM files in `dir`.
fn device_cert(
    ca: &Ca,
    dir: &Path,
    file: &str,
    device: Option<&str>,
    days: (i64, i64),
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    if let Some(d) = device {
        p.subject_alt_names = vec![SanType::URI(format!("wakewire:device:{d}").try_into()?)];
    }
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now + time::Duration::days(days.0);
    p.not_after = now + time::Duration::days(days.1);
    let cert = p.signed_by(&key, &ca.cert, &ca.key)?;
    let (c, k) = (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    );
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

async fn relay_with(mode: DeviceAuth, ca_file: &Path) -> anyhow::Result<TestRelay> {
    let ca_file = ca_file.to_path_buf();
    TestRelay::start_with(move |c| {
        c.device_client_ca = Some(ca_file);
        c.device_auth = mode;
    })
    .await
}

fn certificate_only(relay: &TestRelay, cert: &(PathBuf, PathBuf)) -> wakewire_sdk::ClientBuilder {
    let dev_cert = relay.relay().dev_cert_path().expect("dev").to_path_buf();
    wakewire_sdk::ClientBuilder::new(relay.quic_addr().to_string())
        .server_name("localhost")
        .trust_pem_file(dev_cert)
        .client_certificate(&cert.0, &cert.1)
        .connect_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn a_certificate_alone_authenticates_its_device() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = new_ca()?;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem())?;
    let good = device_cert(&ca, dir.path(), "good", Some("sensor-7"), (-1, 30))?;
    let relay = relay_with(DeviceAuth::Either, &ca_file).await?;
    let client = certificate_only(&relay, &good).connect().await?;
    assert_eq!(client.info().expect("connected").device_id, "sensor-7");
    let ch = client.channel("alarm").register().await?;
    // The channel belongs to the certificate's device.
    let token = relay.publisher_token(&[], &["sensor-7"]);
    let r = relay
        .publisher()
        .await?
        .publish(wakewire_test_support::authed(
            wakewire_api::pb::PublishRequest {
                channel_id: ch.into_string(),
                payload: b"x".to_vec(),
                ..Default::default()
            },
            &token,
        ))
        .await?
        .into_inner();
    assert_eq!(r.status(), DeliveryStatus::Delivered);
    client.close().await;
    // A token still works in `either` mode.
    let c = relay.client("phone").connect().await?;
    c.close().await;
    Ok(())
}

#[tokio::test]
async fn certificates_are_checked_and_modes_enforced() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = new_ca()?;
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem())?;
    let other_ca = new_ca()?;
    let good = device_cert(&ca, dir.path(), "good", Some("dev-a"), (-1, 30))?;
    let expired = device_cert(&ca, dir.path(), "expired", Some("dev-a"), (-30, -1))?;
    let foreign = device_cert(&other_ca, dir.path(), "foreign", Some("dev-a"), (-1, 30))?;
    let nameless = device_cert(&ca, dir.path(), "nameless", None, (-1, 30))?;

    let relay = relay_with(DeviceAuth::Certificate, &ca_file).await?;
    // Expired, or from another CA: the TLS handshake fails, for good.
    for (what, cert) in [("expired", &expired), ("foreign", &foreign)] {
        let e = certificate_only(&relay, cert).connect().await.unwrap_err();
        assert!(!e.is_retryable(), "{what}: {e}");
        assert!(
            matches!(
                e,
                ConnectError::TlsHandshake(_) | ConnectError::TlsCertificateInvalid(_)
            ),
            "{what}: {e}"
        );
    }
    // A valid certificate naming no device: refused with a reason.
    let e = certificate_only(&relay, &nameless)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ConnectError::Unauthorized(m) if m.contains("wakewire:device:")),
        "{e}"
    );
    // Certificate mode: a token alone is not enough.
    let e = relay.client("dev-a").connect().await.unwrap_err();
    assert!(
        matches!(&e, ConnectError::Unauthorized(m) if m.contains("client certificate is required")),
        "{e}"
    );
    let c = certificate_only(&relay, &good).connect().await?;
    c.close().await;

    // Both: the token and the certificate must name the same device.
    let both = relay_with(DeviceAuth::Both, &ca_file).await?;
    let ok = both
        .client("dev-a")
        .client_certificate(&good.0, &good.1)
        .connect()
        .await?;
    ok.close().await;
    let e = both
        .client("dev-b")
        .client_certificate(&good.0, &good.1)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(&e, ConnectError::Unauthorized(m) if m.contains("\"dev-b\"") && m.contains("\"dev-a\"")),
        "{e}"
    );
    Ok(())
}
