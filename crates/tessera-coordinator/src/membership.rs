//! Worker registration: the `tessera.worker.v1.Cluster` service the workers call.
//!
//! Registrations are taken in arrival order until the cluster has `tp × pp` workers; the
//! `i`-th to register gets shard `i` of the plan (stage-major). Later ones are refused
//! with RESOURCE_EXHAUSTED.

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
    /// Its index in registration order, which is its shard index.
    pub worker_id: usize,
    /// Where its `Worker` service listens.
    pub address: SocketAddr,
    /// Its backend: cpu or cuda.
    pub backend: String,
    /// Its host name, for logs.
    pub hostname: String,
    /// Memory it could use for its shard when it registered (0: unknown).
    pub memory_available_bytes: u64,
}

/// The registry behind the `Cluster` service.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    capacity: usize,
    generation: u64,
    heartbeat_ms: u32,
    workers: Mutex<Vec<Registered>>,
    count: watch::Sender<usize>,
}

impl Membership {
    /// A registry that takes `capacity` workers for the cluster generation `generation`.
    pub fn new(capacity: usize, generation: u64, heartbeat_ms: u32) -> Self {
        Membership {
            inner: Arc::new(Inner {
                capacity,
                generation,
                heartbeat_ms,
                workers: Mutex::new(Vec::new()),
                count: watch::channel(0).0,
            }),
        }
    }

    /// The cluster generation every call to a worker carries.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Watches the number of registered workers.
    pub fn watch_count(&self) -> watch::Receiver<usize> {
        self.inner.count.subscribe()
    }

    /// The workers registered so far, in registration order.
    pub fn workers(&self) -> Vec<Registered> {
        self.inner
            .workers
            .lock()
            .map(|w| w.clone())
            .unwrap_or_default()
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
        let mut workers = self
            .inner
            .workers
            .lock()
            .map_err(|_| Status::internal("registry lock poisoned"))?;
        if workers.iter().any(|w| w.address == address) {
            return Err(Status::already_exists(format!(
                "a worker at {address} is already registered"
            )));
        }
        if workers.len() >= self.inner.capacity {
            return Err(Status::resource_exhausted(format!(
                "the cluster has all {} workers it needs",
                self.inner.capacity
            )));
        }
        let w = Registered {
            worker_id: workers.len(),
            address,
            backend: if req.backend.is_empty() {
                "cpu".into()
            } else {
                req.backend.clone()
            },
            hostname: req.hostname.clone(),
            memory_available_bytes: req.memory_available_bytes,
        };
        workers.push(w.clone());
        self.inner.count.send_replace(workers.len());
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
