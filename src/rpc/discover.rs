//! `rpc.discover`: an OpenRPC document for every method, generated from the wire types the
//! server itself uses (`schemars`), so it cannot drift from what is served.

use schemars::generate::{SchemaGenerator, SchemaSettings};
use schemars::{JsonSchema, Schema};
use serde_json::{Value, json};

use super::types::*;
use crate::unit::UnitDef;

/// One method of the document.
struct Method {
    name: &'static str,
    summary: &'static str,
    /// The argument's name and schema, and whether it may be omitted.
    param: Option<(&'static str, Schema, bool)>,
    result: Schema,
    /// For a subscription: the method that ends it.
    unsubscribe: Option<&'static str>,
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
        Method {
            name: "TaskUnit.Add",
            summary: "Add a unit: a definition, or a bare name (tick unit or unit file; answers true)",
            param: Some(("unit", schema::<AddArg>(g), false)),
            result: schema::<AddResult>(g),
            unsubscribe: None,
        },
        Method {
            name: "TaskUnit.Delete",
            summary: "Delete a unit after stopping its active runs",
            param: Some(("unit", schema::<DeleteArg>(g), false)),
            result: schema::<bool>(g),
            unsubscribe: None,
        },
        Method {
            name: "TaskUnit.Edit",
            summary: "Apply a JSON merge patch {name, …fields} to a unit's definition",
            param: Some(("patch", schema::<UnitDef>(g), false)),
            result: schema::<UnitInfo>(g),
            unsubscribe: None,
        },
        Method {
            name: "TaskUnit.List",
            summary: "List units, filtered by state and name glob",
            param: Some(("filter", schema::<ListArg>(g), true)),
            result: schema::<Vec<UnitSummary>>(g),
            unsubscribe: None,
        },
        Method {
            name: "TaskUnit.Get",
            summary: "One unit: definition, state, next fire time, last run, counters",
            param: Some(("name", name(g), false)),
            result: schema::<UnitInfo>(g),
            unsubscribe: None,
        },
        Method {
            name: "TaskUnit.Start",
            summary: "Start a run now (or the active one, per the overlap policy)",
            param: Some(("name", name(g), false)),
            result: schema::<RunInfo>(g),
            unsubscribe: None,
        },
        Method {
            name: "TaskUnit.Stop",
            summary: "Stop every active run; a service stays stopped until Start",
            param: Some(("name", name(g), false)),
            result: schema::<u64>(g),
            unsubscribe: None,
        },
        Method {
            name: "TaskUnit.Pause",
            summary: "Pause schedules and restarts",
            param: Some(("name", name(g), false)),
            result: schema::<UnitInfo>(g),
            unsubscribe: None,
        },
        Method {
            name: "TaskUnit.Resume",
            summary: "Resume a paused unit",
            param: Some(("name", name(g), false)),
            result: schema::<UnitInfo>(g),
            unsubscribe: None,
        },
        Method {
            name: "Run.List",
            summary: "Runs, newest first, paged by id",
            param: Some(("filter", schema::<RunListArg>(g), true)),
            result: schema::<Vec<RunInfo>>(g),
            unsubscribe: None,
        },
        Method {
            name: "Run.Get",
            summary: "One run",
            param: Some(("id", id(g), false)),
            result: schema::<RunInfo>(g),
            unsubscribe: None,
        },
        Method {
            name: "Run.Cancel",
            summary: "Stop a run (TERM, grace, KILL); answers with the run as it ended",
            param: Some(("id", id(g), false)),
            result: schema::<RunInfo>(g),
            unsubscribe: None,
        },
        Method {
            name: "Run.Logs",
            summary: "A slice of a run's output",
            param: Some(("query", schema::<LogsArg>(g), false)),
            result: schema::<LogsResult>(g),
            unsubscribe: None,
        },
        Method {
            name: "Run.Follow",
            summary: "Subscription: a run's output as it is written, then its end state",
            param: Some(("query", schema::<FollowArg>(g), false)),
            result: schema::<FollowItem>(g),
            unsubscribe: Some("Run.Unfollow"),
        },
        Method {
            name: "Events.Subscribe",
            summary: "Subscription: every committed change, optionally replayed after a seq",
            param: Some(("from", schema::<SubscribeArg>(g), true)),
            result: schema::<EventInfo>(g),
            unsubscribe: Some("Events.Unsubscribe"),
        },
        Method {
            name: "Daemon.Status",
            summary: "Version, uptime, unit and run counts, listeners",
            param: Some(("none", schema::<Value>(g), true)),
            result: schema::<StatusInfo>(g),
            unsubscribe: None,
        },
        Method {
            name: "Auth.Login",
            summary: "Authenticate this raw TCP connection with the daemon's token",
            param: Some(("token", name(g), false)),
            result: schema::<bool>(g),
            unsubscribe: None,
        },
    ];
    let mut out: Vec<Value> = Vec::new();
    for m in methods {
        let params: Vec<Value> = m
            .param
            .into_iter()
            .map(|(n, s, optional)| json!({"name": n, "required": !optional, "schema": s}))
            .collect();
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
            "description": "Every method takes one argument (params: [arg]; a bare object is the same as [object]). Subscriptions work over WebSocket and raw TCP (JSON-RPC 2.0).",
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
        };
        let root = tokio_util::sync::CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let registry = Registry::open(store, cfg, root, tracker).await.unwrap();
        let api = Api(Arc::new(ApiContext {
            registry,
            started: jiff::Timestamp::now(),
            listeners: vec![],
            token: None,
            followers: Default::default(),
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
