//! `Audit.List`: the audit log, newest first: every state-changing call an authenticated
//! client made (unauthenticated traffic is only counted, see `Daemon.Status`).

use jsonrpsee::core::{RpcResult, async_trait};
use jsonrpsee::proc_macros::rpc;

use super::api::{Api, rpc_error};
use super::types::{AuditInfo, AuditListArg};

/// Default and largest page of `Audit.List`.
const AUDIT_PAGE: (u32, u32) = (50, 1000);

/// The `Audit` method group.
#[rpc(server, client, namespace = "Audit", namespace_separator = ".")]
pub trait AuditApi {
    /// Audit records, newest first, paged by id (`before`).
    #[method(name = "List")]
    async fn list(&self, arg: Option<AuditListArg>) -> RpcResult<Vec<AuditInfo>>;
}

#[async_trait]
impl AuditApiServer for Api {
    async fn list(&self, arg: Option<AuditListArg>) -> RpcResult<Vec<AuditInfo>> {
        let arg = arg.unwrap_or_default();
        let limit = arg.limit.unwrap_or(AUDIT_PAGE.0).clamp(1, AUDIT_PAGE.1);
        let rows = self.registry.store().audit_log(limit, arg.before).await.map_err(rpc_error)?;
        Ok(rows.iter().map(AuditInfo::from).collect())
    }
}
