//! The `nccl` collective (feature `cuda`): ranks are GPUs, each driven by its own process,
//! and NCCL moves the data between their device buffers.
//!
//! # Threads
//! An NCCL communicator is a raw handle that NCCL does not let two threads use at once,
//! and NCCL binds calls to the CUDA context current on the calling thread. Each
//! [`NcclComm`] therefore owns one OS thread: it binds the device's context, creates the
//! communicator, and then serves the operations that the handle sends it over a channel,
//! answering each. The handle is `Send` and is what the shard thread holds.
//!
//! # Streams and ordering
//! Device operations ([`NcclComm::all_reduce_sum_in_place`], [`NcclComm::send_device`],
//! [`NcclComm::recv_device`]) are enqueued on the stream the caller passes, normally its
//! compute stream, and nowhere else. Stream order is then the whole story: the NCCL kernel
//! runs after every kernel the caller queued before it (the one that produced the buffer)
//! and before every kernel queued after it (the one that consumes it), with no event and
//! no host wait per operation. A separate communication stream joined by events both ways
//! would only pay off if there were independent work to overlap, and in this forward pass
//! every all-reduce sits on the critical path. The buffers are cudarc views, so cudarc's
//! own event tracking also orders the operation after earlier work on other streams.
//!
//! The host-buffer [`Collective`] methods, for code written against the trait, run on a
//! stream of the communicator's own: copy in, operate, wait, copy out.
//!
//! # Waiting, failure and abort
//! Communicators are created nonblocking (`blocking = 0`): no NCCL call ever blocks this
//! thread, so joining the group can give up at a deadline, and everything that waits
//! (forming the group, a host-buffer operation, [`NcclComm::synchronize`]) polls the
//! stream and `ncclCommGetAsyncError` instead of blocking in the driver. A wait that sees
//! an NCCL error, or outlasts its timeout, aborts the communicator.
//!
//! A dead peer leaves NCCL kernels spinning on the device, so every stream behind them is
//! stuck. [`NcclAbort`] ends them from any thread with `ncclCommAbort`: it is what a
//! worker's `Release` calls, as it breaks the sockets of a TCP group. After an abort or
//! any error the group is broken for good, and every later operation fails.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::fmt;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaContext, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use cudarc::nccl::sys::{ncclConfig_t, ncclUniqueId};

use super::nccl_id::{NcclId, NCCL_ID_BYTES, NCCL_MISSING};
use super::Collective;
use crate::error::{Result, RuntimeError};

/// Oldest NCCL whose calls Tessera makes: nonblocking communicators through
/// `ncclCommInitRankConfig`, `ncclRemoteError` and `ncclGetLastError` (`2.18.0`).
pub const MIN_NCCL_VERSION: i32 = 2_18_00;

/// Names libnccl is opened by: the soname first (all the pip wheel `nvidia-nccl-cu13`
/// ships), then the development link.
const LIBRARY_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// The `ncclConfig_t` layout of cudarc's bindings is NCCL 2.30's; the version field tells
/// an older or newer library how much of it to read.
const CONFIG_VERSION: u32 = 2_30_00;
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// `NCCL_CONFIG_UNDEF_INT`: leave the attribute to NCCL.
const UNDEF: c_int = c_int::MIN;

// `ncclResult_t` values.
const SUCCESS: c_int = 0;
const IN_PROGRESS: c_int = 7;
// `ncclRedOp_t::ncclSum`.
const SUM: c_int = 0;

/// How long a wait spins before it starts sleeping between polls, and how long it sleeps.
const SPIN_POLLS: u32 = 200;
const POLL_SLEEP: Duration = Duration::from_micros(50);

/// An NCCL communicator handle (`ncclComm_t`).
type CommHandle = *mut c_void;

/// The entry points of libnccl Tessera calls, resolved once. Declared here rather than
/// taken from cudarc's bindings for two reasons: cudarc opens `libnccl.so` and a CUDA
/// major version, never `libnccl.so.2`, and it panics on a missing symbol. NCCL's enums
/// are C `int`s on the wire and stay `c_int` here, so a status this build does not know
/// is just a number.
struct Api {
    version: c_int,
    get_unique_id: unsafe extern "C" fn(*mut ncclUniqueId) -> c_int,
    init_rank_config: unsafe extern "C" fn(
        *mut CommHandle,
        c_int,
        ncclUniqueId,
        c_int,
        *mut ncclConfig_t,
    ) -> c_int,
    get_async_error: unsafe extern "C" fn(CommHandle, *mut c_int) -> c_int,
    abort: unsafe extern "C" fn(CommHandle) -> c_int,
    get_last_error: unsafe extern "C" fn(CommHandle) -> *const c_char,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        CommHandle,
        *mut c_void,
    ) -> c_int,
    all_gather: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        CommHandle,
        *mut c_void,
    ) -> c_int,
    send:
        unsafe extern "C" fn(*const c_void, usize, c_int, c_int, CommHandle, *mut c_void) -> c_int,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, CommHandle, *mut c_void) -> c_int,
    /// Keeps the library mapped, and so every pointer above valid, for the process's life
    /// (the `Api` lives in a static).
    _library: libloading::Library,
}

static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();

fn api() -> std::result::Result<&'static Api, String> {
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> std::result::Result<Api, String> {
    let library = LIBRARY_NAMES
        .iter()
        // SAFETY: opening libnccl runs its initialisers, which only set up NCCL's own
        // state; nothing of this process is touched.
        .find_map(|&name| unsafe { libloading::Library::new(name) }.ok())
        .ok_or_else(|| NCCL_MISSING.to_string())?;
    /// Resolves `name` as a function of type `F`.
    ///
    /// # Safety
    /// `F` must be the symbol's C signature.
    unsafe fn symbol<F: Copy>(
        library: &libloading::Library,
        name: &str,
    ) -> std::result::Result<F, String> {
        // SAFETY: the caller names the symbol's true signature.
        unsafe { library.get::<F>(name) }.map(|s| *s).map_err(|e| {
            format!(
                "libnccl has no `{name}` ({e}); NCCL {} or newer is needed",
                dotted(MIN_NCCL_VERSION)
            )
        })
    }
    // SAFETY (every `symbol` call below): each type is the function's prototype in nccl.h,
    // with its enum parameters and results as `int`, which is how C passes them.
    let get_version: unsafe extern "C" fn(*mut c_int) -> c_int =
        unsafe { symbol(&library, "ncclGetVersion")? };
    let mut version = 0;
    // SAFETY: ncclGetVersion writes one int through a valid pointer.
    let status = unsafe { get_version(&mut version) };
    if status != SUCCESS {
        return Err(format!(
            "libnccl did not report its version ({})",
            describe(status)
        ));
    }
    if version < MIN_NCCL_VERSION {
        return Err(format!(
            "libnccl is version {}, Tessera needs {} or newer: install a newer one with \
             `pip install -U nvidia-nccl-cu13` and put its nvidia/nccl/lib directory on \
             LD_LIBRARY_PATH",
            dotted(version),
            dotted(MIN_NCCL_VERSION)
        ));
    }
    // SAFETY: see above.
    unsafe {
        Ok(Api {
            version,
            get_unique_id: symbol(&library, "ncclGetUniqueId")?,
            init_rank_config: symbol(&library, "ncclCommInitRankConfig")?,
            get_async_error: symbol(&library, "ncclCommGetAsyncError")?,
            abort: symbol(&library, "ncclCommAbort")?,
            get_last_error: symbol(&library, "ncclGetLastError")?,
            all_reduce: symbol(&library, "ncclAllReduce")?,
            all_gather: symbol(&library, "ncclAllGather")?,
            send: symbol(&library, "ncclSend")?,
            recv: symbol(&library, "ncclRecv")?,
            _library: library,
        })
    }
}

/// `22703` as `2.27.3`.
fn dotted(version: i32) -> String {
    format!(
        "{}.{}.{}",
        version / 10_000,
        (version % 10_000) / 100,
        version % 100
    )
}

/// Whether libnccl, recent enough, can be opened here.
pub fn library_present() -> bool {
    api().is_ok()
}

/// Opens libnccl if it is not open yet; returns its version (`2.30.7`), or says what is
/// missing and how to install it.
pub fn require_library() -> Result<String> {
    api()
        .map(|a| dotted(a.version))
        .map_err(RuntimeError::CudaUnavailable)
}

/// Makes the unique id of a new group (see [`super::new_unique_id`]).
pub(crate) fn new_unique_id() -> Result<NcclId> {
    let api = api().map_err(RuntimeError::CudaUnavailable)?;
    let mut raw = ncclUniqueId {
        internal: [0; NCCL_ID_BYTES],
    };
    // SAFETY: ncclGetUniqueId fills the 128-byte struct it is given.
    let status = unsafe { (api.get_unique_id)(&mut raw) };
    if status != SUCCESS {
        return Err(RuntimeError::Collective(format!(
            "making an NCCL unique id: {}{}",
            describe(status),
            last_error(api)
        )));
    }
    Ok(NcclId::from(raw.internal.map(|c| c as u8)))
}

/// An NCCL status as words.
fn describe(status: c_int) -> String {
    let what = match status {
        1 => "a CUDA call inside NCCL failed (ncclUnhandledCudaError)",
        2 => "a system call failed: a socket, or a peer process gone (ncclSystemError)",
        3 => "NCCL failed an internal check (ncclInternalError)",
        4 => "NCCL was given an invalid argument (ncclInvalidArgument)",
        5 => "NCCL was used in a way it does not allow (ncclInvalidUsage)",
        6 => "a peer failed or went away (ncclRemoteError)",
        7 => "still in progress (ncclInProgress)",
        8 => "NCCL timed out (ncclTimeout)",
        other => return format!("NCCL error {other}"),
    };
    what.to_string()
}

/// NCCL's own account of its last error, as `; NCCL says: …`, or nothing.
fn last_error(api: &Api) -> String {
    // SAFETY: ncclGetLastError ignores its argument (null is allowed) and returns a
    // NUL-terminated string NCCL owns, or null; it is copied at once.
    let text = unsafe {
        let p = (api.get_last_error)(std::ptr::null_mut());
        if p.is_null() {
            return String::new();
        }
        CStr::from_ptr(p).to_string_lossy().trim().to_string()
    };
    if text.is_empty() {
        String::new()
    } else {
        format!("; NCCL says: {text}")
    }
}

fn driver(what: &str, e: DriverError) -> String {
    format!("{what}: {}", crate::cuda::probe::describe(&e))
}

/// The attributes of every communicator Tessera makes: nonblocking, everything else left
/// to NCCL (as `NCCL_CONFIG_INITIALIZER` leaves it).
fn nonblocking_config() -> ncclConfig_t {
    ncclConfig_t {
        size: std::mem::size_of::<ncclConfig_t>(),
        magic: CONFIG_MAGIC,
        version: CONFIG_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Element types NCCL reduces and moves on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NcclDtype {
    /// `f32`.
    F32,
    /// `bf16`.
    Bf16,
    /// `f16`.
    F16,
}

impl NcclDtype {
    /// The `ncclDataType_t` value.
    fn raw(self) -> c_int {
        match self {
            NcclDtype::F16 => 6,
            NcclDtype::F32 => 7,
            NcclDtype::Bf16 => 9,
        }
    }
}

/// A device element type NCCL handles: `f32`, `half::bf16`, `half::f16`.
pub trait NcclElement: sealed::Sealed {
    /// Its NCCL type.
    const DTYPE: NcclDtype;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

impl NcclElement for f32 {
    const DTYPE: NcclDtype = NcclDtype::F32;
}
impl NcclElement for half::bf16 {
    const DTYPE: NcclDtype = NcclDtype::Bf16;
}
impl NcclElement for half::f16 {
    const DTYPE: NcclDtype = NcclDtype::F16;
}

/// What one rank needs to join an NCCL group.
#[derive(Clone)]
pub struct NcclGroupSpec {
    /// This rank.
    pub rank: usize,
    /// Ranks in the group.
    pub world_size: usize,
    /// The group's id, made by one of its ranks and relayed to the others.
    pub id: NcclId,
    /// Deadline for every rank to join.
    pub timeout: Duration,
    /// Once formed, the longest a host-buffer operation or [`NcclComm::synchronize`] may
    /// wait before the group is aborted: longer than the slowest step.
    pub io_timeout: Duration,
}

impl fmt::Debug for NcclGroupSpec {
    /// Leaves the id out: it admits a process to the group.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclGroupSpec")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("timeout", &self.timeout)
            .field("io_timeout", &self.io_timeout)
            .finish_non_exhaustive()
    }
}

impl NcclGroupSpec {
    /// Checks what NCCL itself would reject only later, or never.
    pub fn validate(&self) -> Result<()> {
        let fail = |why: &str| {
            Err(RuntimeError::Collective(format!(
                "rank {} joining an NCCL group of {}: {why}",
                self.rank, self.world_size
            )))
        };
        if self.world_size == 0 || self.world_size > i32::MAX as usize {
            return fail("the world size must be in 1..=2^31-1");
        }
        if self.rank >= self.world_size {
            return fail("the rank is not below the world size");
        }
        if self.timeout.is_zero() || self.io_timeout.is_zero() {
            return fail("the timeout must not be zero");
        }
        Ok(())
    }
}

/// A live communicator handle.
struct RawComm(CommHandle);

// SAFETY: an `ncclComm_t` is a pointer to state NCCL owns; NCCL allows calls on one
// communicator from any thread provided they never overlap. A `RawComm` lives only in
// `Shared::state`, and every call on it is made while holding that mutex: the comm
// thread's calls, and the one `ncclCommAbort`, after which the handle is gone.
unsafe impl Send for RawComm {}

enum State {
    /// Before `ncclCommInitRankConfig` has returned a handle.
    Forming,
    Live(RawComm),
    /// Aborted, with why; the handle is gone.
    Broken(String),
}

/// What the comm thread and the abort handle share.
struct Shared {
    ctx: Arc<CudaContext>,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state as it was; go on with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the live handle, under the lock.
    fn with_comm<T>(&self, f: impl FnOnce(CommHandle) -> T) -> std::result::Result<T, String> {
        match &*self.lock() {
            State::Live(c) => Ok(f(c.0)),
            State::Broken(why) => Err(format!("the group broke earlier: {why}")),
            State::Forming => Err("the group has not formed".into()),
        }
    }

    /// Aborts the communicator, ending its kernels on the device, unless that happened
    /// already; records why.
    fn abort(&self, why: &str) {
        let mut state = self.lock();
        match std::mem::replace(&mut *state, State::Broken(why.to_string())) {
            State::Live(comm) => {
                // NCCL finds the device through the calling thread's context.
                let _ = self.ctx.bind_to_thread();
                if let Ok(api) = api() {
                    // SAFETY: the handle is live and, under the lock, no other call on it
                    // is in progress; it is not used again (the state is now Broken).
                    let status = unsafe { (api.abort)(comm.0) };
                    if status != SUCCESS {
                        tracing::warn!("ncclCommAbort: {}", describe(status));
                    }
                }
            }
            State::Broken(earlier) => *state = State::Broken(earlier),
            State::Forming => {}
        }
    }

    /// The communicator's asynchronous state: `SUCCESS`, `IN_PROGRESS`, or an error.
    fn async_state(&self, api: &Api) -> std::result::Result<c_int, String> {
        self.with_comm(|comm| {
            let mut state = SUCCESS;
            // SAFETY: the handle is live (held under the lock); one int is written.
            let status = unsafe { (api.get_async_error)(comm, &mut state) };
            if status == SUCCESS {
                state
            } else {
                status
            }
        })
    }

    /// Polls until the communicator's last call is no longer in progress; aborts it on an
    /// error or at `deadline`.
    fn settle(
        &self,
        api: &Api,
        deadline: Instant,
        late: impl Fn() -> String,
    ) -> std::result::Result<(), String> {
        let mut polls = 0;
        loop {
            match self.async_state(api)? {
                SUCCESS => return Ok(()),
                IN_PROGRESS => {}
                error => return Err(self.fail(api, describe(error))),
            }
            if Instant::now() >= deadline {
                let why = late();
                self.abort(&why);
                return Err(why);
            }
            pause(&mut polls);
        }
    }

    /// Aborts the communicator for `why`, adding NCCL's own account; returns the message.
    fn fail(&self, api: &Api, why: String) -> String {
        let why = format!("{why}{}", last_error(api));
        self.abort(&why);
        why
    }

    /// Makes one NCCL call on the live handle and waits until NCCL has taken it (a
    /// nonblocking communicator may answer `ncclInProgress`).
    fn call(
        &self,
        api: &Api,
        timeout: Duration,
        f: impl FnOnce(CommHandle) -> c_int,
    ) -> std::result::Result<(), String> {
        match self.with_comm(f)? {
            SUCCESS => Ok(()),
            IN_PROGRESS => self.settle(api, Instant::now() + timeout, || {
                format!("NCCL did not take the operation within {timeout:?}")
            }),
            error => Err(self.fail(api, describe(error))),
        }
    }

    /// Waits until everything queued on `stream` so far has run; fails (and aborts the
    /// group) on an NCCL error, an abort, or after `timeout`.
    fn wait(
        &self,
        api: &Api,
        stream: &CudaStream,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let done = stream
            .record_event(None)
            .map_err(|e| driver("recording an event", e))?;
        let deadline = Instant::now() + timeout;
        let mut polls = 0;
        loop {
            let complete = done
                .try_is_complete()
                .map_err(|e| self.fail(api, driver("the stream failed", e)))?;
            // Checked after the stream: an abort also lets the stream run on, over
            // kernels it cut short, and that must not pass for a finished operation.
            match self.async_state(api)? {
                SUCCESS | IN_PROGRESS => {}
                error => return Err(self.fail(api, describe(error))),
            }
            if complete {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let why = format!("timed out after {timeout:?} waiting for the group's peers");
                self.abort(&why);
                return Err(why);
            }
            pause(&mut polls);
        }
    }
}

fn pause(polls: &mut u32) {
    if *polls < SPIN_POLLS {
        *polls += 1;
        std::thread::yield_now();
    } else {
        std::thread::sleep(POLL_SLEEP);
    }
}

/// Ends an [`NcclComm`]'s operations from outside the thread that uses it.
#[derive(Clone)]
pub struct NcclAbort {
    shared: Arc<Shared>,
}

impl NcclAbort {
    /// Aborts the communicator (`ncclCommAbort`): NCCL kernels waiting on a peer that
    /// will never answer end, the streams behind them move on, and every later operation
    /// of the group fails. Blocks until NCCL has torn the communicator down.
    pub fn abort(&self) {
        self.shared.abort("aborted from outside the group");
    }
}

impl fmt::Debug for NcclAbort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NcclAbort")
    }
}

/// Operations on device buffers, enqueued on the caller's stream.
#[derive(Debug, Clone, Copy)]
enum DeviceOp {
    AllReduceSum,
    Send(usize),
    Recv(usize),
}

/// Operations on host buffers (the [`Collective`] trait).
#[derive(Debug, Clone, Copy)]
enum HostOp {
    AllReduceSum,
    AllGather,
    Send(usize),
    Recv(usize),
    Barrier,
}

type Reply<T> = Sender<std::result::Result<T, String>>;

enum Job {
    Device {
        op: DeviceOp,
        ptr: CUdeviceptr,
        count: usize,
        dtype: NcclDtype,
        stream: Arc<CudaStream>,
        reply: Reply<()>,
    },
    Wait {
        stream: Arc<CudaStream>,
        reply: Reply<()>,
    },
    Host {
        op: HostOp,
        data: Vec<f32>,
        reply: Reply<Vec<f32>>,
    },
}

/// One rank of an NCCL group; see the module documentation for its thread, streams and
/// abort.
///
/// Dropping it aborts the communicator on its thread (it never waits for a peer) and
/// lets the thread end; it does not join it.
pub struct NcclComm {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
    jobs: Sender<Job>,
}

impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("device", &self.shared.ctx.ordinal())
            .finish_non_exhaustive()
    }
}

impl NcclComm {
    /// Joins the group `spec` names on the device of `ctx`; blocks until every rank has
    /// joined, or fails once `spec.timeout` passes (the half-made communicator aborted).
    pub fn connect(ctx: Arc<CudaContext>, spec: &NcclGroupSpec) -> Result<NcclComm> {
        spec.validate()?;
        require_library()?;
        let (rank, world) = (spec.rank, spec.world_size);
        let shared = Arc::new(Shared {
            ctx,
            state: Mutex::new(State::Forming),
        });
        let (formed_tx, formed) = sync_channel(1);
        let (jobs, queue) = channel();
        let thread_shared = shared.clone();
        let thread_spec = spec.clone();
        std::thread::Builder::new()
            .name(format!("nccl-{rank}-of-{world}"))
            .spawn(move || serve(thread_shared, thread_spec, formed_tx, queue))
            .map_err(|e| {
                RuntimeError::Collective(format!("starting the NCCL thread of rank {rank}: {e}"))
            })?;
        let outcome = formed
            .recv()
            .unwrap_or_else(|_| Err("the NCCL thread stopped while forming the group".into()));
        outcome.map_err(|why| {
            RuntimeError::Collective(format!(
                "rank {rank} joining an NCCL group of {world}: {why}"
            ))
        })?;
        Ok(NcclComm {
            rank,
            world,
            shared,
            jobs,
        })
    }

    /// A handle that aborts this communicator from another thread.
    pub fn abort_handle(&self) -> NcclAbort {
        NcclAbort {
            shared: self.shared.clone(),
        }
    }

    /// The CUDA device the communicator's rank runs on.
    pub fn ordinal(&self) -> usize {
        self.shared.ctx.ordinal()
    }

    /// Sums `buf` over the group, in place, enqueued on `stream` (which must belong to
    /// the communicator's device). Returns once enqueued; the sum is in `buf` for work
    /// queued on `stream` after this call.
    pub fn all_reduce_sum_in_place<T: NcclElement>(
        &mut self,
        buf: &mut impl DevicePtrMut<T>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let count = buf.len();
        if self.world == 1 || count == 0 {
            return Ok(());
        }
        let (ptr, _written) = buf.device_ptr_mut(stream);
        // SAFETY: cudarc made `stream` wait for earlier work on `buf`; the pointer is
        // valid for `count` elements of `T` and stays allocated until the work now queued
        // on `stream` has run (`_written` records it as a write of `buf` when dropped,
        // after the call, and cudarc frees a buffer only after its recorded work).
        unsafe { self.device_raw(DeviceOp::AllReduceSum, ptr, count, T::DTYPE, stream) }
    }

    /// Sends `buf` to `peer`, enqueued on `stream`; pairs with the peer's
    /// [`NcclComm::recv_device`] of the same length. The transfer runs when both sides'
    /// streams reach it: two ranks that both send to each other before receiving on one
    /// stream wait for each other forever.
    pub fn send_device<T: NcclElement>(
        &mut self,
        peer: usize,
        buf: &impl DevicePtr<T>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let (ptr, _read) = buf.device_ptr(stream);
        // SAFETY: as in `all_reduce_sum_in_place`; NCCL only reads the buffer.
        unsafe { self.send_raw(peer, ptr, buf.len(), T::DTYPE, stream) }
    }

    /// Receives `buf.len()` elements from `peer` into `buf`, enqueued on `stream`.
    pub fn recv_device<T: NcclElement>(
        &mut self,
        peer: usize,
        buf: &mut impl DevicePtrMut<T>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let count = buf.len();
        let (ptr, _written) = buf.device_ptr_mut(stream);
        // SAFETY: as in `all_reduce_sum_in_place`.
        unsafe { self.recv_raw(peer, ptr, count, T::DTYPE, stream) }
    }

    /// [`NcclComm::all_reduce_sum_in_place`] on a raw device pointer, for buffers that
    /// are not cudarc views.
    ///
    /// # Safety
    /// `ptr` must address `count` elements of `dtype` in device memory of this
    /// communicator's device, stay allocated until the work queued on `stream` now has
    /// run, and not be touched meanwhile by work that `stream` does not order.
    pub unsafe fn all_reduce_sum_raw(
        &mut self,
        ptr: CUdeviceptr,
        count: usize,
        dtype: NcclDtype,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        if self.world == 1 || count == 0 {
            return Ok(());
        }
        // SAFETY: the caller's contract is this function's.
        unsafe { self.device_raw(DeviceOp::AllReduceSum, ptr, count, dtype, stream) }
    }

    /// [`NcclComm::send_device`] on a raw device pointer, for buffers that are not
    /// cudarc views.
    ///
    /// # Safety
    /// As [`NcclComm::all_reduce_sum_raw`]; NCCL only reads the buffer.
    pub unsafe fn send_raw(
        &mut self,
        peer: usize,
        ptr: CUdeviceptr,
        count: usize,
        dtype: NcclDtype,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        // SAFETY: the caller's contract is this function's.
        unsafe { self.device_raw(DeviceOp::Send(peer), ptr, count, dtype, stream) }
    }

    /// [`NcclComm::recv_device`] on a raw device pointer, for buffers that are not
    /// cudarc views.
    ///
    /// # Safety
    /// As [`NcclComm::all_reduce_sum_raw`].
    pub unsafe fn recv_raw(
        &mut self,
        peer: usize,
        ptr: CUdeviceptr,
        count: usize,
        dtype: NcclDtype,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        // SAFETY: the caller's contract is this function's.
        unsafe { self.device_raw(DeviceOp::Recv(peer), ptr, count, dtype, stream) }
    }

    /// Waits on the host until everything queued on `stream` so far has run. Use it
    /// instead of a plain `synchronize` wherever the stream carries this group's
    /// operations: a plain one waits forever behind a kernel whose peer is dead, and once
    /// an abort has ended such kernels it returns as if they had finished, leaving
    /// whatever they had written. This one fails on an NCCL error, after an abort, or
    /// after the group's I/O timeout (aborting the group).
    pub fn synchronize(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        self.request("synchronize", |reply| Job::Wait {
            stream: stream.clone(),
            reply,
        })
    }

    /// Enqueues `op` on `stream` unless it is empty, after checking a send's or a
    /// receive's peer.
    ///
    /// # Safety
    /// See [`NcclComm::all_reduce_sum_raw`].
    unsafe fn device_raw(
        &mut self,
        op: DeviceOp,
        ptr: CUdeviceptr,
        count: usize,
        dtype: NcclDtype,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let what = match op {
            DeviceOp::AllReduceSum => "all_reduce_sum",
            DeviceOp::Send(_) => "send",
            DeviceOp::Recv(_) => "recv",
        };
        if let DeviceOp::Send(peer) | DeviceOp::Recv(peer) = op {
            self.check_peer(what, peer)?;
        }
        if count == 0 {
            return Ok(());
        }
        self.request(what, |reply| Job::Device {
            op,
            ptr,
            count,
            dtype,
            stream: stream.clone(),
            reply,
        })
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

    /// Hands a job to the comm thread and waits for its answer.
    fn request<T>(&self, what: &str, job: impl FnOnce(Reply<T>) -> Job) -> Result<T> {
        let (reply, answer) = channel();
        let fail = |why: String| {
            RuntimeError::Collective(format!(
                "NCCL {what} (rank {} of {}): {why}",
                self.rank, self.world
            ))
        };
        self.jobs
            .send(job(reply))
            .map_err(|_| fail("the communicator's thread has stopped".into()))?;
        answer
            .recv()
            .map_err(|_| fail("the communicator's thread has stopped".into()))?
            .map_err(fail)
    }

    fn host(&self, what: &str, op: HostOp, data: Vec<f32>) -> Result<Vec<f32>> {
        self.request(what, |reply| Job::Host { op, data, reply })
    }
}

impl Collective for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// Copies `buf` to the device, sums it over the group, and copies it back.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        if self.world == 1 || buf.is_empty() {
            return Ok(());
        }
        let summed = self.host("all_reduce_sum", HostOp::AllReduceSum, buf.to_vec())?;
        buf.copy_from_slice(&summed);
        Ok(())
    }

    /// Unlike the TCP group, NCCL does not compare the ranks' lengths: every rank must
    /// pass the same length.
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>> {
        if self.world == 1 || local.is_empty() {
            return Ok(local.repeat(self.world));
        }
        self.host("all_gather", HostOp::AllGather, local.to_vec())
    }

    /// Returns once the peer has received the data.
    fn send(&mut self, peer: usize, data: &[f32]) -> Result<()> {
        self.check_peer("send", peer)?;
        if data.is_empty() {
            return Ok(());
        }
        self.host("send", HostOp::Send(peer), data.to_vec())
            .map(|_| ())
    }

    fn recv(&mut self, peer: usize, out: &mut [f32]) -> Result<()> {
        self.check_peer("recv", peer)?;
        if out.is_empty() {
            return Ok(());
        }
        let got = self.host("recv", HostOp::Recv(peer), vec![0.0; out.len()])?;
        out.copy_from_slice(&got);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        self.host("barrier", HostOp::Barrier, vec![0.0]).map(|_| ())
    }

    fn nccl(&mut self) -> Option<&mut NcclComm> {
        Some(self)
    }
}

/// The comm thread: forms the group, reports how that went, then serves jobs until the
/// handle is dropped, and aborts the communicator.
fn serve(
    shared: Arc<Shared>,
    spec: NcclGroupSpec,
    formed: std::sync::mpsc::SyncSender<std::result::Result<(), String>>,
    jobs: Receiver<Job>,
) {
    let outcome = form(&shared, &spec);
    let ok = outcome.is_ok();
    let _ = formed.send(outcome);
    if !ok {
        return;
    }
    let mut server = Server {
        shared: shared.clone(),
        world: spec.world_size,
        io_timeout: spec.io_timeout,
        host_stream: None,
    };
    for job in jobs {
        server.run(job);
    }
    shared.abort("the rank's communicator was dropped");
}

/// Creates the communicator and waits for every rank to join.
fn form(shared: &Shared, spec: &NcclGroupSpec) -> std::result::Result<(), String> {
    let api = api()?;
    shared
        .ctx
        .bind_to_thread()
        .map_err(|e| driver("binding the device's context", e))?;
    let mut config = nonblocking_config();
    let id = ncclUniqueId {
        internal: spec.id.as_bytes().map(|b| b as c_char),
    };
    let mut comm: CommHandle = std::ptr::null_mut();
    // SAFETY: `comm` and `config` are valid for the call and `config` is initialised as
    // NCCL requires; the rank and world size fit an int (checked by `validate`); the
    // device's context is current, which is how NCCL picks the device.
    let status = unsafe {
        (api.init_rank_config)(
            &mut comm,
            spec.world_size as c_int,
            id,
            spec.rank as c_int,
            &mut config,
        )
    };
    if !comm.is_null() {
        let mut state = shared.lock();
        match &*state {
            State::Forming => *state = State::Live(RawComm(comm)),
            // Aborted before the handle existed: abort the handle now.
            _ => {
                drop(state);
                // SAFETY: the handle was just made and nothing else holds it.
                unsafe { (api.abort)(comm) };
                return Err("aborted while forming".into());
            }
        }
    }
    match status {
        SUCCESS | IN_PROGRESS if !comm.is_null() => {}
        SUCCESS | IN_PROGRESS => return Err("NCCL returned no communicator".into()),
        error => return Err(shared.fail(api, describe(error))),
    }
    shared.settle(api, Instant::now() + spec.timeout, || {
        format!(
            "timed out after {:?} waiting for every rank to join",
            spec.timeout
        )
    })
}

/// The comm thread's side of a formed communicator.
struct Server {
    shared: Arc<Shared>,
    world: usize,
    io_timeout: Duration,
    /// The stream of the host-buffer operations, made on first use.
    host_stream: Option<Arc<CudaStream>>,
}

impl Server {
    fn run(&mut self, job: Job) {
        match job {
            Job::Device {
                op,
                ptr,
                count,
                dtype,
                stream,
                reply,
            } => {
                let _ = reply.send(self.device(op, ptr, count, dtype, &stream));
            }
            Job::Wait { stream, reply } => {
                let _ = reply.send(self.wait(&stream));
            }
            Job::Host { op, data, reply } => {
                let _ = reply.send(self.host(op, data));
            }
        }
    }

    fn same_device(&self, stream: &CudaStream) -> std::result::Result<(), String> {
        if stream.context().as_ref() == self.shared.ctx.as_ref() {
            Ok(())
        } else {
            Err(format!(
                "the stream belongs to GPU {}'s context, the communicator to GPU {}'s",
                stream.context().ordinal(),
                self.shared.ctx.ordinal()
            ))
        }
    }

    fn device(
        &self,
        op: DeviceOp,
        ptr: CUdeviceptr,
        count: usize,
        dtype: NcclDtype,
        stream: &CudaStream,
    ) -> std::result::Result<(), String> {
        let api = api()?;
        self.same_device(stream)?;
        let s = stream.cu_stream() as *mut c_void;
        let (buf, dt) = (ptr as *mut c_void, dtype.raw());
        self.shared.call(api, self.io_timeout, |comm| {
            // SAFETY: the handle is live (held under the lock); `buf` meets the contract
            // of `NcclComm::all_reduce_sum_raw`, which the caller upheld; `s` is a stream
            // of the communicator's context (checked above), kept alive by the caller's
            // `Arc` until this job is answered.
            unsafe {
                match op {
                    DeviceOp::AllReduceSum => (api.all_reduce)(buf, buf, count, dt, SUM, comm, s),
                    DeviceOp::Send(peer) => (api.send)(buf, count, dt, peer as c_int, comm, s),
                    DeviceOp::Recv(peer) => (api.recv)(buf, count, dt, peer as c_int, comm, s),
                }
            }
        })
    }

    fn wait(&self, stream: &CudaStream) -> std::result::Result<(), String> {
        let api = api()?;
        self.same_device(stream)?;
        self.shared.wait(api, stream, self.io_timeout)
    }

    fn host_stream(&mut self) -> std::result::Result<Arc<CudaStream>, String> {
        if let Some(s) = &self.host_stream {
            return Ok(s.clone());
        }
        let s = self
            .shared
            .ctx
            .new_stream()
            .map_err(|e| driver("making the host operations' stream", e))?;
        self.host_stream = Some(s.clone());
        Ok(s)
    }

    /// Copies `data` in, runs `op` on the communicator's own stream, waits for it, and
    /// copies the result out.
    fn host(&mut self, op: HostOp, mut data: Vec<f32>) -> std::result::Result<Vec<f32>, String> {
        let api = api()?;
        // A broken group's stream may still hold the operation that broke it: touch
        // nothing of it.
        self.shared.with_comm(|_| ())?;
        let stream = self.host_stream()?;
        let s = stream.cu_stream() as *mut c_void;
        let len = data.len();
        let f32_type = NcclDtype::F32.raw();
        let mut buf = stream
            .clone_htod(&data)
            .map_err(|e| driver("copying to the device", e))?;
        let mut gathered = match op {
            HostOp::AllGather => Some(
                stream
                    .alloc_zeros::<f32>(len * self.world)
                    .map_err(|e| driver("allocating device memory", e))?,
            ),
            _ => None,
        };
        {
            let (src, _src_used) = buf.device_ptr_mut(&stream);
            let src = src as *mut c_void;
            let dst_used = gathered.as_mut().map(|g| g.device_ptr_mut(&stream));
            let dst = dst_used
                .as_ref()
                .map_or(std::ptr::null_mut(), |(p, _)| *p as *mut c_void);
            self.shared.call(api, self.io_timeout, |comm| {
                // SAFETY: the handle is live (held under the lock); `src` holds `len`
                // f32s and, for an all-gather, `dst` holds `len × world`; both were
                // allocated on `stream` and are kept until the wait below has seen the
                // operation finish.
                unsafe {
                    match op {
                        HostOp::AllReduceSum | HostOp::Barrier => {
                            (api.all_reduce)(src, src, len, f32_type, SUM, comm, s)
                        }
                        HostOp::AllGather => (api.all_gather)(src, dst, len, f32_type, comm, s),
                        HostOp::Send(peer) => {
                            (api.send)(src, len, f32_type, peer as c_int, comm, s)
                        }
                        HostOp::Recv(peer) => {
                            (api.recv)(src, len, f32_type, peer as c_int, comm, s)
                        }
                    }
                }
            })?;
        }
        self.shared.wait(api, &stream, self.io_timeout)?;
        match (op, gathered) {
            (HostOp::AllGather, Some(all)) => {
                let mut out = vec![0f32; len * self.world];
                stream
                    .memcpy_dtoh(&all, &mut out)
                    .map_err(|e| driver("copying from the device", e))?;
                data = out;
            }
            (HostOp::AllReduceSum | HostOp::Recv(_), _) => stream
                .memcpy_dtoh(&buf, &mut data)
                .map_err(|e| driver("copying from the device", e))?,
            _ => {}
        }
        stream
            .synchronize()
            .map_err(|e| driver("finishing the copy", e))?;
        Ok(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(rank: usize, world_size: usize) -> NcclGroupSpec {
        NcclGroupSpec {
            rank,
            world_size,
            id: NcclId::from([1; NCCL_ID_BYTES]),
            timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_spec_needs_a_rank_below_the_world_and_real_timeouts() {
        spec(0, 1).validate().unwrap();
        spec(1, 2).validate().unwrap();
        for (bad, why) in [
            (spec(2, 2), "below the world size"),
            (spec(0, 0), "world size"),
            (
                NcclGroupSpec {
                    timeout: Duration::ZERO,
                    ..spec(0, 2)
                },
                "timeout",
            ),
            (
                NcclGroupSpec {
                    io_timeout: Duration::ZERO,
                    ..spec(0, 2)
                },
                "timeout",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        let shown = format!("{:?}", spec(0, 2));
        assert!(!shown.contains("id"), "{shown}");
    }

    #[test]
    fn the_config_asks_for_a_nonblocking_communicator_and_leaves_the_rest_to_nccl() {
        let c = nonblocking_config();
        assert_eq!(c.size, std::mem::size_of::<ncclConfig_t>());
        assert_eq!(c.magic, 0xcafebeef);
        assert_eq!(c.version, 23000);
        assert_eq!(c.blocking, 0);
        for undefined in [
            c.cgaClusterSize,
            c.minCTAs,
            c.maxCTAs,
            c.splitShare,
            c.maxP2pPeers,
        ] {
            assert_eq!(undefined, i32::MIN);
        }
        assert!(c.netName.is_null() && c.commName.is_null());
    }

    #[test]
    fn versions_and_statuses_read_as_words() {
        assert_eq!(dotted(23007), "2.30.7");
        assert_eq!(dotted(MIN_NCCL_VERSION), "2.18.0");
        assert!(describe(6).contains("peer"));
        assert!(describe(2).contains("system call"));
        assert_eq!(describe(42), "NCCL error 42");
        assert_eq!(NcclDtype::F32.raw(), 7);
        assert_eq!(NcclDtype::Bf16.raw(), 9);
        assert_eq!(NcclDtype::F16.raw(), 6);
    }

    /// The seam the CUDA backend uses answers only for an NCCL group.
    #[test]
    fn other_collectives_have_no_nccl_communicator() {
        let mut group = crate::collective::local_group(1);
        assert!(group[0].nccl().is_none());
    }

    /// Where libnccl is present, ids are 128 bytes and two are never the same.
    #[test]
    fn ids_are_unique_where_nccl_is_present() {
        if !library_present() {
            let e = require_library().unwrap_err().to_string();
            assert!(e.contains("NCCL"), "{e}");
            return;
        }
        println!("libnccl {}", require_library().unwrap());
        match (new_unique_id(), new_unique_id()) {
            (Ok(a), Ok(b)) => assert_ne!(a, b),
            // A machine with libnccl but no usable network or driver: an error, not a panic.
            (Err(e), _) | (_, Err(e)) => println!("no id here: {e}"),
        }
    }

    /// Contexts of the first `n` GPUs, or `None` (saying why) where this machine cannot
    /// run an NCCL group of `n` GPUs in one process.
    fn gpus(n: usize) -> Option<Vec<Arc<CudaContext>>> {
        use crate::cuda::probe::{open_device, Library};
        if !Library::Driver.is_present() || !library_present() {
            println!("skipped: needs the CUDA driver and libnccl");
            return None;
        }
        match CudaContext::device_count() {
            Ok(count) if count as usize >= n => {}
            _ => {
                println!("skipped: needs {n} GPUs");
                return None;
            }
        }
        (0..n)
            .map(|i| open_device(i).map(|(ctx, _)| ctx))
            .collect::<Result<Vec<_>>>()
            .map_err(|e| println!("skipped: {e}"))
            .ok()
    }

    fn join_group(ctx: &Arc<CudaContext>, rank: usize, id: NcclId) -> NcclComm {
        let spec = NcclGroupSpec {
            rank,
            world_size: 2,
            id,
            timeout: Duration::from_secs(60),
            io_timeout: Duration::from_secs(60),
        };
        NcclComm::connect(ctx.clone(), &spec).unwrap()
    }

    /// Two GPUs as the two ranks of a group (skipped with fewer): sums of f32 and bf16
    /// device buffers on the caller's stream, the host methods, a device send and
    /// receive, a barrier.
    #[test]
    fn two_gpus_reduce_and_exchange() {
        let Some(ctxs) = gpus(2) else { return };
        let id = new_unique_id().unwrap();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> = ctxs
                .iter()
                .enumerate()
                .map(|(rank, ctx)| {
                    s.spawn(move || {
                        let mut comm = join_group(ctx, rank, id);
                        let stream = ctx.new_stream().unwrap();
                        let mut buf = stream.clone_htod(&vec![(rank + 1) as f32; 1000]).unwrap();
                        // Work queued before the reduce produces its input.
                        stream.memset_zeros(&mut buf).unwrap();
                        stream
                            .memcpy_htod(&vec![(rank + 1) as f32 * 2.0; 1000], &mut buf)
                            .unwrap();
                        comm.all_reduce_sum_in_place(&mut buf, &stream).unwrap();
                        let mut halves = stream
                            .clone_htod(&vec![half::bf16::from_f32(1.5); 64])
                            .unwrap();
                        comm.all_reduce_sum_in_place(&mut halves, &stream).unwrap();
                        comm.synchronize(&stream).unwrap();
                        let sums = stream.clone_dtoh(&buf).unwrap();
                        let halves = stream.clone_dtoh(&halves).unwrap();
                        let mut host = vec![rank as f32 + 0.5; 7];
                        comm.all_reduce_sum(&mut host).unwrap();
                        let gathered = comm.all_gather(&[rank as f32; 3]).unwrap();
                        let received = if rank == 0 {
                            let src = stream.clone_htod(&[1.0f32, 2.0, 3.0]).unwrap();
                            comm.send_device(1, &src, &stream).unwrap();
                            comm.synchronize(&stream).unwrap();
                            Vec::new()
                        } else {
                            let mut dst = stream.alloc_zeros::<f32>(3).unwrap();
                            comm.recv_device(0, &mut dst, &stream).unwrap();
                            comm.synchronize(&stream).unwrap();
                            stream.clone_dtoh(&dst).unwrap()
                        };
                        comm.barrier().unwrap();
                        (sums, halves, host, gathered, received)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (rank, (sums, halves, host, gathered, received)) in results.into_iter().enumerate() {
            assert!(
                sums.iter().all(|&v| v == 6.0),
                "rank {rank}: {:?}",
                &sums[..4]
            );
            assert!(halves.iter().all(|v| v.to_f32() == 3.0), "rank {rank}");
            assert_eq!(host, vec![2.0; 7], "rank {rank}");
            assert_eq!(gathered, [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], "rank {rank}");
            if rank == 1 {
                assert_eq!(received, [1.0, 2.0, 3.0]);
            }
        }
    }

    /// A rank whose peer never joins the all-reduce waits until the abort handle ends it,
    /// from another thread, and every later operation fails (skipped with fewer than two
    /// GPUs).
    #[test]
    fn two_gpus_an_abort_ends_a_wait_on_a_silent_peer() {
        let Some(ctxs) = gpus(2) else { return };
        let id = new_unique_id().unwrap();
        let (mut waiting, silent) = std::thread::scope(|s| {
            let a = s.spawn(|| join_group(&ctxs[0], 0, id));
            let b = s.spawn(|| join_group(&ctxs[1], 1, id));
            (a.join().unwrap(), b.join().unwrap())
        });
        let abort = waiting.abort_handle();
        let stream = ctxs[0].new_stream().unwrap();
        let started = Instant::now();
        let blocked = std::thread::spawn(move || {
            let mut buf = stream.clone_htod(&vec![1.0f32; 1 << 20]).unwrap();
            waiting.all_reduce_sum_in_place(&mut buf, &stream).unwrap();
            let first = waiting.synchronize(&stream).unwrap_err().to_string();
            let later = waiting.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
            (first, later)
        });
        std::thread::sleep(Duration::from_millis(500));
        abort.abort();
        let (first, later) = blocked.join().unwrap();
        assert!(first.contains("aborted"), "{first}");
        assert!(later.contains("broke earlier"), "{later}");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{:?}",
            started.elapsed()
        );
        drop(silent);
    }
}
