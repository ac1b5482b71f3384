//! Validation of the `cluster_*` settings into a [`ClusterConfig`].

use std::time::Duration;

use super::{ClusterConfig, NatsAuth};
use crate::config::{ConfigError, Settings};

impl Settings {
    /// The cluster settings, checked; `None` for a single node.
    pub(crate) fn cluster_config(&self) -> Result<Option<ClusterConfig>, ConfigError> {
        let invalid = |setting, message: String| ConfigError::Invalid { setting, message };
        let urls: Vec<String> = self
            .cluster_nats_urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect();
        if urls.is_empty() {
            return Ok(None);
        }
        for u in &urls {
            let scheme_ok = ["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|s| u.starts_with(s));
            if !scheme_ok {
                return Err(invalid(
                    "cluster_nats_urls",
                    format!("{u:?} is not a NATS URL like nats://host:4222"),
                ));
            }
        }
        let name = self.cluster_name.trim();
        if name.is_empty()
            || name.len() > 32
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(invalid(
                "cluster_name",
                format!("{name:?} must be 1 to 32 lower-case letters, digits or _"),
            ));
        }
        if !matches!(self.cluster_replicas, 1 | 3 | 5) {
            return Err(invalid("cluster_replicas", "must be 1, 3 or 5".into()));
        }
        if self.cluster_unavailable_after_secs == 0 {
            return Err(invalid(
                "cluster_unavailable_after_secs",
                "must be at least 1".into(),
            ));
        }
        if !(1..=300).contains(&self.cluster_consumer_heartbeat_secs) {
            return Err(invalid(
                "cluster_consumer_heartbeat_secs",
                "must be between 1 and 300".into(),
            ));
        }
        if !(100..=60_000).contains(&self.cluster_request_timeout_ms) {
            return Err(invalid(
                "cluster_request_timeout_ms",
                "must be between 100 and 60000".into(),
            ));
        }
        let auth = match (
            &self.cluster_nats_credentials,
            &self.cluster_nats_user,
            &self.cluster_nats_password,
            &self.cluster_nats_token,
        ) {
            (None, None, None, None) => NatsAuth::None,
            (Some(p), None, None, None) => {
                if !p.is_file() {
                    return Err(invalid(
                        "cluster_nats_credentials",
                        format!("{} is not a readable file", p.display()),
                    ));
                }
                NatsAuth::CredsFile(p.clone())
            }
            (None, Some(u), Some(p), None) => NatsAuth::UserPassword(u.clone(), p.clone()),
            (None, None, None, Some(t)) => NatsAuth::Token(t.clone()),
            (None, Some(_), None, None) | (None, None, Some(_), None) => {
                return Err(invalid(
                    "cluster_nats_user",
                    "cluster_nats_user and cluster_nats_password must be set together".into(),
                ))
            }
            _ => {
                return Err(invalid(
                    "cluster_nats_credentials",
                    "set one of: cluster_nats_credentials, cluster_nats_user/password, cluster_nats_token".into(),
                ))
            }
        };
        for (setting, p) in [
            ("cluster_nats_tls_ca", &self.cluster_nats_tls_ca),
            ("cluster_nats_tls_cert", &self.cluster_nats_tls_cert),
            ("cluster_nats_tls_key", &self.cluster_nats_tls_key),
        ] {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(invalid(
                        setting,
                        format!("{} is not a readable file", p.display()),
                    ));
                }
            }
        }
        let tls_client = match (&self.cluster_nats_tls_cert, &self.cluster_nats_tls_key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => {
                return Err(invalid(
                    "cluster_nats_tls_cert",
                    "cluster_nats_tls_cert and cluster_nats_tls_key must be set together".into(),
                ))
            }
        };
        let advertise = match self.cluster_advertise.trim() {
            "" => None,
            a if a
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Some(a.to_owned())
            }
            a => {
                return Err(invalid(
                    "cluster_advertise",
                    format!("{a:?} is not host:port"),
                ))
            }
        };
        Ok(Some(ClusterConfig {
            nats_urls: urls,
            auth,
            tls_ca: self.cluster_nats_tls_ca.clone(),
            tls_client,
            name: name.to_owned(),
            replicas: self.cluster_replicas,
            unavailable_after: Duration::from_secs(self.cluster_unavailable_after_secs),
            request_timeout: Duration::from_millis(self.cluster_request_timeout_ms),
            advertise,
            consumer_heartbeat: Duration::from_secs(self.cluster_consumer_heartbeat_secs),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(f: impl FnOnce(&mut Settings)) -> Result<Option<ClusterConfig>, ConfigError> {
        let mut s = Settings::default();
        f(&mut s);
        s.cluster_config()
    }

    #[test]
    fn no_urls_is_a_single_node_and_urls_make_a_cluster() {
        assert!(with(|_| {}).unwrap().is_none());
        let c = with(|s| {
            s.cluster_nats_urls = " nats://a:4222, nats://b:4222 ,".into();
            s.cluster_advertise = "relay-1.example:4433".into();
        })
        .unwrap()
        .unwrap();
        assert_eq!(c.nats_urls, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(c.replicas, 3);
        assert_eq!(c.auth, NatsAuth::None);
        assert_eq!(c.advertise.as_deref(), Some("relay-1.example:4433"));
    }

    #[test]
    fn bad_cluster_settings_name_the_setting() {
        type Case = (Box<dyn FnOnce(&mut Settings)>, &'static str);
        let cases: Vec<Case> = vec![
            (
                Box::new(|s| s.cluster_nats_urls = "http://x".into()),
                "cluster_nats_urls",
            ),
            (
                Box::new(|s| {
                    s.cluster_nats_urls = "nats://x:1".into();
                    s.cluster_name = "Has.Dots".into();
                }),
                "cluster_name",
            ),
            (
                Box::new(|s| {
                    s.cluster_nats_urls = "nats://x:1".into();
                    s.cluster_replicas = 2;
                }),
                "cluster_replicas",
            ),
            (
                Box::new(|s| {
                    s.cluster_nats_urls = "nats://x:1".into();
                    s.cluster_nats_user = Some("u".into());
                }),
                "cluster_nats_user",
            ),
            (
                Box::new(|s| {
                    s.cluster_nats_urls = "nats://x:1".into();
                    s.cluster_nats_token = Some("t".into());
                    s.cluster_nats_user = Some("u".into());
                    s.cluster_nats_password = Some("p".into());
                }),
                "cluster_nats_credentials",
            ),
            (
                Box::new(|s| {
                    s.cluster_nats_urls = "nats://x:1".into();
                    s.cluster_nats_tls_ca = Some("/nonexistent.pem".into());
                }),
                "cluster_nats_tls_ca",
            ),
            (
                Box::new(|s| {
                    s.cluster_nats_urls = "nats://x:1".into();
                    s.cluster_advertise = "no-port".into();
                }),
                "cluster_advertise",
            ),
        ];
        for (f, setting) in cases {
            match with(f) {
                Err(ConfigError::Invalid { setting: got, .. }) => assert_eq!(got, setting),
                other => panic!("{setting}: {other:?}"),
            }
        }
    }
}
