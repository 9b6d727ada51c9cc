// Host emulation of the CUDA built-ins Tessera's kernels use, so the unmodified `.cu`
// sources compile with a C++17 compiler (`-x c++ -include cuda_emu.h`) and run on the CPU.
//
// Execution model:
// - A launch runs every block of the grid, each on a fresh OS thread (up to
//   CUDA_EMU_THREADS or the core count at a time). `__shared__` is `thread_local`, so a
//   block's static shared memory is its own and starts zeroed; the dynamic shared memory
//   (`dynamic_smem`, declared by common.cuh) is filled with 0xff bytes (NaN, -1) before the
//   block runs, and the bytes past the launch's `shared_bytes` are checked afterwards.
// - The threads of a block are fibers (ucontext) run one at a time by a scheduler. A fiber
//   runs until `__syncthreads`, a warp-synchronous call (`__shfl_*_sync`, `__syncwarp`,
//   votes) or its end, and resumes once every thread of its block (or lane of its warp)
//   has arrived. Even blocks resume their fibers in thread order, odd blocks in reverse, so
//   a read of another thread's write without a barrier between them gives a wrong result
//   in one of the two. Memory is otherwise always coherent inside a block; what the emulator
//   checks is the synchronisation itself: a barrier some thread never reaches (an early
//   return, a divergent branch) or threads meeting at different barrier calls is reported
//   with the kernel, block and thread, instead of silently passing.
// - Shuffles exchange values through per-warp slots; masks must name every lane of the
//   warp (partial-warp masks are not emulated and are reported).
// - Floating point is the host's IEEE arithmetic without contraction (compile with
//   -ffp-contract=off); math functions are the host libm's, so transcendental results may
//   differ from CUDA's in the last bits. The *_rn intrinsics are exact equivalents.
//
// Limits: blocks run one after another per OS thread, so inter-block communication
// through global memory inside one launch (spin-waits on other blocks) is not supported;
// cooperative groups, textures, `__constant__` banks, clock and printf formatting
// differences are not emulated.
#ifndef TESSERA_CUDA_EMU_H
#define TESSERA_CUDA_EMU_H

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ---- Qualifiers --------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local

namespace cuda_emu {

// Per-block limits of the devices Tessera targets (without an opt-in for more shared memory).
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kSharedBytesLimit = 48 * 1024;
constexpr size_t kFiberStackBytes = 64 * 1024;

struct uint3 {
    unsigned int x, y, z;
};

struct LaunchConfig {
    unsigned grid[3];
    unsigned block[3];
    unsigned shared_bytes;
};

enum class FiberState { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

// Where in the kernel source a barrier or warp-synchronous call is.
struct Site {
    const char* file;
    int line;
    bool operator==(const Site& o) const {
        return line == o.line && (file == o.file || std::strcmp(file, o.file) == 0);
    }
    bool operator!=(const Site& o) const { return !(*this == o); }
};

struct Fiber {
    ucontext_t context;
    uint3 thread_idx;
    unsigned linear;
    FiberState state;
    unsigned long long wait_generation;
    Site waiting_at;
    unsigned shuffles;
};

struct Warp {
    unsigned lanes;
    unsigned arrived;
    unsigned long long generation;
    Site site;
    unsigned long long slots[2][32];
};

struct Block {
    const char* kernel;
    uint3 block_idx;
    uint3 block_dim;
    uint3 grid_dim;
    unsigned threads;
    Fiber* current;
    ucontext_t scheduler;
    std::vector<Fiber> fibers;
    unsigned arrived;
    unsigned long long generation;
    Site site;
    Warp warps[kMaxThreadsPerBlock / 32];
    const std::function<void()>* body;
    // Resume fibers from the last thread down (odd blocks), so a missing barrier between a
    // write and another thread's read shows in one of the two orders.
    bool reverse;
};

inline thread_local Block* tls_block = nullptr;

// Reports a misuse or fault in the running kernel and ends the process.
[[noreturn]] inline void fail(const char* format, ...) {
    char message[1024];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    const Block* b = tls_block;
    if (b != nullptr) {
        const uint3 t = b->current != nullptr ? b->current->thread_idx : uint3{0, 0, 0};
        fprintf(stderr, "cuda_emu: %s block (%u,%u,%u) thread (%u,%u,%u): %s\n", b->kernel, b->block_idx.x,
                b->block_idx.y, b->block_idx.z, t.x, t.y, t.z, message);
    } else {
        fprintf(stderr, "cuda_emu: %s\n", message);
    }
    fflush(stderr);
    _exit(3);
}

inline void yield_to_scheduler(Block& b, Fiber& f) { swapcontext(&f.context, &b.scheduler); }

// Every thread of the block meets here, at the same source line unless the barrier is
// divergent.
inline void block_barrier(Site site) {
    Block& b = *tls_block;
    Fiber& f = *b.current;
    f.waiting_at = site;
    if (b.arrived == 0) {
        b.site = site;
    } else if (b.site != site) {
        fail("divergent barrier: this thread is at __syncthreads in %s:%d, others at %s:%d", site.file, site.line,
             b.site.file, b.site.line);
    }
    if (++b.arrived == b.threads) {
        b.arrived = 0;
        ++b.generation;
        return;
    }
    f.state = FiberState::AtBlockBarrier;
    f.wait_generation = b.generation;
    yield_to_scheduler(b, f);
}

inline Warp& warp_of(Block& b, const Fiber& f) { return b.warps[f.linear / 32]; }

inline void check_mask(const Warp& w, unsigned mask) {
    const unsigned present = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
    if ((mask & present) != present) {
        fail("warp-synchronous call with mask %08x leaves out present lanes %08x (partial-warp masks are not emulated)",
             mask, present);
    }
}

inline void warp_barrier(Site site) {
    Block& b = *tls_block;
    Fiber& f = *b.current;
    Warp& w = warp_of(b, f);
    f.waiting_at = site;
    if (w.arrived == 0) {
        w.site = site;
    } else if (w.site != site) {
        fail("divergent warp %u: this lane is at a warp-synchronous call in %s:%d, others at %s:%d", f.linear / 32,
             site.file, site.line, w.site.file, w.site.line);
    }
    if (++w.arrived == w.lanes) {
        w.arrived = 0;
        ++w.generation;
        return;
    }
    f.state = FiberState::AtWarpBarrier;
    f.wait_generation = w.generation;
    yield_to_scheduler(b, f);
}

enum class ShuffleKind { Index, Up, Down, Xor };

// Deposits this lane's value, waits for the warp, reads the source lane's. Two slot sets
// alternate: a lane can only reuse a set after every lane has passed the exchange between.
template <class T>
T warp_exchange(Site site, unsigned mask, T value, ShuffleKind kind, int arg, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled type");
    Block& b = *tls_block;
    Fiber& f = *b.current;
    Warp& w = warp_of(b, f);
    check_mask(w, mask);
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
        fail("shuffle width %d is not a power of two up to 32", width);
    }
    const int lane = (int)(f.linear % 32);
    const unsigned set = f.shuffles++ & 1u;
    unsigned long long bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    w.slots[set][lane] = bits;
    warp_barrier(site);
    const int segment = lane & ~(width - 1);
    int source = lane;
    switch (kind) {
        case ShuffleKind::Index:
            source = segment + (arg & (width - 1));
            break;
        case ShuffleKind::Up:
            source = lane - arg >= segment ? lane - arg : lane;
            break;
        case ShuffleKind::Down:
            source = lane + arg < segment + width ? lane + arg : lane;
            break;
        case ShuffleKind::Xor:
            source = lane ^ arg;
            if (source >= segment + width) {
                source = lane;
            }
            break;
    }
    if (source < 0 || source >= (int)w.lanes) {
        fail("shuffle reads lane %d, which the block does not have", source);
    }
    T out;
    std::memcpy(&out, &w.slots[set][source], sizeof(T));
    return out;
}

// Predicates of every lane of the warp, as a ballot.
inline unsigned warp_vote(Site site, unsigned mask, int predicate) {
    Block& b = *tls_block;
    Fiber& f = *b.current;
    Warp& w = warp_of(b, f);
    check_mask(w, mask);
    const unsigned set = f.shuffles++ & 1u;
    w.slots[set][f.linear % 32] = predicate != 0 ? 1u : 0u;
    warp_barrier(site);
    unsigned ballot = 0;
    for (unsigned l = 0; l < w.lanes; ++l) {
        ballot |= (unsigned)(w.slots[set][l] & 1u) << l;
    }
    return ballot & mask;
}

inline void fiber_entry() {
    Block* b = tls_block;
    (*b->body)();
    b->current->state = FiberState::Done;
    // Returning resumes uc_link: the scheduler.
}

// Fiber stacks, each below a guard page, reused across blocks.
class StackPool {
   public:
    static StackPool& get() {
        static StackPool pool;
        return pool;
    }
    unsigned char* take() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!free_.empty()) {
            unsigned char* region = free_.back();
            free_.pop_back();
            return region;
        }
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        const size_t stride = kFiberStackBytes + page;
        void* p = mmap(nullptr, stride * kMaxThreadsPerBlock, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) {
            fail("cannot map fiber stacks");
        }
        unsigned char* region = static_cast<unsigned char*>(p);
        for (unsigned i = 0; i < kMaxThreadsPerBlock; ++i) {
            mprotect(region + i * stride, page, PROT_NONE);
        }
        return region;
    }
    void give(unsigned char* region) {
        std::lock_guard<std::mutex> lock(mutex_);
        free_.push_back(region);
    }
    static unsigned char* stack(unsigned char* region, unsigned i) {
        const size_t page = (size_t)sysconf(_SC_PAGESIZE);
        return region + i * (kFiberStackBytes + page) + page;
    }

   private:
    std::mutex mutex_;
    std::vector<unsigned char*> free_;
};

inline void run_block(Block& b) {
    unsigned char* region = StackPool::get().take();
    b.fibers.assign(b.threads, Fiber{});
    for (unsigned w = 0; w < (b.threads + 31) / 32; ++w) {
        b.warps[w] = Warp{};
        b.warps[w].lanes = b.threads - 32 * w < 32 ? b.threads - 32 * w : 32;
    }
    const unsigned bx = b.block_dim.x, by = b.block_dim.y;
    for (unsigned i = 0; i < b.threads; ++i) {
        Fiber& f = b.fibers[i];
        f.thread_idx = uint3{i % bx, (i / bx) % by, i / (bx * by)};
        f.linear = i;
        f.state = FiberState::Runnable;
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = StackPool::stack(region, i);
        f.context.uc_stack.ss_size = kFiberStackBytes;
        f.context.uc_link = &b.scheduler;
        makecontext(&f.context, fiber_entry, 0);
    }
    for (;;) {
        bool ran = false;
        unsigned done = 0, at_block = 0, at_warp = 0;
        for (unsigned k = 0; k < b.threads; ++k) {
            Fiber& f = b.fibers[b.reverse ? b.threads - 1 - k : k];
            switch (f.state) {
                case FiberState::Done:
                    ++done;
                    continue;
                case FiberState::AtBlockBarrier:
                    if (b.generation == f.wait_generation) {
                        ++at_block;
                        continue;
                    }
                    break;
                case FiberState::AtWarpBarrier:
                    if (warp_of(b, f).generation == f.wait_generation) {
                        ++at_warp;
                        continue;
                    }
                    break;
                case FiberState::Runnable:
                    break;
            }
            f.state = FiberState::Runnable;
            b.current = &f;
            swapcontext(&b.scheduler, &f.context);
            b.current = nullptr;
            ran = true;
        }
        if (done == b.threads) {
            break;
        }
        if (!ran) {
            Site where{"?", 0};
            for (const Fiber& f : b.fibers) {
                if (f.state != FiberState::Done) {
                    where = f.waiting_at;
                    break;
                }
            }
            fail("deadlock: %u threads wait at __syncthreads, %u at warp-synchronous calls (e.g. %s:%d), %u have "
                 "returned (a barrier not reached by every thread)",
                 at_block, at_warp, where.file, where.line, done);
        }
    }
    StackPool::get().give(region);
}

}  // namespace cuda_emu

// The block's dynamic shared memory; common.cuh declares it `extern __shared__`.
alignas(16) inline thread_local unsigned char dynamic_smem[cuda_emu::kSharedBytesLimit];

namespace cuda_emu {

inline void on_fault(int sig, siginfo_t* info, void*) {
    char message[512];
    const Block* b = tls_block;
    int n;
    if (b != nullptr && b->current != nullptr) {
        const uint3 t = b->current->thread_idx;
        n = snprintf(message, sizeof message,
                     "cuda_emu: %s block (%u,%u,%u) thread (%u,%u,%u): signal %d at address %p (out-of-bounds "
                     "access or fiber stack overflow)\n",
                     b->kernel, b->block_idx.x, b->block_idx.y, b->block_idx.z, t.x, t.y, t.z, sig, info->si_addr);
    } else {
        n = snprintf(message, sizeof message, "cuda_emu: signal %d at address %p outside a kernel\n", sig,
                     info->si_addr);
    }
    if (write(2, message, (size_t)n) < 0) {
        // Nothing else to do in a signal handler.
    }
    _exit(4);
}

inline void install_fault_handler() {
    static std::once_flag once;
    std::call_once(once, [] {
        struct sigaction sa;
        std::memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigaction(SIGSEGV, &sa, nullptr);
        sigaction(SIGBUS, &sa, nullptr);
        sigaction(SIGFPE, &sa, nullptr);
    });
}

constexpr unsigned char kSharedPoison = 0xff;
constexpr unsigned char kSharedCanary = 0xa5;

inline unsigned parallel_blocks() {
    if (const char* env = getenv("CUDA_EMU_THREADS")) {
        const int n = atoi(env);
        if (n > 0) {
            return (unsigned)n;
        }
    }
    const unsigned n = std::thread::hardware_concurrency();
    return n > 0 ? n : 1;
}

inline void run_block_on_this_thread(const char* name, const LaunchConfig& cfg, unsigned long long linear,
                                     const std::function<void()>* body) {
    static thread_local std::vector<unsigned char> alt_stack(64 * 1024);
    stack_t ss;
    ss.ss_sp = alt_stack.data();
    ss.ss_size = alt_stack.size();
    ss.ss_flags = 0;
    sigaltstack(&ss, nullptr);

    std::memset(dynamic_smem, kSharedPoison, cfg.shared_bytes);
    std::memset(dynamic_smem + cfg.shared_bytes, kSharedCanary, kSharedBytesLimit - cfg.shared_bytes);
    Block* block = new Block();
    block->kernel = name;
    block->grid_dim = uint3{cfg.grid[0], cfg.grid[1], cfg.grid[2]};
    block->block_dim = uint3{cfg.block[0], cfg.block[1], cfg.block[2]};
    block->block_idx = uint3{(unsigned)(linear % cfg.grid[0]), (unsigned)(linear / cfg.grid[0] % cfg.grid[1]),
                             (unsigned)(linear / ((unsigned long long)cfg.grid[0] * cfg.grid[1]))};
    block->threads = cfg.block[0] * cfg.block[1] * cfg.block[2];
    block->body = body;
    block->reverse = (linear & 1) != 0;
    tls_block = block;
    run_block(*block);
    for (unsigned i = cfg.shared_bytes; i < kSharedBytesLimit; ++i) {
        if (dynamic_smem[i] != kSharedCanary) {
            fail("wrote dynamic shared memory at byte %u, past the launch's %u bytes", i, cfg.shared_bytes);
        }
    }
    tls_block = nullptr;
    delete block;
}

// Runs `body` as kernel `name` over the grid.
inline void launch(const char* name, const LaunchConfig& cfg, std::function<void()> body) {
    install_fault_handler();
    const unsigned long long threads = (unsigned long long)cfg.block[0] * cfg.block[1] * cfg.block[2];
    if (threads == 0 || threads > kMaxThreadsPerBlock || cfg.block[2] > 64) {
        fail("%s: invalid block (%u,%u,%u)", name, cfg.block[0], cfg.block[1], cfg.block[2]);
    }
    if (cfg.grid[0] == 0 || cfg.grid[1] == 0 || cfg.grid[2] == 0 || cfg.grid[1] > 65535 || cfg.grid[2] > 65535 ||
        cfg.grid[0] > 0x7fffffffu) {
        fail("%s: invalid grid (%u,%u,%u)", name, cfg.grid[0], cfg.grid[1], cfg.grid[2]);
    }
    if (cfg.shared_bytes > kSharedBytesLimit) {
        fail("%s: %u bytes of dynamic shared memory exceed the %u available without an opt-in", name,
             cfg.shared_bytes, kSharedBytesLimit);
    }
    const unsigned long long blocks = (unsigned long long)cfg.grid[0] * cfg.grid[1] * cfg.grid[2];
    const unsigned width = parallel_blocks();
    for (unsigned long long first = 0; first < blocks; first += width) {
        std::vector<std::thread> running;
        for (unsigned long long i = first; i < blocks && i < first + width; ++i) {
            // A fresh thread per block: fresh thread_local (static __shared__) storage.
            running.emplace_back(run_block_on_this_thread, name, std::cref(cfg), i, &body);
        }
        for (std::thread& t : running) {
            t.join();
        }
    }
}

// Kernels by exported name: each takes CUDA-style `kernelParams` (pointers to the values).
using Launcher = void (*)(const LaunchConfig&, void** params);

inline std::map<std::string, Launcher>& registry() {
    static std::map<std::string, Launcher> kernels;
    return kernels;
}

struct Registration {
    Registration(const char* name, Launcher launcher) { registry()[name] = launcher; }
};

}  // namespace cuda_emu

// ---- Built-in variables and functions --------------------------------------------------
#define threadIdx (::cuda_emu::tls_block->current->thread_idx)
#define blockIdx (::cuda_emu::tls_block->block_idx)
#define blockDim (::cuda_emu::tls_block->block_dim)
#define gridDim (::cuda_emu::tls_block->grid_dim)
constexpr int warpSize = 32;

// Barriers and warp-synchronous calls are macros so that each knows its source line.
#define __syncthreads() ::cuda_emu::block_barrier(::cuda_emu::Site{__FILE__, __LINE__})
#define __syncwarp(...) ::cuda_emu::syncwarp(::cuda_emu::Site{__FILE__, __LINE__}, ::cuda_emu::mask_or_full(__VA_ARGS__))
#define __shfl_sync(...) ::cuda_emu::shfl(::cuda_emu::Site{__FILE__, __LINE__}, ::cuda_emu::ShuffleKind::Index, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_emu::shfl(::cuda_emu::Site{__FILE__, __LINE__}, ::cuda_emu::ShuffleKind::Up, __VA_ARGS__)
#define __shfl_down_sync(...) \
    ::cuda_emu::shfl(::cuda_emu::Site{__FILE__, __LINE__}, ::cuda_emu::ShuffleKind::Down, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_emu::shfl(::cuda_emu::Site{__FILE__, __LINE__}, ::cuda_emu::ShuffleKind::Xor, __VA_ARGS__)
#define __ballot_sync(mask, predicate) ::cuda_emu::warp_vote(::cuda_emu::Site{__FILE__, __LINE__}, mask, predicate)
#define __any_sync(mask, predicate) (::cuda_emu::warp_vote(::cuda_emu::Site{__FILE__, __LINE__}, mask, predicate) != 0u)
#define __all_sync(mask, predicate) \
    (::cuda_emu::warp_vote(::cuda_emu::Site{__FILE__, __LINE__}, mask, predicate) == (unsigned)(mask))

namespace cuda_emu {

// `__syncwarp()` means every lane.
inline unsigned mask_or_full(unsigned mask = 0xffffffffu) { return mask; }

inline void syncwarp(Site site, unsigned mask) {
    Block& b = *tls_block;
    check_mask(warp_of(b, *b.current), mask);
    warp_barrier(site);
}

template <class T>
T shfl(Site site, ShuffleKind kind, unsigned mask, T var, int arg, int width = 32) {
    return warp_exchange(site, mask, var, kind, arg, width);
}

}  // namespace cuda_emu

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Atomics are real atomics: blocks of one launch run on several OS threads.
template <class T>
T atomicAdd(T* address, T value) {
    if constexpr (std::is_floating_point<T>::value) {
        T old;
        __atomic_load(address, &old, __ATOMIC_SEQ_CST);
        T desired;
        do {
            desired = old + value;
        } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
        return old;
    } else {
        return __atomic_fetch_add(address, value, __ATOMIC_SEQ_CST);
    }
}

template <class T>
T atomicSub(T* address, T value) {
    return __atomic_fetch_sub(address, value, __ATOMIC_SEQ_CST);
}

template <class T>
T atomicExch(T* address, T value) {
    return __atomic_exchange_n(address, value, __ATOMIC_SEQ_CST);
}

template <class T>
T atomicCAS(T* address, T compare, T value) {
    __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return compare;
}

template <class T>
T atomicMax(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (old < value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}

template <class T>
T atomicMin(T* address, T value) {
    T old = __atomic_load_n(address, __ATOMIC_SEQ_CST);
    while (old > value && !__atomic_compare_exchange_n(address, &old, value, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}

// Bit casts.
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline double __longlong_as_double(long long i) {
    double d;
    std::memcpy(&d, &i, 8);
    return d;
}
inline long long __double_as_longlong(double d) {
    long long i;
    std::memcpy(&i, &d, 8);
    return i;
}

// Correctly rounded operations: the host's IEEE operations (no contraction).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __double2float_rn(double d) { return (float)d; }

// Fast-math variants map to the accurate functions.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// Integer intrinsics.
inline int __clz(unsigned int x) { return x == 0 ? 32 : __builtin_clz(x); }
inline int __clzll(unsigned long long x) { return x == 0 ? 64 : __builtin_clzll(x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }

#endif  // TESSERA_CUDA_EMU_H
