//! Worker registration: the `tessera.worker.v1.Cluster` service the workers call.
//!
//! The cluster has one slot per shard of the plan (stage-major). A registration takes the
//! lowest vacant slot, whose index is the worker's shard; when every slot is taken it is
//! refused with RESOURCE_EXHAUSTED. A worker found dead is taken out of its slot
//! ([`Membership::vacate`]), and the next worker to register is given its shard.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tessera_proto::worker::v1::cluster_server::Cluster;
use tessera_proto::worker::v1::{RegisterRequest, RegisterResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::info;

/// A worker that has registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Its slot, which is its shard index.
    pub worker_id: usize,
    /// Where its `Worker` service listens.
    pub address: SocketAddr,
    /// Its backend: cpu or cuda.
    pub backend: String,
    /// Its host name, for logs.
    pub hostname: String,
    /// Memory it could use for its shard when it registered (0: unknown).
    pub memory_available_bytes: u64,
    /// Its process id on its host (0: unknown), so a supervisor can end a hung one.
    pub pid: u32,
}

/// The registry behind the `Cluster` service.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    generation: u64,
    heartbeat_ms: u32,
    /// One slot per shard.
    slots: Mutex<Vec<Option<Registered>>>,
    /// Slots taken.
    count: watch::Sender<usize>,
}

impl Membership {
    /// A registry that takes `capacity` workers for the cluster generation `generation`.
    pub fn new(capacity: usize, generation: u64, heartbeat_ms: u32) -> Self {
        Membership {
            inner: Arc::new(Inner {
                generation,
                heartbeat_ms,
                slots: Mutex::new(vec![None; capacity]),
                count: watch::channel(0).0,
            }),
        }
    }

    /// The cluster generation every call to a worker carries.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Watches the number of slots taken.
    pub fn watch_count(&self) -> watch::Receiver<usize> {
        self.inner.count.subscribe()
    }

    /// The registered workers, in slot order (the plan's order once every slot is taken).
    pub fn workers(&self) -> Vec<Registered> {
        self.inner
            .slots
            .lock()
            .map(|w| w.iter().flatten().cloned().collect())
            .unwrap_or_default()
    }

    /// Takes the worker out of slot `worker_id`, which the next registration gets; returns
    /// the worker it held.
    pub fn vacate(&self, worker_id: usize) -> Option<Registered> {
        let mut slots = self.inner.slots.lock().ok()?;
        let gone = slots.get_mut(worker_id)?.take();
        self.inner
            .count
            .send_replace(slots.iter().flatten().count());
        gone
    }

    fn register(
        &self,
        req: &RegisterRequest,
        peer: Option<SocketAddr>,
    ) -> Result<Registered, Status> {
        let port = u16::try_from(req.port)
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| Status::invalid_argument(format!("port: {} is not a port", req.port)))?;
        if req.advertise_host.len() > 255 || req.hostname.len() > 255 || req.backend.len() > 32 {
            return Err(Status::invalid_argument(
                "advertise_host, hostname or backend is too long",
            ));
        }
        let ip = if req.advertise_host.is_empty() {
            peer.map(|p| p.ip()).ok_or_else(|| {
                Status::invalid_argument(
                    "advertise_host: empty, and the caller's address is unknown",
                )
            })?
        } else {
            req.advertise_host.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "advertise_host: `{}` is not an IP address",
                    req.advertise_host
                ))
            })?
        };
        let address = SocketAddr::new(ip, port);
        let mut slots = self
            .inner
            .slots
            .lock()
            .map_err(|_| Status::internal("registry lock poisoned"))?;
        if slots.iter().flatten().any(|w| w.address == address) {
            return Err(Status::already_exists(format!(
                "a worker at {address} is already registered"
            )));
        }
        let Some(slot) = slots.iter().position(Option::is_none) else {
            return Err(Status::resource_exhausted(format!(
                "the cluster has all {} workers it needs",
                slots.len()
            )));
        };
        let w = Registered {
            worker_id: slot,
            address,
            backend: if req.backend.is_empty() {
                "cpu".into()
            } else {
                req.backend.clone()
            },
            hostname: req.hostname.clone(),
            memory_available_bytes: req.memory_available_bytes,
            pid: req.pid,
        };
        slots[slot] = Some(w.clone());
        self.inner
            .count
            .send_replace(slots.iter().flatten().count());
        Ok(w)
    }
}

#[tonic::async_trait]
impl Cluster for Membership {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let peer = request.remote_addr();
        let w = Membership::register(self, request.get_ref(), peer)?;
        info!(
            worker = w.worker_id,
            address = %w.address,
            backend = %w.backend,
            host = %w.hostname,
            "worker registered"
        );
        Ok(Response::new(RegisterResponse {
            worker_id: w.worker_id as u32,
            generation: self.inner.generation,
            heartbeat_ms: self.inner.heartbeat_ms,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(port: u32, host: &str) -> RegisterRequest {
        RegisterRequest {
            port,
            advertise_host: host.into(),
            backend: "cpu".into(),
            threads: 1,
            hostname: "h".into(),
            memory_available_bytes: 1 << 30,
            pid: 0,
        }
    }

    #[test]
    fn registers_in_order_until_full() {
        let m = Membership::new(2, 9, 1000);
        let peer: SocketAddr = "10.1.2.3:999".parse().unwrap();
        let a = m.register(&req(7001, ""), Some(peer)).unwrap();
        assert_eq!(a.address, "10.1.2.3:7001".parse().unwrap());
        assert_eq!(a.worker_id, 0);
        let e = m.register(&req(7001, ""), Some(peer)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists);
        let b = m.register(&req(7002, "10.9.9.9"), Some(peer)).unwrap();
        assert_eq!(b.address, "10.9.9.9:7002".parse().unwrap());
        let e = m.register(&req(7003, ""), Some(peer)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert_eq!(*m.watch_count().borrow(), 2);
    }

    #[test]
    fn a_vacated_slot_goes_to_the_next_registration() {
        let m = Membership::new(3, 9, 1000);
        for port in [7001, 7002, 7003] {
            m.register(&req(port, "10.0.0.1"), None).unwrap();
        }
        let gone = m.vacate(1).unwrap();
        assert_eq!(gone.address, "10.0.0.1:7002".parse().unwrap());
        assert_eq!(*m.watch_count().borrow(), 2);
        assert!(m.vacate(1).is_none(), "already vacant");
        let e = m.register(&req(7001, "10.0.0.1"), None).unwrap_err();
        assert_eq!(
            e.code(),
            tonic::Code::AlreadyExists,
            "slot 0 is still taken"
        );
        let new = m.register(&req(7004, "10.0.0.1"), None).unwrap();
        assert_eq!(new.worker_id, 1, "the replacement takes the vacant shard");
        let order: Vec<u16> = m.workers().iter().map(|w| w.address.port()).collect();
        assert_eq!(order, [7001, 7004, 7003]);
        let e = m.register(&req(7005, "10.0.0.1"), None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    }

    #[test]
    fn bad_registrations_name_the_field() {
        let m = Membership::new(2, 9, 1000);
        let e = m.register(&req(0, "1.2.3.4"), None).unwrap_err();
        assert!(e.message().contains("port"));
        let e = m.register(&req(70000, "1.2.3.4"), None).unwrap_err();
        assert!(e.message().contains("port"));
        let e = m.register(&req(1, "not-an-ip"), None).unwrap_err();
        assert!(e.message().contains("advertise_host"));
    }
}
