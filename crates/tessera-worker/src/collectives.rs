//! The worker's TCP collectives: listeners bound at `Assign`, groups formed at
//! `OpenCollectives`.
//!
//! A worker belongs to up to three groups, formed at once:
//! - its stage's TP group (rank = `tp_rank`, world = `tp`);
//! - the link from the previous stage (world 2; this worker is rank 1 and accepts on its
//!   `prev_port`), unless it is on the first stage;
//! - the link to the next stage (world 2; this worker is rank 0 and dials `next_stage`),
//!   unless it is on the last stage.
//!
//! They are formed concurrently: a stage in the middle that waited for its previous link
//! before dialling its next one would deadlock against its neighbours doing the same.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tessera_runtime::{
    Collective, RuntimeError, ShardComms, TcpAbort, TcpComm, TcpGroupSpec, TcpListenerHandle,
};

use crate::error::WorkerError;

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

/// Where this worker's peers are, resolved.
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

/// Breaks every connection of a worker's groups from outside the shard thread, so a step
/// blocked on a hung peer ends at once when the coordinator releases the shard.
#[derive(Debug, Default)]
pub struct Abort(Vec<TcpAbort>);

impl Abort {
    /// Shuts every connection down.
    pub fn abort(&self) {
        for a in &self.0 {
            a.abort();
        }
    }
}

/// Forms every group of this worker; blocks until all are up or the timeout passes.
pub fn connect(listeners: Listeners, peers: &Peers) -> Result<(ShardComms, Abort), WorkerError> {
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
        let join = |h: std::thread::ScopedJoinHandle<'_, tessera_runtime::Result<TcpComm>>| {
            h.join().unwrap_or_else(|_| {
                Err(RuntimeError::Collective(
                    "a connecting thread panicked".into(),
                ))
            })
        };
        (tp, prev.map(join).transpose(), next.map(join).transpose())
    });
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
    let (Ok(tp), Ok(prev), Ok(next)) = (tp, prev, next) else {
        return Err(RuntimeError::Collective(failures.join("; ")).into());
    };
    let mut aborts = vec![tp.abort_handle()?];
    for c in prev.iter().chain(&next) {
        aborts.push(c.abort_handle()?);
    }
    let boxed = |c: TcpComm| Box::new(c) as Box<dyn Collective>;
    Ok((
        ShardComms {
            tp: boxed(tp),
            prev: prev.map(boxed),
            next: next.map(boxed),
        },
        Abort(aborts),
    ))
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
                    s.spawn(move || connect(l, &peers).unwrap().0)
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
