//! `File.*`: uploads of the files `file` units put on hosts (SPEC §10.7). The daemon keeps
//! each under its SHA-256 ([`crate::store::content`]); a unit then names it as
//! `file.source: "sha256:…"`, so later fires and redos need no client.
//!
//! An upload is `File.Begin {size}` → `{upload}`, then `File.Append {upload, offset, data}`
//! in order (`data` in base64, at most 1 MiB decoded a piece, which fits the default request
//! limit with room to spare: 512 KiB pieces are what `taskctl push` sends), then
//! `File.Commit {upload}` → `{source, size}`. `File.Stat {sha256}` says whether a file is
//! kept already (`taskctl push` then sends nothing). On a cluster's store the files are kept
//! in the database, so every server has them.

use base64::Engine;
use jsonrpsee::core::{RpcResult, async_trait};
use jsonrpsee::proc_macros::rpc;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::api::{Api, rpc_error};
use crate::error::Error;
use crate::unit::definition::CONTENT_PREFIX;

/// `File.Begin`'s argument.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct BeginArg {
    /// The file's size in bytes (at most 1 GiB).
    pub size: u64,
}

/// `File.Begin`'s answer.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Upload {
    /// The upload's id, for `File.Append` and `File.Commit`.
    pub upload: u64,
}

/// `File.Append`'s argument.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct AppendArg {
    /// The upload.
    pub upload: u64,
    /// Where this piece goes: the bytes sent so far.
    pub offset: u64,
    /// The bytes, in standard base64 (at most 1 MiB decoded).
    pub data: String,
}

/// `File.Commit`'s argument.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct CommitArg {
    /// The upload.
    pub upload: u64,
}

/// A kept file.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Kept {
    /// How a unit names it: `sha256:<hex>`.
    pub source: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The `File` method group.
#[rpc(server, client, namespace = "File", namespace_separator = ".")]
pub trait FileApi {
    /// Opens an upload.
    #[method(name = "Begin")]
    async fn begin(&self, arg: BeginArg) -> RpcResult<Upload>;

    /// Appends a piece to an upload: the bytes it holds now.
    #[method(name = "Append")]
    async fn append(&self, arg: AppendArg) -> RpcResult<u64>;

    /// Finishes an upload: the file as a unit names it.
    #[method(name = "Commit")]
    async fn commit(&self, arg: CommitArg) -> RpcResult<Kept>;

    /// Whether a file is kept (by its SHA-256 in hex, with or without `sha256:`).
    #[method(name = "Stat")]
    async fn stat(&self, sha256: String) -> RpcResult<Kept>;
}

impl Api {
    fn content(&self) -> &crate::store::content::Content {
        self.registry.store().content()
    }
}

#[async_trait]
impl FileApiServer for Api {
    async fn begin(&self, arg: BeginArg) -> RpcResult<Upload> {
        let upload = self.content().begin(arg.size).map_err(rpc_error)?;
        Ok(Upload { upload })
    }

    async fn append(&self, arg: AppendArg) -> RpcResult<u64> {
        let data = base64::engine::general_purpose::STANDARD
            .decode(arg.data.as_bytes())
            .map_err(|e| rpc_error(Error::invalid("data", format!("not base64: {e}"))))?;
        self.content().append(arg.upload, arg.offset, data).await.map_err(rpc_error)
    }

    async fn commit(&self, arg: CommitArg) -> RpcResult<Kept> {
        let content = self.content();
        let sha = content.commit(arg.upload).await.map_err(rpc_error)?;
        let size = content.size(&sha).await.map_err(rpc_error)?.unwrap_or_default();
        Ok(Kept { source: format!("{CONTENT_PREFIX}{sha}"), size })
    }

    async fn stat(&self, sha256: String) -> RpcResult<Kept> {
        let sha = sha256.strip_prefix(CONTENT_PREFIX).unwrap_or(&sha256);
        match self.content().size(sha).await.map_err(rpc_error)? {
            Some(size) => Ok(Kept { source: format!("{CONTENT_PREFIX}{sha}"), size }),
            None => Err(rpc_error(Error::invalid("sha256", "no such file is kept here"))),
        }
    }
}
