//! Recovery from a lost worker: a killed worker is replaced (by `tessera serve`'s
//! supervisor, or by a new `tessera worker` joining), the live sequences are prefilled
//! again from the coordinator's record, and every stream ends with exactly the tokens an
//! unbroken run gives. A request whose deadline passes while the cluster recovers ends
//! with DEADLINE_EXCEEDED.
//!
//! The chaos tests run 8 closed-loop clients of long streams against `tessera serve` and
//! SIGKILL a random worker process every 10 s; `TESSERA_CHAOS_SECS` (default 60) sets how
//! long, `TESSERA_CHAOS_PRESET` (default gpt2-tiny) the model.

mod cluster_common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_common::{metric, wait_idle, wait_serving, Manual, Serve};
use tessera_client::{Client, ClientError, Code, GenerateRequest};

/// The tests of this file run one at a time: each times a recovery, and two clusters
/// recovering at once on a 2-core machine would time each other.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Concurrent client streams.
const CLIENTS: usize = 8;
/// Distinct requests the clients cycle through; each has its reference tokens.
const REQUESTS: usize = 16;
/// New tokens per request: long enough that several are in flight at every kill.
const NEW_TOKENS: u32 = 240;
/// Time between kills.
const KILL_EVERY: Duration = Duration::from_secs(10);
/// The first kill, once the load is steady.
const FIRST_KILL: Duration = Duration::from_secs(5);

/// Request `i`: greedy with a repetition penalty (so the tokens vary) for even `i`,
/// seeded sampling for odd `i`; either way the tokens are fixed by the request.
fn request(i: usize) -> GenerateRequest {
    let i32 = i as u32;
    let greedy = i.is_multiple_of(2);
    GenerateRequest {
        prompt_ids: vec![464, 1000 + 37 * i32, 7, 99 + i32],
        max_tokens: Some(NEW_TOKENS),
        ignore_eos: true,
        temperature: Some(if greedy { 0.0 } else { 0.8 }),
        repetition_penalty: Some(if greedy { 1.3 } else { 1.0 }),
        seed: Some(i as u64),
        ..Default::default()
    }
}

/// Streams one request to its end; the tokens, or the error that ended it.
async fn stream(endpoint: &str, req: GenerateRequest) -> Result<Vec<u32>, ClientError> {
    let mut client = Client::connect(endpoint).await?;
    let mut s = client.generate_stream(req).await?;
    let mut tokens = Vec::new();
    while let Some(m) = s.message().await? {
        tokens.extend(m.token_ids);
    }
    Ok(tokens)
}

/// The tokens of every request on an unbroken cluster.
async fn reference(endpoint: &str) -> Vec<Vec<u32>> {
    let runs = (0..REQUESTS).map(|i| {
        let endpoint = endpoint.to_string();
        tokio::spawn(async move { stream(&endpoint, request(i)).await })
    });
    let mut out = Vec::new();
    for (i, r) in futures::future::join_all(runs)
        .await
        .into_iter()
        .enumerate()
    {
        let tokens = r
            .unwrap()
            .unwrap_or_else(|e| panic!("reference run {i}: {e}"));
        assert_eq!(tokens.len(), NEW_TOKENS as usize);
        out.push(tokens);
    }
    out
}

/// Health transitions seen by polling `GET /health`: `(at, serving)`.
type Transitions = Arc<Mutex<Vec<(Instant, bool)>>>;

async fn watch_health(http: String, done: Arc<AtomicBool>, seen: Transitions) {
    let client = reqwest::Client::new();
    let mut last = None;
    while !done.load(Ordering::SeqCst) {
        let serving = match client
            .get(format!("{http}/health"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
        {
            Ok(r) => r.status().is_success(),
            Err(_) => false,
        };
        if last != Some(serving) {
            seen.lock().unwrap().push((Instant::now(), serving));
            last = Some(serving);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// For each kill: how long until health said NOT_SERVING (detection) and SERVING again
/// (recovery), both from the kill.
fn outages(kills: &[Instant], seen: &[(Instant, bool)]) -> Vec<(Duration, Duration)> {
    kills
        .iter()
        .filter_map(|&k| {
            let down = seen.iter().find(|(t, s)| *t >= k && !s)?.0;
            let up = seen.iter().find(|(t, s)| *t > down && *s)?.0;
            Some((down - k, up - k))
        })
        .collect()
}

fn summary(what: &str, xs: impl Iterator<Item = Duration>) -> String {
    let mut ms: Vec<f64> = xs.map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return format!("{what}: none");
    }
    format!(
        "{what}: min {:.0} ms, median {:.0} ms, max {:.0} ms",
        ms[0],
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    )
}

/// A small deterministic generator for the choice of worker to kill.
fn next_random(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

/// Runs the chaos test on `tessera serve ARGS`.
async fn chaos(args: &[&str]) {
    let _serial = SERIAL.lock().await;
    let secs: u64 = std::env::var("TESSERA_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let preset = std::env::var("TESSERA_CHAOS_PRESET").unwrap_or_else(|_| "gpt2-tiny".into());
    let mut all = vec!["--preset", preset.as_str()];
    all.extend_from_slice(args);
    let serve = Serve::start(&all);
    wait_serving(&serve.endpoint, Duration::from_secs(60)).await;
    let expected = Arc::new(reference(&serve.endpoint).await);

    let done = Arc::new(AtomicBool::new(false));
    let seen: Transitions = Arc::default();
    let watcher = tokio::spawn(watch_health(serve.http.clone(), done.clone(), seen.clone()));
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let next = Arc::new(AtomicUsize::new(0));
    let outcomes: Arc<Mutex<HashMap<&'static str, usize>>> = Arc::default();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (endpoint, expected, next, outcomes) = (
                serve.endpoint.clone(),
                expected.clone(),
                next.clone(),
                outcomes.clone(),
            );
            tokio::spawn(async move {
                while Instant::now() < end {
                    let i = next.fetch_add(1, Ordering::SeqCst) % REQUESTS;
                    let outcome = match stream(&endpoint, request(i)).await {
                        Ok(tokens) if tokens == expected[i] => "completed",
                        Ok(tokens) => {
                            eprintln!(
                                "request {i}: {} tokens differ from the unbroken run",
                                tokens.len()
                            );
                            "mismatched"
                        }
                        Err(e) => {
                            eprintln!("request {i} lost: {e}");
                            "lost"
                        }
                    };
                    *outcomes.lock().unwrap().entry(outcome).or_default() += 1;
                }
            })
        })
        .collect();

    let mut kills = Vec::new();
    let mut rng = secs ^ 0x7e55e7a;
    let mut at = start + FIRST_KILL;
    while at < end {
        tokio::time::sleep_until(at.into()).await;
        let workers = serve.workers();
        assert!(!workers.is_empty(), "serve has no worker processes");
        let victim = workers[next_random(&mut rng) as usize % workers.len()];
        // SAFETY: a signal to a process of this test's cluster.
        unsafe {
            libc::kill(victim as libc::pid_t, libc::SIGKILL);
        }
        kills.push(Instant::now());
        eprintln!(
            "{:>5.1} s: killed worker process {victim}",
            start.elapsed().as_secs_f64()
        );
        at += KILL_EVERY;
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(120), c)
            .await
            .expect("the clients finish their last requests")
            .unwrap();
    }
    done.store(true, Ordering::SeqCst);
    watcher.await.unwrap();
    wait_idle(&serve.http, Duration::from_secs(10)).await;

    let outcomes = outcomes.lock().unwrap().clone();
    let get = |k: &str| outcomes.get(k).copied().unwrap_or(0);
    let failures = metric(&serve.http, "tessera_worker_failures_total").await;
    let recoveries = metric(&serve.http, "tessera_recoveries_total").await;
    let seen = seen.lock().unwrap().clone();
    let outages = outages(&kills, &seen);
    eprintln!(
        "chaos {all:?} for {secs} s: {} kills, {} requests completed, lost = {}, mismatched = {}; \
         worker failures {failures}, recoveries {recoveries}",
        kills.len(),
        get("completed"),
        get("lost"),
        get("mismatched"),
    );
    eprintln!(
        "{}; {}",
        summary("detection", outages.iter().map(|o| o.0)),
        summary("back to serving", outages.iter().map(|o| o.1))
    );
    assert_eq!(get("lost"), 0, "every request completes");
    assert_eq!(get("mismatched"), 0, "with the tokens of an unbroken run");
    assert!(get("completed") >= CLIENTS, "the load ran: {outcomes:?}");
    assert!(
        failures >= kills.len() as f64,
        "{failures} failures counted for {} kills",
        kills.len()
    );
    assert!(recoveries >= 1.0, "no recovery counted");
    assert_eq!(
        outages.len(),
        kills.len(),
        "every kill was seen and recovered from: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_tp2_every_request_completes_unchanged() {
    chaos(&["--tp", "2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_tp2_pp2_every_request_completes_unchanged() {
    chaos(&["--tp", "2", "--pp", "2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_worker_takes_over_the_shard_of_a_dead_one() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Manual::start(&["--preset", "gpt2-tiny", "--tp", "2"], 2, &[]);
    let mut client = wait_serving(&cluster.endpoint, Duration::from_secs(60)).await;
    let expected = stream(&cluster.endpoint, request(0)).await.unwrap();
    let before = client.model_info().await.unwrap();

    let endpoint = cluster.endpoint.clone();
    let running = tokio::spawn(async move { stream(&endpoint, request(0)).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = cluster.process_at(&before.workers[1].address);
    cluster.workers[victim].signal(libc::SIGKILL);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!running.is_finished(), "the stream waits for a replacement");
    cluster.add_worker(&[]);

    let tokens = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the stream ends once a replacement has the shard")
        .unwrap()
        .expect("the stream completes");
    assert_eq!(tokens, expected, "with the tokens of an unbroken run");
    let after = client.model_info().await.unwrap();
    assert_eq!(after.workers[0].address, before.workers[0].address);
    assert_ne!(
        after.workers[1].address, before.workers[1].address,
        "the new worker holds shard 1"
    );
    let again = stream(&cluster.endpoint, request(0)).await.unwrap();
    assert_eq!(again, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_during_recovery_ends_the_request() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Manual::start(
        &[
            "--preset",
            "gpt2-tiny",
            "--tp",
            "2",
            "--recovery-timeout-ms",
            "30000",
        ],
        2,
        &[],
    );
    let mut client = wait_serving(&cluster.endpoint, Duration::from_secs(60)).await;
    let info = client.model_info().await.unwrap();
    let victim = cluster.process_at(&info.workers[1].address);
    cluster.workers[victim].signal(libc::SIGKILL);

    let mut req = request(1);
    req.max_tokens = Some(8);
    let mut timed = Client::connect_with(
        &cluster.endpoint,
        tessera_client::ClientOptions {
            call_timeout: Some(Duration::from_millis(1500)),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let started = Instant::now();
    let e = timed
        .generate(req)
        .await
        .expect_err("no worker took over in time");
    assert_eq!(
        e.code(),
        Some(Code::DeadlineExceeded),
        "{e} after {:?} ({e:?})",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ended at its deadline, not at the recovery timeout: {:?}",
        started.elapsed()
    );

    // A replacement brings the cluster back.
    cluster.add_worker(&[]);
    let tokens = tokio::time::timeout(
        Duration::from_secs(60),
        stream(&cluster.endpoint, request(1)),
    )
    .await
    .expect("served again")
    .expect("the request completes");
    assert_eq!(tokens.len(), NEW_TOKENS as usize);
}

/// Whether SIGPIPE is among the signals process `pid` ignores (`SigIgn` in
/// `/proc/PID/status`, a hex mask whose bit `n - 1` is signal `n`).
fn ignores_sigpipe(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .expect("SigIgn line");
    mask & (1 << (libc::SIGPIPE - 1)) != 0
}

/// A step sent to a worker that was just killed fails with EPIPE; with SIGPIPE at its
/// default action the coordinator would die of that write instead of recovering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_processes_survive_writing_to_a_dead_peer() {
    let _serial = SERIAL.lock().await;
    let cluster = Manual::start(&["--preset", "gpt2-tiny", "--tp", "2"], 2, &[]);
    wait_serving(&cluster.endpoint, Duration::from_secs(60)).await;
    assert!(
        ignores_sigpipe(cluster.coordinator.pid()),
        "the coordinator ignores SIGPIPE"
    );
    for w in &cluster.workers {
        assert!(ignores_sigpipe(w.pid()), "a worker ignores SIGPIPE");
    }
}
