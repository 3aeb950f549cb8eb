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
    let mut d = server(&db, "a");
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
    let mut other = server(&db, "b");
    crate::common::wait_for("b to hold the lease", || (holder(&db) == "b").then_some(()));
    let logs = other.taskctl(&["logs", &id.to_string()]);
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout),
        "hi\n",
        "{}\n{}",
        String::from_utf8_lossy(&logs.stderr),
        other.log()
    );
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

/// A server of the cluster on `db`, named `name`, with a 2 s lease.
fn server(db: &PgDb, name: &str) -> TestDaemon {
    TestDaemon::start_with(&["--store", &db.url, "--name", name, "--lease", "2s"])
}

/// The lease holder's name, once somebody holds an unexpired lease.
fn holder(db: &PgDb) -> String {
    crate::common::wait_for("a lease holder", || {
        let rows = query(&db.url, "SELECT holder FROM lease WHERE expires_at > clock_timestamp()");
        rows.first().and_then(|r| r[0].clone())
    })
}

/// `(id, scheduled_at)` of every scheduled run of `unit`, oldest first.
fn scheduled_runs(db: &PgDb, unit: &str) -> Vec<(i64, String)> {
    let q = format!(
        "SELECT id, scheduled_at FROM runs WHERE unit = '{unit}' AND scheduled_at IS NOT NULL ORDER BY id"
    );
    query(&db.url, &q)
        .into_iter()
        .map(|r| (r[0].as_deref().unwrap().parse().unwrap(), r[1].clone().unwrap()))
        .collect()
}

#[test]
fn three_servers_one_engine_a_change_on_one_is_seen_on_all() {
    let Some(db) = PgDb::create() else { return };
    let servers: Vec<TestDaemon> = ["a", "b", "c"].iter().map(|n| server(&db, n)).collect();
    let h = holder(&db);
    // Every server answers for the cluster, with one token.
    assert!(servers.iter().all(|s| s.token == servers[0].token));
    servers[1].call("TaskUnit.Add", json!({"name": "u", "command": ["true"], "paused": true}));
    for s in &servers {
        assert_eq!(s.call("TaskUnit.Get", json!("u"))["name"], "u");
        let st = s.call("Daemon.Status", json!(null));
        assert_eq!(st["cluster"]["holder"], h, "{st}");
    }
}

#[test]
fn the_holder_killed_mid_schedule_another_takes_over_no_fire_twice_none_lost() {
    let Some(db) = PgDb::create() else { return };
    let mut servers: Vec<TestDaemon> = ["a", "b", "c"].iter().map(|n| server(&db, n)).collect();
    let h = holder(&db);
    servers[0].call(
        "TaskUnit.Add",
        json!({"name": "tick", "every": "1s", "catch_up": "once", "command": ["true"]}),
    );
    crate::common::wait_for("three fires", || {
        (scheduled_runs(&db, "tick").len() >= 3).then_some(())
    });
    let i = ["a", "b", "c"].iter().position(|n| *n == h).unwrap();
    let killed_at = std::time::Instant::now();
    servers[i].kill9();
    let before = scheduled_runs(&db, "tick").len();
    let h2 = crate::common::wait_for("another holder", || {
        let rows = query(&db.url, "SELECT holder FROM lease WHERE expires_at > clock_timestamp()");
        rows.first().and_then(|r| r[0].clone()).filter(|n| *n != h)
    });
    crate::common::wait_for("fires again", || {
        (scheduled_runs(&db, "tick").len() > before + 1).then_some(())
    });
    let resumed = killed_at.elapsed();
    assert!(
        resumed < std::time::Duration::from_secs(4),
        "fires resumed after {resumed:?} (lease 2 s)"
    );
    let runs = scheduled_runs(&db, "tick");
    let mut times: Vec<&str> = runs.iter().map(|r| r.1.as_str()).collect();
    times.dedup();
    assert_eq!(times.len(), runs.len(), "a fire was made twice: {runs:?}");
    // None lost: fires come every second, from the first to the last, without a gap (the
    // missed ones were made once, by catch_up).
    let secs: Vec<i64> = query(
        &db.url,
        "SELECT EXTRACT(EPOCH FROM scheduled_at)::bigint FROM runs WHERE unit = 'tick' \
         AND scheduled_at IS NOT NULL ORDER BY scheduled_at",
    )
    .into_iter()
    .map(|r| r[0].as_deref().unwrap().parse().unwrap())
    .collect();
    let gaps: Vec<i64> = secs.windows(2).map(|w| w[1] - w[0]).filter(|g| *g != 1).collect();
    assert!(
        gaps.len() <= 1 && gaps.iter().all(|g| *g <= 4),
        "fires missing: {secs:?} (new holder {h2})"
    );
}

#[test]
fn a_holder_paused_past_its_lease_fires_nothing_when_it_wakes_and_stops() {
    use nix::sys::signal::Signal;
    let Some(db) = PgDb::create() else { return };
    let mut servers: Vec<TestDaemon> = ["a", "b"].iter().map(|n| server(&db, n)).collect();
    let h = holder(&db);
    let i = usize::from(h == "b");
    servers[i].call(
        "TaskUnit.Add",
        json!({"name": "tick", "every": "1s", "catch_up": "once", "command": ["true"]}),
    );
    crate::common::wait_for("two fires", || (scheduled_runs(&db, "tick").len() >= 2).then_some(()));
    servers[i].signal(Signal::SIGSTOP);
    let other = crate::common::wait_for("the other server to take over", || {
        let rows =
            query(&db.url, "SELECT holder, epoch FROM lease WHERE expires_at > clock_timestamp()");
        rows.first().filter(|r| r[0].as_deref() != Some(h.as_str())).map(|r| r[1].clone().unwrap())
    });
    // Let the new holder fire a few, then wake the old one up: its timers are all late.
    std::thread::sleep(std::time::Duration::from_secs(2));
    servers[i].signal(Signal::SIGCONT);
    let st = servers[i].wait_exit();
    assert!(!st.success(), "the old holder exits with an error");
    assert!(servers[i].log().contains("lost the cluster's lease"), "{}", servers[i].log());
    // Every fire made since the takeover is the new holder's.
    let stale = query(
        &db.url,
        &format!(
            "SELECT count(*) FROM fires WHERE epoch <> {other} AND fired_at > \
             (SELECT min(fired_at) FROM fires WHERE epoch = {other})"
        ),
    );
    assert_eq!(stale, [[Some("0".into())]], "the paused holder fired after it lost the lease");
    let runs = scheduled_runs(&db, "tick");
    let mut times: Vec<&str> = runs.iter().map(|r| r.1.as_str()).collect();
    times.sort();
    times.dedup();
    assert_eq!(times.len(), runs.len(), "a fire was made twice: {runs:?}");
}

#[test]
fn events_of_a_change_made_on_one_server_reach_a_subscriber_on_another() {
    use jsonrpsee::core::client::SubscriptionClientT;
    use jsonrpsee::rpc_params;
    use jsonrpsee::ws_client::{HeaderMap, HeaderValue, WsClientBuilder};
    let Some(db) = PgDb::create() else { return };
    let names = ["a", "b", "c"];
    let servers: Vec<TestDaemon> = names.iter().map(|n| server(&db, n)).collect();
    let h = names.iter().position(|n| *n == holder(&db)).unwrap();
    // A subscriber on one standby, over WebSocket (its own address in Host and the URL); the
    // change made on the other standby.
    let (sub_on, adder) = (&servers[(h + 1) % 3], &servers[(h + 2) % 3]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut headers = HeaderMap::new();
        let bearer = format!("Bearer {}", sub_on.token);
        headers.insert("Authorization", HeaderValue::from_str(&bearer).unwrap());
        // The holder accepts a standby's address in Host within 200 ms of its joining.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let client = loop {
            let c = WsClientBuilder::default()
                .set_headers(headers.clone())
                .build(format!("ws://{}", sub_on.addr))
                .await;
            match c {
                Ok(c) => break c,
                Err(e) if std::time::Instant::now() > deadline => {
                    panic!("a WebSocket through a standby: {e}")
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        let mut events = client
            .subscribe::<serde_json::Value, _>(
                "Events.Subscribe",
                rpc_params![json!({})],
                "Events.Unsubscribe",
            )
            .await
            .unwrap();
        let (addr, token) = (adder.addr.clone(), adder.token.clone());
        tokio::task::spawn_blocking(move || {
            let mut c = crate::common::Raw::connect(&addr);
            c.call("Auth.Login", json!(token));
            let v = c
                .call("TaskUnit.Add", json!({"name": "seen", "command": ["true"], "paused": true}));
            assert!(v.get("error").is_none(), "{v}");
        })
        .await
        .unwrap();
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), events.next())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .unwrap();
        assert_eq!(
            (e["kind"].as_str(), e["unit"].as_str()),
            (Some("unit.added"), Some("seen")),
            "{e}"
        );
    });
}
