//! Who a device is: the decision from its token (in Hello) and its client
//! certificate (from the TLS handshake) under the relay's `device_auth`
//! mode. Pure: the driver verifies the token and reads the certificate,
//! this decides.

use crate::config::DeviceAuth;
use crate::tls::CertIdentity;

/// A verified token: its device id and token id.
pub(crate) type TokenIdentity = (String, Option<String>);

/// The authenticated device (and the token id, to watch for revocation),
/// or why the device is refused.
pub(crate) fn decide(
    mode: DeviceAuth,
    token: Option<Result<TokenIdentity, String>>,
    cert: CertIdentity,
) -> Result<TokenIdentity, String> {
    let cert_device = match &cert {
        CertIdentity::Device(d) => Some(d.clone()),
        CertIdentity::None => None,
        CertIdentity::Unusable(why) => return Err(why.clone()),
    };
    match (mode, token, cert_device) {
        (DeviceAuth::Token, Some(t), _) => t,
        (DeviceAuth::Token, None, _) => Err("no device token in Hello".into()),
        (DeviceAuth::Certificate, _, Some(d)) => Ok((d, None)),
        (DeviceAuth::Certificate, _, None) => {
            Err("a client certificate is required (device_auth = certificate)".into())
        }
        (DeviceAuth::Either, None, Some(d)) => Ok((d, None)),
        (DeviceAuth::Either, Some(t), None) => t,
        (DeviceAuth::Either | DeviceAuth::Both, Some(t), Some(d)) => {
            let (tok_device, jti) = t?;
            if tok_device != d {
                return Err(format!(
                    "the token names device {tok_device:?} but the client certificate names {d:?}"
                ));
            }
            Ok((d, jti))
        }
        (DeviceAuth::Either, None, None) => {
            Err("neither a device token nor a client certificate".into())
        }
        (DeviceAuth::Both, _, None) => {
            Err("a client certificate is required (device_auth = both)".into())
        }
        (DeviceAuth::Both, None, Some(_)) => {
            Err("a device token is required too (device_auth = both)".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok(d: &str) -> Option<Result<TokenIdentity, String>> {
        Some(Ok((d.into(), Some("j".into()))))
    }

    fn cert(d: &str) -> CertIdentity {
        CertIdentity::Device(d.into())
    }

    #[test]
    fn every_mode_decides_as_documented() {
        use DeviceAuth::*;
        assert_eq!(
            decide(Token, tok("a"), CertIdentity::None),
            Ok(("a".into(), Some("j".into())))
        );
        // In token mode a certificate is not needed, and not trusted alone.
        assert!(decide(Token, None, cert("a")).is_err());
        assert_eq!(decide(Certificate, None, cert("a")), Ok(("a".into(), None)));
        assert!(decide(Certificate, tok("a"), CertIdentity::None).is_err());
        assert_eq!(decide(Either, None, cert("a")), Ok(("a".into(), None)));
        assert!(decide(Either, tok("a"), CertIdentity::None).is_ok());
        assert!(decide(Either, tok("a"), cert("b")).is_err(), "disagreeing");
        assert!(decide(Both, tok("a"), CertIdentity::None).is_err());
        assert!(decide(Both, None, cert("a")).is_err());
        assert_eq!(
            decide(Both, tok("a"), cert("a")),
            Ok(("a".into(), Some("j".into())))
        );
        assert!(decide(Both, tok("a"), cert("b")).is_err());
        // A bad token is refused even with a good certificate in `both`.
        assert!(decide(Both, Some(Err("expired".into())), cert("a")).is_err());
        assert!(decide(Certificate, None, CertIdentity::Unusable("no SAN".into())).is_err());
    }
}
