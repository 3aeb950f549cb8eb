//! The network cut for real: the daemon and an agent in two network namespaces this test
//! creates, joined by a veth pair with addresses only inside them; the link is taken down
//! mid-run and brought back. Needs root (as CI has); elsewhere it is skipped loudly, and under
//! `CI` it fails rather than skips.

use std::process::Command;

use serde_json::json;

use crate::agents::{TestAgent, wait_run};
use crate::common::{TestDaemon, wait_for};

/// Two namespaces and the veth pair between them; removed on drop.
struct Link {
    server_ns: String,
    agent_ns: String,
    server_if: String,
    server_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Link {
    fn new() -> Link {
        let id = std::process::id() % 100_000;
        let (s, a) = (format!("tds{id}"), format!("tda{id}"));
        let (vs, va) = (format!("vs{id}"), format!("va{id}"));
        let net = format!("10.213.{}", id % 250);
        let link = Link {
            server_ns: s.clone(),
            agent_ns: a.clone(),
            server_if: vs.clone(),
            server_ip: format!("{net}.1"),
        };
        ip(&["netns", "add", &s]);
        ip(&["netns", "add", &a]);
        ip(&["link", "add", &vs, "netns", &s, "type", "veth", "peer", "name", &va, "netns", &a]);
        ip(&["-n", &s, "addr", "add", &format!("{net}.1/24"), "dev", &vs]);
        ip(&["-n", &a, "addr", "add", &format!("{net}.2/24"), "dev", &va]);
        for (ns, dev) in [(&s, &vs), (&a, &va)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        link
    }

    /// Moves the calling thread (and what it starts from now on) into the server's namespace.
    fn enter_server(&self) {
        let f = std::fs::File::open(format!("/run/netns/{}", self.server_ns)).expect("netns");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }

    fn set_link(&self, up: bool) {
        ip(&[
            "-n",
            &self.server_ns,
            "link",
            "set",
            &self.server_if,
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.server_ns, &self.agent_ns] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn an_agent_cut_off_by_a_downed_link_keeps_its_run_and_reports_it_when_the_link_is_back() {
    if !nix::unistd::geteuid().is_root() {
        assert!(std::env::var_os("CI").is_none(), "this test needs root (ip netns), as CI has");
        eprintln!("SKIPPED: the network-namespace test needs root");
        return;
    }
    let link = Link::new();
    // This test's thread (and what it starts) lives in the server's namespace from here on.
    link.enter_server();
    let d = TestDaemon::start_listening(
        &format!("{}:0", link.server_ip),
        // --insecure: this test's own calls are plain, from the server's address; the agent
        // connects with TLS (its join token carries the fingerprint).
        &["--tls", "auto", "--insecure", "--agent-timeout", "1s", "--lost-after", "60s"],
    );
    let a = TestAgent::enroll_in(&d, "far", "", Some(&link.agent_ns));
    let info = d.call(
        "TaskUnit.Add",
        json!({"name": "across", "command": ["sh", "-c", "echo start; sleep 4; echo done"], "hosts": ["far"]}),
    );
    let run = info["last_run"]["id"].as_i64().unwrap();
    wait_run(&d, run, "the run to start", |r| r["pid"].is_i64());
    link.set_link(false);
    wait_run(&d, run, "the run to be unreachable", |r| r["host_state"] == "unreachable");
    link.set_link(true);
    let ended = d.wait_run_end(run);
    assert_eq!(ended["state"], "succeeded", "{ended}");
    assert_eq!(d.call("Run.Logs", json!({"id": run}))["data"], "start\ndone\n");
    wait_for("the agent to be connected again", || {
        (d.call("Agent.Get", json!("far"))["state"] == "connected").then_some(())
    });
    drop(a);
}
