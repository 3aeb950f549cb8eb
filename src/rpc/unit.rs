//! `TaskUnit.*`: add, delete, edit, list, get, start, stop, pause and resume units.

use jsonrpsee::core::{RpcResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use jsonrpsee::types::ErrorCode;
use serde_json::{Map, Value};

use super::api::{Api, rpc_error};
use super::types::{
    AddArg, AddResult, DeleteArg, Encoded, ListArg, ListView, RunInfo, UnitInfo, UnitSummary,
};
use crate::error::Error;
use crate::registry::ListFilter;
use crate::unit::UnitDef;

/// Default and largest page of `TaskUnit.List`. A page of 10,000 summaries is a few MiB of
/// JSON; the default keeps a plain `{}` answering every unit of a daemon with up to a thousand.
pub const UNIT_PAGE: (u32, u32) = (1000, 10_000);

/// The `TaskUnit` method group. Every method takes exactly one argument.
#[rpc(server, client, namespace = "TaskUnit", namespace_separator = ".")]
pub trait TaskUnitApi {
    /// Adds a unit: a definition object, or a bare name (tick unit, or the unit file of that
    /// name). A bare name answers `true`.
    #[method(name = "Add")]
    async fn add(&self, arg: AddArg) -> RpcResult<AddResult>;

    /// Deletes a unit after stopping its active runs: a name, or `{name, keep_history}`.
    #[method(name = "Delete")]
    async fn delete(&self, arg: DeleteArg) -> RpcResult<bool>;

    /// Applies a JSON merge patch `{name, …fields}` to a unit's definition.
    #[method(name = "Edit")]
    async fn edit(&self, patch: Map<String, Value>) -> RpcResult<UnitInfo>;

    /// Lists units sorted by name, optionally filtered by state and name glob, a page at a
    /// time (`limit`, default 1000, at most 10000; `after`: the last name of the previous page).
    #[method(name = "List")]
    async fn list(&self, arg: Option<ListArg>) -> RpcResult<Encoded<Vec<UnitSummary>>>;

    /// One unit in full.
    #[method(name = "Get")]
    async fn get(&self, name: String) -> RpcResult<UnitInfo>;

    /// Starts a run now (or returns the active one when the overlap policy keeps it).
    #[method(name = "Start")]
    async fn start(&self, name: String) -> RpcResult<RunInfo>;

    /// Stops every active run; a service stays stopped until `Start`.
    #[method(name = "Stop")]
    async fn stop(&self, name: String) -> RpcResult<usize>;

    /// Pauses schedules and restarts.
    #[method(name = "Pause")]
    async fn pause(&self, name: String) -> RpcResult<UnitInfo>;

    /// Resumes a paused unit.
    #[method(name = "Resume")]
    async fn resume(&self, name: String) -> RpcResult<UnitInfo>;
}

#[async_trait]
impl TaskUnitApiServer for Api {
    async fn add(&self, arg: AddArg) -> RpcResult<AddResult> {
        match arg {
            AddArg::Name(name) => {
                self.registry.add_name(&name).await.map_err(rpc_error)?;
                Ok(AddResult::Done(true))
            }
            AddArg::Definition(v) => {
                let def = UnitDef::from_json(v).map_err(rpc_error)?;
                let snap = self.registry.add(def).await.map_err(rpc_error)?;
                Ok(AddResult::Unit(Box::new(UnitInfo::from(&snap))))
            }
        }
    }

    async fn delete(&self, arg: DeleteArg) -> RpcResult<bool> {
        let (name, keep) = match arg {
            DeleteArg::Name(n) => (n, false),
            DeleteArg::Options { name, keep_history } => (name, keep_history),
        };
        self.registry.delete(&name, keep).await.map_err(rpc_error)?;
        Ok(true)
    }

    async fn edit(&self, patch: Map<String, Value>) -> RpcResult<UnitInfo> {
        let name = match patch.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => {
                return Err(rpc_error(Error::invalid(
                    "name",
                    "an edit names the unit: {\"name\": \"…\", …fields to change}",
                )));
            }
        };
        let snap = self.registry.edit(&name, Value::Object(patch)).await.map_err(rpc_error)?;
        Ok(UnitInfo::from(&snap))
    }

    async fn list(&self, arg: Option<ListArg>) -> RpcResult<Encoded<Vec<UnitSummary>>> {
        let arg = arg.unwrap_or_default();
        let state = arg
            .state
            .map(|s| s.parse().map_err(|e: String| rpc_error(Error::invalid("state", e))))
            .transpose()?;
        if arg.name_glob.as_ref().is_some_and(|g| g.len() > crate::registry::MAX_GLOB) {
            return Err(rpc_error(Error::invalid(
                "name_glob",
                format!("at most {} characters", crate::registry::MAX_GLOB),
            )));
        }
        let limit = match arg.limit {
            None => UNIT_PAGE.0,
            Some(n) if (1..=UNIT_PAGE.1).contains(&n) => n,
            Some(n) => {
                return Err(rpc_error(Error::invalid(
                    "limit",
                    format!("{n} is not between 1 and {} (a page of units)", UNIT_PAGE.1),
                )));
            }
        };
        let f =
            ListFilter { state, name_glob: arg.name_glob, after: arg.after, limit: limit as usize };
        Encoded::encode(&ListView { registry: &self.registry, filter: &f }).map_err(|e| {
            tracing::error!(error = %e, "cannot serialize a list of units");
            ErrorCode::InternalError.into()
        })
    }

    async fn get(&self, name: String) -> RpcResult<UnitInfo> {
        let snap = self.registry.get(&name).map_err(rpc_error)?;
        Ok(UnitInfo::from(&snap))
    }

    async fn start(&self, name: String) -> RpcResult<RunInfo> {
        let rec = self.registry.start(&name).await.map_err(rpc_error)?;
        Ok(RunInfo::from(&rec))
    }

    async fn stop(&self, name: String) -> RpcResult<usize> {
        self.registry.stop(&name).await.map_err(rpc_error)
    }

    async fn pause(&self, name: String) -> RpcResult<UnitInfo> {
        let snap = self.registry.pause(&name, true).await.map_err(rpc_error)?;
        Ok(UnitInfo::from(&snap))
    }

    async fn resume(&self, name: String) -> RpcResult<UnitInfo> {
        let snap = self.registry.pause(&name, false).await.map_err(rpc_error)?;
        Ok(UnitInfo::from(&snap))
    }
}
