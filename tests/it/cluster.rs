//! Daemons on PostgreSQL (`--store postgres://…`): each test gets a database of its own on
//! the server `TASKD_TEST_PG` names (`scripts/test` starts one), created here and dropped at
//! the end. Without `TASKD_TEST_PG` these tests pass without checking, except under
//! `CI=true`, where they fail.

use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::json;

use crate::common::TestDaemon;

/// A PostgreSQL database of one test, dropped when this is.
pub struct PgDb {
    admin: String,
    name: String,
    /// Its URL.
    pub url: String,
}

/// Runs one batch of SQL on the database at `url`.
pub fn sql(url: &str, statements: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        tokio::spawn(conn);
        c.batch_execute(statements).await.unwrap_or_else(|e| panic!("{statements}: {e}"));
    });
}

/// The rows of a query on `url`, each column as text.
pub fn query(url: &str, q: &str) -> Vec<Vec<Option<String>>> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let rows = c.simple_query(q).await.unwrap();
        rows.into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    Some((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect())
                }
                _ => None,
            })
            .collect()
    })
}

impl PgDb {
    /// A new empty database, or `None` outside CI when no server is configured.
    pub fn create() -> Option<PgDb> {
        let Ok(admin) = std::env::var("TASKD_TEST_PG") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "TASKD_TEST_PG is not set: the PostgreSQL tests need a server (scripts/test starts one)"
            );
            eprintln!("TASKD_TEST_PG is not set: test skipped");
            return None;
        };
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("taskd_it_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        sql(&admin, &format!("CREATE DATABASE {name}"));
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Some(PgDb { admin, name, url })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        sql(&self.admin, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

#[test]
fn a_daemon_on_postgres_keeps_units_runs_and_logs_across_a_kill() {
    let Some(db) = PgDb::create() else { return };
    let mut d = TestDaemon::start_with(&["--store", &db.url]);
    let status = d.call("Daemon.Status", json!(null));
    assert!(
        status["store"].as_str().unwrap().starts_with("postgres://postgres@127.0.0.1:"),
        "{status}"
    );
    d.call("TaskUnit.Add", json!({"name": "hello", "command": ["sh", "-c", "echo hi; exit 3"]}));
    let info = d.wait_unit("hello", "its first run", |u| u["last_run"]["state"] == "failed");
    let id = info["last_run"]["id"].as_i64().unwrap();
    // In the database itself.
    let rows = query(&db.url, &format!("SELECT unit, state, exit_code FROM runs WHERE id = {id}"));
    assert_eq!(rows, [[Some("hello".into()), Some("failed".into()), Some("3".into())]]);

    let rows = query(&db.url, &format!("SELECT count(*) FROM run_logs WHERE run = {id}"));
    assert_eq!(rows, [[Some("1".into())]], "the log is in the database");
    d.kill9();
    // Another server (its own state directory) on the same database reads it too.
    let mut other = TestDaemon::start_with(&["--store", &db.url]);
    let logs = other.taskctl(&["logs", &id.to_string()]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "hi\n");
    other.kill9();
    d.restart();
    let run = d.call("Run.Get", json!(id));
    assert_eq!((run["state"].as_str(), run["exit_code"].as_i64()), (Some("failed"), Some(3)));
    let logs = d.taskctl(&["logs", &id.to_string()]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "hi\n");
    let units = d.call("TaskUnit.List", json!(null));
    assert_eq!(units[0]["name"], "hello");
    let out = d.taskctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("store") && text.contains("postgres://"), "{text}");
}

#[test]
fn a_store_that_is_not_a_postgres_url_is_refused_at_start() {
    let mut d = TestDaemon::start_with(&[]);
    d.kill9();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskd"))
        .args(["--state-dir"])
        .arg(d.state_dir())
        .args(["--store", "mysql://root@localhost/taskd"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a PostgreSQL URL"), "{err}");
}
