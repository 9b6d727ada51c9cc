// Element-wise kernels after a GEMM: bias + GELU, bias, residual add. Grid-stride loops
// over the flattened tensor with 64-bit indices.
#include "common.cuh"

// GPT-2's gelu_new: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
__device__ __forceinline__ float gelu_new(float x) {
    const float c = 0.7978846f;  // sqrt(2/pi)
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}

__device__ __forceinline__ u64 grid_start() { return (u64)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ u64 grid_step() { return (u64)gridDim.x * blockDim.x; }

template <class T>
__device__ __forceinline__ void bias_gelu_all(T* x, const T* bias, u32 rows, u32 cols) {
    const u64 n = (u64)rows * cols;
    for (u64 i = grid_start(); i < n; i += grid_step()) {
        float v = to_float(x[i]);
        if (bias != nullptr) {
            v += to_float(bias[i % cols]);
        }
        x[i] = from_float<T>(gelu_new(v));
    }
}

template <class T>
__device__ __forceinline__ void add_bias_all(T* x, const T* bias, u32 rows, u32 cols) {
    const u64 n = (u64)rows * cols;
    for (u64 i = grid_start(); i < n; i += grid_step()) {
        x[i] = from_float<T>(to_float(x[i]) + to_float(bias[i % cols]));
    }
}

template <class T>
__device__ __forceinline__ void add_assign_all(T* x, const T* y, u64 n) {
    for (u64 i = grid_start(); i < n; i += grid_step()) {
        x[i] = from_float<T>(to_float(x[i]) + to_float(y[i]));
    }
}

extern "C" __global__ void __launch_bounds__(256) bias_gelu_bf16(bf16* x, const bf16* bias, unsigned int rows, unsigned int cols) {
    bias_gelu_all<bf16>(x, bias, rows, cols);
}

extern "C" __global__ void __launch_bounds__(256) bias_gelu_f16(f16* x, const f16* bias, unsigned int rows, unsigned int cols) {
    bias_gelu_all<f16>(x, bias, rows, cols);
}

extern "C" __global__ void __launch_bounds__(256) add_bias_bf16(bf16* x, const bf16* bias, unsigned int rows, unsigned int cols) {
    add_bias_all<bf16>(x, bias, rows, cols);
}

extern "C" __global__ void __launch_bounds__(256) add_bias_f16(f16* x, const f16* bias, unsigned int rows, unsigned int cols) {
    add_bias_all<f16>(x, bias, rows, cols);
}

extern "C" __global__ void __launch_bounds__(256) add_assign_bf16(bf16* x, const bf16* y, unsigned long long n) {
    add_assign_all<bf16>(x, y, n);
}

extern "C" __global__ void __launch_bounds__(256) add_assign_f16(f16* x, const f16* y, unsigned long long n) {
    add_assign_all<f16>(x, y, n);
}
