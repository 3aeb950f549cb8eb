//! The agent protocol's messages: what a `taskd agent` and its server say to each other,
//! as plain serde structures. Both sides build on this module and on nothing of the other's:
//! the server's engine never sees an agent's journal, and an agent never loads the store, the
//! registry or the scheduler.
//!
//! The conversation, on one raw-TCP connection the agent opens (NDJSON JSON-RPC, as any
//! client's):
//!
//! 1. `AgentLink.Join` (first start only, before any login): a one-time join token traded for
//!    the agent's credential, which the agent keeps in `<state-dir>/credential`.
//! 2. `Auth.Login` with that credential: the connection is the agent's from then on, and
//!    serves only `AgentLink.*` methods.
//! 3. `AgentLink.Attach` ([`Hello`]): registers the agent (labels, version, what it holds) and
//!    opens the stream of [`Order`]s: runs assigned to it and runs to stop.
//! 4. The agent reports with calls, each answered only once the server has taken it in:
//!    `AgentLink.Started`, `AgentLink.Output` (bounded batches of [`Chunk`]s),
//!    `AgentLink.Finished` (an [`Outcome`]; its answer is the acknowledgement after which the
//!    agent forgets the run), and `AgentLink.Heartbeat` every few seconds.
//!
//! Times are microseconds since the Unix epoch, so that neither side parses the other's
//! clock format.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A join token traded for a credential (`AgentLink.Join`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct JoinRequest {
    /// The token `taskctl agents join-token` printed.
    pub token: String,
    /// The name the agent will be known by.
    pub name: String,
}

/// What `AgentLink.Join` answers.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Joined {
    /// The agent's name.
    pub name: String,
    /// Its credential: what it logs in with from now on (`Auth.Login`).
    pub credential: String,
}

/// An agent introducing itself on a new connection (`AgentLink.Attach`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct Hello {
    /// Its name: the one its credential was issued to.
    pub name: String,
    /// Its labels, which `hosts` selectors match.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Its taskd version.
    #[serde(default)]
    pub version: String,
    /// Its operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// Its architecture (`x86_64`).
    #[serde(default)]
    pub arch: String,
    /// Most runs it runs at once.
    #[serde(default)]
    pub max_runs: u32,
    /// Runs it is running now.
    #[serde(default)]
    pub holding: Vec<i64>,
}

/// What a server asks of an agent, as notifications of the `AgentLink.Attach` subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "order", rename_all = "snake_case")]
pub enum Order {
    /// The server's settings for this connection, sent first.
    Settings {
        /// How often to call `AgentLink.Heartbeat`, in milliseconds.
        heartbeat_ms: u64,
    },
    /// Run this. Sent again after every reconnection while the run is active on the server:
    /// the agent's journal makes it start once.
    Assign(Assignment),
    /// Stop this run (TERM, grace, KILL to its whole tree), and report its end.
    Cancel {
        /// The run.
        run: i64,
        /// Why (`cancelled`, `timeout`, `agent unreachable`…), recorded with its end.
        reason: String,
    },
}

/// One run for an agent to execute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Assignment {
    /// The run's id on the server.
    pub run: i64,
    /// Its attempt (1 for the first).
    pub attempt: u32,
    /// The unit's name.
    pub unit: String,
    /// What started it (`schedule`, `manual`…).
    pub trigger: String,
    /// The unit's definition, as `TaskUnit.Get` shows it, with `hosts` and the dispatch
    /// fields left out: the agent validates it against its own rules (`--allowed-dirs`,
    /// `--allowed-users`) and runs it as its own host.
    pub definition: serde_json::Value,
    /// When to start it, by the agent's clock (µs since the epoch): a schedule's fire is
    /// sent ahead of its time (see `unit::runner`), and waits here for it, at most
    /// [`START_WAIT_MAX`]. Absent, or past: at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at_us: Option<i64>,
}

/// The longest an agent waits for a run's `start_at_us`: a clock far behind the server's
/// delays a run by no more than this.
pub const START_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// A run's process started (`AgentLink.Started`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Started {
    /// The run.
    pub run: i64,
    /// Its process id on the agent's host.
    pub pid: u32,
    /// When it started (µs since the epoch).
    pub at_us: i64,
}

/// Output of a run (`AgentLink.Output`), at most [`MAX_OUTPUT_BATCH`] bytes of data.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Output {
    /// The run.
    pub run: i64,
    /// Its chunks, in order.
    pub chunks: Vec<Chunk>,
}

/// One piece of a run's output.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Chunk {
    /// Its number among the run's chunks, from 0: a chunk sent again after a reconnection
    /// is recognised and written once.
    pub seq: u64,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// When it was read (µs since the epoch).
    pub at_us: i64,
    /// The bytes, as text (invalid UTF-8 replaced).
    pub data: String,
}

/// A piece of a `file` unit's content, asked for by the agent running it
/// (`AgentLink.FileRead`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct FileRead {
    /// The run putting the file.
    pub run: i64,
    /// The content (`file.source` without its `sha256:`).
    pub sha256: String,
    /// From this byte.
    pub offset: u64,
    /// At most this many bytes (the server gives at most 1 MiB).
    pub len: u32,
}

/// The bytes of a [`FileRead`], in base64 (none past the file's end).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct FileData {
    /// Standard base64 with padding.
    pub data: String,
}

/// Most bytes of output data in one `AgentLink.Output` call.
pub const MAX_OUTPUT_BATCH: usize = 64 * 1024;

/// Most results in one `AgentLink.FinishedMany` call.
pub const MAX_RESULTS_BATCH: usize = 256;

/// How a run ended on its agent (`AgentLink.Finished`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Outcome {
    /// The run.
    pub run: i64,
    /// Its attempt.
    pub attempt: u32,
    /// `succeeded`, `failed`, `timed_out`, `cancelled` or `lost`.
    pub state: String,
    /// Exit code, if it exited.
    pub exit_code: Option<i32>,
    /// Signal number, if a signal ended it.
    pub signal: Option<i32>,
    /// Why it was stopped, lost, or refused.
    pub reason: Option<String>,
    /// Its process id.
    pub pid: Option<u32>,
    /// When it started (µs since the epoch).
    pub started_at_us: Option<i64>,
    /// When it ended (µs since the epoch).
    pub ended_at_us: i64,
    /// Bytes it wrote to stdout.
    pub stdout_bytes: u64,
    /// Bytes it wrote to stderr.
    pub stderr_bytes: u64,
}

/// How often an agent calls `AgentLink.Heartbeat` until the server says otherwise
/// ([`Order::Settings`]: a third of its `agent_timeout`, at most this).
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The prefix of every join token: `taskd-join:<secret>[@sha256:<fingerprint>]`.
pub const JOIN_PREFIX: &str = "taskd-join:";

/// A join token carrying the server certificate's fingerprint, if it has one.
pub fn join_token(secret_part: &str, fingerprint: Option<&str>) -> String {
    match fingerprint {
        Some(fp) => format!("{secret_part}@sha256:{fp}"),
        None => secret_part.to_string(),
    }
}

/// A join token's secret part and the fingerprint it carries.
pub fn split_join_token(token: &str) -> (&str, Option<&str>) {
    let token = token.trim();
    match token.split_once("@sha256:") {
        Some((secret, fp)) => (secret, Some(fp)),
        None => (token, None),
    }
}

/// The prefix of every agent credential: `taskd-agent:<name>:<secret>`.
pub const CREDENTIAL_PREFIX: &str = "taskd-agent:";

/// The name and secret of an agent credential, if `s` is one.
pub fn parse_credential(s: &str) -> Option<(&str, &str)> {
    s.trim().strip_prefix(CREDENTIAL_PREFIX)?.rsplit_once(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_carry_their_kind() {
        let o = Order::Cancel { run: 3, reason: "cancelled".into() };
        let j = serde_json::to_value(&o).unwrap();
        assert_eq!(j, serde_json::json!({"order": "cancel", "run": 3, "reason": "cancelled"}));
        assert_eq!(serde_json::from_value::<Order>(j).unwrap(), o);
    }

    #[test]
    fn credentials_name_their_agent() {
        assert_eq!(parse_credential("taskd-agent:web-01:abc\n"), Some(("web-01", "abc")));
        assert_eq!(parse_credential("0123abcd"), None);
    }
}
