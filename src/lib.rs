//! taskd: a long-running task daemon and its client library.
//!
//! Users define named **units** — a command to run once, on an interval or cron schedule, or
//! to keep running as a supervised service — and taskd runs each as a cancellable tokio task,
//! stops whole process trees, keeps every run's outcome and output, and survives restarts.
//! It answers JSON-RPC over raw TCP, HTTP and WebSocket on one port; `taskctl` is its CLI.
//!
//! # Layout
//!
//! - `daemon` wires everything together: store, registry, listener; runs until cancelled.
//! - `config` reads flags, `TASKD_*` variables and `taskd.toml`.
//! - `heap` tunes glibc's allocator for a server and gives freed memory back after bursts.
//! - `state_dir` makes the state directory private, locks it, and holds the token file.
//! - `unit` holds definitions and validation, schedules, and the per-unit loop.
//! - `names` defines the enums whose values have wire names (`named_enum!`).
//! - `run` is the run state machine and the record kept for each run.
//! - `executor` runs a unit's run where it executes (today: this host, through `exec`) and
//!   hands back how it ended; the unit loop only decides that it happens and records it.
//! - `exec` runs one command in its own process group and stops it with TERM → KILL.
//! - `store` is the only module that touches SQLite and log files.
//! - `registry` maps unit names to their handles and offers every unit operation.
//! - `rpc` has the wire types, one file per method group, the transports and the client.
//! - `cli` is `taskctl`: one file per command group, and output rendering.
//!
//! Data of one run flows one way: `rpc` → `registry` → `unit` loop → `exec`, and the loop
//! records what happened through `store`.

mod names;

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod error;
pub mod exec;
pub mod executor;
pub mod fleet;
pub mod heap;
pub mod metrics;
pub mod notify;
pub mod process;
pub mod proto;
pub mod redis_queue;
pub mod registry;
pub mod rpc;
pub mod run;
pub mod state_dir;
pub mod store;
pub mod systemd;
pub mod task_units;
pub mod tls;
pub mod unit;

pub use error::{Error, Result};
