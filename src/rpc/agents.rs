//! `Agent.*` (enrolled agents, join tokens, revocation) and `Dispatch.*` (a unit's fires on
//! its hosts): the client's view of the fleet. The agents' own protocol is `rpc::link`.

use std::collections::BTreeMap;

use jsonrpsee::core::{RpcResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::api::{Api, rpc_error};
use super::types::{RunInfo, fmt_time};
use crate::error::Error;
use crate::fleet::{AgentState, AgentStatus};
use crate::store::{DispatchFilter, DispatchRecord, DispatchState};
use crate::unit::DispatchOp;
use crate::unit::definition::parse_duration;

/// One agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentInfo {
    /// Its unique name.
    pub name: String,
    /// `connected`, `disconnected` or `revoked`.
    pub state: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its taskd version.
    pub version: String,
    /// Its operating system.
    pub os: String,
    /// Its architecture.
    pub arch: String,
    /// The address it connects from, while connected.
    pub addr: Option<String>,
    /// When its connection was made, while connected.
    pub connected_at: Option<String>,
    /// When it was last heard from.
    pub last_seen: Option<String>,
    /// Its runs active now.
    pub running: usize,
    /// Most runs it runs at once.
    pub max_runs: u32,
}

impl From<AgentStatus> for AgentInfo {
    fn from(a: AgentStatus) -> Self {
        AgentInfo {
            name: a.stored.name,
            state: a.state.as_str().into(),
            labels: a.stored.labels,
            version: a.stored.version,
            os: a.stored.os,
            arch: a.stored.arch,
            addr: a.addr,
            connected_at: a.connected_at.map(fmt_time),
            last_seen: a.last_seen.map(fmt_time),
            running: a.running,
            max_runs: a.stored.max_runs,
        }
    }
}

/// `Agent.List`'s argument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentListArg {
    /// Only agents in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Only agents with this label (`key=value`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// `Agent.JoinToken`'s argument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenArg {
    /// How long the token is good for (default `"1h"`, at most `"7d"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// A join token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct JoinTokenInfo {
    /// The token: `taskd agent --join TOKEN` on the new host.
    pub token: String,
    /// When it stops being accepted.
    pub expires_at: String,
}

/// One dispatch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DispatchInfo {
    /// Its id.
    pub id: i64,
    /// The unit.
    pub unit: String,
    /// What fired it.
    pub trigger: String,
    /// `running`, `paused`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// When it was created.
    pub created_at: String,
    /// When it ended.
    pub ended_at: Option<String>,
    /// Hosts.
    pub total: u32,
    /// Hosts by the state of their newest run (`ignored` for ignored ones).
    pub counts: BTreeMap<String, u32>,
    /// Hosts running at once (0: all).
    pub batch: u32,
    /// Failed hosts allowed before it pauses (`null`: no limit).
    pub tolerance: Option<u32>,
    /// For `Dispatch.Get`: every run, one per host and attempt, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runs: Option<Vec<RunInfo>>,
}

impl DispatchInfo {
    fn new(d: DispatchRecord, counts: BTreeMap<String, u32>) -> Self {
        DispatchInfo {
            id: d.id,
            unit: d.unit,
            trigger: d.trigger.as_str().into(),
            state: d.state.as_str().into(),
            created_at: fmt_time(d.created_at),
            ended_at: d.ended_at.map(fmt_time),
            total: d.total,
            counts,
            batch: d.batch,
            tolerance: d.tolerance,
            runs: None,
        }
    }
}

/// `Dispatch.List`'s argument.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DispatchListArg {
    /// Only dispatches of this unit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Only dispatches in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// At most this many (default 50, at most 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Only dispatches with an id below this (for paging).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
}

/// The `Agent` method group.
#[rpc(server, client, namespace = "Agent", namespace_separator = ".")]
pub trait AgentApi {
    /// Agents, by name.
    #[method(name = "List")]
    async fn list(&self, arg: Option<AgentListArg>) -> RpcResult<Vec<AgentInfo>>;

    /// One agent.
    #[method(name = "Get")]
    async fn get(&self, name: String) -> RpcResult<AgentInfo>;

    /// A one-time token a new agent enrolls with.
    #[method(name = "JoinToken")]
    async fn join_token(&self, arg: Option<JoinTokenArg>) -> RpcResult<JoinTokenInfo>;

    /// Closes an agent's connection and refuses its credential from now on.
    #[method(name = "Revoke")]
    async fn revoke(&self, name: String) -> RpcResult<AgentInfo>;
}

/// The `Dispatch` method group.
#[rpc(server, client, namespace = "Dispatch", namespace_separator = ".")]
pub trait DispatchApi {
    /// Dispatches, newest first.
    #[method(name = "List")]
    async fn list(&self, arg: Option<DispatchListArg>) -> RpcResult<Vec<DispatchInfo>>;

    /// One dispatch, with a run per host.
    #[method(name = "Get")]
    async fn get(&self, id: i64) -> RpcResult<DispatchInfo>;

    /// Stops its active runs; hosts waiting for their turn end `cancelled`.
    #[method(name = "Cancel")]
    async fn cancel(&self, id: i64) -> RpcResult<DispatchInfo>;

    /// Hosts waiting for their turn wait until it is resumed.
    #[method(name = "Pause")]
    async fn pause(&self, id: i64) -> RpcResult<DispatchInfo>;

    /// Goes on; failures so far no longer count against `tolerance`.
    #[method(name = "Resume")]
    async fn resume(&self, id: i64) -> RpcResult<DispatchInfo>;
}

impl Api {
    /// `Dispatch.Cancel`, `Pause`, `Resume`: done by the unit's loop, answered as it stands.
    async fn dispatch_op(&self, id: i64, op: DispatchOp) -> RpcResult<DispatchInfo> {
        self.registry.dispatch_op(id, op).await.map_err(rpc_error)?;
        DispatchApiServer::get(self, id).await.map(|mut d| {
            d.runs = None;
            d
        })
    }
}

#[async_trait]
impl AgentApiServer for Api {
    async fn list(&self, arg: Option<AgentListArg>) -> RpcResult<Vec<AgentInfo>> {
        let arg = arg.unwrap_or_default();
        let state = arg
            .state
            .as_deref()
            .map(|s| s.parse::<AgentState>().map_err(|e| rpc_error(Error::invalid("state", e))))
            .transpose()?;
        let label = match &arg.label {
            None => None,
            Some(l) => Some(l.split_once('=').ok_or_else(|| {
                rpc_error(Error::invalid("label", format!("{l:?}: write key=value")))
            })?),
        };
        Ok(self
            .registry
            .fleet()
            .list()
            .into_iter()
            .filter(|a| state.is_none_or(|s| a.state == s))
            .filter(|a| label.is_none_or(|(k, v)| a.stored.labels.get(k).is_some_and(|l| l == v)))
            .map(AgentInfo::from)
            .collect())
    }

    async fn get(&self, name: String) -> RpcResult<AgentInfo> {
        let a = self.registry.fleet().status(&name).ok_or(Error::AgentNotFound(name));
        Ok(a.map_err(rpc_error)?.into())
    }

    async fn join_token(&self, arg: Option<JoinTokenArg>) -> RpcResult<JoinTokenInfo> {
        let ttl = match arg.and_then(|a| a.ttl) {
            None => std::time::Duration::from_secs(3600),
            Some(t) => parse_duration(&t).map_err(|e| rpc_error(Error::invalid("ttl", e)))?,
        };
        if ttl > std::time::Duration::from_secs(7 * 86400) || ttl.is_zero() {
            return Err(rpc_error(Error::invalid("ttl", "must be between 1s and 7d")));
        }
        let (token, expires) = self.registry.fleet().join_token(ttl).await.map_err(rpc_error)?;
        Ok(JoinTokenInfo { token, expires_at: fmt_time(expires) })
    }

    async fn revoke(&self, name: String) -> RpcResult<AgentInfo> {
        Ok(self.registry.fleet().revoke(&name).await.map_err(rpc_error)?.into())
    }
}

#[async_trait]
impl DispatchApiServer for Api {
    async fn list(&self, arg: Option<DispatchListArg>) -> RpcResult<Vec<DispatchInfo>> {
        let arg = arg.unwrap_or_default();
        let state = arg
            .state
            .as_deref()
            .map(|s| s.parse::<DispatchState>().map_err(|e| rpc_error(Error::invalid("state", e))))
            .transpose()?;
        let f = DispatchFilter {
            unit: arg.unit,
            state,
            limit: arg.limit.unwrap_or(50).clamp(1, 1000),
            before: arg.before,
        };
        let list = self.registry.store().list_dispatches(f).await.map_err(rpc_error)?;
        Ok(list.into_iter().map(|(d, c)| DispatchInfo::new(d, c)).collect())
    }

    async fn get(&self, id: i64) -> RpcResult<DispatchInfo> {
        let (d, runs, counts) = self.registry.store().get_dispatch(id).await.map_err(rpc_error)?;
        let mut info = DispatchInfo::new(d, counts);
        let mut out = Vec::with_capacity(runs.len());
        for r in &runs {
            out.push(self.run_info(r).await);
        }
        info.runs = Some(out);
        Ok(info)
    }

    async fn cancel(&self, id: i64) -> RpcResult<DispatchInfo> {
        self.dispatch_op(id, DispatchOp::Cancel).await
    }

    async fn pause(&self, id: i64) -> RpcResult<DispatchInfo> {
        self.dispatch_op(id, DispatchOp::Pause).await
    }

    async fn resume(&self, id: i64) -> RpcResult<DispatchInfo> {
        self.dispatch_op(id, DispatchOp::Resume).await
    }
}
