//! Wakes as a stream: for apps whose handling takes time. The SDK's task
//! hands each wake over and goes on (keepalives, acks, other channels); the
//! app acks when it is done with [`Wake::ack`]. A wake dropped without an
//! ack is not acked: the relay sends it again on a later connection.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::driver::Command;
use crate::types::WakeEvent;

/// Most wakes waiting in a stream the app does not read; more are left
/// unacked (the relay sends them again later).
pub(crate) const STREAM_BUFFER: usize = 1024;

/// One wake from a [`WakeStream`]; ack it when handled.
#[derive(Debug)]
pub struct Wake {
    event: WakeEvent,
    cmd: Option<mpsc::UnboundedSender<Command>>,
}

impl Wake {
    pub(crate) fn new(event: WakeEvent, cmd: mpsc::UnboundedSender<Command>) -> Self {
        Self {
            event,
            cmd: Some(cmd),
        }
    }

    /// The event.
    pub fn event(&self) -> &WakeEvent {
        &self.event
    }

    /// Acknowledges the event: the relay marks it delivered, and the SDK
    /// will not hand it out again (it is in the dedup window). Returns
    /// false if the client is closed (the ack could not be sent; the event
    /// comes again after a reconnect of a new client, unless deduplicated
    /// by a persisted window).
    pub fn ack(mut self) -> bool {
        match self.cmd.take() {
            Some(cmd) => cmd
                .send(Command::Ack {
                    event_id: self.event.event_id.clone(),
                })
                .is_ok(),
            None => false,
        }
    }
}

impl std::ops::Deref for Wake {
    type Target = WakeEvent;
    fn deref(&self) -> &WakeEvent {
        &self.event
    }
}

impl Drop for Wake {
    fn drop(&mut self) {
        if let Some(cmd) = self.cmd.take() {
            let _ = cmd.send(Command::Abandon {
                event_id: std::mem::take(&mut self.event.event_id),
            });
        }
    }
}

/// The wakes of one channel, in arrival order. Ends when the client is
/// closed or the channel unregistered.
#[derive(Debug)]
pub struct WakeStream {
    rx: mpsc::Receiver<Wake>,
}

impl WakeStream {
    pub(crate) fn new(rx: mpsc::Receiver<Wake>) -> Self {
        Self { rx }
    }

    /// The next wake; `None` once the stream has ended.
    pub async fn next(&mut self) -> Option<Wake> {
        self.rx.recv().await
    }
}

impl tokio_stream::Stream for WakeStream {
    type Item = Wake;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Wake>> {
        self.rx.poll_recv(cx)
    }
}
