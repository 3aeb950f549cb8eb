//! The mixed load test, short: clients racing `TaskUnit.Add/Edit/Delete/Start/Get/List` on
//! shared names get no error that is not their own doing, nothing deadlocks, and the daemon
//! ends up holding exactly what it acknowledged, also after `kill -9` and a restart. The
//! workload is the one `scripts/load` runs at full size (`examples/load/mixed.rs`).

#[path = "../../examples/load/conn.rs"]
mod conn;
#[path = "../../examples/load/mixed.rs"]
mod mixed;

use std::time::Duration;

use crate::common::TestDaemon;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_clients_leave_exactly_what_was_acknowledged() {
    let mut d = TestDaemon::start();
    let cfg = mixed::Config {
        addr: d.addr.clone(),
        token: d.token.clone(),
        clients: 16,
        duration: Duration::from_secs(3),
        names: 64,
    };
    let outcome = mixed::run(cfg).await;
    println!("{}", outcome.table());
    let problems = outcome.problems();
    assert!(problems.is_empty(), "{problems:#?}\n{}", d.log());
    let diff = mixed::verify(&d.addr, &d.token, &outcome.expected).await;
    assert!(diff.is_empty(), "state differs from what was acknowledged: {diff:#?}");
    d.kill9();
    d.restart();
    let diff = mixed::verify(&d.addr, &d.token, &outcome.expected).await;
    assert!(diff.is_empty(), "after kill -9 and a restart: {diff:#?}");
}
