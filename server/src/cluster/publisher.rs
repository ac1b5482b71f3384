//! Publish in cluster mode: the same checks as a single node (done by the
//! caller), then JetStream instead of the embedded store.
//!
//! - ttl 0 (deliver now or never): asked of the relay holding the device,
//!   never stored; a keyed one reserves its id in the status stream first.
//! - stored: written to the events stream and answered once JetStream
//!   acknowledged the replicated write; if a relay holds the device, the
//!   answer waits (up to `ack_wait`) for the delivery receipt its relay
//!   writes when the device acks.

use std::sync::Arc;

use tokio_stream::StreamExt;
use tracing::debug;
use wakewire_api::pb::{DeliveryStatus, PublishResponse};

use super::{Cluster, StoredIn};
use crate::metrics as m;
use crate::pb::{StoredEvent, StoredIdempotency};
use crate::publish::{duplicate_answer, PublishError, PublisherService};
use crate::registry::ChannelEntry;
use crate::state::clock;
use crate::store::{Duplicate, FinishReason, IdempotencyKey};

impl PublisherService {
    /// Cluster mode: a channel this relay has not seen yet (registered a
    /// moment ago through another relay): asks the bucket. Single node:
    /// `None`.
    pub(crate) async fn channel_elsewhere(
        &self,
        channel_id: &str,
    ) -> Result<Option<ChannelEntry>, PublishError> {
        let Some(cluster) = &self.shared.cluster else {
            return Ok(None);
        };
        let Some(record) = cluster
            .channel(channel_id)
            .await
            .map_err(PublishError::ClusterRead)?
        else {
            return Ok(None);
        };
        let device: Arc<str> = record.device_id.as_str().into();
        if record.gone_reason.is_empty() {
            self.shared.registry.register_channel(
                channel_id,
                &device,
                &record.name,
                record.last_used_ms,
            );
            Ok(self.shared.registry.channel(channel_id))
        } else {
            self.shared.registry.channel_gone(
                channel_id,
                &device,
                &record.gone_reason,
                record.gone_at_ms,
            );
            Ok(None)
        }
    }

    /// Publishes a checked event (`event` without id and time) for
    /// `device_id` through the cluster.
    pub(crate) async fn publish_in_cluster(
        &self,
        cluster: &Arc<Cluster>,
        device_id: &str,
        mut event: StoredEvent,
        idempotency: Option<IdempotencyKey>,
    ) -> Result<PublishResponse, PublishError> {
        let now_ms = clock::unix_ms();
        let devkey = cluster.names.devkey(device_id);
        event.created_at_ms = now_ms;
        event.event_id = match &idempotency {
            Some(k) => cluster.names.keyed_event_id(&k.scoped_key, &devkey),
            None => cluster.names.event_id(now_ms, &devkey, random6()),
        };
        if let Some(k) = &idempotency {
            event.request_hash = k.request_hash.clone();
        }
        tracing::Span::current().record("event", event.event_id.as_str());
        let ack_wait = self.shared.config.ack_wait;
        if event.ttl_s == 0 {
            return self
                .publish_now_or_never(cluster, device_id, event, idempotency.is_some())
                .await;
        }
        // Subscribed before the write, so a fast delivery is not missed.
        let mut receipt = cluster
            .await_receipt(&event.event_id)
            .await
            .map_err(PublishError::ClusterNotStored)?;
        let msg_id = idempotency
            .as_ref()
            .map(|k| cluster.names.message_id(&k.scoped_key));
        let (stored, present) = tokio::join!(
            cluster.enqueue(&event, device_id, msg_id),
            cluster.present(device_id)
        );
        let (stored, displaced) = stored.map_err(PublishError::ClusterNotStored)?;
        // Before answering: a GetEvent that follows sees why they ended.
        cluster.finish_displaced(displaced, now_ms).await;
        match stored {
            StoredIn::Duplicate(first) => {
                let key = idempotency.as_ref().map(|k| k.request_hash.as_slice());
                return duplicate_answer(duplicate_of(first.map(|b| *b), &event.event_id, key));
            }
            StoredIn::Stream(seq) => debug!(seq, "stored in the cluster"),
        }
        let status = if present {
            match tokio::time::timeout(ack_wait, receipt.next()).await {
                Ok(Some(m))
                    if <StoredEvent as prost::Message>::decode(m.payload.as_ref())
                        .is_ok_and(|r| r.state == delivered_state()) =>
                {
                    DeliveryStatus::Delivered
                }
                _ => DeliveryStatus::Queued,
            }
        } else {
            DeliveryStatus::Queued
        };
        if status == DeliveryStatus::Queued {
            metrics::counter!(m::QUEUED).increment(1);
        }
        Ok(PublishResponse {
            event_id: event.event_id,
            status: status as i32,
            duplicate: false,
        })
    }

    async fn publish_now_or_never(
        &self,
        cluster: &Arc<Cluster>,
        device_id: &str,
        event: StoredEvent,
        keyed: bool,
    ) -> Result<PublishResponse, PublishError> {
        if keyed {
            // The status record is the reservation: a second publish with
            // the key finds it and answers with the first one's result.
            let record = StoredEvent {
                payload: Vec::new(),
                ..event.clone()
            };
            if let Some(first) = cluster
                .reserve(&record)
                .await
                .map_err(PublishError::ClusterNotStored)?
            {
                return duplicate_answer(duplicate_of(
                    Some(first),
                    &event.event_id,
                    Some(&event.request_hash),
                ));
            }
        }
        let outcome = cluster
            .deliver_now(device_id, event.clone(), self.shared.config.ack_wait)
            .await
            .map_err(PublishError::ClusterNotStored)?;
        let status = match outcome {
            super::LiveOutcome::Delivered => DeliveryStatus::Delivered,
            super::LiveOutcome::NotSent => DeliveryStatus::NotConnected,
            super::LiveOutcome::SentUnacked => DeliveryStatus::SentUnacked,
        };
        if keyed {
            let record = StoredEvent {
                payload: Vec::new(),
                first_answer: status as i32,
                ..event.clone()
            };
            if let Err(e) = cluster.settle(&record).await {
                debug!(error = %e, "idempotency answer not recorded");
            }
        }
        Ok(PublishResponse {
            event_id: event.event_id,
            status: status as i32,
            duplicate: false,
        })
    }
}

/// The state of `DELIVERED` in records.
fn delivered_state() -> i32 {
    FinishReason::Delivered.state_and_reason().0 as i32
}

/// What a retried keyed publish answers, from the first event's record.
fn duplicate_of(
    first: Option<StoredEvent>,
    event_id: &str,
    request_hash: Option<&[u8]>,
) -> Duplicate {
    let Some(first) = first else {
        return Duplicate::Forgotten(event_id.to_owned());
    };
    if let Some(h) = request_hash {
        if !first.request_hash.is_empty() && first.request_hash != h {
            return Duplicate::Mismatch;
        }
    }
    if first.ttl_s == 0 {
        return Duplicate::NotStored(StoredIdempotency {
            event_id: first.event_id,
            request_hash: first.request_hash,
            created_at_ms: first.created_at_ms,
            status: first.first_answer,
            stored: false,
        });
    }
    Duplicate::Stored(first)
}

fn random6() -> [u8; 6] {
    let mut b = [0u8; 6];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        b.copy_from_slice(&clock::unix_ms().to_le_bytes()[..6]);
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_is_answered_from_the_first_record_or_refused_if_it_differs() {
        let first = StoredEvent {
            event_id: "e".into(),
            ttl_s: 60,
            request_hash: vec![1, 2],
            state: delivered_state(),
            ..Default::default()
        };
        assert!(matches!(
            duplicate_of(Some(first.clone()), "e", Some(&[1, 2])),
            Duplicate::Stored(ev) if ev.event_id == "e"
        ));
        assert!(matches!(
            duplicate_of(Some(first.clone()), "e", Some(&[9])),
            Duplicate::Mismatch
        ));
        assert!(matches!(
            duplicate_of(None, "e", Some(&[1])),
            Duplicate::Forgotten(id) if id == "e"
        ));
        let now_or_never = StoredEvent {
            ttl_s: 0,
            first_answer: DeliveryStatus::NotConnected as i32,
            ..first
        };
        assert!(matches!(
            duplicate_of(Some(now_or_never), "e", Some(&[1, 2])),
            Duplicate::NotStored(r) if r.status == DeliveryStatus::NotConnected as i32
        ));
    }
}
