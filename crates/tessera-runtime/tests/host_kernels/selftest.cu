// Kernels with deliberate bugs, compiled into the emulator next to the real ones (and not
// listed in sources.rs): the self-test expects the emulator to report every one of them.
// Each takes one float buffer of 64 elements per block.

#define SELFTEST_LAUNCHER(name)                                                          \
    static void launch_##name(const cuda_emu::LaunchConfig& cfg, void** params) {        \
        float* const out = *static_cast<float**>(params[0]);                              \
        cuda_emu::launch(#name, cfg, [=] { name(out); });                                 \
    }                                                                                     \
    static cuda_emu::Registration register_##name(#name, &launch_##name);

// One thread returns before a barrier the others wait at.
extern "C" __global__ void selftest_early_return(float* out) {
    if (threadIdx.x == 5) {
        return;
    }
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = 1.0f;
}
SELFTEST_LAUNCHER(selftest_early_return)

// The two halves of the block wait at different barriers.
extern "C" __global__ void selftest_divergent_barrier(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[blockIdx.x * 64 + threadIdx.x] = 1.0f;
}
SELFTEST_LAUNCHER(selftest_divergent_barrier)

// Reads a neighbour's shared-memory write without a barrier in between.
extern "C" __global__ void selftest_missing_barrier(float* out) {
    __shared__ float values[64];
    values[threadIdx.x] = (float)threadIdx.x + 1.0f;
    out[blockIdx.x * 64 + threadIdx.x] = values[(threadIdx.x + 1) % 64];
}
SELFTEST_LAUNCHER(selftest_missing_barrier)

// Writes one element past the end of its buffer.
extern "C" __global__ void selftest_out_of_bounds(float* out) {
    out[blockIdx.x * 64 + threadIdx.x + 1] = 1.0f;
}
SELFTEST_LAUNCHER(selftest_out_of_bounds)

// Uses more dynamic shared memory than the launch asked for.
extern "C" __global__ void selftest_shared_overflow(float* out) {
    float* scratch = reinterpret_cast<float*>(dynamic_smem);
    scratch[threadIdx.x] = 1.0f;
    __syncthreads();
    out[blockIdx.x * 64 + threadIdx.x] = scratch[63 - threadIdx.x];
}
SELFTEST_LAUNCHER(selftest_shared_overflow)

// Only half of a warp reaches a full-warp shuffle.
extern "C" __global__ void selftest_half_warp_shuffle(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 2 == 0) {
        v = __shfl_xor_sync(0xffffffffu, v, 1);
    }
    out[blockIdx.x * 64 + threadIdx.x] = v;
}
SELFTEST_LAUNCHER(selftest_half_warp_shuffle)
