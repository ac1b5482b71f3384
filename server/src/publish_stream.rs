//! `PublishStream`: many publishes on one HTTP/2 stream, the cheap path for
//! backends publishing at high rates (a unary Publish costs the relay a
//! whole HTTP/2 stream: headers in, headers, data and trailers out).
//!
//! The stream was authenticated on its headers by the interceptor, and
//! holds one permit of the relay's requests in flight for its life. Each
//! event is then charged to the publisher's rate quota and its credential
//! checked again (expiry, revocation): an expired or revoked credential
//! ends the stream. Each event runs in a task of its own, like a unary
//! Publish, so a caller that goes away cannot stop a publish half-way; its
//! answer goes out with the caller's sequence number, in completion order.
//!
//! At most [`STREAM_WINDOW`] events are in flight per stream: past that the
//! relay stops reading, and HTTP/2 flow control holds the caller. A caller
//! that never reads its answers therefore holds at most that many.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Status, Streaming};
use tracing::{debug, info_span, Instrument};
use wakewire_api::pb::{PublishStreamRequest, PublishStreamResponse};

use crate::auth::Authed;
use crate::publish::{result_of, PublishError, PublisherService};

/// Most events in flight on one stream.
pub const STREAM_WINDOW: usize = 256;

/// The answers of one `PublishStream`.
pub type AnswerStream = Pin<Box<dyn Stream<Item = Result<PublishStreamResponse, Status>> + Send>>;

/// Serves one stream: reads events while the window has room, publishes
/// each in its own task, and sends the answers.
pub(crate) fn serve(
    service: PublisherService,
    authed: Authed,
    mut inbound: Streaming<PublishStreamRequest>,
) -> AnswerStream {
    // As many answers as events in flight: a task never waits to answer.
    let (tx, rx) = mpsc::channel(STREAM_WINDOW);
    tokio::spawn(async move {
        let window = Arc::new(Semaphore::new(STREAM_WINDOW));
        loop {
            let Ok(permit) = window.clone().acquire_owned().await else {
                break;
            };
            let next = tokio::select! {
                m = inbound.message() => m,
                () = tx.closed() => break,
            };
            let req = match next {
                Ok(Some(req)) => req,
                // The caller finished sending: answer what is in flight.
                Ok(None) => break,
                // A malformed message or a reset stream: nothing more to read.
                Err(status) => {
                    debug!(%status, "publish stream ended by its caller");
                    break;
                }
            };
            if let Err(e) = service.still_valid(&authed.claims) {
                let _ = tx.send(Err(Status::from(e))).await;
                break;
            }
            let seq = req.seq;
            // A request without an event is refused before the quota is
            // charged: it publishes nothing.
            let Some(event) = req.event else {
                let e =
                    PublishError::InvalidArgument("a PublishStreamRequest needs an event".into());
                let _ = tx.send(Ok(answer(seq, Err(e)))).await;
                continue;
            };
            if let Err(e) = service.charge(&authed.claims, 1) {
                let _ = tx.send(Ok(answer(seq, Err(e)))).await;
                continue;
            }
            let span = info_span!("publish", seq, event = tracing::field::Empty);
            let (this, claims, tx) = (service.clone(), authed.claims.clone(), tx.clone());
            tokio::spawn(
                async move {
                    let r = this.publish_counted(claims, event).await;
                    let _ = tx.send(Ok(answer(seq, r))).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        // The stream's in-flight permit is held until every event started
        // here has been answered.
        let _ = window.acquire_many(STREAM_WINDOW as u32).await;
        drop(authed);
    });
    Box::pin(ReceiverStream::new(rx))
}

fn answer(
    seq: u64,
    r: Result<wakewire_api::pb::PublishResponse, PublishError>,
) -> PublishStreamResponse {
    PublishStreamResponse {
        seq,
        result: Some(result_of(r)),
    }
}
