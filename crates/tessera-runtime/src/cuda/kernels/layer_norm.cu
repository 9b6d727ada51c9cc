// Fused LayerNorm: one block per row, statistics in f32.
#include "common.cuh"

// Two passes over the row (mean, then the biased variance of the centred values), as the
// CPU backend computes it; the row is re-read from L1/L2 rather than staged.
template <class T>
__device__ __forceinline__ void layer_norm_row(T* out, const T* x, const T* weight, const T* bias, u32 rows,
                                               u32 cols, float eps) {
    __shared__ float scratch[32];
    const u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const T* xr = x + (u64)row * cols;
    T* outr = out + (u64)row * cols;
    const float n = (float)cols;

    float sum = 0.0f;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        sum += to_float(xr[c]);
    }
    const float mean = block_sum(sum, scratch) / n;

    float squares = 0.0f;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = to_float(xr[c]) - mean;
        squares += d * d;
    }
    const float var = block_sum(squares, scratch) / n;
    const float inv = 1.0f / sqrtf(var + eps);

    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float y = (to_float(xr[c]) - mean) * inv * to_float(weight[c]) + to_float(bias[c]);
        outr[c] = from_float<T>(y);
    }
}

extern "C" __global__ void __launch_bounds__(256) layer_norm_bf16(bf16* out, const bf16* x, const bf16* weight, const bf16* bias, unsigned int rows, unsigned int cols, float eps) {
    layer_norm_row<bf16>(out, x, weight, bias, rows, cols, eps);
}

extern "C" __global__ void __launch_bounds__(256) layer_norm_f16(f16* out, const f16* x, const f16* weight, const f16* bias, unsigned int rows, unsigned int cols, float eps) {
    layer_norm_row<f16>(out, x, weight, bias, rows, cols, eps);
}
