//! The store's promises (module documentation), checked against both backends: each test
//! below runs once on a new SQLite store and once on a new PostgreSQL database.
//!
//! The PostgreSQL half needs a server: `TASKD_TEST_PG` is the URL of a database on it from
//! which a database per test is created and dropped (`scripts/test` starts a throwaway server
//! and sets it). Without it the PostgreSQL tests pass without checking anything, except under
//! `CI=true`, where they fail.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use super::*;

/// A PostgreSQL database made for one test, dropped when this is.
pub(crate) struct TestDb {
    admin: String,
    name: String,
    /// Its URL.
    pub url: String,
}

impl TestDb {
    /// A new empty database, or `None` (outside CI) when no server is configured.
    pub async fn create() -> Option<TestDb> {
        let Ok(admin) = std::env::var("TASKD_TEST_PG") else {
            assert!(
                std::env::var_os("CI").is_none(),
                "TASKD_TEST_PG is not set: the PostgreSQL store tests need a server (scripts/test starts one)"
            );
            eprintln!("TASKD_TEST_PG is not set: PostgreSQL half skipped");
            return None;
        };
        static N: AtomicU32 = AtomicU32::new(0);
        let name =
            format!("taskd_test_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("TASKD_TEST_PG={admin}: {e}"));
        tokio::spawn(conn);
        c.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Some(TestDb { admin, name, url })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Off the test's runtime, which may be shutting down.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (c, conn) = tokio_postgres::connect(&admin, tokio_postgres::NoTls).await?;
                tokio::spawn(conn);
                c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await
            })
        });
        if let Ok(Err(e)) = dropped.join() {
            eprintln!("cannot drop test database {}: {e}", self.name);
        }
    }
}

/// Each named test, on SQLite and on PostgreSQL.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$name(super::Store::open(dir.path()).unwrap()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let Some(db) = super::TestDb::create().await else { return };
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::Store::open_postgres(&db.url, dir.path()).await.unwrap();
                    super::$name(store).await;
                }
            )*
        }
    };
}

on_both_stores!(
    units_are_added_once_edited_and_deleted_with_events_in_order,
    runs_end_once_count_by_state_and_prune_to_keep_runs,
    runs_left_active_are_recovered_and_ids_never_reused,
    changes_nobody_waits_for_are_kept_in_order_by_flush,
    audit_records_page_newest_first,
    join_tokens_enroll_one_agent_once,
    dispatches_keep_their_runs_counts_and_states,
    run_logs_are_read_back_cut_to_their_limit,
    concurrent_starts_and_ends_of_many_units_all_succeed,
    a_fire_made_already_fails_alone_among_fires_made_at_once,
    dispatches_made_at_once_get_their_own_runs_in_their_hosts_order,
    api_tasks_are_listed_newest_last_and_done_once_their_dispatch_ended,
);

/// A unit to store (its times in whole microseconds, as both stores keep them).
pub(in crate::store) fn unit(name: &str) -> StoredUnit {
    let now = Timestamp::from_microsecond(Timestamp::now().as_microsecond()).unwrap();
    StoredUnit {
        name: name.into(),
        definition: serde_json::json!({"name": name, "command": ["true"]}),
        created_at: now,
        updated_at: now,
        paused: false,
        stopped: false,
        last_fire: None,
        anchor: now,
        runs_total: 0,
        failures_total: 0,
    }
}

async fn next_event(rx: &mut broadcast::Receiver<Event>) -> Event {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an event within 10 s")
        .expect("no event lost")
}

async fn units_are_added_once_edited_and_deleted_with_events_in_order(store: Store) {
    let mut events = store.subscribe_events();
    let a = unit("a");
    store.insert_unit(a.clone()).await.unwrap();
    let again = store.insert_unit(unit("a")).await;
    assert!(matches!(again, Err(Error::UnitExists(_))), "{again:?}");
    store.insert_unit(unit("b")).await.unwrap();
    let def = serde_json::json!({"name": "a", "command": ["false"]});
    let later = Timestamp::now();
    // A namesake added since (another created_at) is not edited.
    let other = a.created_at.checked_add(jiff::SignedDuration::from_secs(1)).unwrap();
    let stale = store.update_definition("a", other, def.clone(), false, later, true).await;
    assert!(matches!(stale, Err(Error::UnitNotFound(_))), "{stale:?}");
    store.update_definition("a", a.created_at, def.clone(), true, later, true).await.unwrap();
    store.set_flags("b", true, false, EventKind::UnitPaused).await.unwrap();
    let loaded = store.load_units().await.unwrap();
    assert_eq!(loaded.len(), 2);
    assert_eq!((loaded[0].definition.clone(), loaded[0].paused), (def, true));
    assert_eq!(loaded[0].created_at, a.created_at);
    assert!(loaded[1].paused);
    store.delete_unit("b", false).await.unwrap();
    assert!(matches!(store.delete_unit("b", false).await, Err(Error::UnitNotFound(_))));

    let mut seen = Vec::new();
    for _ in 0..5 {
        seen.push(next_event(&mut events).await);
    }
    let kinds: Vec<(EventKind, &str)> = seen.iter().map(|e| (e.kind, e.unit.as_str())).collect();
    assert_eq!(
        kinds,
        [
            (EventKind::UnitAdded, "a"),
            (EventKind::UnitAdded, "b"),
            (EventKind::UnitEdited, "a"),
            (EventKind::UnitPaused, "b"),
            (EventKind::UnitDeleted, "b"),
        ]
    );
    assert!(seen.windows(2).all(|w| w[0].seq < w[1].seq), "sequence numbers grow");
    assert_eq!(store.last_event_seq().await.unwrap(), seen[4].seq);
    // The same events, replayed from the store, page by page.
    let first = store.events_after(0, 2).await.unwrap();
    let rest = store.events_after(first[1].seq, 10).await.unwrap();
    let replayed: Vec<i64> = first.iter().chain(&rest).map(|e| e.seq).collect();
    assert_eq!(replayed, seen.iter().map(|e| e.seq).collect::<Vec<_>>());
    assert!(tokio::time::timeout(Duration::from_millis(200), events.recv()).await.is_err());
}

async fn runs_end_once_count_by_state_and_prune_to_keep_runs(store: Store) {
    store.insert_unit(unit("u")).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..4 {
        let r = store.create_run("u", RunState::Running, Trigger::Manual, 1, None).await.unwrap();
        let mut done = r.clone();
        done.state = RunState::Failed;
        done.exit_code = Some(3);
        done.stdout_bytes = 12;
        store.finish_run(done.clone(), 2).await.unwrap();
        // A second end changes nothing.
        done.state = RunState::Succeeded;
        store.finish_run(done, 2).await.unwrap();
        ids.push(r.id);
    }
    let at = Timestamp::from_second(1_700_000_000).unwrap();
    let queued = store.create_run("u", RunState::Queued, Trigger::Schedule, 2, Some(at)).await;
    let queued = queued.unwrap();
    let started = store.start_queued(queued.id).await.unwrap();
    assert_eq!(
        (started.state, started.scheduled_at, started.attempt),
        (RunState::Running, Some(at), 2)
    );
    assert!(matches!(store.start_queued(queued.id).await, Err(Error::Conflict(_))));
    let burst = store.create_runs("u", vec![Trigger::Manual, Trigger::Restart]).await.unwrap();
    assert_eq!(burst.len(), 2);

    let all =
        store.list_runs(RunFilter { unit: Some("u".into()), limit: 100, ..Default::default() });
    let all = all.await.unwrap();
    let listed: Vec<i64> = all.iter().map(|r| r.id).collect();
    // Newest first; of the four ended runs, the newest two were kept.
    assert_eq!(listed, [burst[1].id, burst[0].id, queued.id, ids[3], ids[2]]);
    let ended = store.get_run(ids[3]).await.unwrap();
    assert_eq!((ended.state, ended.exit_code, ended.stdout_bytes), (RunState::Failed, Some(3), 12));
    assert!(ended.ended_at.is_some());
    assert!(matches!(store.get_run(ids[0]).await, Err(Error::RunNotFound(_))));
    let running = RunFilter { state: Some(RunState::Running), limit: 100, ..Default::default() };
    assert_eq!(store.list_runs(running).await.unwrap().len(), 3);
    let page = RunFilter { before: Some(queued.id), limit: 1, ..Default::default() };
    assert_eq!(store.list_runs(page).await.unwrap()[0].id, ids[3]);

    let mut counts = store.run_counts().await.unwrap();
    counts.sort();
    assert_eq!(counts, [("failed".into(), 2), ("running".into(), 3)]);
    let u = &store.load_units().await.unwrap()[0];
    assert_eq!((u.runs_total, u.failures_total), (7, 4));
    let page = store.load_units_page(String::new(), 10).await.unwrap();
    assert_eq!(page[0].1.as_ref().map(|r| r.id), Some(burst[1].id));
    store.delete_unit("u", false).await.unwrap();
    assert!(store.run_counts().await.unwrap().is_empty());
}

async fn runs_left_active_are_recovered_and_ids_never_reused(store: Store) {
    store.insert_unit(unit("u")).await.unwrap();
    let running = store.create_run("u", RunState::Running, Trigger::Add, 1, None).await.unwrap();
    let queued = store.create_run("u", RunState::Queued, Trigger::Manual, 1, None).await.unwrap();
    store.set_pid(running.id, 4242, Timestamp::now(), Some(7), Some("boot".into()));
    store.flush().await.unwrap();
    let stale = store.recover_stale_runs().await.unwrap();
    assert_eq!(stale.len(), 2);
    let r = stale.iter().find(|s| s.record.id == running.id).unwrap();
    assert_eq!(r.record.state, RunState::Lost);
    assert_eq!(
        (r.record.pid, r.pid_start, r.boot_id.as_deref()),
        (Some(4242), Some(7), Some("boot"))
    );
    assert_eq!(store.get_run(queued.id).await.unwrap().state, RunState::Cancelled);
    assert!(store.recover_stale_runs().await.unwrap().is_empty());
    store.delete_unit("u", false).await.unwrap();
    store.insert_unit(unit("u")).await.unwrap();
    let next = store.create_run("u", RunState::Running, Trigger::Add, 1, None).await.unwrap();
    assert!(next.id > queued.id, "run ids are never reused");
}

async fn changes_nobody_waits_for_are_kept_in_order_by_flush(store: Store) {
    let mut events = store.subscribe_events();
    store.insert_unit(unit("u")).await.unwrap();
    let r = store.create_run("u", RunState::Running, Trigger::Manual, 1, None).await.unwrap();
    let at = Timestamp::from_second(1_700_000_000).unwrap();
    store.set_last_fire("u", at);
    store.set_pid(r.id, 99, at, None, None);
    store.emit(EventKind::UnitFatal, "u", Some("fatal"));
    store.set_late_result(r.id, "succeeded".into());
    store.set_late_result(r.id, "failed".into());
    store.flush().await.unwrap();
    assert_eq!(store.load_units().await.unwrap()[0].last_fire, Some(at));
    let got = store.get_run(r.id).await.unwrap();
    assert_eq!(
        (got.pid, got.started_at, got.late_result.as_deref()),
        (Some(99), Some(at), Some("succeeded"))
    );
    let kinds: Vec<EventKind> = [
        next_event(&mut events).await,
        next_event(&mut events).await,
        next_event(&mut events).await,
    ]
    .iter()
    .map(|e| e.kind)
    .collect();
    assert_eq!(kinds, [EventKind::UnitAdded, EventKind::RunStarted, EventKind::UnitFatal]);
}

async fn audit_records_page_newest_first(store: Store) {
    for i in 0..5 {
        store.audit(AuditRecord {
            id: 0,
            time: Timestamp::now(),
            peer: "tcp:127.0.0.1:1".into(),
            method: format!("M{i}"),
            unit: (i % 2 == 0).then(|| "u".to_string()),
            outcome: "ok".into(),
        });
    }
    store.flush().await.unwrap();
    let all = store.audit_log(10, None).await.unwrap();
    let methods: Vec<&str> = all.iter().map(|a| a.method.as_str()).collect();
    assert_eq!(methods, ["M4", "M3", "M2", "M1", "M0"]);
    assert_eq!(all[0].unit.as_deref(), Some("u"));
    let older = store.audit_log(2, Some(all[1].id)).await.unwrap();
    let methods: Vec<&str> = older.iter().map(|a| a.method.as_str()).collect();
    assert_eq!(methods, ["M2", "M1"]);
}

async fn join_tokens_enroll_one_agent_once(store: Store) {
    let hour = jiff::SignedDuration::from_hours(1);
    let later = Timestamp::now().checked_add(hour).unwrap();
    store.create_join_token("t1".into(), later).await.unwrap();
    store
        .create_join_token("old".into(), Timestamp::now().checked_sub(hour).unwrap())
        .await
        .unwrap();
    let unknown = store.join_agent("nope".into(), "a".into(), "s".into()).await;
    assert!(matches!(unknown, Err(Error::Unauthorized(_))), "{unknown:?}");
    let expired = store.join_agent("old".into(), "a".into(), "s".into()).await;
    assert!(
        matches!(&expired, Err(Error::Unauthorized(m)) if m.contains("expired")),
        "{expired:?}"
    );
    let a = store.join_agent("t1".into(), "a".into(), "s1".into()).await.unwrap();
    assert_eq!((a.name.as_str(), a.secret_hash.as_str(), a.revoked), ("a", "s1", false));
    let spent = store.join_agent("t1".into(), "b".into(), "s2".into()).await;
    assert!(matches!(&spent, Err(Error::Unauthorized(m)) if m.contains("spent")), "{spent:?}");
    store.create_join_token("t2".into(), later).await.unwrap();
    let taken = store.join_agent("t2".into(), "a".into(), "s2".into()).await;
    assert!(matches!(taken, Err(Error::Conflict(_))), "{taken:?}");
    // Refused changes changed nothing: t2 still enrolls, once the name is free.
    assert!(store.revoke_agent("a".into()).await.unwrap().revoked);
    assert!(matches!(store.revoke_agent("zz".into()).await, Err(Error::AgentNotFound(_))));
    let again = store.join_agent("t2".into(), "a".into(), "s3".into()).await.unwrap();
    assert_eq!((again.secret_hash.as_str(), again.revoked), ("s3", false));
    let mut seen = again.clone();
    seen.labels.insert("zone".into(), "eu".into());
    seen.max_runs = 4;
    seen.last_seen = Some(Timestamp::from_second(1_700_000_000).unwrap());
    store.agent_seen(seen.clone());
    store.flush().await.unwrap();
    assert_eq!(store.load_agents().await.unwrap(), [seen]);
}

async fn dispatches_keep_their_runs_counts_and_states(store: Store) {
    store.insert_unit(unit("u")).await.unwrap();
    let hosts: Vec<String> = ["h1", "h2", "h3"].iter().map(|h| h.to_string()).collect();
    let (d, runs) =
        store.create_dispatch("u", Trigger::Manual, hosts, 2, Some(1), None).await.unwrap();
    assert_eq!((d.state, d.total, d.batch, d.tolerance), (DispatchState::Running, 3, 2, Some(1)));
    let states: Vec<(&str, RunState)> = runs.iter().map(|r| (r.host.as_str(), r.state)).collect();
    assert_eq!(
        states,
        [("h1", RunState::Running), ("h2", RunState::Running), ("h3", RunState::Queued)]
    );
    let mut end = runs[0].clone();
    end.state = RunState::Failed;
    store.finish_run(end, 10).await.unwrap();
    let retry = store.create_host_run("u", "h1".into(), d.id, Trigger::Retry, 2).await.unwrap();
    assert_eq!((retry.dispatch, retry.attempt), (Some(d.id), 2));
    store.set_ignored(runs[1].id, true).await.unwrap();
    assert_eq!(store.ignored_runs(d.id).await.unwrap(), [runs[1].id]);
    let (got, all, counts) = store.get_dispatch(d.id).await.unwrap();
    assert_eq!(got, d);
    assert_eq!(all.len(), 4);
    // The newest run of each host: h1's retry, h2 ignored, h3 queued.
    let counts: Vec<(&str, u32)> = counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(counts, [("ignored", 1), ("queued", 1), ("running", 1)]);
    let paused = store.set_dispatch_state(d.id, DispatchState::Paused).await.unwrap();
    assert_eq!((paused.state, paused.ended_at), (DispatchState::Paused, None));
    let resumed = store.resume_dispatch(d.id, 1).await.unwrap();
    assert_eq!((resumed.state, resumed.forgiven), (DispatchState::Running, 1));
    assert_eq!(store.open_dispatches().await.unwrap().len(), 1);
    store.cancelling_dispatch(d.id).await.unwrap();
    let open = store.open_dispatches().await.unwrap();
    assert_eq!((open[0].0.state, open[0].1.len()), (DispatchState::Cancelled, 4));
    let ended = store.set_dispatch_state(d.id, DispatchState::Cancelled).await.unwrap();
    assert!(ended.ended_at.is_some());
    assert!(store.open_dispatches().await.unwrap().is_empty());
    let f = DispatchFilter { unit: Some("u".into()), limit: 10, ..Default::default() };
    let listed = store.list_dispatches(f).await.unwrap();
    assert_eq!((listed.len(), listed[0].0.state), (1, DispatchState::Cancelled));
    let none =
        DispatchFilter { state: Some(DispatchState::Running), limit: 10, ..Default::default() };
    assert!(store.list_dispatches(none).await.unwrap().is_empty());
    assert!(matches!(store.get_dispatch(d.id + 100).await, Err(Error::DispatchNotFound(_))));
}

/// Stores on one new PostgreSQL database, opened together, with the database.
async fn postgres_stores(n: usize) -> Option<(TestDb, tempfile::TempDir, Vec<Store>)> {
    let db = TestDb::create().await?;
    let dir = tempfile::tempdir().unwrap();
    let opens = (0..n).map(|i| {
        let d = dir.path().join(i.to_string());
        let url = db.url.clone();
        async move { Store::open_postgres(&url, &d).await }
    });
    let stores = futures_util::future::join_all(opens).await;
    let stores = stores.into_iter().collect::<Result<Vec<_>>>().unwrap();
    Some((db, dir, stores))
}

#[tokio::test]
async fn postgres_servers_starting_together_migrate_once_and_a_newer_schema_is_refused() {
    let Some((db, dir, stores)) = postgres_stores(3).await else { return };
    stores[0].insert_unit(unit("u")).await.unwrap();
    assert_eq!(stores[2].load_units().await.unwrap().len(), 1);
    let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let v: i32 = c.query_one("SELECT version FROM schema_version", &[]).await.unwrap().get(0);
    assert_eq!(v, crate::store::postgres::schema::VERSION);
    c.execute("UPDATE schema_version SET version = version + 1", &[]).await.unwrap();
    let newer = Store::open_postgres(&db.url, dir.path()).await;
    let Err(e) = newer else { panic!("a newer schema was accepted") };
    assert!(e.to_string().contains("newer than this taskd knows"), "{e}");
}

#[tokio::test]
async fn postgres_events_of_one_server_reach_every_server_in_one_order() {
    let Some((db, _dir, stores)) = postgres_stores(2).await else { return };
    let mut subs: Vec<_> = stores.iter().map(|s| s.subscribe_events()).collect();
    // Many changes at once from the server that writes: committed side by side, published
    // in one order, on the other server too.
    let adds = (0..40).map(|i| stores[0].insert_unit(unit(&format!("u{i}"))));
    for r in futures_util::future::join_all(adds).await {
        r.unwrap();
    }
    let mut orders = Vec::new();
    for sub in &mut subs {
        let mut seen = Vec::new();
        for _ in 0..40 {
            let e = next_event(sub).await;
            seen.push((e.seq, e.unit));
        }
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "published in sequence order");
        orders.push(seen);
    }
    assert_eq!(orders[0], orders[1], "one order on every server");
    let last = orders[0][39].0;
    for s in &stores {
        assert_eq!(s.last_event_seq().await.unwrap(), last);
        assert_eq!(s.events_after(orders[0][37].0, 10).await.unwrap().len(), 2);
    }

    // The other server writes from now on (as after a takeover), while both listeners'
    // connections are cut: what is committed meanwhile still arrives, once, after the rest.
    let (c, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let cut = c
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query LIKE 'LISTEN%' AND datname = current_database()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(cut, 2, "both listeners cut");
    stores[1].delete_unit("u0", false).await.unwrap();
    stores[1].delete_unit("u1", false).await.unwrap();
    for sub in &mut subs {
        let got = [next_event(sub).await, next_event(sub).await];
        assert_eq!([got[0].unit.as_str(), got[1].unit.as_str()], ["u0", "u1"]);
        assert!(got[0].seq > last && got[1].seq > got[0].seq, "numbered after the others");
        assert!(tokio::time::timeout(Duration::from_millis(300), sub.recv()).await.is_err());
    }
}

async fn run_logs_are_read_back_cut_to_their_limit(store: Store) {
    use super::logs::{LogQuery, Stream};
    store.insert_unit(unit("u")).await.unwrap();
    let r = store.create_run("u", RunState::Running, Trigger::Manual, 1, None).await.unwrap();
    let logs = store.logs();
    logs.open(r.id, 64).await.unwrap();
    let at = Timestamp::now();
    for i in 0..10 {
        logs.write(r.id, Stream::Stdout, at, format!("line {i}\n").into_bytes()).await;
    }
    logs.write(r.id, Stream::Stderr, at, b"oops\n".to_vec()).await;
    let summary = logs.finish(r.id).await;
    assert_eq!((summary.stdout_bytes, summary.stderr_bytes, summary.truncated), (70, 5, true));
    let all = logs.read(r.id, LogQuery::default()).await.unwrap();
    // The head, a cut marker, then the newest output.
    assert!(all.truncated && all.eof, "{all:?}");
    assert_eq!(all.data, "line 0\noops\n[… 56 bytes of stdout cut …]\nline 9\n");
    let err = LogQuery { stream: Some(Stream::Stderr), ..Default::default() };
    assert_eq!(logs.read(r.id, err).await.unwrap().data, "oops\n");
    let tail = LogQuery { tail: Some(1), stream: Some(Stream::Stdout), ..Default::default() };
    assert_eq!(logs.read(r.id, tail).await.unwrap().data, "line 9\n");
}

#[tokio::test]
async fn postgres_a_file_kept_by_one_server_is_read_whole_by_another() {
    let Some((_db, _dir, stores)) = postgres_stores(2).await else { return };
    let piece = super::postgres::files::PIECE;
    let data: Vec<u8> = (0..2 * piece + 1000).map(|i| (i % 251) as u8).collect();
    let content = stores[0].content();
    let id = content.begin(data.len() as u64).unwrap();
    let mut at = 0;
    for chunk in data.chunks(700_000) {
        at = content.append(id, at, chunk.to_vec()).await.unwrap();
    }
    let sha = content.commit(id).await.unwrap();
    // Kept once: the same content again changes nothing.
    let again = content.begin(data.len() as u64).unwrap();
    let mut at = 0;
    for chunk in data.chunks(piece) {
        at = content.append(again, at, chunk.to_vec()).await.unwrap();
    }
    assert_eq!(content.commit(again).await.unwrap(), sha);
    let other = stores[1].content();
    assert_eq!(other.size(&sha).await.unwrap(), Some(data.len() as u64));
    // Ranges within a piece, across two, and past the end.
    for (offset, len) in [(0, 10), (piece - 5, 10), (piece + 3, piece), (2 * piece + 990, 100)] {
        let got = other.read(&sha, offset as u64, len).await.unwrap();
        assert_eq!(got, data[offset..(offset + len).min(data.len())], "{offset}+{len}");
    }
    assert!(other.read(&sha, data.len() as u64, 10).await.unwrap().is_empty());
    let missing = "0".repeat(64);
    assert_eq!(other.size(&missing).await.unwrap(), None);
    assert!(other.read(&missing, 0, 10).await.is_err());
    // Nothing is left in the state directory: the database keeps it.
    let left: Vec<_> = std::fs::read_dir(stores[0].dir().join("files")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn postgres_a_server_not_seen_for_a_day_is_forgotten_at_the_next_heartbeat() {
    let Some((db, _dir, stores)) = postgres_stores(1).await else { return };
    let a = stores[0].join_cluster("a").unwrap().unwrap();
    let b = stores[0].join_cluster("b").unwrap().unwrap();
    let c = stores[0].join_cluster("c").unwrap().unwrap();
    for (s, addr) in [(&a, "a:1"), (&b, "b:1"), (&c, "c:1")] {
        s.join(addr).await.unwrap();
    }
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let ago = |hours: f64| {
        format!("UPDATE servers SET seen_at = now() - interval '{hours} hours' WHERE name = ")
    };
    client.execute(&format!("{}'b'", ago(25.0)), &[]).await.unwrap();
    client.execute(&format!("{}'c'", ago(23.0)), &[]).await.unwrap();
    a.heartbeat().await.unwrap();
    let names: Vec<String> = a.servers().await.unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["a", "c"], "b, gone for 25 hours, is forgotten; c, 23, still listed");
    b.heartbeat().await.unwrap();
    assert_eq!(a.servers().await.unwrap().len(), 3, "back, it joins again");
}

#[tokio::test]
async fn postgres_a_server_that_lost_the_lease_creates_no_run_and_a_fire_is_made_once() {
    let Some((_db, _dir, stores)) = postgres_stores(2).await else { return };
    let a = stores[0].join_cluster("a").unwrap().unwrap();
    let b = stores[1].join_cluster("b").unwrap().unwrap();
    let lease = Duration::from_secs(1);
    let ea = a.try_acquire(lease).await.unwrap().expect("a takes the free lease");
    assert_eq!(b.try_acquire(lease).await.unwrap(), None, "not while a's lease runs");
    stores[0].insert_unit(unit("u")).await.unwrap();
    let at = Timestamp::from_second(1_700_000_000).unwrap();
    stores[0].create_run("u", RunState::Running, Trigger::Schedule, 1, Some(at)).await.unwrap();
    // b cannot create runs without the lease; nor the same fire, ever.
    let refused = stores[1].create_run("u", RunState::Running, Trigger::Manual, 1, None).await;
    assert!(matches!(refused, Err(Error::Fenced)), "{refused:?}");
    // a is paused past its lease: b takes over; a, awake again, creates nothing.
    tokio::time::sleep(lease + Duration::from_millis(100)).await;
    let eb = b.try_acquire(lease).await.unwrap().expect("b takes the expired lease");
    assert!(eb > ea);
    let late = stores[0].create_run("u", RunState::Running, Trigger::Manual, 1, None).await;
    assert!(matches!(late, Err(Error::Fenced)), "{late:?}");
    let hosts = vec!["h".to_string()];
    let late = stores[0].create_dispatch("u", Trigger::Manual, hosts, 0, None, None).await;
    assert!(matches!(late, Err(Error::Fenced)), "{late:?}");
    assert!(!a.renew(ea, lease).await.unwrap(), "a's renewal fails");
    let twice = stores[1].create_run("u", RunState::Running, Trigger::Schedule, 1, Some(at)).await;
    assert!(matches!(&twice, Err(Error::Conflict(m)) if m.contains("made already")), "{twice:?}");
    let next = at.checked_add(jiff::SignedDuration::from_secs(1)).unwrap();
    stores[1].create_run("u", RunState::Running, Trigger::Schedule, 1, Some(next)).await.unwrap();
    // Given up cleanly, the lease is free at once.
    b.release(eb).await.unwrap();
    assert!(a.try_acquire(lease).await.unwrap().is_some());
}

async fn concurrent_starts_and_ends_of_many_units_all_succeed(store: Store) {
    // Starts, queued starts, dispatches and ends of 16 units at once: each change touches
    // several states' counts, in different orders; none may fail (no deadlock).
    let mut tasks = Vec::new();
    for u in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let name = format!("u{u}");
            store.insert_unit(unit(&name)).await?;
            for _ in 0..10 {
                let hosts = vec!["h1".to_string(), "h2".to_string()];
                let (_, runs) =
                    store.create_dispatch(&name, Trigger::Manual, hosts, 1, None, None).await?;
                let queued = store.start_queued(runs[1].id).await?;
                let r =
                    store.create_run(&name, RunState::Running, Trigger::Manual, 1, None).await?;
                let ends: Vec<RunRecord> = [runs[0].clone(), queued, r]
                    .into_iter()
                    .map(|mut e| {
                        e.state = RunState::Succeeded;
                        e
                    })
                    .collect();
                store.finish_runs(ends, 100).await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let mut counts = store.run_counts().await.unwrap();
    counts.sort();
    assert_eq!(counts, [("succeeded".to_string(), 16 * 30)]);
}

async fn api_tasks_are_listed_newest_last_and_done_once_their_dispatch_ended(store: Store) {
    let created = Timestamp::from_second(1_700_000_000).unwrap();
    let task = |title: &str| ApiTask {
        id: 0,
        title: title.into(),
        account: "root".into(),
        timeout: 5,
        hosts: vec!["h1".into(), "h2".into()],
        script: "#!/bin/bash\nss -ntlp".into(),
        args: "-a b".into(),
        creator: "xiaoyi".into(),
        created,
        done: false,
    };
    let a = store.insert_api_task(task("a")).await.unwrap();
    let b = store.insert_api_task(task("b")).await.unwrap();
    let c = store.insert_api_task(task("c")).await.unwrap();
    assert!(a < b && b < c);
    // Not listed until settled (its unit may not exist yet); a refused one is forgotten.
    assert_eq!(store.list_api_tasks(10, None).await.unwrap(), []);
    store.settle_api_task(a, true).await.unwrap();
    store.settle_api_task(b, true).await.unwrap();
    store.settle_api_task(c, false).await.unwrap();
    // Task a's unit ran its dispatch to the end; b's unit has one still running.
    for id in [a, b] {
        store.insert_unit(unit(&ApiTask::unit_name(id))).await.unwrap();
    }
    let hosts = vec!["h1".to_string()];
    let name = ApiTask::unit_name(a);
    let (d, _) =
        store.create_dispatch(&name, Trigger::Add, hosts.clone(), 0, None, None).await.unwrap();
    store.set_dispatch_state(d.id, DispatchState::Succeeded).await.unwrap();
    let name = ApiTask::unit_name(b);
    store.create_dispatch(&name, Trigger::Add, hosts, 0, None, None).await.unwrap();
    let listed = store.list_api_tasks(10, None).await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0], ApiTask { id: a, done: true, ..task("a") });
    assert_eq!(listed[1], ApiTask { id: b, done: false, ..task("b") });
    assert_eq!(store.list_api_tasks(1, None).await.unwrap()[0].id, b, "the newest");
    assert_eq!(store.list_api_tasks(10, Some(b)).await.unwrap()[0].id, a, "a page before b");
    // A task whose unit is gone is done; ids are never reused.
    store.delete_unit(&ApiTask::unit_name(b), false).await.unwrap();
    assert!(store.list_api_tasks(10, None).await.unwrap()[1].done);
    assert!(store.insert_api_task(task("d")).await.unwrap() > c);
}

async fn dispatches_made_at_once_get_their_own_runs_in_their_hosts_order(store: Store) {
    // 24 units' dispatches at once (the PostgreSQL store inserts a group's dispatches in one
    // statement), of 1 to 5 hosts and batches of 0 to 2: each gets its own hosts' runs, ids
    // ascending in its hosts' order, the first `batch` running (all if 0), as stored.
    for u in 0..24 {
        store.insert_unit(unit(&format!("m{u}"))).await.unwrap();
    }
    let made = futures_util::future::join_all((0..24).map(|u| {
        let store = store.clone();
        async move {
            let hosts = (0..=u % 5).map(|h| format!("m{u}-h{h}")).collect();
            let name = format!("m{u}");
            store.create_dispatch(&name, Trigger::Manual, hosts, u % 3, None, None).await
        }
    }))
    .await;
    for (u, m) in made.into_iter().enumerate() {
        let (d, runs) = m.unwrap();
        let (hosts, batch) = (u % 5 + 1, u % 3);
        assert_eq!((d.unit.as_str(), d.total as usize), (format!("m{u}").as_str(), hosts));
        assert_eq!(runs.len(), hosts);
        assert!(runs.windows(2).all(|w| w[0].id < w[1].id), "m{u}: {runs:?}");
        for (h, r) in runs.iter().enumerate() {
            let state = if batch == 0 || h < batch { RunState::Running } else { RunState::Queued };
            let host = format!("m{u}-h{h}");
            assert_eq!((r.host.as_str(), r.state, r.dispatch), (host.as_str(), state, Some(d.id)));
            let stored = store.get_run(r.id).await.unwrap();
            assert_eq!(
                (stored.unit.as_str(), stored.host.as_str(), stored.state, stored.dispatch),
                (format!("m{u}").as_str(), host.as_str(), state, Some(d.id))
            );
        }
    }
    store.flush().await.unwrap();
    for u in store.load_units().await.unwrap() {
        let n: usize = u.name[1..].parse().unwrap();
        let running = if n.is_multiple_of(3) { n % 5 + 1 } else { (n % 3).min(n % 5 + 1) };
        assert_eq!(u.runs_total, running as u64, "{}: runs counted as they start", u.name);
    }
}

async fn a_fire_made_already_fails_alone_among_fires_made_at_once(store: Store) {
    // Fires of 32 units at the same moment (the PostgreSQL store makes them in shared
    // transactions): the one made already is refused, every other is made, whole.
    let at = Timestamp::from_second(1_700_000_000).unwrap();
    for u in 0..32 {
        store.insert_unit(unit(&format!("f{u}"))).await.unwrap();
    }
    let hosts = vec!["h".to_string()];
    store.create_dispatch("f7", Trigger::Schedule, hosts.clone(), 0, None, Some(at)).await.unwrap();
    let fires = (0..32).map(|u| {
        let (store, hosts) = (store.clone(), hosts.clone());
        async move {
            let name = format!("f{u}");
            // A fire's dispatch records the unit's last fire itself; a fire time recorded
            // apart as well changes nothing.
            if u % 2 == 1 {
                store.set_last_fire(&name, at);
            }
            store.create_dispatch(&name, Trigger::Schedule, hosts, 0, None, Some(at)).await
        }
    });
    let made = futures_util::future::join_all(fires).await;
    // Only a shared store refuses a fire made already (across servers and takeovers).
    let refused = store.is_shared().then_some(7);
    for (u, m) in made.iter().enumerate() {
        if Some(u) == refused {
            assert!(matches!(m, Err(Error::Conflict(e)) if e.contains("made already")), "{m:?}");
        } else {
            let (d, runs) = m.as_ref().unwrap_or_else(|e| panic!("f{u}: {e}"));
            assert_eq!((d.unit.as_str(), runs.len()), (format!("f{u}").as_str(), 1));
            assert_eq!(runs[0].scheduled_at, Some(at));
        }
    }
    store.flush().await.unwrap();
    let units = store.load_units().await.unwrap();
    assert_eq!(units.len(), 32);
    assert!(units.iter().all(|u| u.last_fire == Some(at)), "every fire time is kept");
    // Runs counted once per dispatch made (f7's first, and its second where it was made).
    for u in &units {
        let made = if u.name == "f7" && refused.is_none() { 2 } else { 1 };
        assert_eq!(u.runs_total, made, "{}", u.name);
    }
    let all = DispatchFilter { unit: None, state: None, limit: 100, before: None };
    let dispatches = store.list_dispatches(all);
    let expected = if refused.is_some() { 32 } else { 33 };
    assert_eq!(dispatches.await.unwrap().len(), expected, "each fire made, and the one before");
}
