//! `Events.Subscribe`: every committed change, in order, optionally replayed from a sequence
//! number.

use std::sync::Arc;

use jsonrpsee::core::{SubscriptionResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use jsonrpsee::server::SubscriptionMessage;
use jsonrpsee::{Extensions, PendingSubscriptionSink};
use serde_json::value::to_raw_value;
use tokio::sync::broadcast::error::RecvError;

use super::api::Api;
use super::conn::Conn;
use super::run::NOTIFICATION_OVERHEAD;
use super::types::{EventInfo, SubscribeArg};

/// Events replayed per store query.
const REPLAY_PAGE: u32 = 1000;
/// How long an event waits for its change to show in the unit (see
/// [`crate::registry::Registry::settled`]).
const SETTLES_IN: std::time::Duration = std::time::Duration::from_secs(2);

/// The `Events` method group.
#[rpc(server, client, namespace = "Events", namespace_separator = ".")]
pub trait EventsApi {
    /// `{seq, time, kind, unit, run, state}` for every change; with `after_seq`, stored
    /// events after it are sent first.
    /// A client that does not read is not sent more than its backlog allows: the events wait
    /// in the store meanwhile, and are replayed from there.
    #[subscription(
        name = "Subscribe",
        unsubscribe = "Unsubscribe",
        item = EventInfo,
        with_extensions
    )]
    async fn subscribe_events(&self, arg: Option<SubscribeArg>) -> SubscriptionResult;
}

#[async_trait]
impl EventsApiServer for Api {
    async fn subscribe_events(
        &self,
        pending: PendingSubscriptionSink,
        ext: &Extensions,
        arg: Option<SubscribeArg>,
    ) -> SubscriptionResult {
        let conn = ext.get::<Arc<Conn>>().cloned();
        let registry = self.registry.clone();
        let store = registry.store().clone();
        let mut rx = store.subscribe_events();
        let after = arg.and_then(|a| a.after_seq);
        // Replay from the store until it has nothing newer, then follow the live channel;
        // a follower that lags behind goes back to the store for what it missed. Without
        // `after_seq`, "now" is the newest event before the subscription is confirmed: a
        // change the client asks for once it has the confirmation comes after it.
        let mut replay = after.is_some();
        let mut last = match after {
            Some(a) => a,
            None => store.last_event_seq().await.map_err(|e| e.to_string())?,
        };
        let sink = pending.accept().await?;
        let send = async |e: EventInfo| -> SubscriptionResult {
            let raw = to_raw_value(&e)?;
            if let Some(c) = &conn {
                tokio::select! {
                    () = c.backlog().room() => {}
                    () = sink.closed() => return Err("closed".into()),
                }
                c.backlog().produced(raw.get().len() + NOTIFICATION_OVERHEAD);
            }
            sink.send(SubscriptionMessage::from(raw)).await?;
            Ok(())
        };
        loop {
            if replay {
                let page =
                    store.events_after(last, REPLAY_PAGE).await.map_err(|e| e.to_string())?;
                for e in &page {
                    send(EventInfo::from(e)).await?;
                    last = e.seq;
                }
                if page.len() < REPLAY_PAGE as usize {
                    replay = false;
                }
                continue;
            }
            match rx.recv().await {
                Ok(e) => {
                    if e.seq <= last {
                        continue;
                    }
                    registry.settled(e.kind, &e.unit, SETTLES_IN).await;
                    send(EventInfo::from(&e)).await?;
                    last = e.seq;
                }
                Err(RecvError::Lagged(_)) => replay = true,
                Err(RecvError::Closed) => return Ok(()),
            }
        }
    }
}
