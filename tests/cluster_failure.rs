//! A cluster that loses a process says so and leaves nothing behind: a killed or hung
//! worker that no replacement takes over from within the recovery timeout ends every
//! request with UNAVAILABLE naming that worker, while the coordinator keeps running and
//! reports NOT_SERVING; Ctrl-C or a SIGKILL of `tessera serve` takes its workers down; a
//! worker whose coordinator dies exits on its own. (Recovery with a replacement is in
//! `recovery.rs`.)

mod cluster_common;

use std::time::{Duration, Instant};

use cluster_common::{alive, listening_ports, wait_serving, Manual, Serve};
use tessera_client::{Client, ClientError, Code, GenerateRequest};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Flags of the coordinator of a failure test: the worker timeout bounds how long a hung
/// worker goes unnoticed, the recovery timeout how long requests wait for a replacement
/// (none comes in these tests).
const WORKER_TIMEOUT_MS: u64 = 2000;
const RECOVERY_TIMEOUT_MS: u64 = 1500;
/// How long every request may take to end once a worker is killed or stopped.
const FAILURE_DEADLINE: Duration = Duration::from_secs(15);

/// A request long enough to be running when the worker goes: the preset's context is
/// 1024 tokens.
fn long_request(i: u32) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: vec![464, 13 + i, 7, 99],
        max_tokens: Some(1000),
        ignore_eos: true,
        seed: Some(u64::from(i)),
        ..Default::default()
    }
}

/// How one stream ended.
#[derive(Debug)]
struct StreamEnd {
    messages: usize,
    result: Result<(), ClientError>,
    at: Instant,
}

/// Starts `n` long streams and returns once each has produced a message.
async fn start_long_streams(endpoint: &str, n: u32) -> Vec<JoinHandle<StreamEnd>> {
    let mut tasks = Vec::new();
    let mut started = Vec::new();
    for i in 0..n {
        let (tx, rx) = oneshot::channel::<()>();
        let endpoint = endpoint.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(&endpoint).await.unwrap();
            let mut stream = client.generate_stream(long_request(i)).await.unwrap();
            let mut tx = Some(tx);
            let mut messages = 0;
            let result = loop {
                match stream.message().await {
                    Ok(Some(_)) => {
                        messages += 1;
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            StreamEnd {
                messages,
                result,
                at: Instant::now(),
            }
        }));
        started.push(rx);
    }
    for (i, rx) in started.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                let end = tasks.remove(i).await;
                panic!("stream {i} ended before its first message: {end:?}");
            }
            Err(_) => panic!("stream {i} produced no message within 30 s"),
        }
    }
    tasks
}

/// How the cluster names a worker: `worker N (stage S, tp rank R, IP:PORT)`.
struct WorkerIdentity {
    /// Its index in the plan, the N of `worker N`.
    index: usize,
    /// Its gRPC address, as ModelInfo lists it.
    address: String,
    /// Its process among the cluster's workers.
    proc: usize,
}

/// The worker process that holds shard `index` of the plan: the one listening on the
/// port ModelInfo lists for that worker.
async fn identify(client: &mut Client, cluster: &Manual, index: usize) -> WorkerIdentity {
    let info = client.model_info().await.unwrap();
    let address = info.workers[index].address.clone();
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();
    let proc = cluster
        .workers
        .iter()
        .position(|w| listening_ports(w.pid()).contains(&port))
        .unwrap_or_else(|| panic!("no worker process listens on {address}"));
    WorkerIdentity {
        index,
        address,
        proc,
    }
}

/// Whether a status message names `who` (`strict`), or at least some worker.
fn names(message: &str, who: &WorkerIdentity, strict: bool) -> bool {
    if strict {
        message.contains(&format!("worker {} (", who.index)) && message.contains(&who.address)
    } else {
        message.contains("worker ") && message.contains("(stage ")
    }
}

/// Every stream ends with UNAVAILABLE naming a worker — `who` if `strict` — within
/// [`FAILURE_DEADLINE`] of `t0`.
async fn expect_unavailable(
    tasks: Vec<JoinHandle<StreamEnd>>,
    t0: Instant,
    who: &WorkerIdentity,
    strict: bool,
) {
    for (i, task) in tasks.into_iter().enumerate() {
        let end = tokio::time::timeout_at((t0 + FAILURE_DEADLINE).into(), task)
            .await
            .unwrap_or_else(|_| {
                panic!("stream {i} still open {FAILURE_DEADLINE:?} after the failure")
            })
            .unwrap();
        let took = end.at.saturating_duration_since(t0);
        eprintln!(
            "stream {i}: {} messages, ended {took:?} after the failure: {:?}",
            end.messages, end.result
        );
        let err = match end.result {
            Ok(()) => panic!(
                "stream {i} finished normally after {} messages",
                end.messages
            ),
            Err(e) => e,
        };
        assert!(took < FAILURE_DEADLINE, "stream {i} ended after {took:?}");
        let status = err
            .status()
            .unwrap_or_else(|| panic!("stream {i}: not a status: {err}"));
        assert_eq!(status.code(), Code::Unavailable, "stream {i}: {err}");
        assert!(
            names(status.message(), who, strict),
            "stream {i}: `{}` should name worker {} ({})",
            status.message(),
            who.index,
            who.address
        );
    }
}

/// The coordinator's health for `service`.
async fn health(endpoint: &str, service: &str) -> Result<ServingStatus, String> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map_err(|s| s.to_string())?;
    Ok(reply.into_inner().status())
}

/// After a worker failure: NOT_SERVING, new requests refused at once, the coordinator
/// still running.
async fn expect_reported_failure(cluster: &mut Manual, who: &WorkerIdentity, strict: bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    for service in ["", "tessera.v1.Generation"] {
        loop {
            let h = health(&cluster.endpoint, service).await;
            if h == Ok(ServingStatus::NotServing) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "health of `{service}` is {h:?}, not NOT_SERVING, 5 s after the failure"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let mut client = Client::connect(&cluster.endpoint).await.unwrap();
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(1), client.generate(long_request(9)))
        .await
        .expect("a new request is answered within 1 s");
    let err = r.expect_err("a new request is refused");
    assert_eq!(err.code(), Some(Code::Unavailable), "{err}");
    assert!(
        names(&err.to_string(), who, strict),
        "the refusal should name worker {} ({}): {err}",
        who.index,
        who.address
    );
    eprintln!("new request refused in {:?}: {err}", started.elapsed());

    assert!(
        cluster.coordinator.0.try_wait().unwrap().is_none(),
        "the coordinator process exited"
    );
    assert!(alive(cluster.coordinator.pid()));
}

fn failure_cluster() -> Manual {
    let timeout = WORKER_TIMEOUT_MS.to_string();
    let recovery = RECOVERY_TIMEOUT_MS.to_string();
    Manual::start(
        &[
            "--preset",
            "gpt2-tiny",
            "--tp",
            "2",
            "--worker-timeout-ms",
            &timeout,
            "--recovery-timeout-ms",
            &recovery,
        ],
        2,
        &[],
    )
}

/// Starts long streams, kills (or stops) the worker of plan index 1 with `sig`, and
/// checks how the cluster reports it.
async fn fail_a_worker(sig: libc::c_int, strict: bool) {
    let mut cluster = failure_cluster();
    let mut client = wait_serving(&cluster.endpoint, Duration::from_secs(60)).await;
    let who = identify(&mut client, &cluster, 1).await;
    let tasks = start_long_streams(&cluster.endpoint, 4).await;

    cluster.workers[who.proc].signal(sig);
    let t0 = Instant::now();
    expect_unavailable(tasks, t0, &who, strict).await;
    expect_reported_failure(&mut cluster, &who, strict).await;
    if sig == libc::SIGSTOP {
        cluster.workers[who.proc].signal(libc::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_ends_its_requests_with_unavailable() {
    fail_a_worker(libc::SIGKILL, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_the_one_its_requests_name() {
    fail_a_worker(libc::SIGKILL, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_is_detected_by_its_heartbeat() {
    // A hung worker: its sockets stay open, it just never answers. Dropping the cluster
    // SIGKILLs it, which ends a stopped process too.
    fail_a_worker(libc::SIGSTOP, true).await;
}

/// `tessera serve`'s worker pids, and the serve process gone by `sig`.
fn stop_serve(sig: libc::c_int) -> (Serve, Vec<u32>) {
    let serve = Serve::start(&[]);
    let workers = serve.workers();
    assert_eq!(
        workers.len(),
        2,
        "serve starts one worker per shard: {workers:?}"
    );
    assert!(workers.iter().all(|&w| alive(w)));
    serve.proc.signal(sig);
    (serve, workers)
}

/// Every pid in `pids` is gone within `timeout`.
fn expect_gone(pids: &[u32], timeout: Duration, what: &str) {
    let start = Instant::now();
    while pids.iter().any(|&p| alive(p)) {
        let left: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
        assert!(
            start.elapsed() < timeout,
            "{what}: processes {left:?} still alive after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("{what}: gone {:?} after", start.elapsed());
}

#[test]
fn ctrl_c_on_serve_leaves_no_process() {
    let (mut serve, workers) = stop_serve(libc::SIGINT);
    let start = Instant::now();
    let status = serve
        .proc
        .wait_exit(Duration::from_secs(10))
        .expect("serve exits within 10 s of Ctrl-C");
    eprintln!("serve exited {status} in {:?}", start.elapsed());
    assert!(status.success(), "serve exited with {status}");
    expect_gone(
        &workers,
        Duration::from_secs(5),
        "serve's workers after Ctrl-C",
    );
}

#[test]
fn killing_serve_takes_its_workers_down() {
    let (mut serve, workers) = stop_serve(libc::SIGKILL);
    serve
        .proc
        .wait_exit(Duration::from_secs(5))
        .expect("a SIGKILLed serve exits");
    expect_gone(
        &workers,
        Duration::from_secs(5),
        "serve's workers after SIGKILL",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_exits_when_its_coordinator_dies() {
    const COORDINATOR_TIMEOUT_S: u64 = 3;
    let timeout = COORDINATOR_TIMEOUT_S.to_string();
    let mut cluster = Manual::start(
        &["--preset", "gpt2-tiny", "--tp", "2"],
        2,
        &["--coordinator-timeout", &timeout],
    );
    wait_serving(&cluster.endpoint, Duration::from_secs(60)).await;
    cluster.coordinator.signal(libc::SIGKILL);
    let start = Instant::now();
    let limit = Duration::from_secs(COORDINATOR_TIMEOUT_S + 3);
    for (i, w) in cluster.workers.iter_mut().enumerate() {
        let left = limit.saturating_sub(start.elapsed());
        let status = w.wait_exit(left).unwrap_or_else(|| {
            panic!("worker {i} still running {limit:?} after its coordinator died")
        });
        eprintln!("worker {i} exited {status} after {:?}", start.elapsed());
    }
}
