//! Agents, join tokens and dispatches in the store: who may connect as an agent (a hash of
//! each credential, never the credential), which join tokens are still good, and each
//! dispatch with its runs (one per host; a retry or redo adds a run on the same host).

use std::collections::BTreeMap;

use jiff::Timestamp;

use crate::error::{Error, Result};
use crate::names::named_enum;
use crate::run::Trigger;

named_enum! {
    /// Where a dispatch stands.
    pub enum DispatchState("a dispatch state") {
        /// Hosts are running or waiting for their turn.
        Running = "running",
        /// Hosts not started yet wait: `tolerance` was exceeded, or it was paused by hand.
        Paused = "paused",
        /// Every host succeeded or was ignored.
        Succeeded = "succeeded",
        /// A host ended other than succeeded.
        Failed = "failed",
        /// Cancelled by hand (or its unit deleted).
        Cancelled = "cancelled",
    }
}

impl DispatchState {
    /// Whether it has ended.
    pub fn is_final(self) -> bool {
        !matches!(self, DispatchState::Running | DispatchState::Paused)
    }
}

/// An enrolled agent as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAgent {
    /// Its unique name.
    pub name: String,
    /// SHA-256 of its credential's secret, hex.
    pub secret_hash: String,
    /// Labels, as it last registered them.
    pub labels: BTreeMap<String, String>,
    /// Its version, OS and architecture, as it last registered them.
    pub version: String,
    /// `linux`…
    pub os: String,
    /// `x86_64`…
    pub arch: String,
    /// Most runs at once, as it last registered.
    pub max_runs: u32,
    /// When it enrolled.
    pub created_at: Timestamp,
    /// When it was last connected.
    pub last_seen: Option<Timestamp>,
    /// Revoked: its credential is refused.
    pub revoked: bool,
}

/// One dispatch: a fire of a unit on its hosts.
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchRecord {
    /// Its id.
    pub id: i64,
    /// The unit.
    pub unit: String,
    /// What fired it.
    pub trigger: Trigger,
    /// Its state.
    pub state: DispatchState,
    /// When it was created.
    pub created_at: Timestamp,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
    /// Hosts.
    pub total: u32,
    /// Hosts running at once (0: all).
    pub batch: u32,
    /// Failed hosts allowed before it pauses.
    pub tolerance: Option<u32>,
    /// Failures forgiven by its last resume: only those beyond count against `tolerance`.
    pub forgiven: u32,
}

/// Which dispatches `Store::list_dispatches` returns.
#[derive(Debug, Clone, Default)]
pub struct DispatchFilter {
    /// Of this unit only.
    pub unit: Option<String>,
    /// In this state only.
    pub state: Option<DispatchState>,
    /// At most this many.
    pub limit: u32,
    /// With an id below this.
    pub before: Option<i64>,
}

/// Whether a join token found as `(expires_at, spent_by)` (`None`: not found) may enroll an
/// agent at `now`; the refusal says why and what to do.
pub(super) fn check_join_token(
    token: Option<(Timestamp, Option<String>)>,
    now: Timestamp,
) -> Result<()> {
    match token {
        None => Err(Error::Unauthorized("unknown join token".into())),
        Some((_, Some(by))) => Err(Error::Unauthorized(format!(
            "this join token was spent already (by agent {by:?}): ask for a new one with \
             `taskctl agents join-token`"
        ))),
        Some((exp, None)) if exp < now => Err(Error::Unauthorized(
            "this join token has expired: ask for a new one with `taskctl agents join-token`"
                .into(),
        )),
        Some(_) => Ok(()),
    }
}

/// The refusal to enroll an agent under the name of one enrolled already.
pub(super) fn name_taken(name: &str) -> Error {
    Error::Conflict(format!(
        "an agent named {name:?} is enrolled already: give this one another --name, or revoke \
         that one first (`taskctl agents revoke {name}`)"
    ))
}
