//! `rpc.discover`: an OpenRPC document for every method, generated from the wire types the
//! server itself uses (`schemars`), so it cannot drift from what is served.

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Value, json};

use super::agents::{
    AgentInfo, AgentListArg, DispatchInfo, DispatchListArg, JoinTokenArg, JoinTokenInfo,
};
use super::types::*;
use crate::proto;
use crate::unit::UnitDef;

/// One method of the document.
struct Method {
    name: &'static str,
    summary: &'static str,
    /// The one argument's name and schema, and whether it may be omitted.
    param: (&'static str, Schema, bool),
    result: Schema,
    /// For a subscription: the method that ends it.
    unsubscribe: Option<&'static str>,
}

fn method(
    name: &'static str,
    summary: &'static str,
    param: (&'static str, Schema, bool),
    result: Schema,
    unsubscribe: Option<&'static str>,
) -> Method {
    Method { name, summary, param, result, unsubscribe }
}

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// The OpenRPC document of taskd's API.
pub fn document() -> Value {
    let mut settings = SchemaSettings::draft07();
    settings.definitions_path = "/components/schemas".into();
    let g = &mut settings.into_generator();
    let name = |g: &mut SchemaGenerator| schema::<String>(g);
    let id = |g: &mut SchemaGenerator| schema::<i64>(g);
    let methods = vec![
        method(
            "TaskUnit.Add",
            "Add a unit: a definition, or a bare name (tick unit or unit file; answers true)",
            ("unit", schema::<AddArg>(g), false),
            schema::<AddResult>(g),
            None,
        ),
        method(
            "TaskUnit.Delete",
            "Delete a unit after stopping its active runs",
            ("unit", schema::<DeleteArg>(g), false),
            schema::<bool>(g),
            None,
        ),
        method(
            "TaskUnit.Edit",
            "Apply a JSON merge patch {name, …fields} to a unit's definition",
            ("patch", schema::<UnitDef>(g), false),
            schema::<UnitInfo>(g),
            None,
        ),
        method(
            "TaskUnit.List",
            "List units, filtered by state and name glob",
            ("filter", schema::<ListArg>(g), true),
            schema::<Vec<UnitSummary>>(g),
            None,
        ),
        method(
            "TaskUnit.Get",
            "One unit: definition, state, next fire time, last run, counters",
            ("name", name(g), false),
            schema::<UnitInfo>(g),
            None,
        ),
        method(
            "TaskUnit.Start",
            "Start a run now (or the active one, per the overlap policy)",
            ("name", name(g), false),
            schema::<RunInfo>(g),
            None,
        ),
        method(
            "TaskUnit.Stop",
            "Stop every active run; a service stays stopped until Start",
            ("name", name(g), false),
            schema::<u64>(g),
            None,
        ),
        method(
            "TaskUnit.Pause",
            "Pause schedules and restarts",
            ("name", name(g), false),
            schema::<UnitInfo>(g),
            None,
        ),
        method(
            "TaskUnit.Resume",
            "Resume a paused unit",
            ("name", name(g), false),
            schema::<UnitInfo>(g),
            None,
        ),
        method(
            "Run.List",
            "Runs, newest first, paged by id",
            ("filter", schema::<RunListArg>(g), true),
            schema::<Vec<RunInfo>>(g),
            None,
        ),
        method("Run.Get", "One run", ("id", id(g), false), schema::<RunInfo>(g), None),
        method(
            "Run.Cancel",
            "Stop a run (TERM, grace, KILL); answers with the run as it ended",
            ("id", id(g), false),
            schema::<RunInfo>(g),
            None,
        ),
        method(
            "Run.Logs",
            "A slice of a run's output",
            ("query", schema::<LogsArg>(g), false),
            schema::<LogsResult>(g),
            None,
        ),
        method(
            "Run.Follow",
            "Subscription: a run's output as it is written, then its end state",
            ("query", schema::<FollowArg>(g), false),
            schema::<FollowItem>(g),
            Some("Run.Unfollow"),
        ),
        method(
            "Events.Subscribe",
            "Subscription: every committed change, optionally replayed after a seq",
            ("from", schema::<SubscribeArg>(g), true),
            schema::<EventInfo>(g),
            Some("Events.Unsubscribe"),
        ),
        method(
            "Daemon.Status",
            "Version, uptime, unit and run counts, listeners",
            ("none", schema::<Value>(g), true),
            schema::<StatusInfo>(g),
            None,
        ),
        method(
            "Audit.List",
            "Audit records (state-changing calls of authenticated clients), newest first",
            ("filter", schema::<AuditListArg>(g), true),
            schema::<Vec<AuditInfo>>(g),
            None,
        ),
        method(
            "File.Begin",
            "Open an upload of a file for `file` units: its id",
            ("arg", schema::<super::files::BeginArg>(g), false),
            schema::<super::files::Upload>(g),
            None,
        ),
        method(
            "File.Append",
            "Append a piece (base64, at most 1 MiB) to an upload: the bytes it holds",
            ("arg", schema::<super::files::AppendArg>(g), false),
            schema::<u64>(g),
            None,
        ),
        method(
            "File.Commit",
            "Finish an upload: the file as a unit's file.source names it (sha256:…)",
            ("arg", schema::<super::files::CommitArg>(g), false),
            schema::<super::files::Kept>(g),
            None,
        ),
        method(
            "File.Stat",
            "Whether a file is kept, by its SHA-256",
            ("sha256", name(g), false),
            schema::<super::files::Kept>(g),
            None,
        ),
        method(
            "Agent.List",
            "Agents, by name: state, labels, version, address, running runs",
            ("filter", schema::<AgentListArg>(g), true),
            schema::<Vec<AgentInfo>>(g),
            None,
        ),
        method("Agent.Get", "One agent", ("name", name(g), false), schema::<AgentInfo>(g), None),
        method(
            "Agent.JoinToken",
            "A one-time token a new agent enrolls with (`taskd agent --join TOKEN`)",
            ("options", schema::<JoinTokenArg>(g), true),
            schema::<JoinTokenInfo>(g),
            None,
        ),
        method(
            "Agent.Revoke",
            "Close an agent's connection and refuse its credential from now on",
            ("name", name(g), false),
            schema::<AgentInfo>(g),
            None,
        ),
        method(
            "Dispatch.List",
            "Dispatches (fires of units on their hosts), newest first, with counts by state",
            ("filter", schema::<DispatchListArg>(g), true),
            schema::<Vec<DispatchInfo>>(g),
            None,
        ),
        method(
            "Dispatch.Get",
            "One dispatch with every run, one per host and attempt",
            ("id", id(g), false),
            schema::<DispatchInfo>(g),
            None,
        ),
        method(
            "Dispatch.Cancel",
            "Stop a dispatch's active runs; hosts waiting for their turn end cancelled",
            ("id", id(g), false),
            schema::<DispatchInfo>(g),
            None,
        ),
        method(
            "Dispatch.Pause",
            "Hosts waiting for their turn wait until the dispatch is resumed",
            ("id", id(g), false),
            schema::<DispatchInfo>(g),
            None,
        ),
        method(
            "Dispatch.Resume",
            "Go on; failures so far no longer count against tolerance",
            ("id", id(g), false),
            schema::<DispatchInfo>(g),
            None,
        ),
        method(
            "Run.Redo",
            "Run a dispatch's ended run again on the same host, as a new attempt",
            ("id", id(g), false),
            schema::<RunInfo>(g),
            None,
        ),
        method(
            "Run.Ignore",
            "A dispatch's run no longer counts against its tolerance or outcome",
            ("id", id(g), false),
            schema::<RunInfo>(g),
            None,
        ),
        method(
            "AgentLink.Join",
            "Agent protocol: trade a one-time join token for an agent's credential",
            ("request", schema::<proto::JoinRequest>(g), false),
            schema::<proto::Joined>(g),
            None,
        ),
        method(
            "AgentLink.Attach",
            "Agent protocol (agent credentials only): register, and receive orders",
            ("hello", schema::<proto::Hello>(g), false),
            schema::<proto::Order>(g),
            Some("AgentLink.Detach"),
        ),
        method(
            "AgentLink.Started",
            "Agent protocol (agent credentials only): a run's process started",
            ("started", schema::<proto::Started>(g), false),
            schema::<bool>(g),
            None,
        ),
        method(
            "AgentLink.Output",
            "Agent protocol (agent credentials only): a run's output, each chunk numbered",
            ("output", schema::<proto::Output>(g), false),
            schema::<bool>(g),
            None,
        ),
        method(
            "AgentLink.Finished",
            "Agent protocol (agent credentials only): a run ended; answered once recorded",
            ("outcome", schema::<proto::Outcome>(g), false),
            schema::<bool>(g),
            None,
        ),
        method(
            "AgentLink.FinishedMany",
            "Agent protocol (agent credentials only): runs ended, at most 256; answered once \
             each is recorded or refused, in order: null, or why it was not taken",
            ("outcomes", schema::<Vec<proto::Outcome>>(g), false),
            schema::<Vec<Option<String>>>(g),
            None,
        ),
        method(
            "AgentLink.Heartbeat",
            "Agent protocol (agent credentials only): the agent is alive",
            ("none", schema::<Value>(g), true),
            schema::<bool>(g),
            None,
        ),
        method(
            "AgentLink.FileRead",
            "Agent protocol (agent credentials only): a piece of the file a run of it puts",
            ("read", schema::<proto::FileRead>(g), false),
            schema::<proto::FileData>(g),
            None,
        ),
        method(
            "Auth.Login",
            "Authenticate this raw TCP connection with the daemon's token",
            ("token", name(g), false),
            schema::<bool>(g),
            None,
        ),
    ];
    let mut out: Vec<Value> = Vec::new();
    for m in methods {
        let (pname, pschema, optional) = m.param;
        let params = json!([{"name": pname, "required": !optional, "schema": pschema}]);
        let mut doc = json!({
            "name": m.name,
            "summary": m.summary,
            "paramStructure": "by-position",
            "params": params,
            "result": {"name": "result", "schema": m.result},
        });
        if let Some(unsub) = m.unsubscribe {
            doc["x-subscription"] = json!({"notifications": m.name, "unsubscribe": unsub});
            out.push(doc);
            out.push(json!({
                "name": unsub,
                "summary": format!("End a {} subscription", m.name),
                "paramStructure": "by-position",
                "params": [{"name": "subscription", "required": true, "schema": {}}],
                "result": {"name": "result", "schema": {"type": "boolean"}},
            }));
        } else {
            out.push(doc);
        }
    }
    out.push(json!({
        "name": "rpc.discover",
        "summary": "This document",
        "params": [],
        "result": {"name": "OpenRPC document", "schema": {"type": "object"}},
    }));
    json!({
        "openrpc": "1.3.2",
        "info": {
            "title": "taskd",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Methods marked \"Agent protocol\" are for `taskd agent` only: only an agent's credential may call them, and it may call nothing else. Every method takes one argument (params: [arg]; a bare object is the same as [object]). Subscriptions work over WebSocket and raw TCP (JSON-RPC 2.0).",
        },
        "methods": out,
        "components": {"schemas": g.take_definitions(true)},
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::*;
    use crate::registry::{Registry, RegistryConfig};
    use crate::rpc::api::{Api, ApiContext, methods};
    use crate::store::Store;

    #[tokio::test]
    async fn every_served_method_is_in_the_document() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cfg = RegistryConfig {
            validate: Default::default(),
            units_dir: dir.path().join("units"),
            work_dir: dir.path().join("work"),
            keep_runs: 10,
            max_units: 10,
            metrics: crate::metrics::Metrics::new(store.commit_latency()),
            notifier: crate::notify::Notifier::start(
                store.clone(),
                |_| Value::Null,
                tokio_util::sync::CancellationToken::new(),
                &tokio_util::task::TaskTracker::new(),
            ),
        };
        let root = tokio_util::sync::CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let fleet = crate::fleet::Fleet::open(store.clone(), Default::default(), root.clone())
            .await
            .unwrap();
        let registry = Registry::open(store, fleet, cfg, root, tracker).await.unwrap();
        let api = Api(Arc::new(ApiContext {
            registry,
            started: jiff::Timestamp::now(),
            listeners: vec![],
            token: None,
            followers: Default::default(),
            gate: crate::rpc::conn::Gate::new(1, false),
            cluster: None,
        }));
        let served: BTreeSet<String> = methods(api).method_names().map(str::to_string).collect();
        let doc = document();
        let documented: BTreeSet<String> = doc["methods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(served, documented);
        // Every reference resolves to a schema in the document.
        let text = doc.to_string();
        for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = r.split('"').next().unwrap();
            assert!(doc["components"]["schemas"].get(name).is_some(), "dangling $ref {name}");
        }
        assert!(doc["components"]["schemas"]["UnitDef"]["properties"]["cron"].is_object());
    }
}
