//! Fuzz harnesses: everything a peer can send, fed to the code that reads
//! it. Each harness must return without panicking whatever the input; that
//! is the property. They are shared by the cargo-fuzz targets in `fuzz/`
//! (libFuzzer, nightly toolchain) and by the property tests below, which
//! run on stable in CI over the seed corpus in `fuzz/corpus/` plus random
//! cases (proptest; a failing case is saved in `proptest-regressions/`).

use std::time::{Duration, Instant};

use crate::codec::FrameDecoder;
use crate::device_connection::DeviceConnection;
use crate::device_session::DeviceSessionConfig;
use crate::pb::device::{frame::Body, Hello, Priority, Wake, Welcome};
use crate::probe::Probe;
use crate::relay_connection::{ConnectionEvent, RelayConnection, RelayConnectionConfig};
use crate::token::{Signer, TokenKind, Verifier};
use crate::MAX_FRAME_SIZE;

/// Splits `data` into chunks at the sizes its first bytes give, so that
/// one input also explores how a stream is cut.
fn chunks(data: &[u8]) -> Vec<&[u8]> {
    let (sizes, rest) = data.split_at(data.len().min(4));
    let mut out = vec![];
    let mut rest = rest;
    let mut i = 0;
    while !rest.is_empty() {
        let n = (usize::from(sizes.get(i % sizes.len().max(1)).copied().unwrap_or(0)) % 64 + 1)
            .min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
        i += 1;
    }
    out
}

/// The frame codec: decodes a byte stream, cut anywhere.
pub fn frame_decoder(data: &[u8]) {
    let mut d = FrameDecoder::new(MAX_FRAME_SIZE);
    for c in chunks(data) {
        d.extend(c);
        while let Ok(Some(_)) = d.next_frame() {}
    }
}

/// The token parser and verifier, with a key that signed nothing of it.
pub fn token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let v = Verifier::new(vec![vec![7u8; 32]]);
    for kind in [TokenKind::Device, TokenKind::Publisher] {
        let _ = v.verify(&text, kind, 0);
        let _ = v.verify(&format!("ww1.{text}"), kind, 0);
    }
}

/// The probe packet parsers.
pub fn probe(data: &[u8]) {
    if let Some(p) = Probe::parse_request(data) {
        assert_eq!(Probe::parse_request(&p.request()), Some(p));
    }
    let _ = Probe::parse_reply(data);
}

/// The relay's connection: arbitrary bytes after a valid, accepted Hello.
pub fn relay_connection(data: &[u8]) {
    let now = origin();
    let mut c = RelayConnection::new(now, 1_700_000_000_000, RelayConnectionConfig::default());
    let hello = frame(Body::Hello(Hello {
        protocol_version: crate::PROTOCOL_VERSION,
        credential: "t".into(),
        sdk: String::new(),
    }));
    c.handle_data(now, &hello);
    while let Some(e) = c.poll_event() {
        if let ConnectionEvent::Hello { .. } = e {
            c.accept(now, "dev".into(), "s".into());
        }
    }
    let mut t = now;
    for chunk in chunks(data) {
        t += Duration::from_millis(u64::from(chunk[0]));
        c.handle_data(t, chunk);
        while let Some(e) = c.poll_event() {
            if let ConnectionEvent::Register { request_id, names } = e {
                let b = names
                    .iter()
                    .map(|n| (n.clone(), format!("{n}-id")))
                    .collect();
                c.registered(t, request_id, b);
                let ids: Vec<String> = names.iter().map(|n| format!("{n}-id")).collect();
                let wakes = ids.iter().map(|id| wake(id, t)).collect();
                c.handle_queued(t, &ids, wakes);
            }
        }
        let _ = c.poll_transmit();
        c.handle_timeout(t);
        let _ = c.poll_timeout();
    }
    let _ = c.drain_undelivered();
    while c.poll_event().is_some() {}
}

/// The device's connection: arbitrary bytes after a valid Welcome.
pub fn device_connection(data: &[u8]) {
    let now = origin();
    let mut d = DeviceConnection::new(8, vec![]);
    d.connect(now, DeviceSessionConfig::new("t"));
    let _ = d.register(now, "mail".into());
    d.handle_data(
        now,
        &frame(Body::Welcome(Welcome {
            session_id: "s".into(),
            limits: None,
            server_time_ms: 1,
            device_id: "dev".into(),
        })),
    );
    let mut t = now;
    for chunk in chunks(data) {
        t += Duration::from_millis(u64::from(chunk[0]) * 100);
        d.handle_data(t, chunk);
        while let Some(e) = d.poll_event() {
            if let crate::device_connection::DeviceConnectionEvent::Wake { wake, .. } = e {
                d.handled(t, &wake.event_id);
            }
        }
        let _ = d.poll_transmit();
        d.handle_timeout(t);
    }
}

fn frame(body: Body) -> Vec<u8> {
    crate::codec::encode_to_bytes(body, MAX_FRAME_SIZE)
        .map(|b| b.to_vec())
        .unwrap_or_default()
}

fn wake(channel: &str, _t: Instant) -> Wake {
    Wake {
        event_id: format!("{channel}-queued"),
        channel_id: channel.into(),
        payload: vec![1],
        priority: Priority::Normal as i32,
        created_at_ms: 1_700_000_000_000,
        ttl_s: 60,
    }
}

/// A fixed origin for the simulated clock (the harnesses must be
/// deterministic; the value itself does not matter).
#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    Instant::now()
}

/// A token the verifier of [`token`] refuses, for seeds.
pub fn sample_token() -> String {
    Signer::from_pkcs8(&Signer::generate_pkcs8().unwrap_or_default())
        .map(|s| {
            s.mint(&crate::token::Claims {
                typ: TokenKind::Device,
                sub: Some("d".into()),
                iat: 0,
                exp: 10,
                channels: vec![],
                devices: vec![],
                jti: None,
                kid: None,
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The seed corpus of one target (fuzz/corpus/<target>/*).
    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .map(|it| {
                it.flatten()
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    #[test]
    fn the_seed_corpus_passes_every_harness() {
        type Harness = (&'static str, fn(&[u8]));
        let targets: [Harness; 5] = [
            ("frame_decoder", frame_decoder),
            ("token", token),
            ("probe", probe),
            ("relay_connection", relay_connection),
            ("device_connection", device_connection),
        ];
        for (name, f) in targets {
            let seeds = corpus(name);
            assert!(!seeds.is_empty(), "no seeds for {name}");
            for s in seeds {
                f(&s);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn frames_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            frame_decoder(&data);
        }

        #[test]
        fn tokens_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            token(&data);
        }

        #[test]
        fn probes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            probe(&data);
        }

        #[test]
        fn relay_connections_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            relay_connection(&data);
        }

        #[test]
        fn device_connections_never_panic(data in proptest::collection::vec(any::<u8>(), 0..4096)) {
            device_connection(&data);
        }

        /// Valid frames, not just noise: any sequence of real frames a
        /// device could send, cut anywhere.
        #[test]
        fn relay_connections_take_any_frame_sequence(
            frames in proptest::collection::vec((0u8..6, any::<u64>(), "[a-z]{0,70}"), 0..40),
            cut in any::<u32>(),
        ) {
            use crate::pb::device::{Ack, Ping, Register, Unregister};
            let mut bytes = cut.to_le_bytes().to_vec();
            for (kind, n, s) in frames {
                let body = match kind {
                    0 => Body::Register(Register { request_id: n % 4, names: vec![s.clone(), s] }),
                    1 => Body::Unregister(Unregister { channel_ids: vec![format!("{s}-id")] }),
                    2 => Body::Ack(Ack { event_id: format!("{s}-id-queued") }),
                    3 => Body::Ping(Ping { nonce: n, canary_after_ms: n % 3 * 1000 }),
                    4 => Body::Hello(Hello { protocol_version: 1, credential: s, sdk: String::new() }),
                    _ => Body::Ack(Ack { event_id: s }),
                };
                bytes.extend(frame(body));
            }
            relay_connection(&bytes);
        }
    }
}

#[cfg(test)]
mod corpus {
    use super::*;
    use crate::pb::device::{
        Ack, ChannelBinding, GoAway, Ping, Pong, Register, Registered, Unregister,
    };

    /// Writes the seed corpus (`cargo test -p wakewire-proto -- --ignored
    /// write_seed_corpus`); the files are committed.
    #[test]
    #[ignore]
    fn write_seed_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let put = |target: &str, name: &str, bytes: Vec<u8>| {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(name), bytes).unwrap();
        };
        let relay_frames = [
            Body::Register(Register {
                request_id: 1,
                names: vec!["mail".into(), "chat".into()],
            }),
            Body::Ack(Ack {
                event_id: "mail-id-queued".into(),
            }),
            Body::Ping(Ping {
                nonce: 9,
                canary_after_ms: 0,
            }),
            Body::Unregister(Unregister {
                channel_ids: vec!["chat-id".into()],
            }),
            Body::Ack(Ack {
                event_id: "unknown".into(),
            }),
        ];
        let mut stream = vec![8, 3, 200, 1];
        for f in relay_frames {
            stream.extend(frame(f));
        }
        put("relay_connection", "session", stream.clone());
        put("frame_decoder", "session", stream);
        put("frame_decoder", "oversize", vec![0xff, 0xff, 0xff, 0x7f, 0]);
        let device_frames = [
            Body::Registered(Registered {
                request_id: 1,
                channels: vec![ChannelBinding {
                    name: "mail".into(),
                    channel_id: "mail-id".into(),
                }],
                error_code: 0,
                error_message: String::new(),
            }),
            Body::Wake(wake("mail-id", origin())),
            Body::Wake(wake("mail-id", origin())),
            Body::Pong(Pong {
                nonce: 1,
                observed_addr: "203.0.113.1:5".into(),
                server_time_ms: 2,
            }),
            Body::GoAway(GoAway {
                reason: 1,
                reconnect_after_ms: 10,
                message: "bye".into(),
                alternatives: vec!["relay-2.example:4433".into()],
            }),
        ];
        let mut stream = vec![16, 1, 7, 64];
        for f in device_frames {
            stream.extend(frame(f));
        }
        put("device_connection", "session", stream);
        put("token", "valid_format", sample_token().into_bytes());
        put("token", "garbage", b"ww1.e30.AAAA".to_vec());
        let p = Probe {
            nonce: 1,
            delay_ms: 1000,
            cookie: [3; crate::probe::COOKIE_LEN],
        };
        put("probe", "request", p.request().to_vec());
        put("probe", "reply", p.reply().to_vec());
    }
}
