//! A bound on handshakes in flight, shared by the clients of one process.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most `n` connection attempts (QUIC or TCP handshakes with their
/// session setup) in flight across every client given a clone of it.
///
/// For a process that hosts many device identities on one host (a gateway
/// bridging sensors, a fleet simulator): after a relay restart, every client
/// reconnects at once, and without a bound the host starts more handshakes
/// than its CPU can finish within the connect timeout. Then its sockets
/// overflow, established connections miss their keepalive replies, and the
/// attempts that time out are retried: a congestion collapse on the
/// client's side. With a bound, a client waits for its turn before it
/// starts; the wait does not count against its connect timeout, and it
/// still answers commands (a close) while it waits.
///
/// A single app with one client never needs this.
#[derive(Debug, Clone)]
pub struct HandshakeLimit(Arc<Semaphore>);

impl HandshakeLimit {
    /// A limit of `n` attempts in flight (at least 1).
    pub fn new(n: usize) -> Self {
        Self(Arc::new(Semaphore::new(n.clamp(1, Semaphore::MAX_PERMITS))))
    }

    /// Waits for a turn; the attempt holds it until dropped.
    pub(crate) async fn turn(&self) -> Turn {
        // The semaphore is never closed, so acquiring cannot fail; if it
        // ever did, the attempt goes ahead unbounded rather than never.
        Turn(self.0.clone().acquire_owned().await.ok())
    }

    /// Attempts that may start now.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }
}

/// One attempt's place under a [`HandshakeLimit`]; given back on drop.
#[derive(Debug)]
pub(crate) struct Turn(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

/// Waits for a turn under `limit`, or at once without one.
pub(crate) async fn turn(limit: Option<&HandshakeLimit>) -> Option<Turn> {
    match limit {
        Some(l) => Some(l.turn().await),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn turns_are_bounded_and_given_back_on_drop() {
        let limit = HandshakeLimit::new(2);
        let a = turn(Some(&limit)).await;
        let b = turn(Some(&limit)).await;
        assert_eq!(limit.available(), 0);
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { turn(Some(&limit)).await.is_some() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "a third attempt waits for a turn");
        drop(a);
        assert!(waiting.await.unwrap());
        drop(b);
        assert_eq!(limit.available(), 2);
        assert!(turn(None).await.is_none(), "no limit: no waiting");
        assert_eq!(HandshakeLimit::new(0).available(), 1, "at least one");
    }
}
