//! The library's one error type, and the stable JSON-RPC error codes it maps to.

use std::path::PathBuf;

/// Stable JSON-RPC error codes. JSON-RPC's own codes (-32700, -32600, -32601, -32602) are
/// used for malformed input; these are taskd's application codes.
pub mod codes {
    /// `Auth.Login` has not succeeded on this connection, or the bearer token is wrong.
    pub const UNAUTHORIZED: i32 = -32050;
    /// `TaskUnit.Add` of a name that is already taken.
    pub const UNIT_EXISTS: i32 = -32051;
    /// No unit has that name.
    pub const UNIT_NOT_FOUND: i32 = -32052;
    /// No run has that id.
    pub const RUN_NOT_FOUND: i32 = -32053;
    /// A unit definition (or an edit of one) failed validation; `data.field` names the field.
    pub const INVALID_DEFINITION: i32 = -32054;
    /// A limit was exceeded: request size, connections, subscriptions, units.
    pub const LIMIT_EXCEEDED: i32 = -32055;
    /// The store could not record the change (disk full, read-only state directory…).
    pub const STORAGE: i32 = -32056;
    /// The request is well-formed but not allowed in the unit's or run's current state.
    pub const CONFLICT: i32 = -32057;
    /// No agent has that name.
    pub const AGENT_NOT_FOUND: i32 = -32058;
    /// No dispatch has that id.
    pub const DISPATCH_NOT_FOUND: i32 = -32059;
}

/// Everything that can go wrong inside taskd's engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A unit definition is invalid; `field` names the offending field.
    #[error("{field}: {reason}")]
    Invalid {
        /// The definition field at fault (`cron`, `env.FOO`, …).
        field: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A unit with this name already exists.
    #[error("unit {} already exists: edit it, or delete it first", shown_name(.0))]
    UnitExists(String),
    /// No unit with this name.
    #[error("unit {} not found", shown_name(.0))]
    UnitNotFound(String),
    /// No run with this id.
    #[error("run {0} not found")]
    RunNotFound(i64),
    /// No agent with this name.
    #[error("agent {} not found", shown_name(.0))]
    AgentNotFound(String),
    /// No dispatch with this id.
    #[error("dispatch {0} not found")]
    DispatchNotFound(i64),
    /// A join token or an agent credential was refused; the message says why.
    #[error("{0}")]
    Unauthorized(String),
    /// The operation does not apply in the current state.
    #[error("{0}")]
    Conflict(String),
    /// A configured limit was reached.
    #[error("{0}")]
    Limit(String),
    /// The SQLite store failed.
    #[error("store: {0}")]
    Store(#[from] rusqlite::Error),
    /// In a cluster, this server does not hold the lease (any more): it may change nothing.
    #[error("this server does not hold the cluster's lease (any more): it changes nothing")]
    Fenced,
    /// The PostgreSQL store failed (unreachable, or it refused a statement).
    #[error("store: {0}")]
    Postgres(String),
    /// A batch of changes could not be committed (disk full, read-only state directory…).
    #[error("store: {0}")]
    Storage(String),
    /// A change was only partly made: the store could not record the rest. The message says
    /// what was done.
    #[error("{0}")]
    NotRecorded(String),
    /// A file under the state directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The daemon is shutting down and no longer accepts work.
    #[error("the daemon is shutting down")]
    ShuttingDown,
}

impl Error {
    /// An invalid-definition error for `field`.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid { field: field.into(), reason: reason.into() }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    /// The stable JSON-RPC error code for this error.
    pub fn code(&self) -> i32 {
        match self {
            Error::Invalid { .. } => codes::INVALID_DEFINITION,
            Error::UnitExists(_) => codes::UNIT_EXISTS,
            Error::UnitNotFound(_) => codes::UNIT_NOT_FOUND,
            Error::RunNotFound(_) => codes::RUN_NOT_FOUND,
            Error::AgentNotFound(_) => codes::AGENT_NOT_FOUND,
            Error::DispatchNotFound(_) => codes::DISPATCH_NOT_FOUND,
            Error::Unauthorized(_) => codes::UNAUTHORIZED,
            Error::Conflict(_) | Error::ShuttingDown | Error::Fenced => codes::CONFLICT,
            Error::Limit(_) => codes::LIMIT_EXCEEDED,
            Error::Store(_)
            | Error::Storage(_)
            | Error::Postgres(_)
            | Error::NotRecorded(_)
            | Error::Io { .. } => codes::STORAGE,
        }
    }
}

/// A name as error messages show it: quoted, and cut when it is longer than any unit name can
/// be, so that a hostile name is never copied whole into a reply, a log or the audit log.
pub fn shown_name(name: &str) -> String {
    const MAX: usize = 64;
    if name.len() <= MAX {
        return format!("{name:?}");
    }
    let mut end = 32;
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes, longer than a unit name can be)", &name[..end], name.len())
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's own message when it gave one ("duplicate key…"), else what failed.
        match e.as_db_error() {
            Some(db) => Error::Postgres(format!("PostgreSQL: {}", db.message())),
            None => {
                // With its causes: "error performing TLS handshake: invalid peer certificate…".
                let mut why = format!("PostgreSQL: {e}");
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    why = format!("{why}: {c}");
                    cause = c.source();
                }
                Error::Postgres(why)
            }
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            e => Error::Postgres(format!("cannot reach PostgreSQL: {e}")),
        }
    }
}
