// Writes a step's new K and V rows into the paged cache.
#include "common.cuh"

// Row i of qkv is [q | k | v], each heads · head_dim wide; its k and v go to cache slot
// slots[i] (block · block_size + offset in the block) of the layer's K and V storage, laid
// out [slot][heads · head_dim].
template <class T>
__device__ __forceinline__ void write_kv_rows(T* k_cache, T* v_cache, const T* qkv, const u32* slots, u32 rows,
                                              u32 heads, u32 head_dim) {
    const u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const u32 width = heads * head_dim;
    const T* src = qkv + (u64)row * 3u * width;
    const u64 dst = (u64)slots[row] * width;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
        k_cache[dst + c] = src[width + c];
        v_cache[dst + c] = src[2u * width + c];
    }
}

extern "C" __global__ void __launch_bounds__(256) write_kv_bf16(bf16* k_cache, bf16* v_cache, const bf16* qkv, const unsigned int* slots, unsigned int rows, unsigned int heads, unsigned int head_dim) {
    write_kv_rows<bf16>(k_cache, v_cache, qkv, slots, rows, heads, head_dim);
}

extern "C" __global__ void __launch_bounds__(256) write_kv_f16(f16* k_cache, f16* v_cache, const f16* qkv, const unsigned int* slots, unsigned int rows, unsigned int heads, unsigned int head_dim) {
    write_kv_rows<f16>(k_cache, v_cache, qkv, slots, rows, heads, head_dim);
}
