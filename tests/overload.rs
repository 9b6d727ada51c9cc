//! Overload: at ten times the load the cluster sustains, it stays responsive. Health
//! answers quickly, the coordinator's memory stays bounded, the excess is refused at once
//! with RESOURCE_EXHAUSTED, and every admitted request completes.
//!
//! The sustainable rate is measured first: closed-loop clients, as many as the batch
//! holds. Then requests arrive open-loop at ten times that rate for a while, while a
//! prober times the gRPC health check and the coordinator's resident memory is sampled.
//! The figures are printed; the assertions hold generous bounds, since this machine is
//! shared with the cluster under test.

mod cluster_common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster_common::{wait_idle, wait_serving, Serve};
use tessera_client::{Code, GenerateRequest};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Sequences per step: the load the cluster sustains is this many requests at a time.
const BATCH: usize = 4;
/// Requests that may wait for the batch.
const QUEUE: usize = 8;
/// How long the sustainable rate is measured, and how long the overload lasts.
const MEASURE: Duration = Duration::from_secs(4);
const OVERLOAD: Duration = Duration::from_secs(8);
/// The overload, as a multiple of the sustainable rate.
const FACTOR: f64 = 10.0;

fn request(i: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_ids: vec![464, 13 + (i % 500) as u32, 7, 99, 5, 6, 7, 8],
        max_tokens: Some(32),
        ignore_eos: true,
        seed: Some(i as u64),
        ..Default::default()
    }
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[derive(Default)]
struct Outcomes {
    completed: usize,
    shed: Vec<Duration>,
    other: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_times_the_sustainable_load_is_shed_at_once_and_health_stays_quick() {
    let batch = BATCH.to_string();
    let queue = QUEUE.to_string();
    let serve = Serve::start(&["--max-batch-seqs", &batch, "--max-queued", &queue]);
    let client = wait_serving(&serve.endpoint, Duration::from_secs(60)).await;

    // The sustainable rate: as many closed-loop clients as the batch holds.
    let started = Instant::now();
    let loops: Vec<_> = (0..BATCH)
        .map(|c| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut done = 0usize;
                while started.elapsed() < MEASURE {
                    client.generate(request(c * 1000 + done)).await.unwrap();
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut completed = 0;
    for l in loops {
        completed += l.await.unwrap();
    }
    let sustainable = completed as f64 / started.elapsed().as_secs_f64();
    let rate = sustainable * FACTOR;
    eprintln!("sustainable: {sustainable:.1} requests/s; overload at {rate:.1} requests/s");

    // Health, timed throughout.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", serve.endpoint))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut health = HealthClient::new(channel);
            let mut times = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                let r = health
                    .check(HealthCheckRequest {
                        service: "tessera.v1.Generation".into(),
                    })
                    .await;
                assert!(r.is_ok(), "health failed under load: {r:?}");
                times.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            times
        })
    };
    let pid = serve.proc.pid();
    let rss_before = rss(pid);
    let rss_peak = Arc::new(Mutex::new(rss_before));
    let sampler = {
        let (stop, peak) = (stop.clone(), rss_peak.clone());
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let now = rss(pid);
                {
                    let mut p = peak.lock().unwrap();
                    *p = (*p).max(now);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // Open-loop arrivals at ten times the sustainable rate.
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    let mut calls = Vec::new();
    let mut i = 0usize;
    while start.elapsed() < OVERLOAD {
        let mut client = client.clone();
        let outcomes = outcomes.clone();
        let req = request(i);
        calls.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client.generate(req).await;
            let took = t.elapsed();
            let mut o = outcomes.lock().unwrap();
            match r {
                Ok(reply) => {
                    assert_eq!(reply.completion_tokens, 32);
                    o.completed += 1;
                }
                Err(e) if e.code() == Some(Code::ResourceExhausted) => o.shed.push(took),
                Err(e) => o.other.push(e.to_string()),
            }
        }));
        i += 1;
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
    }
    for c in calls {
        tokio::time::timeout(Duration::from_secs(120), c)
            .await
            .expect("every admitted request completes")
            .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut health = prober.await.unwrap();
    sampler.await.unwrap();
    wait_idle(&serve.http, Duration::from_secs(10)).await;

    let o = outcomes.lock().unwrap();
    let mut shed = o.shed.clone();
    shed.sort();
    health.sort();
    let peak = *rss_peak.lock().unwrap();
    let sent = i;
    eprintln!(
        "overload: {sent} requests in {:.1} s ({:.1}/s); completed {}, shed {} ({:.0}%), other errors {}",
        OVERLOAD.as_secs_f64(),
        sent as f64 / OVERLOAD.as_secs_f64(),
        o.completed,
        shed.len(),
        100.0 * shed.len() as f64 / sent as f64,
        o.other.len()
    );
    eprintln!(
        "shed answered in: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&shed, 0.5)),
        ms(percentile(&shed, 0.99)),
        ms(percentile(&shed, 1.0))
    );
    eprintln!(
        "health ({} checks): median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        health.len(),
        ms(percentile(&health, 0.5)),
        ms(percentile(&health, 0.99)),
        ms(percentile(&health, 1.0))
    );
    eprintln!(
        "coordinator RSS: {:.1} MiB before, {:.1} MiB peak",
        rss_before as f64 / (1 << 20) as f64,
        peak as f64 / (1 << 20) as f64
    );
    assert!(o.other.is_empty(), "only RESOURCE_EXHAUSTED: {:?}", o.other);
    assert_eq!(o.completed + shed.len(), sent);
    assert!(
        shed.len() * 2 > sent,
        "most of a tenfold overload is shed: {} of {sent}",
        shed.len()
    );
    assert!(o.completed > 0);
    assert!(
        percentile(&shed, 0.99) < Duration::from_secs(1),
        "the excess is refused at once"
    );
    assert!(
        percentile(&health, 1.0) < Duration::from_secs(1),
        "health stays responsive"
    );
    assert!(
        peak < rss_before + (256 << 20),
        "memory stays bounded: {rss_before} → {peak} bytes"
    );
}
