//! The publisher front door: the gRPC server (publisher service behind the
//! authentication interceptor, reflection, health) on an already-bound TCP
//! listener, with a limit on everything a client can hold:
//!
//! - connections: at most `max_connections`; more are closed at accept;
//! - idle: a connection that sends nothing for `idle_timeout` is closed
//!   (the relay pings every quarter of it and live HTTP/2 clients answer,
//!   so only dead or silent ones are);
//! - streams: `max_streams_per_connection` HTTP/2 streams, as many
//!   requests handled at once per connection, `max_in_flight` over all;
//! - time: every request has a deadline (`request_timeout`);
//! - size: a request message is at most [`MAX_MESSAGE_BYTES`], and an
//!   unauthenticated request is refused on its headers, before its body is
//!   read.
//!
//! TLS (`grpc_tls_*`) is done here too, with the certificate renewable at
//! run time; without it the relay refuses to listen beyond loopback.
//!
//! The accept loop is our own: every accepted socket gets TCP_NODELAY (a
//! receipt or answer is one small write that Nagle's algorithm would hold
//! for the peer's delayed ack, ~40 ms), and an accept error (the file
//! descriptor limit, say) is logged and retried with backoff instead of
//! ending the server.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;
use wakewire_api::pb::publisher_server::PublisherServer;

use crate::auth::Authenticator;
use crate::config::GrpcLimits;
use crate::publish::PublisherService;
use crate::state::{clock, Shared};

/// The largest request message: a full PublishBatch (1000 events with
/// 4096-byte payloads, channel ids and keys at their maximum) and some
/// framing; anything larger is OUT_OF_RANGE.
pub const MAX_MESSAGE_BYTES: usize = 4_700_000;
/// First pause after a failed accept (EMFILE, ENFILE, ENOBUFS...).
const ACCEPT_RETRY: Duration = Duration::from_millis(10);
/// Longest pause between accept retries.
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(1);
/// Longest a TLS handshake on the publisher port may take.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// Longest interval of the server's HTTP/2 keepalive pings (they are sent
/// at a quarter of the idle timeout, so a live client's answers keep its
/// connection from looking idle while it waits for a long answer or a
/// receipt stream).
const KEEPALIVE_MAX: Duration = Duration::from_secs(30);

/// The health service's handle: reports SERVING, then NOT_SERVING while
/// the relay drains (readiness probes see it before devices are told to
/// leave).
#[derive(Clone)]
pub(crate) struct Health {
    reporter: tonic_health::server::HealthReporter,
    /// Draining: NOT_SERVING for good.
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// Cluster mode: NATS reachable (always true on a single node).
    backend_ok: Arc<std::sync::atomic::AtomicBool>,
}

impl Health {
    fn new(reporter: tonic_health::server::HealthReporter) -> Self {
        Self {
            reporter,
            draining: Arc::default(),
            backend_ok: Arc::new(std::sync::atomic::AtomicBool::new(true)),
        }
    }

    /// The relay is draining: NOT_SERVING from now on.
    pub(crate) async fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.publish().await;
    }

    /// Whether the relay's backend (the cluster's NATS) is usable.
    pub(crate) async fn set_backend(&self, ok: bool) {
        let was = self
            .backend_ok
            .swap(ok, std::sync::atomic::Ordering::SeqCst);
        if was != ok {
            self.publish().await;
        }
    }

    async fn publish(&self) {
        let serving = !self.draining.load(std::sync::atomic::Ordering::SeqCst)
            && self.backend_ok.load(std::sync::atomic::Ordering::SeqCst);
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.reporter
            .set_service_status(
                <PublisherServer<PublisherService> as tonic::server::NamedService>::NAME,
                status,
            )
            .await;
        self.reporter.set_service_status("", status).await;
    }
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health").finish_non_exhaustive()
    }
}

/// Builds the services; the future serves until `stop` turns true.
pub(crate) async fn server(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<(impl std::future::Future<Output = ()>, Health), String> {
    let limits = shared.config.grpc.clone();
    // Reflection in both versions: grpcio's reflection client, Postman and
    // older grpcurl speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(wakewire_api::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(|e| e.to_string())?;
    let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| e.to_string())?;
    let (health, health_service) = tonic_health::server::health_reporter();
    let health = Health::new(health);
    health.publish().await;
    let auth = Authenticator::new(shared.clone());
    let publisher = PublisherServer::new(PublisherService::new(shared))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    let intercept = move |req| auth.intercept(req);
    let publisher = tonic::service::interceptor::InterceptedService::new(publisher, intercept);
    let incoming = accept(listener, tls, limits.clone(), stop.clone());
    let keepalive = (limits.idle_timeout / 4).min(KEEPALIVE_MAX);
    let serve = async move {
        let result = tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_streams_per_connection)
            .concurrency_limit_per_connection(limits.max_streams_per_connection as usize)
            .timeout(limits.request_timeout)
            .http2_keepalive_interval(Some(keepalive))
            .http2_keepalive_timeout(Some(keepalive))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(publisher)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            warn!(error = %e, "gRPC server stopped with an error");
        }
    };
    Ok((serve, health))
}

/// The plaintext health-only endpoint (`health_listen`): the same statuses
/// as the publisher port's health service, nothing else.
pub(crate) async fn health_server(
    listener: TcpListener,
    health: Health,
    mut stop: watch::Receiver<bool>,
) {
    let service = tonic_health::pb::health_server::HealthServer::new(
        tonic_health::server::HealthService::from_health_reporter(health.reporter.clone()),
    );
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let result = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(5))
        .concurrency_limit_per_connection(4)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = result {
        warn!(error = %e, "health endpoint stopped with an error");
    }
}

/// Accepted sockets as a stream: TCP_NODELAY, a connection permit, an
/// idle deadline, TLS if configured (the handshake bounded in time, off the
/// accept loop). Accept errors are retried, never passed on (tonic would
/// stop serving).
fn accept(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: GrpcLimits,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<GuardedStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    tokio::spawn(async move {
        let mut failures = 0u32;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    failures = 0;
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        // Over the cap: closed at once (dropping it), so the
                        // kernel's backlog does not fill instead.
                        metrics::counter!(crate::metrics::THROTTLED, "limit" => "connections")
                            .increment(1);
                        tracing::debug!(%peer, "gRPC connection refused: too many connections");
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let idle = limits.idle_timeout;
                    match &tls {
                        None => {
                            let guarded = GuardedStream::new(Io::Plain(stream), permit, idle);
                            if tx.send(Ok(guarded)).await.is_err() {
                                return;
                            }
                        }
                        Some(acceptor) => {
                            let (acceptor, tx) = (acceptor.clone(), tx.clone());
                            tokio::spawn(async move {
                                let hs =
                                    tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream));
                                match hs.await {
                                    Ok(Ok(s)) => {
                                        let io = Io::Tls(Box::new(s));
                                        let _ =
                                            tx.send(Ok(GuardedStream::new(io, permit, idle))).await;
                                    }
                                    Ok(Err(e)) => {
                                        metrics::counter!(crate::metrics::GRPC_TLS_FAILURES)
                                            .increment(1);
                                        tracing::debug!(%peer, error = %e, "gRPC TLS handshake failed");
                                    }
                                    Err(_) => {
                                        metrics::counter!(crate::metrics::GRPC_TLS_FAILURES)
                                            .increment(1);
                                        tracing::debug!(%peer, "gRPC TLS handshake timed out");
                                    }
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    metrics::counter!(crate::metrics::ACCEPT_ERRORS).increment(1);
                    if failures.is_power_of_two() {
                        warn!(error = %e, failures, "gRPC accept failed; retrying");
                    }
                    let pause = ACCEPT_RETRY
                        .saturating_mul(failures.min(100))
                        .min(ACCEPT_RETRY_MAX);
                    tokio::time::sleep(pause).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A publisher connection's transport.
pub(crate) enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Io {
    fn tcp(&self) -> &TcpStream {
        match self {
            Io::Plain(s) => s,
            Io::Tls(s) => s.get_ref().0,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Io::Plain($s) => $e,
            Io::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// An accepted connection holding its connection permit, closed (read
/// error) when nothing has been read from it for the idle timeout.
pub(crate) struct GuardedStream {
    inner: Io,
    /// Given back as soon as the connection is over (read error, end or
    /// idle), before the socket is even closed.
    permit: Option<OwnedSemaphorePermit>,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl GuardedStream {
    fn new(inner: Io, permit: OwnedSemaphorePermit, idle: Duration) -> Self {
        Self {
            inner,
            permit: Some(permit),
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
        }
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if r.is_ok() && buf.filled().len() > before {
                    let next = tokio::time::Instant::from_std(clock::now() + self.idle);
                    self.deadline.as_mut().reset(next);
                } else {
                    self.permit = None;
                }
                Poll::Ready(r)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.permit = None;
                    Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "idle publisher connection closed",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for GuardedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.tcp().connect_info()
    }
}
