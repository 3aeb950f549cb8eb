//! The server side of the API: the context every method group shares, the one place engine
//! errors become JSON-RPC errors, and the assembly of every method into one `Methods`.

use std::sync::Arc;

use jiff::Timestamp;
use jsonrpsee::RpcModule;
use jsonrpsee::types::ErrorObjectOwned;
use serde_json::json;

use super::conn::Gate;
use crate::error::Error;
use crate::registry::Registry;

/// What the method implementations share.
pub struct ApiContext {
    /// The units.
    pub registry: Registry,
    /// When the daemon started.
    pub started: Timestamp,
    /// The addresses it listens on.
    pub listeners: Vec<String>,
    /// The daemon's token, when `--auth token`.
    pub token: Option<Arc<str>>,
    /// Every active `Run.Follow`: at shutdown the daemon lets them deliver their runs' final
    /// state before it closes connections.
    pub followers: tokio_util::task::TaskTracker,
    /// The listener's connection slots and failed-login counts.
    pub gate: Arc<Gate>,
    /// This server's handle on its cluster, with the lease's length.
    pub cluster: Option<(crate::store::Cluster, std::time::Duration)>,
}

/// A cheap-to-clone handle every method group is implemented on.
#[derive(Clone)]
pub struct Api(pub Arc<ApiContext>);

impl std::ops::Deref for Api {
    type Target = ApiContext;
    fn deref(&self) -> &ApiContext {
        &self.0
    }
}

/// Maps an engine error to its JSON-RPC error: stable code, a message that says what to fix,
/// and `data.field` for invalid definitions. Storage details are logged, and summarised.
pub fn rpc_error(e: Error) -> ErrorObjectOwned {
    let code = e.code();
    match &e {
        Error::Invalid { field, .. } => {
            ErrorObjectOwned::owned(code, e.to_string(), Some(json!({ "field": field })))
        }
        Error::Store(_) | Error::Storage(_) | Error::Io { .. } => {
            tracing::error!(error = %e, "storage failure answered to a client");
            ErrorObjectOwned::owned(
                code,
                format!("storage failure, nothing was changed: {e}"),
                None::<()>,
            )
        }
        Error::NotRecorded(_) => {
            tracing::error!(error = %e, "storage failure answered to a client");
            ErrorObjectOwned::owned(code, format!("storage failure: {e}"), None::<()>)
        }
        _ => ErrorObjectOwned::owned(code, e.to_string(), None::<()>),
    }
}

/// Every method of the API, ready to serve.
pub fn methods(api: Api) -> RpcModule<()> {
    use super::audit::AuditApiServer;
    use super::daemon::{AuthApiServer, DaemonApiServer};
    use super::events::EventsApiServer;
    use super::run::RunApiServer;
    use super::unit::TaskUnitApiServer;
    let mut m = RpcModule::new(());
    m.merge(TaskUnitApiServer::into_rpc(api.clone())).expect("unique method names");
    m.merge(RunApiServer::into_rpc(api.clone())).expect("unique method names");
    m.merge(EventsApiServer::into_rpc(api.clone())).expect("unique method names");
    m.merge(DaemonApiServer::into_rpc(api.clone())).expect("unique method names");
    m.merge(AuditApiServer::into_rpc(api.clone())).expect("unique method names");
    m.merge(super::files::FileApiServer::into_rpc(api.clone())).expect("unique method names");
    m.merge(super::agents::AgentApiServer::into_rpc(api.clone())).expect("unique method names");
    m.merge(super::agents::DispatchApiServer::into_rpc(api.clone())).expect("unique method names");
    m.merge(super::link::AgentLinkApiServer::into_rpc(api.clone())).expect("unique method names");
    m.merge(AuthApiServer::into_rpc(api)).expect("unique method names");
    // Serialised once: every call answers the same bytes.
    let doc: Box<serde_json::value::RawValue> =
        serde_json::value::to_raw_value(&super::discover::document())
            .expect("the OpenRPC document is JSON");
    m.register_method("rpc.discover", move |_, _, _| Ok::<_, ErrorObjectOwned>(doc.clone()))
        .expect("unique method names");
    m
}
