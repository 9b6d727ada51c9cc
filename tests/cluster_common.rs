//! Real clusters for the integration tests: `tessera serve`, or a coordinator and worker
//! processes started one by one, on 127.0.0.1 (or in network namespaces). Every process
//! is killed when its handle drops, so a failing test leaves nothing behind.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `tessera` binary under test.
pub fn tessera() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tessera"));
    // `TESSERA_TEST_LOG` sets the processes' log filter (default: warnings).
    let filter = std::env::var("TESSERA_TEST_LOG").unwrap_or_else(|_| "warn".into());
    c.env("RUST_LOG", filter).stdin(Stdio::null());
    c
}

/// A child process killed (and reaped) on drop.
pub struct Proc(pub Child);

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: signalling our own child, not yet reaped.
        unsafe {
            libc::kill(self.0.id() as libc::pid_t, sig);
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.0.try_wait() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether a process id is alive (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

/// Children of a process.
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// Reads lines of `stream` on a thread until one satisfies `find`, for up to `timeout`.
/// Returns the first capture, and keeps draining the stream afterwards. Every line is
/// echoed to the test's captured output, so a failing test shows what its processes said.
fn watch_lines(
    stream: impl std::io::Read + Send + 'static,
    mut find: impl FnMut(&str) -> Option<String> + Send + 'static,
    timeout: Duration,
) -> Result<String, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        let mut found = false;
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            eprintln!("[process] {line}");
            if !found {
                if let Some(v) = find(&line) {
                    found = true;
                    let _ = tx.send(Ok(v));
                } else {
                    seen.push_str(&line);
                    seen.push('\n');
                }
            }
        }
        if !found {
            let _ = tx.send(Err(seen));
        }
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => Err(format!("nothing within {timeout:?}")),
    }
}

/// `tessera serve` on ephemeral ports.
pub struct Serve {
    pub proc: Proc,
    /// The gRPC endpoint, `127.0.0.1:PORT`.
    pub endpoint: String,
    /// The OpenAI-compatible API's base, `http://127.0.0.1:PORT`.
    pub http: String,
}

impl Serve {
    /// Starts `tessera serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 ARGS` and waits
    /// until it serves.
    pub fn start(args: &[&str]) -> Serve {
        let mut cmd = tessera();
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--threads", "2"])
            .args(["--http-listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("tessera serve starts");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let proc = Proc(child);
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[process] {line}");
                all.push_str(&line);
                all.push('\n');
            }
            let _ = etx.send(all);
        });
        let mut grpc = None;
        let found = watch_lines(
            stdout,
            move |l| {
                if let Some(rest) = l.strip_prefix("Tessera is serving") {
                    grpc = rest.rsplit(" on ").next().map(|a| a.trim().to_string());
                }
                let http = l
                    .trim()
                    .strip_prefix("OpenAI API:")?
                    .split_whitespace()
                    .next()?;
                let base = http.trim_end_matches("/v1");
                Some(format!("{} {base}", grpc.as_deref()?))
            },
            Duration::from_secs(120),
        );
        match found {
            Ok(both) => {
                let (endpoint, http) = both.split_once(' ').expect("two addresses");
                Serve {
                    proc,
                    endpoint: endpoint.to_string(),
                    http: http.to_string(),
                }
            }
            Err(out) => {
                drop(proc);
                let err = erx.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
                panic!("tessera serve {args:?} did not start:\n{out}\nstderr:\n{err}");
            }
        }
    }

    /// The worker processes it started.
    pub fn workers(&self) -> Vec<u32> {
        children(self.proc.pid())
    }
}

/// A coordinator process on an ephemeral port, with worker processes started by hand.
pub struct Manual {
    pub coordinator: Proc,
    pub workers: Vec<Proc>,
    pub endpoint: String,
}

impl Manual {
    /// `tessera coordinator --listen 127.0.0.1:0 ARGS` and `n` workers on 127.0.0.1.
    pub fn start(args: &[&str], n: usize, worker_args: &[&str]) -> Manual {
        let mut cmd = tessera();
        cmd.args(["coordinator", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("tessera coordinator starts");
        let stderr = child.stderr.take().unwrap();
        let coordinator = Proc(child);
        let endpoint = watch_lines(
            stderr,
            |l| {
                l.strip_prefix("coordinator on ")
                    .and_then(|r| r.split(':').take(2).collect::<Vec<_>>().join(":").into())
            },
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("coordinator did not start: {e}"));
        let workers = (0..n).map(|_| worker(&endpoint, worker_args)).collect();
        Manual {
            coordinator,
            workers,
            endpoint,
        }
    }

    /// Starts one more worker, as a new node joining the cluster would.
    pub fn add_worker(&mut self, worker_args: &[&str]) {
        self.workers.push(worker(&self.endpoint, worker_args));
    }

    /// The index in `workers` of the process listening on `address` (`IP:PORT`, as
    /// ModelInfo lists a worker).
    pub fn process_at(&self, address: &str) -> usize {
        let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
        self.workers
            .iter()
            .position(|w| listening_ports(w.pid()).contains(&port))
            .unwrap_or_else(|| panic!("no worker process listens on {address}"))
    }
}

/// A worker process of the coordinator at `endpoint`, on 127.0.0.1.
fn worker(endpoint: &str, worker_args: &[&str]) -> Proc {
    let mut w = tessera();
    w.args(["worker", "--coordinator", endpoint])
        .args(["--listen", "127.0.0.1:0", "--threads", "1"])
        .args(worker_args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc(w.spawn().expect("tessera worker starts"))
}

/// Polls the cluster until it answers `ModelInfo`, i.e. serves.
pub async fn wait_serving(endpoint: &str, timeout: Duration) -> tessera_client::Client {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut c) = tessera_client::Client::connect(endpoint).await {
            if c.model_info().await.is_ok() {
                return c;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{endpoint} did not serve within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `tessera run ARGS --json`, parsed.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let out = tessera()
        .arg("run")
        .args(args)
        .args(["--json", "--threads", "2"])
        .output()
        .expect("tessera run");
    assert!(
        out.status.success(),
        "tessera run {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// The token ids of a `run --json` report.
pub fn token_ids(v: &serde_json::Value) -> Vec<u32> {
    v["token_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// TCP ports a process listens on (IPv4 and IPv6), from `/proc`: the sockets among its
/// open files that `/proc/net/tcp{,6}` lists in the LISTEN state. Only sees processes in
/// this network namespace.
pub fn listening_ports(pid: u32) -> Vec<u16> {
    let mut inodes = std::collections::HashSet::new();
    if let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                let t = target.to_string_lossy();
                if let Some(inode) = t.strip_prefix("socket:[").and_then(|r| r.strip_suffix(']')) {
                    inodes.insert(inode.to_string());
                }
            }
        }
    }
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if f.len() < 10 || f[3] != "0A" || !inodes.contains(f[9]) {
                continue;
            }
            if let Some(port) = f[1]
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok())
            {
                ports.push(port);
            }
        }
    }
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The sum of every series of metric `name` at `GET {http}/metrics`; `name` may carry a
/// full label set (`name{reason="cancelled"}`) to pick one series.
pub async fn metric(http: &str, name: &str) -> f64 {
    let text = reqwest::get(format!("{http}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    parse_metric(&text, name)
}

/// The sum of every series of `name` in a Prometheus text exposition.
pub fn parse_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let value = if rest.starts_with('{') {
                rest.split_once("} ")?.1
            } else {
                rest.strip_prefix(' ')?
            };
            value.trim().parse::<f64>().ok()
        })
        .sum()
}

/// Waits until no sequence runs and no KV block is used, and says how long that took;
/// panics after `timeout`.
pub async fn wait_idle(http: &str, timeout: Duration) -> Duration {
    let start = std::time::Instant::now();
    loop {
        let running = metric(http, "tessera_requests_running").await;
        let used = metric(http, "tessera_kv_blocks_used").await;
        let waiting = metric(http, "tessera_requests_waiting").await;
        if running == 0.0 && used == 0.0 && waiting == 0.0 {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "still busy after {timeout:?}: {running} running, {waiting} waiting, {used} KV blocks used"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
