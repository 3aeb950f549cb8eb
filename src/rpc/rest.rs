//! The seed's REST task API (seed 000, open-devops; SPEC §12), so that its scripts work
//! against taskd with only the address and an `Authorization` header changed:
//!
//! - `POST /api/v1/task` `{title, account, timeout, hosts, script, args, creator}` records the
//!   task ([`ApiTask`]) and adds the one-shot unit `task-<id>` that runs `script` once (with
//!   `args` split at whitespace) as `account` on `hosts`, each host's run stopped after
//!   `timeout` seconds (0: never). `hosts` is a JSON array of host names or selectors, or a
//!   string holding one, as the seed's Python client sends it (`json.dumps([...])`). Fields
//!   the seed's model does not have are ignored, as its Go binding ignores them. Answers 200
//!   with the task's id as a bare JSON number, once the task and its unit are committed.
//! - `GET /api/v1/task` answers the newest tasks (1,000, or `?limit=N` up to 10,000; older
//!   ones with `?before=ID`), oldest first, as `{id, title, account, timeout, hosts, script,
//!   args, creator, created, done}`, at most [`LIST_BYTES`] of them (the oldest left out);
//!   `done` is 1 once every host's run has ended (the unit's dispatch ended), or its unit is
//!   gone. A task is listed once its unit's `Add` was answered.
//!
//! Errors are HTTP 400 (the request: the field and why), 401 (the token) or 500 (the store),
//! with `{"error": "…"}`; a refused task leaves nothing behind.

use std::net::SocketAddr;

use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderValue};
use jiff::Timestamp;
use jsonrpsee::server::{HttpBody, HttpResponse};
use serde_json::{Map, Value, json};

use super::http::route_error;
use crate::error::Error;
use crate::registry::Registry;
use crate::store::{API_TASKS_LISTED, ApiTask, AuditRecord};
use crate::unit::UnitDef;
use crate::unit::definition::kind_of;

/// The path of the task API.
pub const TASK_PATH: &str = "/api/v1/task";

/// The method name the audit log records for a task added.
const AUDITED_AS: &str = "POST /api/v1/task";

/// The largest answer of `GET /api/v1/task`, in bytes: older tasks beyond it are left out.
pub const LIST_BYTES: usize = 8 << 20;

fn json_ok(body: String) -> HttpResponse {
    let mut resp = HttpResponse::new(HttpBody::from(body));
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A field that must be a string, if present.
fn string_field(m: &Map<String, Value>, field: &str) -> Result<String, String> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(format!("{field}: expected a string, got {}", kind_of(v))),
    }
}

/// `hosts`: an array of strings, or a string holding one.
fn hosts_field(m: &Map<String, Value>) -> Result<Vec<String>, String> {
    let parsed;
    let v = match m.get("hosts") {
        None | Some(Value::Null) => return Err("hosts: required".into()),
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s).map_err(|e| {
                format!("hosts: a string must hold a JSON array of host names: {e}")
            })?;
            &parsed
        }
        Some(v) => v,
    };
    let Value::Array(items) = v else {
        return Err(format!("hosts: expected an array of host names, got {}", kind_of(v)));
    };
    if items.is_empty() {
        return Err("hosts: at least one host".into());
    }
    items
        .iter()
        .map(|h| match h {
            Value::String(s) => Ok(s.clone()),
            other => Err(format!("hosts: expected host names (strings), got {}", kind_of(other))),
        })
        .collect()
}

/// `args`: a string (the seed's), or an array of strings (joined with spaces).
fn args_field(m: &Map<String, Value>) -> Result<String, String> {
    match m.get("args") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|a| match a {
                Value::String(s) => Ok(s.as_str()),
                other => Err(format!("args: expected strings, got {}", kind_of(other))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|v| v.join(" ")),
        _ => string_field(m, "args"),
    }
}

/// The task a request body asks for.
fn parse(body: &[u8]) -> Result<ApiTask, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let Value::Object(m) = v else {
        return Err(format!("expected a JSON object, got {}", kind_of(&v)));
    };
    let script = string_field(&m, "script")?;
    if script.trim().is_empty() {
        return Err("script: required, and not empty".into());
    }
    let timeout = match m.get("timeout") {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("timeout: expected whole seconds from 0 to {}", u32::MAX))?,
        Some(v) => {
            return Err(format!("timeout: expected a number of seconds, got {}", kind_of(v)));
        }
    };
    Ok(ApiTask {
        id: 0,
        title: string_field(&m, "title")?,
        account: string_field(&m, "account")?,
        timeout,
        hosts: hosts_field(&m)?,
        script,
        args: args_field(&m)?,
        creator: string_field(&m, "creator")?,
        created: Timestamp::now(),
        done: false,
    })
}

/// The definition of the unit that runs `t`.
fn definition(t: &ApiTask, id: i64) -> Value {
    let name = ApiTask::unit_name(id);
    let mut def = json!({
        "name": name,
        "script": t.script,
        "args": t.args.split_whitespace().collect::<Vec<_>>(),
        "hosts": t.hosts,
        "description": t.title,
        "env": {crate::task_units::TASK_ID: id.to_string()},
    });
    if !t.account.is_empty() {
        def["user"] = json!(t.account);
    }
    if t.timeout > 0 {
        def["timeout"] = json!(format!("{}s", t.timeout));
    }
    def
}

/// An error of the unit's definition, told in the task's words.
fn refusal(e: &Error) -> HttpResponse {
    let status = match e {
        Error::Invalid { .. } | Error::Limit(_) | Error::UnitExists(_) | Error::Conflict(_) => {
            StatusCode::BAD_REQUEST
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let message = match e {
        Error::Invalid { field, reason } => {
            let field = match field.as_str() {
                "user" => "account",
                "description" => "title",
                f => f,
            };
            format!("{field}: {reason}")
        }
        e => e.to_string(),
    };
    route_error(status, &message)
}

/// Ids a task may try when units of their names exist already.
const NAME_TRIES: u32 = 16;

/// `POST /api/v1/task`.
pub async fn add(registry: &Registry, body: &[u8], peer: Option<SocketAddr>) -> HttpResponse {
    let task = match parse(body) {
        Ok(t) => t,
        Err(message) => return route_error(StatusCode::BAD_REQUEST, &message),
    };
    let store = registry.store();
    // The id names the unit: the task is recorded first, and forgotten if its unit is refused.
    // A unit of that name made otherwise (a user's `task-7`) costs the id, not the task.
    let mut tries = 0;
    let (id, name, added) = loop {
        let id = match store.insert_api_task(task.clone()).await {
            Ok(id) => id,
            Err(e) => return route_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
        let name = ApiTask::unit_name(id);
        let added = match UnitDef::from_json(definition(&task, id)) {
            Ok(def) => registry.add(def).await.map(|_| ()),
            Err(e) => Err(e),
        };
        tries += 1;
        match added {
            Err(Error::UnitExists(_)) if tries < NAME_TRIES => {
                if let Err(e) = store.settle_api_task(id, false).await {
                    tracing::warn!(task = id, error = %e, "cannot forget a task of the REST API");
                }
            }
            added => break (id, name, added),
        }
    };
    store.audit(AuditRecord {
        id: 0,
        time: Timestamp::now(),
        peer: peer.map_or_else(|| "http".into(), |p| format!("http:{p}")),
        method: AUDITED_AS.into(),
        unit: Some(name),
        outcome: match &added {
            Ok(()) => "ok".into(),
            Err(e) => e.to_string(),
        },
    });
    // Listed from now on, or forgotten; a task whose settling fails stays unlisted.
    if let Err(d) = store.settle_api_task(id, added.is_ok()).await {
        tracing::warn!(task = id, error = %d, "cannot settle a task of the REST API");
        if added.is_ok() {
            return route_error(StatusCode::INTERNAL_SERVER_ERROR, &d.to_string());
        }
    }
    match added {
        Ok(()) => json_ok(id.to_string()),
        Err(e) => refusal(&e),
    }
}

/// `?limit=N&before=ID` of `GET /api/v1/task`.
fn list_query(query: Option<&str>) -> Result<(u32, Option<i64>), String> {
    let (mut limit, mut before) = (API_TASKS_LISTED.0, None);
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=API_TASKS_LISTED.1).contains(n))
                    .ok_or_else(|| format!("limit: 1 to {}", API_TASKS_LISTED.1))?;
            }
            "before" => {
                before = Some(v.parse::<i64>().map_err(|_| "before: a task id".to_string())?);
            }
            _ => {}
        }
    }
    Ok((limit, before))
}

/// `GET /api/v1/task` (`query`: the URL's query string).
pub async fn list(registry: &Registry, query: Option<&str>) -> HttpResponse {
    let (limit, before) = match list_query(query) {
        Ok(q) => q,
        Err(message) => return route_error(StatusCode::BAD_REQUEST, &message),
    };
    let tasks = match registry.store().list_api_tasks(limit, before).await {
        Ok(t) => t,
        Err(e) => return route_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    // Newest first until the answer is full, then in the seed's order, oldest first.
    let mut bytes = 2;
    let mut items: Vec<String> = tasks
        .iter()
        .rev()
        .map(|t| {
            json!({
                "id": t.id,
                "title": t.title,
                "account": t.account,
                "timeout": t.timeout,
                "hosts": t.hosts,
                "script": t.script,
                "args": t.args,
                "creator": t.creator,
                "created": t.created.to_string(),
                "done": u8::from(t.done),
            })
            .to_string()
        })
        .take_while(|item| {
            bytes += item.len() + 1;
            bytes <= LIST_BYTES
        })
        .collect();
    items.reverse();
    json_ok(format!("[{}]", items.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_request_parses_with_hosts_as_a_string() {
        let body = br##"{"script": "#!/bin/bash\nss -ntlp", "account": "root", "title": "test01",
            "timeout": 5, "hosts": "[\"192.168.3.200\", \"192.168.3.201\"]", "creator": "xiaoyi"}"##;
        let t = parse(body).unwrap();
        assert_eq!(t.hosts, ["192.168.3.200", "192.168.3.201"]);
        assert_eq!((t.timeout, t.account.as_str(), t.args.as_str()), (5, "root", ""));
        let def = definition(&t, 1);
        assert_eq!(def["user"], "root");
        assert_eq!(def["timeout"], "5s");
        assert_eq!(def["description"], "test01");
        let t =
            parse(br#"{"script": "x", "hosts": ["a"], "args": "-v  --all", "done": 0}"#).unwrap();
        assert_eq!(definition(&t, 1)["args"], json!(["-v", "--all"]));
        assert!(definition(&t, 1).get("user").is_none());
    }

    #[test]
    fn bad_requests_name_the_field() {
        for (body, field) in [
            (&br#"[1]"#[..], "expected a JSON object"),
            (br#"{"hosts": ["a"]}"#, "script:"),
            (br#"{"script": "x"}"#, "hosts: required"),
            (br#"{"script": "x", "hosts": "not json"}"#, "hosts: a string"),
            (br#"{"script": "x", "hosts": []}"#, "hosts: at least"),
            (br#"{"script": "x", "hosts": [1]}"#, "hosts: expected host names"),
            (br#"{"script": "x", "hosts": ["a"], "timeout": -1}"#, "timeout:"),
            (br#"{"script": "x", "hosts": ["a"], "timeout": "5"}"#, "timeout:"),
            (br#"{"script": "x", "hosts": ["a"], "account": 0}"#, "account:"),
            (b"{", "not JSON"),
        ] {
            let e = parse(body).unwrap_err();
            assert!(e.contains(field), "{e} should name {field}");
        }
    }
}
