//! The worker's collectives: TCP listeners bound at `Assign`, groups formed at
//! `OpenCollectives`, over TCP or NCCL as the coordinator says.
//!
//! A worker belongs to up to three groups, formed at once:
//! - its stage's TP group (rank = `tp_rank`, world = `tp`);
//! - the link from the previous stage (world 2; this worker is rank 1), unless it is on
//!   the first stage;
//! - the link to the next stage (world 2; this worker is rank 0), unless it is on the last
//!   stage.
//!
//! Over TCP the previous stage's link accepts on this worker's `prev_port` and the next
//! stage's link dials `next_stage`. Over NCCL (feature `cuda`, every worker on the cuda
//! backend) each group forms from the unique id its founder made, and each communicator
//! runs on a thread of its own; the TCP listeners bound at `Assign` are then dropped
//! unused.
//!
//! They are formed concurrently: a stage in the middle that waited for its previous link
//! before dialling its next one would deadlock against its neighbours doing the same.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tessera_runtime::{
    Collective, NcclId, RuntimeError, ShardComms, TcpAbort, TcpComm, TcpGroupSpec,
    TcpListenerHandle,
};

use crate::error::WorkerError;
use crate::shard_thread::Device;

/// Stands in for a peer address nobody dials: a link's rank 0 is never dialled, and the
/// later stage is not told where the earlier one is.
const UNDIALLED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// The listeners of one assignment.
#[derive(Debug)]
pub struct Listeners {
    tp: TcpListenerHandle,
    prev: Option<TcpListenerHandle>,
    /// Rank 0 of the link to the next stage never accepts, but forming a group takes a
    /// listener; it is closed as soon as the link is up.
    next: Option<TcpListenerHandle>,
}

impl Listeners {
    /// Binds port 0 on `ip` for the TP group, for the previous stage's link when
    /// `stage > 0` and for the next stage's link when `stage < pp - 1`.
    pub fn bind(ip: IpAddr, stage: usize, pp: usize) -> Result<Listeners, WorkerError> {
        let any = SocketAddr::new(ip, 0);
        Ok(Listeners {
            tp: TcpComm::bind(any)?,
            prev: (stage > 0).then(|| TcpComm::bind(any)).transpose()?,
            next: (stage + 1 < pp).then(|| TcpComm::bind(any)).transpose()?,
        })
    }

    /// Port of the TP group's listener.
    pub fn tp_port(&self) -> Result<u16, WorkerError> {
        Ok(self.tp.local_addr()?.port())
    }

    /// Port of the previous stage's listener, 0 on the first stage.
    pub fn prev_port(&self) -> Result<u16, WorkerError> {
        match &self.prev {
            Some(l) => Ok(l.local_addr()?.port()),
            None => Ok(0),
        }
    }
}

/// How this worker's groups form, as `OpenCollectives` asked.
#[derive(Debug, Clone)]
pub enum Transport {
    /// TCP between the collective listeners.
    Tcp(Peers),
    /// NCCL between the GPUs.
    Nccl(Box<NcclPeers>),
}

/// Where this worker's TCP peers are, resolved.
#[derive(Debug, Clone)]
pub struct Peers {
    /// This worker's rank in its TP group.
    pub tp_rank: usize,
    /// Every TP rank's listener, by rank.
    pub tp: Vec<SocketAddr>,
    /// The next stage's listener for this worker's link; `None` on the last stage.
    pub next_stage: Option<SocketAddr>,
    /// The cluster generation's token.
    pub token: [u8; 16],
    /// How long forming the groups may take.
    pub timeout: Duration,
    /// The longest any later read or write of a collective may wait.
    pub io_timeout: Duration,
}

/// This worker's NCCL groups. (A build without CUDA validates them and refuses them, so
/// only a CUDA build reads them.)
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub struct NcclPeers {
    /// The CUDA device the worker runs on.
    pub device: usize,
    /// This worker's rank in its TP group.
    pub tp_rank: usize,
    /// Ranks of the TP group.
    pub tp: usize,
    /// The TP group's id.
    pub tp_id: NcclId,
    /// The id of the link from the previous stage; `None` on the first stage.
    pub prev_id: Option<NcclId>,
    /// The id of the link to the next stage; `None` on the last stage.
    pub next_id: Option<NcclId>,
    /// How long forming the groups may take.
    pub timeout: Duration,
    /// The longest any later wait on the host for the groups' device work may take.
    pub io_timeout: Duration,
}

/// The CUDA device a worker on `device` runs on, if it runs on one.
fn cuda_device(device: &Device) -> Option<usize> {
    match device {
        Device::Cpu { .. } | Device::Sim(_) => None,
        Device::Cuda(gpu) => Some(gpu.ordinal),
    }
}

/// The CUDA device NCCL would use on this worker; fails with
/// [`WorkerError::NcclUnavailable`] (FAILED_PRECONDITION), saying why, unless the build has
/// CUDA, the worker runs the cuda backend, and libnccl can be opened.
pub fn nccl_device(device: &Device) -> Result<usize, WorkerError> {
    if !tessera_runtime::cuda::COMPILED {
        return Err(WorkerError::NcclUnavailable(format!(
            "this worker was built without CUDA support: {}",
            tessera_runtime::cuda::NOT_COMPILED
        )));
    }
    let Some(ordinal) = cuda_device(device) else {
        let backend = match device {
            Device::Cpu { .. } => "cpu",
            Device::Sim(_) => "sim",
            Device::Cuda(_) => "cuda",
        };
        return Err(WorkerError::NcclUnavailable(format!(
            "this worker runs the {backend} backend; NCCL needs a worker started with \
             --backend cuda"
        )));
    };
    require_nccl_library()?;
    Ok(ordinal)
}

/// Fails with [`WorkerError::NcclUnavailable`] unless this build can open libnccl.
fn require_nccl_library() -> Result<(), WorkerError> {
    tessera_runtime::collective::require_nccl()
        .map_err(|e| WorkerError::NcclUnavailable(unavailable_reason(e)))
}

/// The reason inside a runtime error, without its prefix.
fn unavailable_reason(e: RuntimeError) -> String {
    match e {
        RuntimeError::CudaUnavailable(why) | RuntimeError::Collective(why) => why,
        other => other.to_string(),
    }
}

/// Makes `count` NCCL unique ids on this worker (see `NcclIds`).
pub fn make_nccl_ids(device: &Device, count: usize) -> Result<Vec<NcclId>, WorkerError> {
    nccl_device(device)?;
    (0..count)
        .map(|_| {
            tessera_runtime::collective::new_unique_id()
                .map_err(|e| WorkerError::NcclUnavailable(unavailable_reason(e)))
        })
        .collect()
}

/// One group's abort.
#[derive(Debug)]
enum GroupAbort {
    Tcp(TcpAbort),
    #[cfg(feature = "cuda")]
    Nccl(tessera_runtime::NcclAbort),
}

/// Breaks every group of a worker from outside the shard thread, so a step blocked on a
/// hung peer ends at once when the coordinator releases the shard: TCP connections are
/// shut down, NCCL communicators aborted (which ends their kernels on the device).
#[derive(Debug, Default)]
pub struct Abort(Vec<GroupAbort>);

impl Abort {
    /// Breaks every group.
    pub fn abort(&self) {
        for a in &self.0 {
            match a {
                GroupAbort::Tcp(t) => t.abort(),
                #[cfg(feature = "cuda")]
                GroupAbort::Nccl(n) => n.abort(),
            }
        }
    }
}

/// Forms every group of this worker; blocks until all are up or the timeout passes.
/// NCCL groups do not use the TCP listeners, which close.
pub fn connect(
    listeners: Listeners,
    transport: &Transport,
) -> Result<(ShardComms, Abort), WorkerError> {
    match transport {
        Transport::Tcp(peers) => connect_tcp(listeners, peers),
        Transport::Nccl(peers) => {
            drop(listeners);
            connect_nccl(peers)
        }
    }
}

/// The three groups' outcomes, or one error that names each group that failed.
fn all_formed<C>(
    tp: tessera_runtime::Result<C>,
    prev: tessera_runtime::Result<Option<C>>,
    next: tessera_runtime::Result<Option<C>>,
) -> Result<(C, Option<C>, Option<C>), WorkerError> {
    let mut failures = Vec::new();
    let mut note = |what: &str, e: &RuntimeError| {
        let why = match e {
            RuntimeError::Collective(why) => why.clone(),
            other => other.to_string(),
        };
        failures.push(format!("{what}: {why}"));
    };
    if let Err(e) = &tp {
        note("TP group", e);
    }
    if let Err(e) = &prev {
        note("link from the previous stage", e);
    }
    if let Err(e) = &next {
        note("link to the next stage", e);
    }
    match (tp, prev, next) {
        (Ok(tp), Ok(prev), Ok(next)) => Ok((tp, prev, next)),
        _ => Err(RuntimeError::Collective(failures.join("; ")).into()),
    }
}

fn join<C>(
    h: std::thread::ScopedJoinHandle<'_, tessera_runtime::Result<C>>,
) -> tessera_runtime::Result<C> {
    h.join().unwrap_or_else(|_| {
        Err(RuntimeError::Collective(
            "a connecting thread panicked".into(),
        ))
    })
}

fn boxed<C: Collective + 'static>((tp, prev, next): (C, Option<C>, Option<C>)) -> ShardComms {
    let boxed = |c: C| Box::new(c) as Box<dyn Collective>;
    ShardComms {
        tp: boxed(tp),
        prev: prev.map(boxed),
        next: next.map(boxed),
    }
}

/// Forms the TCP groups.
fn connect_tcp(listeners: Listeners, peers: &Peers) -> Result<(ShardComms, Abort), WorkerError> {
    let Listeners { tp, prev, next } = listeners;
    let group = |rank: usize, addrs: Vec<SocketAddr>| TcpGroupSpec {
        rank,
        peers: addrs,
        token: peers.token,
        timeout: peers.timeout,
        io_timeout: peers.io_timeout,
    };
    let tp_spec = group(peers.tp_rank, peers.tp.clone());
    let prev_spec = prev
        .as_ref()
        .map(|l| l.local_addr().map(|own| group(1, vec![UNDIALLED, own])))
        .transpose()?;
    let next_spec = match (&next, peers.next_stage) {
        (Some(l), Some(addr)) => Some(group(0, vec![l.local_addr()?, addr])),
        (None, None) => None,
        _ => {
            return Err(WorkerError::invalid(
                "next_stage",
                "given on the last stage, or missing on an earlier one",
            ))
        }
    };
    let (tp, prev, next) = std::thread::scope(|s| {
        let prev = prev
            .zip(prev_spec)
            .map(|(l, spec)| s.spawn(move || TcpComm::connect(l, &spec)));
        let next = next
            .zip(next_spec)
            .map(|(l, spec)| s.spawn(move || TcpComm::connect(l, &spec)));
        let tp = TcpComm::connect(tp, &tp_spec);
        (tp, prev.map(join).transpose(), next.map(join).transpose())
    });
    let groups = all_formed(tp, prev, next)?;
    let mut aborts = vec![GroupAbort::Tcp(groups.0.abort_handle()?)];
    for c in groups.1.iter().chain(&groups.2) {
        aborts.push(GroupAbort::Tcp(c.abort_handle()?));
    }
    Ok((boxed(groups), Abort(aborts)))
}

/// Forms the NCCL groups on the worker's device.
#[cfg(feature = "cuda")]
fn connect_nccl(peers: &NcclPeers) -> Result<(ShardComms, Abort), WorkerError> {
    use tessera_runtime::{NcclComm, NcclGroupSpec};

    let (ctx, _) = tessera_runtime::cuda::probe::open_device(peers.device)?;
    let group = |rank: usize, world_size: usize, id: NcclId| NcclGroupSpec {
        rank,
        world_size,
        id,
        timeout: peers.timeout,
        io_timeout: peers.io_timeout,
    };
    let tp_spec = group(peers.tp_rank, peers.tp, peers.tp_id);
    let prev_spec = peers.prev_id.map(|id| group(1, 2, id));
    let next_spec = peers.next_id.map(|id| group(0, 2, id));
    let (tp, prev, next) = std::thread::scope(|s| {
        let prev = prev_spec.map(|spec| {
            let ctx = ctx.clone();
            s.spawn(move || NcclComm::connect(ctx, &spec))
        });
        let next = next_spec.map(|spec| {
            let ctx = ctx.clone();
            s.spawn(move || NcclComm::connect(ctx, &spec))
        });
        let tp = NcclComm::connect(ctx.clone(), &tp_spec);
        (tp, prev.map(join).transpose(), next.map(join).transpose())
    });
    let groups = all_formed(tp, prev, next)?;
    let aborts = std::iter::once(&groups.0)
        .chain(groups.1.iter())
        .chain(groups.2.iter())
        .map(|c| GroupAbort::Nccl(c.abort_handle()))
        .collect();
    Ok((boxed(groups), Abort(aborts)))
}

/// Without CUDA there is no NCCL; `OpenCollectives` refuses NCCL before it gets here.
#[cfg(not(feature = "cuda"))]
fn connect_nccl(peers: &NcclPeers) -> Result<(ShardComms, Abort), WorkerError> {
    let _ = peers;
    Err(WorkerError::NcclUnavailable(format!(
        "this worker was built without CUDA support: {}",
        tessera_runtime::cuda::NOT_COMPILED
    )))
}

/// Parses `host:port`, resolving the host, for the request field `field`.
pub async fn resolve(field: &str, address: &str) -> Result<SocketAddr, WorkerError> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let port_ok = address
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        return Err(WorkerError::invalid(
            field,
            format!("`{address}` is not host:port"),
        ));
    }
    let found = tokio::net::lookup_host(address)
        .await
        .map_err(|e| WorkerError::invalid(field, format!("cannot resolve `{address}`: {e}")))?
        .next();
    found.ok_or_else(|| WorkerError::invalid(field, format!("`{address}` resolves to nothing")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_must_be_host_and_port() {
        assert_eq!(
            resolve("tp_peers[0]", "127.0.0.1:9").await.unwrap(),
            "127.0.0.1:9".parse::<SocketAddr>().unwrap()
        );
        assert!(resolve("x", "localhost:9")
            .await
            .unwrap()
            .ip()
            .is_loopback());
        for bad in ["", "127.0.0.1", ":9", "host:99999"] {
            let e = resolve("tp_peers[1]", bad).await.unwrap_err().to_string();
            assert!(e.contains("tp_peers[1]"), "{bad}: {e}");
        }
    }

    /// A CPU or simulated worker refuses NCCL with FAILED_PRECONDITION, naming why: no
    /// CUDA in the build, or another backend.
    #[test]
    fn nccl_needs_a_cuda_build_and_the_cuda_backend() {
        let sim = Device::Sim(crate::SimDevice {
            hardware: tessera_model::Hardware::gpu("h200").unwrap(),
            gpus_per_node: 8,
        });
        for (device, backend) in [(Device::Cpu { threads: 1 }, "cpu"), (sim, "sim")] {
            let e = nccl_device(&device).unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
            let text = e.to_string();
            assert!(text.contains("NCCL is not available"), "{text}");
            if tessera_runtime::cuda::COMPILED {
                assert!(
                    text.contains(&format!("runs the {backend} backend")),
                    "{text}"
                );
                assert!(text.contains("--backend cuda"), "{text}");
            } else {
                assert!(text.contains("built without CUDA support"), "{text}");
                assert!(text.contains("--features cuda"), "{text}");
            }
            let e = make_nccl_ids(&device, 1).unwrap_err();
            assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
        }
    }

    /// Where libnccl cannot be opened (this build has no CUDA, or the library is not on
    /// the loader's path), the refusal says what to install.
    #[test]
    fn a_missing_libnccl_is_a_precondition_that_says_what_to_install() {
        match require_nccl_library() {
            Ok(()) => {
                if !tessera_runtime::cuda::COMPILED {
                    panic!("libnccl opened by a build without CUDA");
                }
            }
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
                let text = e.to_string();
                if tessera_runtime::cuda::COMPILED {
                    assert!(text.contains("NCCL library not found"), "{text}");
                    assert!(text.contains("nvidia-nccl-cu13"), "{text}");
                    assert!(text.contains("LD_LIBRARY_PATH"), "{text}");
                } else {
                    assert!(text.contains("--features cuda"), "{text}");
                }
            }
        }
    }

    /// Three stages of one rank each: the middle one accepts and dials at once.
    #[test]
    fn a_pipeline_of_three_forms_its_links() {
        let ip: IpAddr = Ipv4Addr::LOCALHOST.into();
        let listeners: Vec<Listeners> =
            (0..3).map(|s| Listeners::bind(ip, s, 3).unwrap()).collect();
        let prev_ports: Vec<u16> = listeners.iter().map(|l| l.prev_port().unwrap()).collect();
        assert_eq!(prev_ports[0], 0);
        let comms: Vec<ShardComms> = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(stage, l)| {
                    let tp = vec![SocketAddr::new(ip, l.tp_port().unwrap())];
                    let next_stage =
                        (stage < 2).then(|| SocketAddr::new(ip, prev_ports[stage + 1]));
                    let peers = Peers {
                        tp_rank: 0,
                        tp,
                        next_stage,
                        token: [7; 16],
                        timeout: Duration::from_secs(5),
                        io_timeout: Duration::from_secs(5),
                    };
                    s.spawn(move || connect(l, &Transport::Tcp(peers)).unwrap().0)
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut comms = comms.into_iter();
        let (mut first, mut middle, mut last) = (
            comms.next().unwrap(),
            comms.next().unwrap(),
            comms.next().unwrap(),
        );
        assert!(first.prev.is_none() && last.next.is_none());
        std::thread::scope(|s| {
            s.spawn(|| first.next.as_mut().unwrap().send(1, &[1.0, 2.0]).unwrap());
            s.spawn(|| {
                let mut buf = [0f32; 2];
                middle.prev.as_mut().unwrap().recv(0, &mut buf).unwrap();
                buf[0] += 10.0;
                middle.next.as_mut().unwrap().send(1, &buf).unwrap();
            });
            let mut out = [0f32; 2];
            last.prev.as_mut().unwrap().recv(0, &mut out).unwrap();
            assert_eq!(out, [11.0, 2.0]);
        });
    }
}
