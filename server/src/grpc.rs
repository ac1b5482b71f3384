//! The publisher front door: the gRPC server (publisher service,
//! reflection, health) on an already-bound TCP listener.
//!
//! The accept loop is our own: every accepted socket gets TCP_NODELAY (a
//! receipt or answer is one small write that Nagle's algorithm would hold
//! for the peer's delayed ack, ~40 ms), and an accept error (the file
//! descriptor limit, say) is logged and retried instead of ending the
//! server.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::warn;
use wakewire_api::pb::publisher_server::PublisherServer;

use crate::publish::PublisherService;
use crate::state::Shared;

/// Pause after a failed accept (EMFILE, ENFILE, ENOBUFS...).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Builds the services; the future serves until `stop` turns true.
pub(crate) async fn server(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<impl std::future::Future<Output = ()>, String> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(wakewire_api::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| e.to_string())?;
    let (mut health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<PublisherServer<PublisherService>>()
        .await;
    let publisher = PublisherServer::new(PublisherService::new(shared));
    let incoming = accept(listener, stop.clone());
    Ok(async move {
        let result = tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(reflection)
            .add_service(publisher)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            warn!(error = %e, "gRPC server stopped with an error");
        }
    })
}

/// Accepted sockets as a stream, with TCP_NODELAY; accept errors are
/// retried, never passed on (tonic would stop serving).
fn accept(
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) -> ReceiverStream<Result<TcpStream, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut failures = 0u64;
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    failures = 0;
                    let _ = stream.set_nodelay(true);
                    if tx.send(Ok(stream)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    failures += 1;
                    metrics::counter!(crate::metrics::ACCEPT_ERRORS).increment(1);
                    if failures.is_power_of_two() {
                        warn!(error = %e, failures, "gRPC accept failed; retrying");
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    });
    ReceiverStream::new(rx)
}
