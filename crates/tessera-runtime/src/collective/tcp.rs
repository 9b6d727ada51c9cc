//! The `tcp` collective: ranks are processes that talk over TCP.
//!
//! Every pair of ranks shares one connection, made when the group forms: the lower rank
//! dials the higher rank's listener and introduces itself with a hello (magic, the
//! cluster-generation token, its rank, the world size); the higher rank checks it and
//! answers with an ack naming itself. Data then travels in frames — a 24-byte header
//! (magic, operation, the operation's length on the sender, the frame's element count)
//! followed by little-endian f32s — so a peer that runs another operation, or the same
//! one with another length, is reported instead of silently mis-summed.
//!
//! Each connection has one writer thread, fed by a channel, and the caller's thread only
//! reads. In a ring step every rank sends and receives at once, and with two ranks the
//! next and the previous peer share one socket: were both sides to write a large message
//! before reading, both socket buffers would fill and neither side would read again.

use std::fmt;
use std::io::{self, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{ring_chunk, Collective};
use crate::error::{Result, RuntimeError};

const HELLO_MAGIC: [u8; 8] = *b"TSRHELO1";
const HELLO_LEN: usize = 8 + 16 + 4 + 4;
const ACK_MAGIC: [u8; 8] = *b"TSRACK01";
const ACK_LEN: usize = 8 + 4 + 4;
const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"TSRF");
const HEADER_LEN: usize = 4 + 4 + 8 + 8;
const READ_BUFFER: usize = 64 * 1024;
/// Frame buffers up to this size go back to the caller for reuse; larger ones are freed,
/// so one huge message does not pin its memory for the life of the group.
const RECYCLE_MAX: usize = 1 << 20;
const DIAL_RETRY: Duration = Duration::from_millis(10);
const ACCEPT_POLL: Duration = Duration::from_millis(1);

/// Where every rank of a TCP group listens, and what proves membership of it.
#[derive(Clone)]
pub struct TcpGroupSpec {
    /// This worker's rank in the group.
    pub rank: usize,
    /// The listening address of every rank, indexed by rank; its length is the world size.
    pub peers: Vec<SocketAddr>,
    /// Cluster-generation token: only ranks presenting the same token join, so a worker
    /// left over from an earlier cluster cannot slip into this one.
    pub token: [u8; 16],
    /// Deadline for forming the group.
    pub timeout: Duration,
    /// Once formed, the longest any single read or write may wait before the operation
    /// fails: longer than the slowest step a peer may take (a pipeline stage waits for
    /// the whole forward pass of the stages before it).
    pub io_timeout: Duration,
}

impl fmt::Debug for TcpGroupSpec {
    /// Leaves the token out, so logging a spec does not hand out membership.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TcpGroupSpec")
            .field("rank", &self.rank)
            .field("peers", &self.peers)
            .field("timeout", &self.timeout)
            .field("io_timeout", &self.io_timeout)
            .finish_non_exhaustive()
    }
}

/// A listener bound before the group's addresses are known, so its port can be reported;
/// [`TcpComm::connect`] consumes it. One listener serves one group.
#[derive(Debug)]
pub struct TcpListenerHandle {
    listener: TcpListener,
}

impl TcpListenerHandle {
    /// The bound address, with the port the OS picked when bound to port 0.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|e| RuntimeError::Collective(format!("listener address: {e}")))
    }
}

/// Breaks the connections of one [`TcpComm`] from outside the thread that uses it.
#[derive(Debug)]
pub struct TcpAbort {
    streams: Vec<TcpStream>,
}

impl TcpAbort {
    /// Shuts every connection down; the group's blocked and later operations fail.
    pub fn abort(&self) {
        for s in &self.streams {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// One rank of a group whose ranks are processes connected over TCP.
///
/// Blocking: meant for a dedicated OS thread. After an operation fails the group is
/// broken for good: this rank closes its connections, so its peers fail promptly too,
/// and every later operation fails. Dropping it closes its connections once the frames
/// already sent are written; it never waits for a peer.
pub struct TcpComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// `links[peer]`, `None` at this rank's own index.
    links: Vec<Option<Link>>,
    /// Payload of the frame being received.
    scratch: Vec<u8>,
    /// Why the group broke, once it has.
    broken: Option<String>,
}

/// The connection to one peer.
struct Link {
    peer: usize,
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
    /// Frames for the writer thread.
    queue: Sender<Vec<u8>>,
    /// Frame buffers the writer thread has finished with.
    spent: Receiver<Vec<u8>>,
    /// Why the writer thread stopped, if it failed.
    failure: Arc<Mutex<Option<String>>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    ReduceScatter = 1,
    ReduceGather = 2,
    AllGather = 3,
    PointToPoint = 4,
    Barrier = 5,
}

impl Op {
    fn from_wire(v: u32) -> Option<Op> {
        [
            Op::ReduceScatter,
            Op::ReduceGather,
            Op::AllGather,
            Op::PointToPoint,
            Op::Barrier,
        ]
        .into_iter()
        .find(|op| *op as u32 == v)
    }

    fn name(self) -> &'static str {
        match self {
            Op::ReduceScatter => "all_reduce_sum (reduce-scatter)",
            Op::ReduceGather => "all_reduce_sum (all-gather)",
            Op::AllGather => "all_gather",
            Op::PointToPoint => "send/recv",
            Op::Barrier => "barrier",
        }
    }
}

impl TcpComm {
    /// Binds the listener this rank's peers will dial (e.g. `0.0.0.0:0`), before their
    /// addresses are known, so the chosen port can be reported to the coordinator.
    pub fn bind(addr: SocketAddr) -> Result<TcpListenerHandle> {
        TcpListener::bind(addr)
            .map(|listener| TcpListenerHandle { listener })
            .map_err(|e| RuntimeError::Collective(format!("cannot listen on {addr}: {e}")))
    }

    /// A handle that breaks this rank's connections from another thread: an operation
    /// blocked on a peer that will never answer (a hung process keeps its sockets open)
    /// fails at once instead of waiting out the I/O timeout, and so do its peers'.
    pub fn abort_handle(&self) -> Result<TcpAbort> {
        let streams = self
            .links
            .iter()
            .flatten()
            .map(|l| l.reader.get_ref().try_clone())
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| RuntimeError::Collective(format!("cloning a connection: {e}")))?;
        Ok(TcpAbort { streams })
    }

    /// Forms the group: one connection per pair of ranks, the lower rank dialling the
    /// higher rank's listener until `spec.timeout` passes, the higher rank accepting.
    /// Connections that bring a wrong token, world size or rank, or a rank already
    /// connected, are dropped and accepting goes on; the group fails only at the deadline.
    /// A group of one needs no connection.
    pub fn connect(listener: TcpListenerHandle, spec: &TcpGroupSpec) -> Result<TcpComm> {
        let (rank, world) = (spec.rank, spec.peers.len());
        let fail = |why: String| {
            RuntimeError::Collective(format!("rank {rank} joining a group of {world}: {why}"))
        };
        if rank >= world {
            return Err(fail("the rank is not below the world size".into()));
        }
        if spec.timeout.is_zero() || spec.io_timeout.is_zero() {
            return Err(fail("the timeout must not be zero".into()));
        }
        let deadline = Instant::now() + spec.timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for (peer, slot) in streams.iter_mut().enumerate().skip(rank + 1) {
            *slot = Some(dial(spec, peer, deadline).map_err(fail)?);
        }
        accept_lower(&listener.listener, spec, deadline, &mut streams).map_err(fail)?;
        drop(listener);
        let links = streams
            .into_iter()
            .enumerate()
            .map(|(peer, stream)| {
                stream
                    .map(|s| Link::start(rank, peer, spec.peers[peer], s, spec.io_timeout))
                    .transpose()
            })
            .collect::<std::result::Result<Vec<_>, String>>()
            .map_err(fail)?;
        Ok(TcpComm {
            rank,
            world,
            timeout: spec.io_timeout,
            links,
            scratch: Vec::new(),
            broken: None,
        })
    }

    /// Runs one operation; on failure breaks the group and names the operation.
    fn guarded<T>(
        &mut self,
        what: &str,
        op: impl FnOnce(&mut Self) -> std::result::Result<T, String>,
    ) -> Result<T> {
        if let Some(why) = &self.broken {
            return Err(RuntimeError::Collective(format!(
                "{what}: the group broke earlier: {why}"
            )));
        }
        op(self).map_err(|why| {
            let why = format!("{what}: {why}");
            self.break_group(&why);
            RuntimeError::Collective(why)
        })
    }

    /// Closes every connection, so peers blocked on this rank fail now rather than at
    /// their timeout.
    fn break_group(&mut self, why: &str) {
        self.broken = Some(why.to_string());
        for link in self.links.iter().flatten() {
            let _ = link.reader.get_ref().shutdown(Shutdown::Both);
        }
    }

    fn check_peer(&self, what: &str, peer: usize) -> Result<()> {
        if peer >= self.world {
            Err(RuntimeError::Collective(format!(
                "{what}: no rank {peer} in a group of {}",
                self.world
            )))
        } else if peer == self.rank {
            Err(RuntimeError::Collective(format!(
                "{what}: rank {peer} is this rank; it cannot talk to itself"
            )))
        } else {
            Ok(())
        }
    }

    fn link(&self, peer: usize) -> std::result::Result<&Link, String> {
        self.links
            .get(peer)
            .and_then(Option::as_ref)
            .ok_or_else(|| format!("no connection to rank {peer}"))
    }

    /// Queues one frame for `peer`; returns before it is written.
    fn post(
        &mut self,
        peer: usize,
        op: Op,
        total: usize,
        data: &[f32],
    ) -> std::result::Result<(), String> {
        let link = self.link(peer)?;
        let mut frame = link.spent.try_recv().unwrap_or_default();
        frame.clear();
        frame.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        frame.extend_from_slice(&(op as u32).to_le_bytes());
        frame.extend_from_slice(&(total as u64).to_le_bytes());
        frame.extend_from_slice(&(data.len() as u64).to_le_bytes());
        frame.resize(HEADER_LEN + 4 * data.len(), 0);
        for (dst, v) in frame[HEADER_LEN..].chunks_exact_mut(4).zip(data) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        link.queue.send(frame).map_err(|_| link.writer_failure())
    }

    /// Receives the next frame from `peer`, which must be `op` with the same `total` and
    /// `count` elements; returns its payload bytes.
    fn take(
        &mut self,
        peer: usize,
        op: Op,
        total: usize,
        count: usize,
    ) -> std::result::Result<&[u8], String> {
        let timeout = self.timeout;
        let link = self
            .links
            .get_mut(peer)
            .and_then(Option::as_mut)
            .ok_or_else(|| format!("no connection to rank {peer}"))?;
        let mut header = [0u8; HEADER_LEN];
        link.reader
            .read_exact(&mut header)
            .map_err(|e| link.read_error(&e, timeout))?;
        check_header(&header, op, total, count).map_err(|why| format!("{}: {why}", link.who()))?;
        self.scratch.resize(4 * count, 0);
        link.reader
            .read_exact(&mut self.scratch)
            .map_err(|e| link.read_error(&e, timeout))?;
        Ok(&self.scratch)
    }

    /// Ring reduce-scatter, then ring all-gather. In reduce-scatter step `s` rank `r`
    /// passes on chunk `r - 1 - s` and adds its own values to chunk `r - 2 - s`, so chunk
    /// `c` starts at rank `c + 1` and is complete at rank `c`: the order of `ring_order_sum`.
    fn ring_all_reduce(&mut self, buf: &mut [f32]) -> std::result::Result<(), String> {
        let (n, r, len) = (self.world, self.rank, buf.len());
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let chunks: Vec<_> = (0..n).map(|c| ring_chunk(len, n, c)).collect();
        for s in 0..n - 1 {
            let out = chunks[(r + 2 * n - 1 - s) % n].clone();
            let into = chunks[(r + 2 * n - 2 - s) % n].clone();
            self.post(next, Op::ReduceScatter, len, &buf[out])?;
            let partial = self.take(prev, Op::ReduceScatter, len, into.len())?;
            for (slot, p) in buf[into].iter_mut().zip(partial.chunks_exact(4)) {
                // The running sum is the left operand, as in `ring_order_sum`, so even NaN
                // payloads come out the same.
                let (running, own) = (f32::from_le_bytes([p[0], p[1], p[2], p[3]]), *slot);
                *slot = running + own;
            }
        }
        for s in 0..n - 1 {
            let out = chunks[(r + n - s) % n].clone();
            let into = chunks[(r + 2 * n - 1 - s) % n].clone();
            self.post(next, Op::ReduceGather, len, &buf[out])?;
            let done = self.take(prev, Op::ReduceGather, len, into.len())?;
            decode(done, &mut buf[into]);
        }
        Ok(())
    }

    /// Ring all-gather of equal blocks: in step `s` rank `r` passes on block `r - s` and
    /// receives block `r - 1 - s`. Each hop compares the two neighbours' lengths, so any
    /// rank with a different length is caught.
    fn ring_all_gather(&mut self, local: &[f32]) -> std::result::Result<Vec<f32>, String> {
        let (n, r, len) = (self.world, self.rank, local.len());
        let next = (r + 1) % n;
        let prev = (r + n - 1) % n;
        let mut all = vec![0f32; n * len];
        all[r * len..(r + 1) * len].copy_from_slice(local);
        for s in 0..n - 1 {
            let out = (r + n - s) % n;
            let into = (r + 2 * n - 1 - s) % n;
            self.post(next, Op::AllGather, len, &all[out * len..(out + 1) * len])?;
            let block = self.take(prev, Op::AllGather, len, len)?;
            decode(block, &mut all[into * len..(into + 1) * len]);
        }
        Ok(all)
    }

    /// `n - 1` ring steps of empty frames: the last frame a rank receives has travelled
    /// through every other rank after it entered the barrier.
    fn ring_barrier(&mut self) -> std::result::Result<(), String> {
        let (n, r) = (self.world, self.rank);
        for _ in 0..n - 1 {
            self.post((r + 1) % n, Op::Barrier, 0, &[])?;
            self.take((r + n - 1) % n, Op::Barrier, 0, 0)?;
        }
        Ok(())
    }
}

impl Collective for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.guarded("all_reduce_sum", |c| c.ring_all_reduce(buf))
    }

    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        if self.world == 1 {
            return Ok(local.to_vec());
        }
        self.guarded("all_gather", |c| c.ring_all_gather(local))
    }

    /// Returns once the frame is queued for the connection's writer, not when it arrives.
    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()> {
        self.check_peer("send", peer)?;
        self.guarded("send", |c| c.post(peer, Op::PointToPoint, data.len(), data))
    }

    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()> {
        self.check_peer("recv", peer)?;
        self.guarded("recv", |c| {
            let data = c.take(peer, Op::PointToPoint, out.len(), out.len())?;
            decode(data, out);
            Ok(())
        })
    }

    fn barrier(&mut self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.guarded("barrier", |c| c.ring_barrier())
    }
}

/// Checks that a frame header is `op` with the same `total` and `count` elements.
fn check_header(
    header: &[u8; HEADER_LEN],
    op: Op,
    total: usize,
    count: usize,
) -> std::result::Result<(), String> {
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let long = |at: usize| u64::from(word(at)) | (u64::from(word(at + 4)) << 32);
    if word(0) != FRAME_MAGIC {
        return Err("sent bytes that are not a frame header; the stream is out of step".into());
    }
    let theirs = Op::from_wire(word(4));
    if theirs != Some(op) {
        let theirs = theirs.map_or_else(|| format!("operation {}", word(4)), |o| o.name().into());
        return Err(format!("in {theirs} while this rank is in {}", op.name()));
    }
    let (their_total, their_count) = (long(8), long(16));
    if their_total != total as u64 {
        return Err(match op {
            Op::PointToPoint => format!("sent {their_total} values, recv expected {total}"),
            _ => format!(
                "called {} with {their_total} values, this rank with {total}",
                op.name()
            ),
        });
    }
    if their_count != count as u64 {
        return Err(format!(
            "sent a frame of {their_count} values in {}, expected {count}",
            op.name()
        ));
    }
    Ok(())
}

fn decode(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

impl Link {
    /// Sets the connection up for data and starts its writer thread.
    fn start(
        rank: usize,
        peer: usize,
        addr: SocketAddr,
        stream: TcpStream,
        timeout: Duration,
    ) -> std::result::Result<Link, String> {
        let who = format!("rank {peer} ({addr})");
        let setup = |e: io::Error| format!("{who}: setting up the connection: {e}");
        stream.set_nonblocking(false).map_err(setup)?;
        stream.set_nodelay(true).map_err(setup)?;
        stream.set_read_timeout(Some(timeout)).map_err(setup)?;
        stream.set_write_timeout(Some(timeout)).map_err(setup)?;
        let out = stream.try_clone().map_err(setup)?;
        let (queue, frames) = channel();
        let (done, spent) = channel();
        let failure = Arc::new(Mutex::new(None));
        let writer_failure = failure.clone();
        std::thread::Builder::new()
            .name(format!("tcp-comm-{rank}-to-{peer}"))
            .spawn(move || write_frames(out, frames, done, writer_failure, who, timeout))
            .map_err(|e| format!("rank {peer} ({addr}): starting its writer thread: {e}"))?;
        Ok(Link {
            peer,
            addr,
            reader: BufReader::with_capacity(READ_BUFFER, stream),
            queue,
            spent,
            failure,
        })
    }

    fn who(&self) -> String {
        format!("rank {} ({})", self.peer, self.addr)
    }

    fn recorded_failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    fn writer_failure(&self) -> String {
        self.recorded_failure()
            .unwrap_or_else(|| format!("{}: the connection's writer has stopped", self.who()))
    }

    /// Prefers the writer's failure: when a write fails the writer closes the socket,
    /// and the read error that follows says less.
    fn read_error(&self, e: &io::Error, timeout: Duration) -> String {
        if let Some(why) = self.recorded_failure() {
            return why;
        }
        let who = self.who();
        match e.kind() {
            ErrorKind::UnexpectedEof => format!("{who}: connection closed"),
            _ if is_timeout(e) => format!("timed out after {timeout:?} waiting for {who}"),
            _ => format!("{who}: {e}"),
        }
    }
}

/// The writer thread of one connection: writes frames in order until the comm drops its
/// sender, or a write fails, in which case it records why and shuts the socket down.
fn write_frames(
    mut out: TcpStream,
    frames: Receiver<Vec<u8>>,
    done: Sender<Vec<u8>>,
    failure: Arc<Mutex<Option<String>>>,
    who: String,
    timeout: Duration,
) {
    for frame in frames {
        // `write_all` (not vectored writes): std's `write` passes MSG_NOSIGNAL, so a dead
        // peer is an EPIPE error even where SIGPIPE has its default, process-killing action.
        if let Err(e) = out.write_all(&frame) {
            let why = if is_timeout(&e) {
                format!("timed out after {timeout:?} sending to {who}, which is not reading")
            } else {
                format!("{who}: {e}")
            };
            if let Ok(mut f) = failure.lock() {
                *f = Some(why);
            }
            let _ = out.shutdown(Shutdown::Both);
            return;
        }
        if frame.capacity() <= RECYCLE_MAX {
            let _ = done.send(frame);
        }
    }
}

/// Dials `peer` until `deadline`, then trades hello and ack with it.
fn dial(
    spec: &TcpGroupSpec,
    peer: usize,
    deadline: Instant,
) -> std::result::Result<TcpStream, String> {
    let addr = spec.peers[peer];
    let who = format!("rank {peer} ({addr})");
    let mut last_error = None;
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let last = last_error.map(|e| format!(": {e}")).unwrap_or_default();
            return Err(format!(
                "timed out after {:?} connecting to {who}{last}",
                spec.timeout
            ));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => break s,
            Err(e) => {
                last_error = Some(e);
                std::thread::sleep(left.min(DIAL_RETRY));
            }
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let io = |e: io::Error| format!("{who}: {e}");
    stream.set_nodelay(true).map_err(io)?;
    stream.set_read_timeout(Some(left)).map_err(io)?;
    stream.set_write_timeout(Some(left)).map_err(io)?;
    let mut hello = Vec::with_capacity(HELLO_LEN);
    hello.extend_from_slice(&HELLO_MAGIC);
    hello.extend_from_slice(&spec.token);
    hello.extend_from_slice(&(spec.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(spec.peers.len() as u32).to_le_bytes());
    stream.write_all(&hello).map_err(io)?;
    let mut ack = [0u8; ACK_LEN];
    stream.read_exact(&mut ack).map_err(|e| match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset => {
            format!("{who} turned this rank away: it expects another token, world size or rank")
        }
        _ if is_timeout(&e) => format!(
            "timed out after {:?} waiting for {who} to accept",
            spec.timeout
        ),
        _ => format!("{who}: {e}"),
    })?;
    let their_rank = u32::from_le_bytes([ack[8], ack[9], ack[10], ack[11]]);
    let their_world = u32::from_le_bytes([ack[12], ack[13], ack[14], ack[15]]);
    if ack[..8] != ACK_MAGIC {
        return Err(format!("{who} answered with something other than an ack"));
    }
    if their_rank as usize != peer || their_world as usize != spec.peers.len() {
        return Err(format!(
            "{addr} answered as rank {their_rank} of {their_world}, expected rank {peer} of {}",
            spec.peers.len()
        ));
    }
    Ok(stream)
}

/// A connection accepted but whose hello has not fully arrived.
struct Pending {
    stream: TcpStream,
    addr: SocketAddr,
    hello: [u8; HELLO_LEN],
    have: usize,
}

enum HelloState {
    Waiting,
    Complete,
    Gone,
}

impl Pending {
    fn read_more(&mut self) -> HelloState {
        loop {
            match self.stream.read(&mut self.hello[self.have..]) {
                Ok(0) => return HelloState::Gone,
                Ok(k) => {
                    self.have += k;
                    if self.have == HELLO_LEN {
                        return HelloState::Complete;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return HelloState::Waiting,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return HelloState::Gone,
            }
        }
    }

    /// The rank the hello claims, if this group should take it.
    fn admit(
        &self,
        spec: &TcpGroupSpec,
        streams: &[Option<TcpStream>],
    ) -> std::result::Result<usize, String> {
        let h = &self.hello;
        let rank = u32::from_le_bytes([h[24], h[25], h[26], h[27]]) as usize;
        let world = u32::from_le_bytes([h[28], h[29], h[30], h[31]]) as usize;
        if h[..8] != HELLO_MAGIC {
            Err("not a Tessera hello".into())
        } else if h[8..24] != spec.token {
            Err("wrong cluster token".into())
        } else if world != spec.peers.len() {
            Err(format!(
                "world size {world}, this group has {}",
                spec.peers.len()
            ))
        } else if rank >= spec.rank {
            Err(format!("rank {rank} must not dial rank {}", spec.rank))
        } else if streams[rank].is_some() {
            Err(format!("rank {rank} is already connected"))
        } else {
            Ok(rank)
        }
    }
}

/// Accepts ranks `0..spec.rank` until all have arrived or `deadline` passes. Hellos are
/// read without blocking, so a connection that never speaks holds up nobody.
fn accept_lower(
    listener: &TcpListener,
    spec: &TcpGroupSpec,
    deadline: Instant,
    streams: &mut [Option<TcpStream>],
) -> std::result::Result<(), String> {
    let missing = |streams: &[Option<TcpStream>]| -> Vec<usize> {
        (0..spec.rank).filter(|&r| streams[r].is_none()).collect()
    };
    if spec.rank == 0 {
        return Ok(());
    }
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("listener: {e}"))?;
    let mut pending: Vec<Pending> = Vec::new();
    while !missing(streams).is_empty() {
        if Instant::now() >= deadline {
            return Err(format!(
                "timed out after {:?} waiting for ranks {:?} to connect",
                spec.timeout,
                missing(streams)
            ));
        }
        let mut progressed = false;
        loop {
            match listener.accept() {
                Ok((stream, addr)) => {
                    progressed = true;
                    if stream.set_nonblocking(true).is_ok() {
                        pending.push(Pending {
                            stream,
                            addr,
                            hello: [0; HELLO_LEN],
                            have: 0,
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::Interrupted
                            | ErrorKind::ConnectionAborted
                            | ErrorKind::ConnectionReset
                    ) => {}
                Err(e) => return Err(format!("accepting connections: {e}")),
            }
        }
        let mut i = 0;
        while i < pending.len() {
            match pending[i].read_more() {
                HelloState::Waiting => i += 1,
                HelloState::Gone => {
                    progressed = true;
                    pending.swap_remove(i);
                }
                HelloState::Complete => {
                    progressed = true;
                    let p = pending.swap_remove(i);
                    match p.admit(spec, streams) {
                        Ok(rank) => {
                            if let Err(why) = acknowledge(&p.stream, spec, deadline) {
                                tracing::warn!(peer = %p.addr, "could not acknowledge rank {rank}: {why}");
                            } else {
                                streams[rank] = Some(p.stream);
                            }
                        }
                        Err(why) => {
                            tracing::warn!(peer = %p.addr, "rank {} turned a connection away: {why}", spec.rank);
                        }
                    }
                }
            }
        }
        if !progressed {
            std::thread::sleep(ACCEPT_POLL);
        }
    }
    Ok(())
}

fn acknowledge(mut stream: &TcpStream, spec: &TcpGroupSpec, deadline: Instant) -> io::Result<()> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_nonblocking(false)?;
    stream.set_write_timeout(Some(left))?;
    let mut ack = Vec::with_capacity(ACK_LEN);
    ack.extend_from_slice(&ACK_MAGIC);
    ack.extend_from_slice(&(spec.rank as u32).to_le_bytes());
    ack.extend_from_slice(&(spec.peers.len() as u32).to_le_bytes());
    stream.write_all(&ack)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{local_group, ring_order_sum, LocalComm};
    use std::thread;

    const TOKEN: [u8; 16] = *b"tessera-test-gen";
    /// Long enough never to fire in a passing test; only failing tests wait for it.
    const PATIENT: Duration = Duration::from_secs(10);

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    fn listeners(n: usize) -> (Vec<TcpListenerHandle>, Vec<SocketAddr>) {
        let ls: Vec<_> = (0..n).map(|_| TcpComm::bind(loopback()).unwrap()).collect();
        let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
        (ls, addrs)
    }

    fn spec(rank: usize, peers: &[SocketAddr], timeout: Duration) -> TcpGroupSpec {
        TcpGroupSpec {
            rank,
            peers: peers.to_vec(),
            token: TOKEN,
            timeout,
            io_timeout: timeout,
        }
    }

    /// Forms a group of `n` ranks on loopback, each rank connecting from its own thread.
    fn group(n: usize, timeout: Duration) -> Vec<TcpComm> {
        let (ls, peers) = listeners(n);
        let joining: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let spec = spec(rank, &peers, timeout);
                thread::spawn(move || TcpComm::connect(l, &spec))
            })
            .collect();
        joining
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    }

    fn run_on<C: Send + 'static, T: Send + 'static>(
        comms: Vec<C>,
        f: impl Fn(C) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        let f = Arc::new(f);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                let f = f.clone();
                thread::spawn(move || f(c))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn run_group<T: Send + 'static>(
        n: usize,
        f: impl Fn(TcpComm) -> T + Send + Sync + 'static,
    ) -> Vec<T> {
        run_on(group(n, PATIENT), f)
    }

    fn splitmix64(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Values whose sum depends on the order of addition: both signs, magnitudes from
    /// 1e-3 to 1e6.
    fn input(rank: usize, len: usize) -> Vec<f32> {
        let mut state = (rank as u64) << 32 | len as u64;
        (0..len)
            .map(|_| {
                let x = splitmix64(&mut state);
                let exponent = (x % 9001) as f64 / 1000.0 - 3.0;
                let sign = if x >> 63 == 1 { -1.0 } else { 1.0 };
                (sign * 10f64.powf(exponent)) as f32
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn all_reduce_is_bit_identical_to_the_ring_order_sum_and_the_local_collective() {
        let mut order_mattered = 0;
        for n in 1..=5 {
            for len in [0, 1, 3, 7, 1000, 4097] {
                let reduce = move |mut c: Box<dyn Collective>| {
                    let mut buf = input(c.rank(), len);
                    c.all_reduce_sum(&mut buf).unwrap();
                    buf
                };
                let tcp = run_on(
                    group(n, PATIENT)
                        .into_iter()
                        .map(|c| Box::new(c) as Box<dyn Collective>)
                        .collect(),
                    reduce,
                );
                let local = run_on(
                    local_group(n)
                        .into_iter()
                        .map(|c: LocalComm| Box::new(c) as Box<dyn Collective>)
                        .collect(),
                    reduce,
                );
                let parts: Vec<Vec<f32>> = (0..n).map(|r| input(r, len)).collect();
                let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
                let mut expected = vec![0f32; len];
                ring_order_sum(&refs, &mut expected);
                for (rank, (t, l)) in tcp.iter().zip(&local).enumerate() {
                    assert_eq!(bits(t), bits(&expected), "n={n} len={len} rank={rank}");
                    assert_eq!(bits(l), bits(&expected), "n={n} len={len} rank={rank}");
                }
                let in_rank_order: Vec<f32> = (0..len)
                    .map(|i| parts.iter().skip(1).fold(parts[0][i], |acc, p| acc + p[i]))
                    .collect();
                order_mattered += expected
                    .iter()
                    .zip(&in_rank_order)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
            }
        }
        assert!(order_mattered > 0, "the inputs must make the order visible");
    }

    #[test]
    fn all_gather_concatenates_in_rank_order() {
        for n in 1..=5 {
            for len in [0, 1, 3] {
                let results = run_group(n, move |mut c| {
                    let local: Vec<f32> = (0..len).map(|i| (c.rank() * 100 + i) as f32).collect();
                    c.all_gather(&local).unwrap()
                });
                let expected: Vec<f32> = (0..n)
                    .flat_map(|r| (0..len).map(move |i| (r * 100 + i) as f32))
                    .collect();
                for got in results {
                    assert_eq!(got, expected, "n={n} len={len}");
                }
            }
        }
    }

    #[test]
    fn different_lengths_fail_on_every_rank() {
        let gathered = run_group(3, |mut c| {
            let len = if c.rank() == 1 { 4 } else { 3 };
            c.all_gather(&vec![1.0; len]).map(|_| ())
        });
        let reduced = run_group(3, |mut c| {
            let len = if c.rank() == 2 { 5 } else { 6 };
            c.all_reduce_sum(&mut vec![1.0; len])
        });
        for result in gathered.into_iter().chain(reduced) {
            let e = result.unwrap_err().to_string();
            assert!(e.contains("rank"), "{e}");
        }
    }

    #[test]
    fn send_and_recv_round_trip() {
        let results = run_group(3, |mut c| {
            let r = c.rank();
            let (next, prev) = ((r + 1) % 3, (r + 2) % 3);
            let mut got = Vec::new();
            for len in [0, 1, 5000] {
                let data: Vec<f32> = (0..len).map(|i| (r * 10_000 + i) as f32).collect();
                c.send(next, &data).unwrap();
                let mut back = vec![0f32; len];
                c.recv(prev, &mut back).unwrap();
                got.push(back);
            }
            got
        });
        for (r, got) in results.into_iter().enumerate() {
            let prev = (r + 2) % 3;
            for (len, back) in [0, 1, 5000].into_iter().zip(got) {
                let expected: Vec<f32> = (0..len).map(|i| (prev * 10_000 + i) as f32).collect();
                assert_eq!(back, expected);
            }
        }
    }

    #[test]
    fn recv_of_the_wrong_length_fails_naming_the_peer() {
        let results = run_group(2, |mut c| {
            if c.rank() == 0 {
                c.send(1, &[1.0, 2.0, 3.0]).map(|_| String::new())
            } else {
                let mut out = [0f32; 2];
                c.recv(0, &mut out).map(|_| String::new())
            }
        });
        assert!(results[0].is_ok());
        let e = results[1].as_ref().unwrap_err().to_string();
        assert!(
            e.contains("rank 0 (127.0.0.1:") && e.contains("sent 3 values"),
            "{e}"
        );
    }

    #[test]
    fn talking_to_itself_or_a_missing_rank_is_refused_and_leaves_the_group_usable() {
        let results = run_group(2, |mut c| {
            let me = c.rank();
            assert!(c.send(me, &[1.0]).is_err());
            assert!(c.recv(7, &mut [0.0]).is_err());
            let mut buf = [1.0f32; 3];
            c.all_reduce_sum(&mut buf).unwrap();
            buf
        });
        assert_eq!(results, vec![[2.0; 3]; 2]);
    }

    #[test]
    fn barrier_waits_for_every_rank_and_can_repeat() {
        const ROUNDS: usize = 5;
        let spans = run_group(4, |mut c| {
            (0..ROUNDS)
                .map(|round| {
                    if round % 4 == c.rank() {
                        thread::sleep(Duration::from_millis(20));
                    }
                    let entered = Instant::now();
                    c.barrier().unwrap();
                    (entered, Instant::now())
                })
                .collect::<Vec<_>>()
        });
        for round in 0..ROUNDS {
            let last_in = spans.iter().map(|s| s[round].0).max().unwrap();
            let first_out = spans.iter().map(|s| s[round].1).min().unwrap();
            assert!(last_in <= first_out, "round {round}");
        }
    }

    #[test]
    fn large_messages_both_ways_do_not_deadlock() {
        const LEN: usize = 8 << 20;
        let started = Instant::now();
        let results = run_group(2, |mut c| {
            let r = c.rank();
            let mut buf: Vec<f32> = (0..LEN)
                .map(|i| (i % 1000) as f32 * (r + 1) as f32)
                .collect();
            c.all_reduce_sum(&mut buf).unwrap();
            // Both sides send 16 MiB before either receives: more than both socket buffers.
            let half = &buf[..LEN / 2];
            let mut back = vec![0f32; LEN / 2];
            c.send(1 - r, half).unwrap();
            c.recv(1 - r, &mut back).unwrap();
            assert!(back == half);
            buf
        });
        let expected: Vec<f32> = (0..LEN).map(|i| (i % 1000) as f32 * 3.0).collect();
        for got in &results {
            assert!(got == &expected);
        }
        println!(
            "32 MiB all-reduce and exchange at world size 2: {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn intruders_are_turned_away_and_the_group_still_forms() {
        let (mut ls, peers) = listeners(2);
        let higher = ls.pop().unwrap();
        let higher_spec = spec(1, &peers, PATIENT);
        let forming = thread::spawn(move || TcpComm::connect(higher, &higher_spec));

        let silent = TcpStream::connect(peers[1]).unwrap();
        let mut garbage = TcpStream::connect(peers[1]).unwrap();
        garbage.write_all(&[0xAB; HELLO_LEN]).unwrap();
        let bad_token = TcpGroupSpec {
            token: *b"another-cluster!",
            ..spec(0, &peers, PATIENT)
        };
        let e = TcpComm::connect(TcpComm::bind(loopback()).unwrap(), &bad_token)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("turned this rank away"), "{e}");
        let mut bigger = peers.clone();
        bigger.push(peers[0]);
        let e = TcpComm::connect(
            TcpComm::bind(loopback()).unwrap(),
            &spec(0, &bigger, PATIENT),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("turned this rank away"), "{e}");

        let lower = ls.pop().unwrap();
        let mut low = TcpComm::connect(lower, &spec(0, &peers, PATIENT)).unwrap();
        let mut high = forming.join().unwrap().unwrap();
        drop((silent, garbage));
        let other = thread::spawn(move || {
            let mut buf = [2.0f32];
            high.all_reduce_sum(&mut buf).map(|_| buf[0])
        });
        let mut buf = [1.0f32];
        low.all_reduce_sum(&mut buf).unwrap();
        assert_eq!(buf[0], 3.0);
        assert_eq!(other.join().unwrap().unwrap(), 3.0);
    }

    /// Once formed, a group takes no more connections: every rank's listener is closed,
    /// so a foreign peer, with the token or without, has nowhere to send a frame.
    #[test]
    fn a_formed_group_listens_no_more() {
        let (ls, peers) = listeners(3);
        let joining: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let spec = spec(rank, &peers, PATIENT);
                thread::spawn(move || TcpComm::connect(l, &spec))
            })
            .collect();
        let comms: Vec<TcpComm> = joining
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        for addr in &peers {
            let e = TcpStream::connect(addr).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ConnectionRefused, "{addr}: {e}");
        }
        let reducing: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                thread::spawn(move || {
                    let mut buf = [1.0f32; 4];
                    c.all_reduce_sum(&mut buf).map(|_| buf)
                })
            })
            .collect();
        for h in reducing {
            assert_eq!(h.join().unwrap().unwrap(), [3.0; 4]);
        }
    }

    #[test]
    fn an_aborted_rank_stops_waiting_for_a_silent_peer() {
        let mut comms = group(2, PATIENT);
        let _silent = comms.pop().unwrap();
        let mut waiting = comms.pop().unwrap();
        let abort = waiting.abort_handle().unwrap();
        let started = Instant::now();
        let blocked = thread::spawn(move || {
            let mut buf = vec![1.0f32; 8];
            waiting.all_reduce_sum(&mut buf)
        });
        thread::sleep(Duration::from_millis(100));
        abort.abort();
        let e = blocked.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 1"), "{e}");
        assert!(
            started.elapsed() < PATIENT / 2,
            "the abort ended the wait: {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn forming_a_group_gives_up_at_the_timeout() {
        let quick = Duration::from_millis(200);
        let started = Instant::now();
        let (mut ls, peers) = listeners(2);
        // Rank 1 listens but never joins: the hello is never acknowledged.
        let _mute = ls.pop();
        let waits_for_ack = thread::spawn({
            let spec = spec(0, &peers, quick);
            let l = ls.pop().unwrap();
            move || TcpComm::connect(l, &spec)
        });
        // Nobody dials rank 1.
        let (mut ls2, peers2) = listeners(2);
        let waits_for_dial = thread::spawn({
            let spec = spec(1, &peers2, quick);
            let l = ls2.pop().unwrap();
            move || TcpComm::connect(l, &spec)
        });
        // Nothing listens at rank 1's address.
        let (mut ls3, peers3) = listeners(2);
        drop(ls3.pop());
        let refused = TcpComm::connect(ls3.pop().unwrap(), &spec(0, &peers3, quick));

        let ack = waits_for_ack.join().unwrap().err().unwrap().to_string();
        let dial = waits_for_dial.join().unwrap().err().unwrap().to_string();
        let refused = refused.err().unwrap().to_string();
        assert!(
            ack.contains("timed out") && ack.contains("rank 1 (127.0.0.1:"),
            "{ack}"
        );
        assert!(
            dial.contains("timed out") && dial.contains("ranks [0]"),
            "{dial}"
        );
        assert!(
            refused.contains("timed out") && refused.contains("connecting to rank 1"),
            "{refused}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_rank_that_goes_away_fails_its_peers_promptly() {
        let mut comms = group(3, PATIENT);
        let gone = comms.pop().unwrap();
        let started = Instant::now();
        let handles: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                thread::spawn(move || {
                    let mut buf = [1.0f32; 64];
                    let first = c.all_reduce_sum(&mut buf).unwrap_err().to_string();
                    let later = c.barrier().unwrap_err().to_string();
                    (first, later)
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(50));
        drop(gone);
        let errors: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            errors[0].0.contains("rank 2 (127.0.0.1:") && errors[0].0.contains("connection closed"),
            "{}",
            errors[0].0
        );
        assert!(
            errors[1].0.contains("rank 0 (127.0.0.1:"),
            "{}",
            errors[1].0
        );
        for (_, later) in &errors {
            assert!(later.contains("broke earlier"), "{later}");
        }
    }

    #[test]
    fn a_hung_rank_times_out() {
        let timeout = Duration::from_millis(200);
        let mut comms = group(2, timeout);
        let hung = comms.pop().unwrap();
        let mut waiting = comms.pop().unwrap();
        let started = Instant::now();
        let e = waiting
            .all_reduce_sum(&mut [1.0; 8])
            .unwrap_err()
            .to_string();
        let waited = started.elapsed();
        assert!(
            e.contains("timed out after 200ms waiting for rank 1 (127.0.0.1:"),
            "{e}"
        );
        assert!(
            waited >= timeout && waited < Duration::from_secs(1),
            "{waited:?}"
        );
        drop(hung);
    }

    #[test]
    fn dropping_a_comm_does_not_wait_and_still_delivers_what_it_sent() {
        const LEN: usize = 4 << 20;
        let mut comms = group(2, PATIENT);
        let mut reader = comms.pop().unwrap();
        let mut sender = comms.pop().unwrap();
        let data: Vec<f32> = (0..LEN).map(|i| i as f32).collect();
        sender.send(1, &data).unwrap();
        let started = Instant::now();
        drop(sender);
        assert!(started.elapsed() < Duration::from_millis(100));
        let mut got = vec![0f32; LEN];
        reader.recv(0, &mut got).unwrap();
        assert!(got == data);
        let e = reader.recv(0, &mut got).unwrap_err().to_string();
        assert!(
            e.contains("rank 0 (127.0.0.1:") && e.contains("connection closed"),
            "{e}"
        );
    }

    /// Not an assertion: prints the latency of one hidden-state-sized all-reduce.
    #[test]
    fn all_reduce_latency_at_world_size_two() {
        const ITERS: usize = 2000;
        let times = run_group(2, |mut c| {
            let mut buf = vec![1.0f32; 768];
            for _ in 0..200 {
                c.all_reduce_sum(&mut buf).unwrap();
                buf.fill(1.0);
            }
            let mut each = Vec::with_capacity(ITERS);
            for _ in 0..ITERS {
                let t = Instant::now();
                c.all_reduce_sum(&mut buf).unwrap();
                each.push(t.elapsed());
                buf.fill(1.0);
            }
            each
        });
        let mut each = times[0].clone();
        each.sort();
        let mean = each.iter().sum::<Duration>() / ITERS as u32;
        println!(
            "all_reduce_sum of 768 f32 at world size 2: mean {mean:?}, median {:?}, p99 {:?}",
            each[ITERS / 2],
            each[ITERS * 99 / 100]
        );
    }
}
