//! The coordinator's bring-up against fake workers that only record what they are asked:
//! which transport it picks, which workers it asks for NCCL ids, and which ids it relays
//! to each worker, at bring-up and again when it rebuilds the cluster.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_coordinator::{ClusterState, Coordinator, CoordinatorConfig, ModelSource};
use tessera_proto::worker::v1 as pb;
use tessera_proto::worker::v1::cluster_client::ClusterClient;
use tessera_proto::worker::v1::worker_server::{Worker, WorkerServer};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic::{Request, Response, Status};

const TP: u32 = 2;
const PP: u32 = 2;

/// Everything one fake worker was asked, in order.
#[derive(Debug, Clone)]
enum Call {
    Assign,
    NcclIds { count: u32, made: Vec<Vec<u8>> },
    Open(pb::OpenCollectivesRequest),
    Release,
}

/// A `Worker` service that answers like a healthy worker and records every call.
#[derive(Clone, Default)]
struct FakeWorker {
    calls: Arc<Mutex<Vec<Call>>>,
    /// Its shard, once assigned: `(stage, tp_rank)`.
    shard: Arc<Mutex<Option<(u32, u32)>>>,
    /// Report the shard failed at the next health check.
    fail_once: Arc<AtomicBool>,
    /// Ids made so far (every id this fake makes differs from every other).
    made: Arc<AtomicU64>,
}

impl FakeWorker {
    fn record(&self, call: Call) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// `(stage, tp_rank)`.
    fn shard(&self) -> (u32, u32) {
        self.shard.lock().unwrap().expect("assigned")
    }

    /// An id that says which shard made it: byte 0 its plan index, then a serial.
    fn new_id(&self) -> Vec<u8> {
        let (stage, tp_rank) = self.shard();
        let mut id = vec![0u8; 128];
        id[0] = (stage * TP + tp_rank) as u8;
        let serial = self.made.fetch_add(1, Ordering::SeqCst);
        id[1..9].copy_from_slice(&serial.to_le_bytes());
        id
    }
}

#[tonic::async_trait]
impl Worker for FakeWorker {
    async fn assign(
        &self,
        req: Request<pb::AssignRequest>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        let r = req.into_inner();
        *self.shard.lock().unwrap() = Some((r.stage, r.tp_rank));
        self.record(Call::Assign);
        Ok(Response::new(pb::AssignResponse {
            tp_port: 40_000 + r.stage * TP + r.tp_rank,
            prev_port: if r.stage == 0 { 0 } else { 41_000 + r.tp_rank },
        }))
    }

    async fn nccl_ids(
        &self,
        req: Request<pb::NcclIdsRequest>,
    ) -> Result<Response<pb::NcclIdsResponse>, Status> {
        let count = req.into_inner().count;
        let made: Vec<Vec<u8>> = (0..count).map(|_| self.new_id()).collect();
        self.record(Call::NcclIds {
            count,
            made: made.clone(),
        });
        Ok(Response::new(pb::NcclIdsResponse { ids: made }))
    }

    async fn open_collectives(
        &self,
        req: Request<pb::OpenCollectivesRequest>,
    ) -> Result<Response<pb::OpenCollectivesResponse>, Status> {
        self.record(Call::Open(req.into_inner()));
        Ok(Response::new(pb::OpenCollectivesResponse {}))
    }

    async fn load(
        &self,
        _req: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        Ok(Response::new(pb::LoadResponse {
            weight_bytes: 1,
            load_ms: 0,
            reused: false,
        }))
    }

    async fn step(
        &self,
        req: Request<pb::StepRequest>,
    ) -> Result<Response<pb::StepResponse>, Status> {
        let reports = self.shard() == (PP - 1, 0);
        let results = if reports {
            req.into_inner()
                .seqs
                .iter()
                .filter(|s| s.sample.is_some())
                .map(|s| pb::SeqResult {
                    seq_id: s.seq_id,
                    token_id: 0,
                    logprob: 0.0,
                    logits: Vec::new(),
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(Response::new(pb::StepResponse {
            results,
            reports,
            compute_us: 1,
        }))
    }

    async fn release(
        &self,
        _req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        self.record(Call::Release);
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn health(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let failed = self.fail_once.swap(false, Ordering::SeqCst);
        Ok(Response::new(pb::HealthResponse {
            state: if failed {
                pb::WorkerState::Failed
            } else {
                pb::WorkerState::Ready
            }
            .into(),
            message: if failed {
                "a peer went away".into()
            } else {
                String::new()
            },
            steps: 0,
        }))
    }
}

/// Serves `fake` on 127.0.0.1; returns its port.
async fn serve(fake: FakeWorker) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        Server::builder()
            .add_service(WorkerServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    port
}

/// A coordinator of a 2 × 2 split of gpt2-tiny and four fake workers of `backends`,
/// registered in order (so the first is shard 0), brought up to `Serving`.
async fn cluster(backends: [&str; 4]) -> (Coordinator, Vec<FakeWorker>) {
    let mut config = CoordinatorConfig::new(ModelSource::Synthetic {
        preset: "gpt2-tiny".into(),
        seed: 5,
    });
    config.tp = TP as usize;
    config.pp = PP as usize;
    config.listen = "127.0.0.1:0".into();
    config.kv_cache_bytes = Some(1 << 20);
    config.heartbeat = Duration::from_millis(100);
    let coordinator = Coordinator::start(config).await.unwrap();
    let at: SocketAddr = coordinator.registration_addr();
    let mut cluster = ClusterClient::connect(format!("http://{at}"))
        .await
        .unwrap();
    let mut fakes = Vec::new();
    for backend in backends {
        let fake = FakeWorker::default();
        let port = serve(fake.clone()).await;
        cluster
            .register(pb::RegisterRequest {
                port: port.into(),
                advertise_host: "127.0.0.1".into(),
                backend: backend.into(),
                threads: 1,
                hostname: "fake".into(),
                memory_available_bytes: 1 << 30,
                pid: 0,
            })
            .await
            .unwrap();
        fakes.push(fake);
    }
    wait_for(&coordinator, |s| *s == ClusterState::Serving).await;
    (coordinator, fakes)
}

async fn wait_for(coordinator: &Coordinator, ok: impl Fn(&ClusterState) -> bool) {
    let mut state = coordinator.state();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if ok(&state.borrow_and_update()) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "the cluster did not get there: {:?}",
            *state.borrow()
        );
        let _ = tokio::time::timeout(left, state.changed()).await;
    }
}

/// The ids each fake made in its `round`-th `NcclIds` call (empty when it made none),
/// and the `OpenCollectives` it got in its `round`-th bring-up, in plan order.
fn round(
    fakes: &[FakeWorker],
    round: usize,
) -> (Vec<Vec<Vec<u8>>>, Vec<pb::OpenCollectivesRequest>) {
    let mut made = BTreeMap::new();
    let mut opened = BTreeMap::new();
    for fake in fakes {
        let (stage, tp_rank) = fake.shard();
        let at = (stage * TP + tp_rank) as usize;
        let calls = fake.calls();
        let ids: Vec<_> = calls
            .iter()
            .filter_map(|c| match c {
                Call::NcclIds { made, count } => {
                    assert_eq!(*count as usize, made.len());
                    Some(made.clone())
                }
                _ => None,
            })
            .collect();
        made.insert(at, ids.get(round).cloned().unwrap_or_default());
        let opens: Vec<_> = calls
            .iter()
            .filter_map(|c| match c {
                Call::Open(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        opened.insert(at, opens[round].clone());
    }
    (made.into_values().collect(), opened.into_values().collect())
}

/// Checks that every worker was given its groups' ids: the TP group's from its stage's
/// rank 0 (its first id), the previous link's from the previous stage's worker of its rank
/// and the next link's from itself (each founder's last id).
fn check_relayed(made: &[Vec<Vec<u8>>], opened: &[pb::OpenCollectivesRequest]) {
    // Who founds what: (0,0) its TP group and its link, (0,1) its link, (1,0) its TP
    // group, (1,1) nothing.
    let counts: Vec<usize> = made.iter().map(Vec::len).collect();
    assert_eq!(counts, [2, 1, 1, 0], "ids made per worker");
    for (i, open) in opened.iter().enumerate() {
        let (stage, rank) = (i / TP as usize, i % TP as usize);
        assert_eq!(
            open.transport(),
            pb::CollectiveTransport::Nccl,
            "worker {i}"
        );
        assert!(
            open.tp_peers.is_empty() && open.next_stage.is_empty() && open.token.is_empty(),
            "worker {i} was given TCP fields: {open:?}"
        );
        assert!(open.timeout_ms > 0 && open.io_timeout_ms > 0);
        let ids = open.nccl.as_ref().expect("NCCL ids");
        let founder = |s: usize, r: usize| &made[s * TP as usize + r];
        assert_eq!(ids.tp_id, founder(stage, 0)[0], "worker {i} tp_id");
        if stage == 0 {
            assert!(ids.prev_id.is_empty(), "worker {i} prev_id");
            assert_eq!(&ids.next_id, founder(0, rank).last().unwrap(), "worker {i}");
        } else {
            assert_eq!(&ids.prev_id, founder(0, rank).last().unwrap(), "worker {i}");
            assert!(ids.next_id.is_empty(), "worker {i} next_id");
        }
    }
    // The two ends of each link hold one id, and no two groups share one.
    for rank in 0..TP as usize {
        assert_eq!(opened[rank].nccl.as_ref().unwrap().next_id, {
            opened[TP as usize + rank]
                .nccl
                .as_ref()
                .unwrap()
                .prev_id
                .clone()
        });
    }
    let mut all: Vec<&Vec<u8>> = made.iter().flatten().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 4, "4 groups, 4 distinct ids");
}

async fn stop(coordinator: Coordinator) {
    let _ = coordinator.stopper().send(true);
    let _ = tokio::time::timeout(Duration::from_secs(10), coordinator.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuda_workers_get_nccl_ids_from_their_groups_founders() {
    let (coordinator, fakes) = cluster(["cuda"; 4]).await;
    let (made, opened) = round(&fakes, 0);
    check_relayed(&made, &opened);
    // Each founder was asked after its Assign and before its OpenCollectives.
    for fake in &fakes {
        let calls = fake.calls();
        let at = |want: fn(&Call) -> bool| calls.iter().position(want);
        let assign = at(|c| matches!(c, Call::Assign)).unwrap();
        let open = at(|c| matches!(c, Call::Open(_))).unwrap();
        if let Some(ids) = at(|c| matches!(c, Call::NcclIds { .. })) {
            assert!(assign < ids && ids < open, "{calls:?}");
        }
    }
    stop(coordinator).await;
}

/// A failed worker sends the cluster into recovery: every worker is released (which
/// aborts its communicators) before the second bring-up, which asks the founders for
/// fresh ids and relays those.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_cluster_gets_fresh_nccl_ids() {
    let (coordinator, fakes) = cluster(["cuda"; 4]).await;
    let (first, _) = round(&fakes, 0);
    fakes[3].fail_once.store(true, Ordering::SeqCst);
    wait_for(&coordinator, |s| matches!(s, ClusterState::Recovering(_))).await;
    wait_for(&coordinator, |s| *s == ClusterState::Serving).await;
    let (made, opened) = round(&fakes, 1);
    check_relayed(&made, &opened);
    for (old, new) in first.iter().flatten().zip(made.iter().flatten()) {
        assert_ne!(old, new, "an id was reused");
    }
    for fake in &fakes {
        let calls = fake.calls();
        let opens: Vec<usize> = (0..calls.len())
            .filter(|&i| matches!(calls[i], Call::Open(_)))
            .collect();
        let released = (opens[0]..opens[1]).any(|i| matches!(calls[i], Call::Release));
        assert!(released, "released between the bring-ups: {calls:?}");
    }
    stop(coordinator).await;
}

/// One CPU worker makes the whole cluster TCP: nobody is asked for NCCL ids, and every
/// worker gets the TCP fields as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_cpu_worker_keeps_the_cluster_on_tcp() {
    let (coordinator, fakes) = cluster(["cuda", "cuda", "cpu", "cuda"]).await;
    for fake in &fakes {
        let calls = fake.calls();
        assert!(
            !calls.iter().any(|c| matches!(c, Call::NcclIds { .. })),
            "{calls:?}"
        );
    }
    let (_, opened) = round(&fakes, 0);
    for (i, open) in opened.iter().enumerate() {
        assert_eq!(open.transport(), pb::CollectiveTransport::Tcp, "worker {i}");
        assert!(open.nccl.is_none(), "worker {i}");
        assert_eq!(open.token.len(), 16);
        assert_eq!(open.tp_peers.len(), TP as usize);
        let stage = i / TP as usize;
        assert_eq!(open.next_stage.is_empty(), stage + 1 == PP as usize);
        // The peers are the fakes' listeners on 127.0.0.1.
        for (r, peer) in open.tp_peers.iter().enumerate() {
            let port = 40_000 + stage * TP as usize + r;
            assert_eq!(peer.address, format!("127.0.0.1:{port}"));
        }
    }
    // Every worker of a bring-up shares one token.
    assert!(opened.iter().all(|o| o.token == opened[0].token));
    stop(coordinator).await;
}
