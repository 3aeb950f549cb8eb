//! `Run.*`: list, get and cancel runs, read their logs, and follow a run's output live.

use std::sync::Arc;

use jsonrpsee::core::{RpcResult, SubscriptionResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use jsonrpsee::{Extensions, PendingSubscriptionSink};

use super::api::{Api, rpc_error};
use super::conn::Conn;
use super::follow::{self, parse_stream, read_or_empty};
use super::types::{FollowArg, FollowItem, LogsArg, LogsResult, RunInfo, RunListArg};
use crate::error::Error;
use crate::run::{RunRecord, RunState};
use crate::store::RunFilter;
use crate::store::logs::{self, LogQuery};

/// Default and largest page of `Run.List`.
const RUN_PAGE: (u32, u32) = (50, 1000);
/// Bytes a subscription notification adds around its item, at least: the shortest wrapper,
/// `{"jsonrpc":"2.0","method":"Run.Follow","params":{"subscription":1,"result":…}}`, is 77.
/// Never more than the real overhead: a count above what reaches the socket would stay in a
/// connection's backlog for good.
pub(crate) const NOTIFICATION_OVERHEAD: usize = 64;
/// Default and largest slice of `Run.Logs`, in bytes.
const LOG_PAGE: (u32, u32) = (64 * 1024, 1 << 20);

/// The `Run` method group.
#[rpc(server, client, namespace = "Run", namespace_separator = ".")]
pub trait RunApi {
    /// Runs, newest first, paged by id (`before`).
    #[method(name = "List")]
    async fn list(&self, arg: Option<RunListArg>) -> RpcResult<Vec<RunInfo>>;

    /// One run.
    #[method(name = "Get")]
    async fn get(&self, id: i64) -> RpcResult<RunInfo>;

    /// Stops a run (TERM, grace, KILL); answers with the run as it ended.
    #[method(name = "Cancel")]
    async fn cancel(&self, id: i64) -> RpcResult<RunInfo>;

    /// A run of a dispatch again, on the same host, as a new attempt.
    #[method(name = "Redo")]
    async fn redo(&self, id: i64) -> RpcResult<RunInfo>;

    /// A run of a dispatch no longer counts against its tolerance or outcome.
    #[method(name = "Ignore")]
    async fn ignore(&self, id: i64) -> RpcResult<RunInfo>;

    /// A slice of a run's output.
    #[method(name = "Logs")]
    async fn logs(&self, arg: LogsArg) -> RpcResult<LogsResult>;

    /// A run's output as it is written, then one final message with the run's end state (or a
    /// `lagged` message, when the client falls more than 4 MiB behind).
    #[subscription(name = "Follow", unsubscribe = "Unfollow", item = FollowItem, with_extensions)]
    async fn follow(&self, arg: FollowArg) -> SubscriptionResult;
}

impl Api {
    /// A run's wire form; an active run's byte counts come live from its log writer.
    pub(crate) async fn run_info(&self, r: &RunRecord) -> RunInfo {
        let mut info = RunInfo::from(r);
        if r.state == RunState::Running
            && let Some([out, err]) = self.registry.store().logs().totals(r.id).await
        {
            info.stdout_bytes = out;
            info.stderr_bytes = err;
        }
        if r.state == RunState::Running && !r.is_local() {
            let connected = self.registry.fleet().is_connected(&r.host);
            info.host_state = Some(if connected { "connected" } else { "unreachable" }.into());
        }
        info
    }
}

#[async_trait]
impl RunApiServer for Api {
    async fn list(&self, arg: Option<RunListArg>) -> RpcResult<Vec<RunInfo>> {
        let arg = arg.unwrap_or_default();
        let state = arg
            .state
            .as_deref()
            .map(|s| s.parse::<RunState>().map_err(|e| rpc_error(Error::invalid("state", e))))
            .transpose()?;
        let limit = arg.limit.unwrap_or(RUN_PAGE.0).clamp(1, RUN_PAGE.1);
        let f = RunFilter { unit: arg.unit, state, limit, before: arg.before };
        let runs = self.registry.runs(f).await.map_err(rpc_error)?;
        let mut out = Vec::with_capacity(runs.len());
        for r in &runs {
            out.push(self.run_info(r).await);
        }
        Ok(out)
    }

    async fn get(&self, id: i64) -> RpcResult<RunInfo> {
        let r = self.registry.run(id).await.map_err(rpc_error)?;
        Ok(self.run_info(&r).await)
    }

    async fn cancel(&self, id: i64) -> RpcResult<RunInfo> {
        let r = self.registry.cancel_run(id).await.map_err(rpc_error)?;
        Ok(RunInfo::from(&r))
    }

    async fn redo(&self, id: i64) -> RpcResult<RunInfo> {
        let r = self.registry.redo_run(id).await.map_err(rpc_error)?;
        Ok(self.run_info(&r).await)
    }

    async fn ignore(&self, id: i64) -> RpcResult<RunInfo> {
        let r = self.registry.ignore_run(id).await.map_err(rpc_error)?;
        Ok(self.run_info(&r).await)
    }

    async fn logs(&self, arg: LogsArg) -> RpcResult<LogsResult> {
        let rec = self.registry.run(arg.id).await.map_err(rpc_error)?;
        let stream = parse_stream(arg.stream.as_deref()).map_err(rpc_error)?;
        let limit = arg.limit.unwrap_or(LOG_PAGE.0).clamp(1, LOG_PAGE.1) as usize;
        let store_logs = self.registry.store().logs().clone();
        let active = !rec.state.is_final();
        // While a run is active and over its limit, its tail lives in memory: it is shown
        // after the file's content, newest `limit` bytes at most, as a snapshot.
        let live = if active { store_logs.subscribe(arg.id, Some(limit)).await } else { None };
        let q = LogQuery {
            stream,
            offset: arg.offset.unwrap_or(0),
            limit,
            tail: arg.tail.map(|n| n as usize),
            timestamps: arg.timestamps,
            end: live.as_ref().map(|f| f.file_len),
        };
        let slice = read_or_empty(&store_logs, arg.id, q.clone()).await.map_err(rpc_error)?;
        let mut out = LogsResult {
            data: slice.data,
            next_offset: slice.next_offset,
            eof: slice.eof,
            truncated: slice.truncated || rec.truncated,
            active,
        };
        if let Some(f) = live
            && slice.eof
            && (!f.tail.is_empty() || f.cut.iter().any(|&c| c > 0))
        {
            let tail = logs::render_chunks(&f.tail, f.cut, &q);
            out.data = match q.tail {
                Some(n) => logs::last_lines(&(out.data + &tail), n),
                None => out.data + &tail,
            };
            out.truncated |= f.cut.iter().any(|&c| c > 0);
        }
        Ok(out)
    }

    async fn follow(
        &self,
        pending: PendingSubscriptionSink,
        ext: &Extensions,
        arg: FollowArg,
    ) -> SubscriptionResult {
        let _follower = self.followers.token();
        let conn = ext.get::<Arc<Conn>>().cloned();
        follow::follow(self.registry.store().clone(), conn, pending, arg).await
    }
}
