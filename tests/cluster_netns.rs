//! A cluster whose coordinator, workers and client each live in their own network
//! namespace, joined by a bridge: nothing may assume 127.0.0.1. The coordinator learns
//! each worker's address from its registration, the workers open their TP collective to
//! each other's namespace addresses, and a client in yet another namespace gets exactly
//! the tokens of `tessera run`.
//!
//! Needs root and `ip netns`; without them the test says so on stderr and passes.

mod cluster_common;
mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_common::{run_json, token_ids, Proc};
use common::fixture;

const PROMPT_IDS: &str = "464,13,7,99,250";
const MAX_TOKENS: &str = "16";
const PORT: u16 = 50051;

/// Runs `ip ARGS`; the error is its stderr.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Network namespaces made by this test and the processes running in them. Dropping it,
/// also while a failed assertion unwinds, kills the processes and deletes every
/// namespace, which deletes the links inside them.
struct Namespaces {
    procs: Vec<Proc>,
    names: Vec<String>,
}

impl Namespaces {
    fn add(&mut self, name: &str) -> Result<(), String> {
        ip(&["netns", "add", name])?;
        self.names.push(name.to_string());
        Ok(())
    }

    fn listed() -> String {
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // Proc's drop kills and reaps each; a namespace outlives its name while a process
        // is still in it.
        self.procs.clear();
        for name in self.names.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &name]) {
                eprintln!("cleanup: {e}");
            }
        }
    }
}

/// One namespace of the cluster, and its address on the bridge.
struct Node {
    ns: String,
    ip: String,
}

/// The stderr of a process, collected on a thread.
fn collect(stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    log
}

/// `tessera ARGS` inside namespace `ns`, its stderr collected.
fn spawn_in(ns: &str, args: &[&str]) -> (Proc, Arc<Mutex<String>>) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_tessera")])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ip netns exec tessera starts");
    let log = collect(child.stderr.take().unwrap());
    (Proc(child), log)
}

/// A line without its ANSI colour sequences.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-byte
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The worker addresses of the coordinator's "worker registered" log lines.
fn registered_addresses(log: &str) -> Vec<String> {
    log.lines()
        .map(plain)
        .filter(|l| l.contains("worker registered"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("address=").map(str::to_string))
        })
        .collect()
}

/// Builds the namespaces: a bridge in its own namespace and one veth into it per node.
fn build(ns: &mut Namespaces, bridge: &str, nodes: &[Node]) -> Result<(), String> {
    ip(&["-n", bridge, "link", "set", "lo", "up"])?;
    ip(&["-n", bridge, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", bridge, "link", "set", "br0", "up"])?;
    for (i, node) in nodes.iter().enumerate() {
        ns.add(&node.ns)?;
        let port = format!("v{i}");
        ip(&[
            "-n", bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            &node.ns,
        ])?;
        ip(&["-n", bridge, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", bridge, "link", "set", &port, "up"])?;
        let cidr = format!("{}/24", node.ip);
        ip(&["-n", &node.ns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &node.ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &node.ns, "link", "set", "lo", "up"])?;
    }
    Ok(())
}

#[test]
fn a_cluster_across_network_namespaces_matches_run() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root and `ip netns` (not running as root)");
        return;
    }
    let pid = std::process::id();
    let prefix = format!("ts{pid}");
    let subnet = format!("10.{}.{}", 200 + pid % 50, pid / 50 % 250);
    let bridge = format!("{prefix}b");
    let mut ns = Namespaces {
        procs: Vec::new(),
        names: Vec::new(),
    };
    if let Err(e) = ns.add(&bridge) {
        assert!(
            !e.contains("File exists"),
            "a namespace named {bridge} already exists: {e}"
        );
        eprintln!("skipped: needs root and `ip netns` ({e})");
        return;
    }
    let node = |suffix: &str, host: u32| Node {
        ns: format!("{prefix}{suffix}"),
        ip: format!("{subnet}.{host}"),
    };
    let nodes = [node("c", 1), node("w0", 2), node("w1", 3), node("g", 4)];
    build(&mut ns, &bridge, &nodes).unwrap_or_else(|e| panic!("cannot build the namespaces: {e}"));
    let [coord, w0, w1, client] = &nodes;

    let model = fixture("tiny-gpt2").display().to_string();
    let endpoint = format!("{}:{PORT}", coord.ip);
    let (c, coord_log) = spawn_in(
        &coord.ns,
        &[
            "coordinator",
            "--model",
            &model,
            "--tp",
            "2",
            "--listen",
            &endpoint,
        ],
    );
    ns.procs.push(c);
    let mut worker_logs = Vec::new();
    for w in [w0, w1] {
        let (p, log) = spawn_in(
            &w.ns,
            &[
                "worker",
                "--coordinator",
                &endpoint,
                "--listen",
                "0.0.0.0:0",
                "--threads",
                "1",
            ],
        );
        ns.procs.push(p);
        worker_logs.push(log);
    }
    let logs = || {
        let mut s = format!("coordinator:\n{}", coord_log.lock().unwrap());
        for (i, l) in worker_logs.iter().enumerate() {
            s.push_str(&format!("worker {i}:\n{}", l.lock().unwrap()));
        }
        s
    };

    let want = token_ids(&run_json(&[
        "--model",
        &model,
        "--prompt-ids",
        PROMPT_IDS,
        "--max-tokens",
        MAX_TOKENS,
        "--ignore-eos",
    ]));

    // From the client's namespace, until the cluster serves.
    let start = Instant::now();
    let report: serde_json::Value = loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &client.ns, env!("CARGO_BIN_EXE_tessera")])
            .args(["generate", "--endpoint", &endpoint])
            .args(["--prompt-ids", PROMPT_IDS, "--max-tokens", MAX_TOKENS])
            .args(["--ignore-eos", "--json", "--timeout", "20"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("ip netns exec tessera generate");
        if out.status.success() {
            let stdout = String::from_utf8(out.stdout).unwrap();
            break serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the cluster did not serve {endpoint} within 30 s; last attempt: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("served after {:?}", start.elapsed());
    assert_eq!(token_ids(&report), want, "{report}");
    assert_eq!(report["finish_reason"], "length");

    // The coordinator took each worker's address from its registration: the worker's
    // namespace address, never loopback.
    let mut seen: Vec<String> = registered_addresses(&coord_log.lock().unwrap())
        .iter()
        .map(|a| a.rsplit_once(':').map_or(a.clone(), |(h, _)| h.to_string()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [w0.ip.clone(), w1.ip.clone()],
        "registered worker addresses\n{}",
        logs()
    );

    drop(ns);
    let left = Namespaces::listed();
    assert!(!left.contains(&prefix), "namespaces left behind:\n{left}");
}
