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
    wait_hosts(&d, &["a"]);
    let local = d.raw().call("TaskUnit.Add", json!({"name": "l", "command": ["true"]}));
    assert_eq!(local["error"]["data"]["field"], "hosts", "local is refused in a cluster: {local}");
    d.call(
        "TaskUnit.Add",
        json!({"name": "hello", "hosts": ["a"], "command": ["sh", "-c", "echo hi; exit 3"]}),
    );
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

#[test]
fn a_server_whose_certificate_cannot_be_loaded_stops_before_it_takes_the_lease() {
    let Some(db) = PgDb::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskd"))
        .args(["--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.path().join("state"))
        .args(["--store", &db.url, "--name", "a", "--lease", "30s"])
        .args(["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    // Nobody holds the lease: a good server takes it at once, not 30 s later.
    let rows = query(&db.url, "SELECT holder FROM lease WHERE expires_at > clock_timestamp()");
    assert!(rows.iter().all(|r| r[0].is_none()), "{rows:?}");
    let _b = server(&db, "b");
    assert_eq!(holder(&db), "b");
}

/// A server of the cluster on `db`, named `name`, with a 2 s lease.
fn server(db: &PgDb, name: &str) -> TestDaemon {
    TestDaemon::start_with(&["--store", &db.url, "--name", name, "--lease", "2s"])
}

/// Waits until the servers `names` are enrolled as hosts (each server's own agent), and
/// connected.
fn wait_hosts(d: &TestDaemon, names: &[&str]) {
    for n in names {
        crate::common::wait_for(&format!("server {n} as a host"), || {
            let v = d.raw().call("Agent.Get", json!(n));
            (v["result"]["state"] == "connected").then_some(())
        });
    }
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
    wait_hosts(&servers[0], &["a", "b", "c"]);
    // Added through a standby, run on every server (each is a host by its name).
    servers[1].call(
        "TaskUnit.Add",
        json!({"name": "u", "hosts": ["taskd=server"], "command": ["hostname"]}),
    );
    crate::common::wait_for("a run on each server", || {
        let q = "SELECT string_agg(host, ',' ORDER BY host) FROM runs WHERE unit = 'u' \
                 AND state = 'succeeded'";
        (query(&db.url, q)[0][0].as_deref() == Some("a,b,c")).then_some(())
    });
    let out = servers[2].taskctl(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("held by {h}")), "{text}");
    for n in ["a", "b", "c"] {
        let role = if n == h { "holder" } else { "standby" };
        assert!(text.lines().any(|l| l.starts_with(n) && l.contains(role)), "{n} {role}: {text}");
    }
    assert!(text.contains("agents") && text.contains("3 connected"), "{text}");
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
    // Run on a server that stays.
    let i = ["a", "b", "c"].iter().position(|n| *n == h).unwrap();
    let on = ["a", "b", "c"][(i + 1) % 3];
    wait_hosts(&servers[0], &[on]);
    servers[0].call(
        "TaskUnit.Add",
        json!({"name": "tick", "every": "1s", "catch_up": "once", "hosts": [on], "command": ["true"]}),
    );
    crate::common::wait_for("three fires", || {
        (scheduled_runs(&db, "tick").len() >= 3).then_some(())
    });
    // The kill's time and the lease's epoch by the database's clock, which times the fires.
    let at = query(&db.url, "SELECT EXTRACT(EPOCH FROM clock_timestamp())::text, epoch FROM lease");
    let (killed_at, epoch): (f64, i64) = (
        at[0][0].as_deref().unwrap().parse().unwrap(),
        at[0][1].as_deref().unwrap().parse().unwrap(),
    );
    servers[i].kill9();
    let before = scheduled_runs(&db, "tick").len();
    let h2 = crate::common::wait_for("another holder", || {
        let rows = query(&db.url, "SELECT holder FROM lease WHERE expires_at > clock_timestamp()");
        rows.first().and_then(|r| r[0].clone()).filter(|n| *n != h)
    });
    // The first fire the new holder made (under a higher epoch), from the kill.
    let resumed: f64 = crate::common::wait_for("a fire of the new holder", || {
        let q = format!(
            "SELECT EXTRACT(EPOCH FROM MIN(fired_at))::text FROM fires \
             WHERE unit = 'tick' AND epoch > {epoch}"
        );
        query(&db.url, &q)[0][0].as_deref().map(|t| t.parse::<f64>().unwrap() - killed_at)
    });
    // SPEC: within the lease + 1 s (3 s here; about 1.75 s measured), with half a second for
    // a test machine busy with the other tests.
    assert!(resumed < 3.5, "fires resumed {resumed:.2} s after the kill (lease 2 s)");
    crate::common::wait_for("fires again", || {
        (scheduled_runs(&db, "tick").len() > before + 1).then_some(())
    });
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
    let on = ["a", "b"][1 - i];
    wait_hosts(&servers[i], &[on]);
    servers[i].call(
        "TaskUnit.Add",
        json!({"name": "tick", "every": "1s", "catch_up": "once", "hosts": [on], "command": ["true"]}),
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
            let v = c.call(
                "TaskUnit.Add",
                json!({"name": "seen", "hosts": ["taskd=server"], "command": ["true"], "paused": true}),
            );
            assert!(v.get("error").is_none(), "{v}");
        })
        .await
        .unwrap();
        // Others may come first: the servers' own agents connecting, say.
        let e = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let e = events.next().await.expect("subscription open").unwrap();
                if e["unit"] == "seen" {
                    return e;
                }
            }
        })
        .await
        .expect("the unit's event within 10 s");
        assert_eq!(e["kind"].as_str(), Some("unit.added"), "{e}");
    });
}

#[test]
fn an_agent_fails_over_to_the_new_holder_mid_run_and_the_run_ends_once() {
    let Some(db) = PgDb::create() else { return };
    let names = ["a", "b", "c"];
    let mut servers: Vec<TestDaemon> = names.iter().map(|n| server(&db, n)).collect();
    let h = names.iter().position(|n| *n == holder(&db)).unwrap();
    let list: Vec<String> = servers.iter().map(|s| s.addr.clone()).collect();
    // The agent lists every server, the holder last: it talks through a standby first.
    let mut order = list.clone();
    order.rotate_left(h + 1);
    let _agent =
        crate::agents::TestAgent::enroll_listing(&servers[h], &order.join(","), "w1", "", None);
    servers[h].call(
        "TaskUnit.Add",
        json!({"name": "job", "hosts": ["w1"], "command": ["sh", "-c", "echo start; sleep 2; echo done"]}),
    );
    // Added, it runs at once.
    let info = servers[h].wait_unit("job", "its run", |u| u["last_run"]["state"] == "running");
    let id = info["last_run"]["id"].as_i64().unwrap();
    let log = |s: &TestDaemon| {
        String::from_utf8_lossy(&s.taskctl(&["logs", &id.to_string()]).stdout).into_owned()
    };
    crate::common::wait_for("its first line", || (log(&servers[h]) == "start\n").then_some(()));
    servers[h].kill9();
    let next = (h + 1) % 3;
    let r = crate::agents::wait_run(&servers[next], id, "the run to end", |r| {
        !matches!(r["state"].as_str(), Some("running" | "queued"))
    });
    assert_eq!((r["state"].as_str(), r["exit_code"].as_i64()), (Some("succeeded"), Some(0)), "{r}");
    // Its whole output, from every server left, also what was written before the holder died.
    for s in servers.iter().filter(|s| s.addr != list[h]) {
        let out = s.taskctl(&["logs", &id.to_string()]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "start\ndone\n");
    }
    let runs = query(&db.url, "SELECT count(*) FROM runs WHERE unit = 'job'");
    assert_eq!(runs, [[Some("1".into())]], "one run, never started twice");
}

/// A PostgreSQL server of one test's own (`scripts/test-postgres`), stopped when this is.
struct OwnPostgres {
    dir: std::path::PathBuf,
    url: String,
}

impl OwnPostgres {
    /// A new server, or `None` (outside CI) when the PostgreSQL tests are not set up.
    fn start() -> Option<OwnPostgres> {
        Self::start_with(&[])
    }

    /// A new server with `env` set for `scripts/test-postgres` (`TASKD_PG_TLS`…).
    fn start_with(env: &[(&str, &std::path::Path)]) -> Option<OwnPostgres> {
        if std::env::var_os("TASKD_TEST_PG").is_none() {
            assert!(std::env::var_os("CI").is_none(), "TASKD_TEST_PG is not set");
            return None;
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("taskd-own-pg-{}-{n}", std::process::id()));
        let out = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/test-postgres"
        ))
        .arg("start")
        .arg(&dir)
        .envs(env.iter().copied())
        .output()
        .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
        Some(OwnPostgres { dir, url })
    }

    fn run(&self, what: &str) {
        let out = std::process::Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/test-postgres"
        ))
        .arg(what)
        .arg(&self.dir)
        .output()
        .unwrap();
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        self.run("stop");
    }
}

#[test]
fn postgres_restarted_under_load_servers_reconnect_and_nothing_acknowledged_is_lost() {
    let Some(pg) = OwnPostgres::start() else { return };
    let start =
        |name: &str| TestDaemon::start_with(&["--store", &pg.url, "--name", name, "--lease", "5s"]);
    let servers = [start("a"), start("b")];
    let url = pg.url.clone();
    crate::common::wait_for("a holder", || {
        let rows = query(&url, "SELECT holder FROM lease WHERE expires_at > clock_timestamp()");
        rows.first().and_then(|r| r[0].clone())
    });
    wait_hosts(&servers[0], &["a", "b"]);
    servers[0].call(
        "TaskUnit.Add",
        json!({"name": "tick", "every": "200ms", "hosts": ["b"], "command": ["true"]}),
    );
    // Adds through both servers, one after another, while the database restarts.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let adders: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let (addr, token, stop) = (s.addr.clone(), s.token.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut acked = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let name = format!("u{i}-{n}");
                    let mut c = crate::common::Raw::connect(&addr);
                    c.call("Auth.Login", json!(token));
                    let v = c.call(
                        "TaskUnit.Add",
                        json!({"name": name, "hosts": ["a"], "command": ["true"], "paused": true}),
                    );
                    if v.get("error").is_none() {
                        acked.push(name);
                    }
                }
                acked
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(500));
    pg.run("restart");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    let acked: Vec<String> = adders.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert!((10..10_000).contains(&acked.len()), "adds went through: {}", acked.len());
    // Every acknowledged add is there, on both servers.
    for s in &servers {
        let units = s.call("TaskUnit.List", json!({"limit": 10000}));
        let names: std::collections::BTreeSet<&str> =
            units.as_array().unwrap().iter().filter_map(|u| u["name"].as_str()).collect();
        let missing: Vec<&String> = acked.iter().filter(|n| !names.contains(n.as_str())).collect();
        assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    }
    // And the schedule goes on.
    let count = || {
        query(&url, "SELECT count(*) FROM runs WHERE unit = 'tick'")[0][0]
            .clone()
            .unwrap()
            .parse::<i64>()
            .unwrap()
    };
    let before = count();
    crate::common::wait_for("fires after the restart", || (count() > before + 2).then_some(()));
}

/// `taskd store copy` as a user types it.
fn store_copy(from: &str, to: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_taskd"))
        .args(["store", "copy", "--from", from, "--to", to])
        .output()
        .unwrap()
}

#[test]
fn store_copy_moves_a_single_server_into_a_cluster_and_back() {
    let Some(db) = PgDb::create() else { return };
    let mut single = TestDaemon::start();
    single.call(
        "TaskUnit.Add",
        json!({"name": "hello", "command": ["sh", "-c", "echo hi; echo oops >&2"]}),
    );
    let info = single.wait_unit("hello", "its run", |u| u["last_run"]["state"] == "succeeded");
    let id = info["last_run"]["id"].as_i64().unwrap();
    single.call(
        "TaskUnit.Add",
        json!({"name": "later", "every": "1h", "command": ["true"], "paused": true}),
    );
    // A kept file (pushed to the daemon's own host), two pieces of the database's.
    let work = tempfile::tempdir().unwrap();
    let src = crate::files::random_file(work.path(), "conf", (3 << 20) / 2);
    let dest = work.path().join("conf.out");
    let push = single.taskctl(&[
        "push",
        src.to_str().unwrap(),
        "--hosts",
        "local",
        "--dest",
        dest.to_str().unwrap(),
    ]);
    assert!(push.status.success(), "{}", String::from_utf8_lossy(&push.stderr));
    let kept = |d: &TestDaemon| {
        use sha2::Digest;
        let sha = taskd::store::content::hex(&sha2::Sha256::digest(std::fs::read(&src).unwrap()));
        d.call("File.Stat", json!(sha))["size"].clone()
    };
    assert_eq!(kept(&single), (3 << 20) / 2);
    let dir = single.state_dir().to_str().unwrap().to_string();
    // In use: refused, nothing copied.
    let busy = store_copy(&dir, &db.url);
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("stop its daemon"), "{busy:?}");
    single.terminate();

    let out = store_copy(&dir, &db.url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("3 units") && said.contains("2 run logs") && said.contains("1 files"),
        "{said}"
    );
    // Not into a store that holds units.
    let again = store_copy(&dir, &db.url);
    assert!(String::from_utf8_lossy(&again.stderr).contains("empty store"), "{again:?}");

    let mut c = server(&db, "a");
    let r = c.call("Run.Get", json!(id));
    assert_eq!((r["unit"].as_str(), r["state"].as_str()), (Some("hello"), Some("succeeded")));
    let logs = c.taskctl(&["logs", &id.to_string()]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "hi\noops\n");
    assert_eq!(c.call("TaskUnit.Get", json!("later"))["state"], "paused");
    assert_eq!(kept(&c), (3 << 20) / 2, "the kept file is in the database");
    // New runs get new ids.
    wait_hosts(&c, &["a"]);
    c.call("TaskUnit.Add", json!({"name": "next", "hosts": ["a"], "command": ["true"]}));
    let next = c.wait_unit("next", "its run", |u| u["last_run"]["state"] == "succeeded");
    assert!(next["last_run"]["id"].as_i64().unwrap() > id);
    c.terminate();

    // And back, into a new state directory.
    let back = tempfile::tempdir().unwrap();
    let back_dir = back.path().join("state");
    let out = store_copy(&db.url, back_dir.to_str().unwrap());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    crate::common::make_private(&back_dir);
    let log = back.path().join("daemon.log");
    let d = TestDaemon::start_at(&back_dir, &log);
    let r = d.call("Run.Get", json!(id));
    assert_eq!(r["state"], "succeeded");
    let logs = d.taskctl(&["logs", &id.to_string()]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "hi\noops\n");
    let names: Vec<String> = d
        .call("TaskUnit.List", json!(null))
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names[..2], ["hello", "later"]);
    assert!(names.contains(&"next".to_string()), "{names:?}");
    assert_eq!(kept(&d), (3 << 20) / 2, "the kept file is back in the state directory");
}

/// Servers `a` and `b` on `db`, both connected as hosts: with the holder's index and the
/// other's name.
fn two_servers(db: &PgDb) -> ([TestDaemon; 2], usize, &'static str) {
    let servers = [server(db, "a"), server(db, "b")];
    let (i, other) = if holder(db) == "a" { (0, "b") } else { (1, "a") };
    wait_hosts(&servers[0], &["a", "b"]);
    (servers, i, other)
}

#[test]
fn a_join_token_asked_of_a_cluster_shows_the_agent_every_server() {
    let Some(db) = PgDb::create() else { return };
    let (servers, _, _) = two_servers(&db);
    let out = servers[1].taskctl(&["agents", "join-token"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let every = format!("taskd agent --server {},{} --join", servers[0].addr, servers[1].addr);
    assert!(err.contains(&every), "{err}");
}

#[test]
fn a_file_pushed_through_one_server_is_put_again_after_that_server_died() {
    let Some(db) = PgDb::create() else { return };
    let (mut servers, i, other) = two_servers(&db);
    let work = tempfile::tempdir().unwrap();
    // Three pieces of the database's 1 MiB, the last one short.
    let src = crate::files::random_file(work.path(), "app.bin", (5 << 20) / 2);
    let dest = work.path().join("app.out");
    // Uploaded through the holder, put by the other server's host.
    let out = servers[i].taskctl(&[
        "push",
        src.to_str().unwrap(),
        "--hosts",
        other,
        "--dest",
        dest.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
    let unit =
        servers[i].call("TaskUnit.List", json!(null))[0]["name"].as_str().unwrap().to_string();
    // The server that took the upload dies; the other, holding the lease now, puts the file
    // again from the database.
    servers[i].kill9();
    std::fs::remove_file(&dest).unwrap();
    let survivor = &servers[1 - i];
    wait_hosts(survivor, &[other]);
    // taskctl given both servers goes on to the one alive.
    let both = format!("{},{}", servers[i].addr, survivor.addr);
    let out = survivor.taskctl(&["--addr", &both, "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("held by {other}")), "{text}");
    // Its uptime is its process's, not its time as the holder (it took over just now, after
    // a lease of 2 s at least).
    let status = survivor.call("Daemon.Status", json!(null));
    assert!(status["uptime_secs"].as_u64() >= Some(2), "{status}");
    let before = survivor.call("TaskUnit.Get", json!(unit))["last_run"]["id"].as_i64().unwrap();
    survivor.call("TaskUnit.Start", json!(unit));
    let info = survivor.wait_unit(&unit, "the second put", |u| {
        u["last_run"]["id"].as_i64() > Some(before) && u["last_run"]["state"] != "running"
    });
    assert_eq!(info["last_run"]["state"], "succeeded", "{info}");
    assert_eq!(std::fs::read(&dest).unwrap(), std::fs::read(&src).unwrap());
    let sha = info["definition"]["file"]["source"].as_str().unwrap_or_default().to_string();
    let stat = survivor.call("File.Stat", json!(sha));
    assert_eq!(stat["size"], (5 << 20) / 2, "{stat}");
}

/// A child process killed when the test ends, passed or failed.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_push_whose_server_dies_mid_upload_is_sent_again_to_the_server_that_took_over() {
    let Some(db) = PgDb::create() else { return };
    let (mut servers, i, other) = two_servers(&db);
    let work = tempfile::tempdir().unwrap();
    let src = crate::files::random_file(work.path(), "big.bin", 48 << 20);
    let dest = work.path().join("big.out");
    // Pushed through the other server, which relays it to the holder (killed if the test
    // fails).
    let mut push = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_taskctl"))
            .arg("--state-dir")
            .arg(servers[1 - i].state_dir())
            .args(["push", src.to_str().unwrap(), "--hosts", other, "--dest"])
            .arg(&dest)
            .env_remove("TASKD_ADDR")
            .env_remove("TASKD_TOKEN")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The holder dies while it takes the upload (its temporary file has some of it).
    let uploads = servers[i].state_dir().join("files");
    crate::common::wait_for("the upload under way at the holder", || {
        std::fs::read_dir(&uploads).ok()?.flatten().find(|e| {
            e.file_name().to_string_lossy().starts_with(".upload-")
                && e.metadata().is_ok_and(|m| m.len() > 0)
        })
    });
    servers[i].kill9();
    // The push dials its server again until it answers (having taken over), sends the file
    // again, and the file unit puts it.
    // Bounded more widely than `wait_for`: the file is sent twice, then kept and put.
    let end = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = push.0.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < end, "the push did not end within 120 s");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut push.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("dialling again"), "the upload started over: {err}");
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(&src).unwrap(), "the file is put whole");
}

#[test]
fn a_server_reaches_postgres_over_tls_and_refuses_a_certificate_it_cannot_verify() {
    let certs = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(certs.path().join("server.crt"), ck.cert.pem()).unwrap();
    std::fs::write(certs.path().join("server.key"), ck.signing_key.serialize_pem()).unwrap();
    let Some(pg) = OwnPostgres::start_with(&[("TASKD_PG_TLS", certs.path())]) else { return };
    let ca = certs.path().join("server.crt");
    let url = format!("{}?sslmode=verify-full&sslrootcert={}", pg.url, ca.display());
    let d = TestDaemon::start_with(&["--store", &url, "--name", "a"]);
    wait_hosts(&d, &["a"]);
    d.call("TaskUnit.Add", json!({"name": "u", "hosts": ["a"], "command": ["true"]}));
    d.wait_unit("u", "its run", |u| u["last_run"]["state"] == "succeeded");
    // Every connection of taskd's is encrypted.
    let rows = query(
        &pg.url,
        "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'taskd'",
    );
    assert!(!rows.is_empty() && rows.iter().all(|r| r[0].as_deref() == Some("t")), "{rows:?}");
    // A certificate this machine's CAs did not sign: refused at start, saying why.
    let state = tempfile::tempdir().unwrap();
    crate::common::make_private(state.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_taskd"))
        .args(["--listen", "127.0.0.1:0", "--name", "b", "--state-dir"])
        .arg(state.path())
        .args(["--store", &format!("{}?sslmode=require", pg.url)])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("certificate"), "{err}");
}

#[test]
fn servers_stop_on_sigterm_when_the_database_is_gone() {
    let Some(pg) = OwnPostgres::start() else { return };
    let start =
        |name: &str| TestDaemon::start_with(&["--store", &pg.url, "--name", name, "--lease", "2s"]);
    let mut servers = [start("a"), start("b")];
    wait_hosts(&servers[0], &["a", "b"]);
    // Busy: runs starting and ending on both hosts, changes queued for the store.
    for (i, host) in ["a", "b"].iter().enumerate() {
        servers[0].call(
            "TaskUnit.Add",
            json!({"name": format!("tick{i}"), "every": "100ms", "hosts": [host],
                   "command": ["sleep", "0.05"]}),
        );
    }
    let url = pg.url.clone();
    crate::common::wait_for("runs", || {
        let n = query(&url, "SELECT count(*) FROM runs WHERE state = 'succeeded'")[0][0]
            .clone()
            .unwrap();
        (n.parse::<i64>().unwrap() > 5).then_some(())
    });
    pg.run("stop");
    // Whatever they could not record, each server stops within the deadline.
    for s in &mut servers {
        s.terminate();
    }
}
