//! `Events.Subscribe`: every committed change, in order, optionally replayed from a sequence
//! number.

use jsonrpsee::PendingSubscriptionSink;
use jsonrpsee::core::{SubscriptionResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use jsonrpsee::server::SubscriptionMessage;
use serde_json::value::to_raw_value;
use tokio::sync::broadcast::error::RecvError;

use super::api::Api;
use super::types::{EventInfo, SubscribeArg};

/// Events replayed per store query.
const REPLAY_PAGE: u32 = 1000;

/// The `Events` method group.
#[rpc(server, client, namespace = "Events", namespace_separator = ".")]
pub trait EventsApi {
    /// `{seq, time, kind, unit, run, state}` for every change; with `after_seq`, stored
    /// events after it are sent first.
    #[subscription(name = "Subscribe", unsubscribe = "Unsubscribe", item = EventInfo)]
    async fn subscribe_events(&self, arg: Option<SubscribeArg>) -> SubscriptionResult;
}

#[async_trait]
impl EventsApiServer for Api {
    async fn subscribe_events(
        &self,
        pending: PendingSubscriptionSink,
        arg: Option<SubscribeArg>,
    ) -> SubscriptionResult {
        let store = self.registry.store().clone();
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
        loop {
            if replay {
                let page =
                    store.events_after(last, REPLAY_PAGE).await.map_err(|e| e.to_string())?;
                for e in &page {
                    sink.send(SubscriptionMessage::from(to_raw_value(&EventInfo::from(e))?))
                        .await?;
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
                    sink.send(SubscriptionMessage::from(to_raw_value(&EventInfo::from(&e))?))
                        .await?;
                    last = e.seq;
                }
                Err(RecvError::Lagged(_)) => replay = true,
                Err(RecvError::Closed) => return Ok(()),
            }
        }
    }
}
