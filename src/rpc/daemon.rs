//! `Daemon.Status` and `Auth.Login`.

use std::collections::BTreeMap;

use jiff::Timestamp;
use jsonrpsee::Extensions;
use jsonrpsee::core::{RpcResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use jsonrpsee::types::ErrorObjectOwned;
use serde_json::Value;

use super::api::{Api, rpc_error};
use super::auth::{ConnAuth, token_eq};
use super::types::{ConnectionCounts, StatusInfo, fmt_time};
use crate::error::codes;

/// The `Daemon` method group.
#[rpc(server, client, namespace = "Daemon", namespace_separator = ".")]
pub trait DaemonApi {
    /// Version, uptime, unit and run counts, listeners.
    #[method(name = "Status")]
    async fn status(&self, arg: Option<Value>) -> RpcResult<StatusInfo>;
}

/// The `Auth` method group.
#[rpc(server, client, namespace = "Auth", namespace_separator = ".")]
pub trait AuthApi {
    /// Authenticates this raw TCP connection with the daemon's token.
    #[method(name = "Login", with_extensions)]
    async fn login(&self, token: String) -> RpcResult<bool>;
}

#[async_trait]
impl DaemonApiServer for Api {
    async fn status(&self, _arg: Option<Value>) -> RpcResult<StatusInfo> {
        let mut units: BTreeMap<String, usize> = BTreeMap::new();
        let mut total_units = 0;
        for (s, n) in self.registry.unit_counts() {
            total_units += n;
            units.insert(s.as_str().into(), n);
        }
        units.insert("total".into(), total_units);
        let mut runs: BTreeMap<String, u64> = BTreeMap::new();
        let mut total_runs = 0;
        for (s, n) in self.registry.store().run_counts().await.map_err(rpc_error)? {
            total_runs += n;
            runs.insert(s, n);
        }
        runs.insert("total".into(), total_runs);
        let uptime = Timestamp::now().duration_since(self.started);
        Ok(StatusInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            started_at: fmt_time(self.started),
            uptime_secs: uptime.as_secs().max(0) as u64,
            units,
            runs,
            listeners: self.listeners.clone(),
            state_dir: self.registry.store().dir().display().to_string(),
            store: self.registry.store().location(),
            auth: if self.token.is_some() { "token" } else { "none" }.into(),
            connections: {
                let (unauthenticated, probation, authenticated) = self.gate.occupancy();
                ConnectionCounts { authenticated, unauthenticated, probation, max: self.gate.max() }
            },
            auth_failures: self.gate.failures_total(),
            store_commits: self.registry.store().commits(),
            agents: {
                let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
                let list = self.registry.fleet().list();
                for a in &list {
                    *by_state.entry(a.state.as_str().into()).or_default() += 1;
                }
                by_state.insert("total".into(), list.len());
                by_state
            },
            cluster: match &self.cluster {
                Some((c, lease)) => Some(cluster_status(c, *lease).await.map_err(rpc_error)?),
                None => None,
            },
        })
    }
}

#[async_trait]
impl AuthApiServer for Api {
    async fn login(&self, ext: &Extensions, token: String) -> RpcResult<bool> {
        // An agent's credential: the connection becomes the agent's (raw TCP only).
        if crate::proto::parse_credential(&token).is_some() {
            let agent = self.registry.fleet().authenticate(&token);
            return match (agent, ext.get::<ConnAuth>()) {
                (Some((name, epoch)), Some(c)) => {
                    c.set_agent(name, epoch);
                    Ok(true)
                }
                (_, c) => {
                    if let Some(c) = c {
                        c.failed();
                    }
                    Err(ErrorObjectOwned::owned(
                        codes::UNAUTHORIZED,
                        "agent credential refused: unknown, revoked, or not on raw TCP",
                        None::<()>,
                    ))
                }
            };
        }
        let Some(expected) = &self.token else {
            return Ok(true);
        };
        if !token_eq(expected, token.trim()) {
            if let Some(c) = ext.get::<ConnAuth>() {
                c.failed();
            }
            return Err(ErrorObjectOwned::owned(
                codes::UNAUTHORIZED,
                "wrong token: use the one in <state-dir>/token",
                None::<()>,
            ));
        }
        if let Some(c) = ext.get::<ConnAuth>() {
            c.set();
        }
        Ok(true)
    }
}

/// The cluster as the lease row and the servers' rows say.
async fn cluster_status(
    c: &crate::store::Cluster,
    lease: std::time::Duration,
) -> crate::error::Result<super::types::ClusterStatus> {
    let l = c.lease().await?;
    // Servers say they are alive every third of the lease.
    let gone_after = jiff::SignedDuration::try_from(lease).unwrap_or_default();
    let now = Timestamp::now();
    let holder = l.as_ref().map(|l| l.holder.clone()).unwrap_or_default();
    let servers = c
        .servers()
        .await?
        .into_iter()
        .map(|s| super::types::ServerStatus {
            role: if s.name == holder {
                "holder"
            } else if now.duration_since(s.seen_at) > gone_after {
                "gone"
            } else {
                "standby"
            }
            .into(),
            seen_at: super::types::fmt_time(s.seen_at),
            name: s.name,
            address: s.address,
            version: s.version,
        })
        .collect();
    Ok(super::types::ClusterStatus {
        name: c.name().to_string(),
        holder,
        epoch: l.as_ref().map_or(0, |l| l.epoch),
        lease_left_ms: l.map_or(0, |l| l.left.as_millis() as i64),
        servers,
    })
}
