//! `AgentLink.*`: the agent protocol's methods (messages in [`crate::proto`]). Only a
//! connection logged in with an agent's credential may call them, and it may call nothing
//! else (`rpc::middleware::AGENT_METHODS`); `AgentLink.Join` is public, as `Auth.Login` is.
//! Every report is checked against the calling agent: an agent can only speak for the runs
//! assigned to it.

use std::sync::Arc;

use jsonrpsee::core::{RpcResult, SubscriptionResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use jsonrpsee::server::SubscriptionMessage;
use jsonrpsee::types::ErrorObjectOwned;
use jsonrpsee::{Extensions, PendingSubscriptionSink};
use serde_json::Value;
use serde_json::value::to_raw_value;

use super::api::{Api, rpc_error};
use super::auth::ConnAuth;
use super::conn::Conn;
use super::run::NOTIFICATION_OVERHEAD;
use crate::error::{Error, codes};
use crate::proto::{
    FileData, FileRead, Hello, JoinRequest, Joined, MAX_RESULTS_BATCH, Order, Outcome, Output,
    Started,
};
use crate::unit::definition::Action;

/// The agent protocol.
#[rpc(server, client, namespace = "AgentLink", namespace_separator = ".")]
pub trait AgentLinkApi {
    /// Trades a one-time join token for the agent's credential. Public: the agent has no
    /// credential yet.
    #[method(name = "Join", with_extensions)]
    async fn join(&self, req: JoinRequest) -> RpcResult<Joined>;

    /// Registers the agent on this connection and streams its orders.
    #[subscription(name = "Attach" => "Order", unsubscribe = "Detach", item = Order, with_extensions)]
    async fn attach(&self, hello: Hello) -> SubscriptionResult;

    /// A run's process started.
    #[method(name = "Started", with_extensions)]
    async fn started(&self, s: Started) -> RpcResult<bool>;

    /// Output of a run, in order.
    #[method(name = "Output", with_extensions)]
    async fn output(&self, o: Output) -> RpcResult<bool>;

    /// A run ended. Answered once its end is recorded: then the agent may forget it.
    #[method(name = "Finished", with_extensions)]
    async fn finished(&self, o: Outcome) -> RpcResult<bool>;

    /// Runs ended, at most [`MAX_RESULTS_BATCH`]. Answered once every end is recorded or
    /// refused, in order: nothing for one recorded (the agent may forget it), why for one not
    /// taken (the agent sends it again later). An agent waits for each end to be recorded: one
    /// end a call would cap its runs per second at its calls in flight per commit time.
    #[method(name = "FinishedMany", with_extensions)]
    async fn finished_many(&self, o: Vec<Outcome>) -> RpcResult<Vec<Option<String>>>;

    /// The agent is alive.
    #[method(name = "Heartbeat", with_extensions)]
    async fn heartbeat(&self, arg: Option<Value>) -> RpcResult<bool>;

    /// A piece of the file a run of this agent puts (its unit's `file`).
    #[method(name = "FileRead", with_extensions)]
    async fn file_read(&self, r: FileRead) -> RpcResult<FileData>;
}

impl Api {
    /// The agent the calling connection belongs to (the middleware let only agents through),
    /// if its credential still stands: a connection logged in before the agent was revoked
    /// (or enrolled again under the same name) is refused.
    fn agent_of(&self, ext: &Extensions) -> RpcResult<(Arc<Conn>, String)> {
        let conn = ext.get::<Arc<Conn>>().cloned();
        let who = conn.as_ref().and_then(|c| c.agent().map(|(n, e)| (n.to_string(), e)));
        match who {
            Some((name, epoch)) if self.registry.fleet().current(&name, epoch) => {
                Ok((conn.expect("checked"), name))
            }
            Some(_) => Err(ErrorObjectOwned::owned(
                codes::UNAUTHORIZED,
                "this agent's credential was revoked",
                None::<()>,
            )),
            None => Err(ErrorObjectOwned::owned(codes::UNAUTHORIZED, "not an agent", None::<()>)),
        }
    }
}

#[async_trait]
impl AgentLinkApiServer for Api {
    async fn join(&self, ext: &Extensions, req: JoinRequest) -> RpcResult<Joined> {
        match self.registry.fleet().join(&req.token, &req.name).await {
            Ok(credential) => Ok(Joined { name: req.name, credential }),
            Err(e) => {
                // Counted as a failed login of its peer, as a wrong token is.
                if let Some(c) = ext.get::<ConnAuth>() {
                    c.failed();
                }
                Err(rpc_error(e))
            }
        }
    }

    async fn attach(
        &self,
        pending: PendingSubscriptionSink,
        ext: &Extensions,
        hello: Hello,
    ) -> SubscriptionResult {
        let (conn, name) = self.agent_of(ext)?;
        if hello.name != name {
            pending
                .reject(ErrorObjectOwned::owned(
                    codes::UNAUTHORIZED,
                    format!("this credential is agent {name:?}'s, not {:?}'s", hello.name),
                    None::<()>,
                ))
                .await;
            return Ok(());
        }
        let fleet = self.registry.fleet().clone();
        let addr = conn.peer().map(|p| p.to_string());
        let epoch = conn.agent().map_or(0, |(_, e)| e);
        let (session, mut orders, close) = match fleet.attach(hello, addr, epoch) {
            Ok(s) => s,
            Err(e) => {
                pending.reject(rpc_error(e)).await;
                return Ok(());
            }
        };
        let settings = Order::Settings {
            heartbeat_ms: (fleet.config().agent_timeout.as_millis() / 3).clamp(100, 5000) as u64,
        };
        let sink = match pending.accept().await {
            Ok(s) => s,
            Err(e) => {
                fleet.detach(&name, Some(session));
                return Err(e.into());
            }
        };
        let result: SubscriptionResult = async {
            sink.send(SubscriptionMessage::from(to_raw_value(&settings)?)).await?;
            loop {
                tokio::select! {
                    order = orders.recv() => {
                        let Some(order) = order else {
                            // The session ended (revoked, replaced, silent too long).
                            conn.close();
                            return Ok(());
                        };
                        let raw = to_raw_value(&order)?;
                        // An agent that does not read is sent no more than its backlog allows.
                        tokio::select! {
                            () = conn.backlog().room() => {}
                            () = sink.closed() => return Ok(()),
                            () = close.cancelled() => {
                                conn.close();
                                return Ok(());
                            }
                        }
                        conn.backlog().produced(raw.get().len() + NOTIFICATION_OVERHEAD);
                        sink.send(SubscriptionMessage::from(raw)).await?;
                    }
                    () = close.cancelled() => {
                        // Revoked, replaced by a newer connection, or silent too long.
                        conn.close();
                        return Ok(());
                    }
                    () = sink.closed() => return Ok(()),
                }
            }
        }
        .await;
        fleet.detach(&name, Some(session));
        result
    }

    async fn started(&self, ext: &Extensions, s: Started) -> RpcResult<bool> {
        let (_, name) = self.agent_of(ext)?;
        self.registry.fleet().started(&name, s).map_err(rpc_error)?;
        Ok(true)
    }

    async fn output(&self, ext: &Extensions, o: Output) -> RpcResult<bool> {
        let (_, name) = self.agent_of(ext)?;
        self.registry.fleet().output(&name, o).await.map_err(rpc_error)?;
        Ok(true)
    }

    async fn finished(&self, ext: &Extensions, o: Outcome) -> RpcResult<bool> {
        let (_, name) = self.agent_of(ext)?;
        self.registry.fleet().finished(&name, o).await.map_err(rpc_error)?;
        Ok(true)
    }

    async fn finished_many(
        &self,
        ext: &Extensions,
        outcomes: Vec<Outcome>,
    ) -> RpcResult<Vec<Option<String>>> {
        let (_, name) = self.agent_of(ext)?;
        if outcomes.len() > MAX_RESULTS_BATCH {
            return Err(rpc_error(Error::Limit(format!(
                "at most {MAX_RESULTS_BATCH} results a call, not {}",
                outcomes.len()
            ))));
        }
        let fleet = self.registry.fleet();
        let ends = outcomes.into_iter().map(|o| fleet.finished(&name, o));
        let answers = futures_util::future::join_all(ends).await;
        Ok(answers
            .into_iter()
            .map(|r| r.err().map(|e| rpc_error(e).message().to_string()))
            .collect())
    }

    async fn heartbeat(&self, ext: &Extensions, _arg: Option<Value>) -> RpcResult<bool> {
        let (_, name) = self.agent_of(ext)?;
        self.registry.fleet().heard(&name);
        Ok(true)
    }

    async fn file_read(&self, ext: &Extensions, r: FileRead) -> RpcResult<FileData> {
        use base64::Engine;
        let (_, name) = self.agent_of(ext)?;
        // Only the content of a run this agent is putting now.
        let refused = |why: &str| rpc_error(Error::Unauthorized(why.into()));
        let rec = self.registry.run(r.run).await.map_err(rpc_error)?;
        if rec.host != name || rec.state.is_final() {
            return Err(refused("that run is not this agent's, or it ended"));
        }
        let unit = self.registry.get(&rec.unit).map_err(rpc_error)?;
        match &unit.config.action {
            Action::File(f) if f.sha256 == r.sha256 => {}
            _ => return Err(refused("that run's unit puts no such file")),
        }
        let len = (r.len as usize).min(crate::store::content::CHUNK_MAX);
        let data = self.registry.store().content().read(&r.sha256, r.offset, len).await;
        let data = data.map_err(rpc_error)?;
        Ok(FileData { data: base64::engine::general_purpose::STANDARD.encode(data) })
    }
}
