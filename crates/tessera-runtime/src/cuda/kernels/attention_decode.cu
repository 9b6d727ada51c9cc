// Attention of single query rows over long cached contexts (decode), split-K style
// (flash-decoding): a row's positions are cut into splits of whole cache blocks, one
// thread block per (split, head, row) reduces its split to a partial (max, sum, weighted
// value sum), and attention_combine merges the partials of a (row, head).
#include "common.cuh"

#define DEC_BLOCK_K 64u

template <class T>
__device__ __forceinline__ void attention_decode_split(float* part_max, float* part_sum, float* part_acc,
                                                       const T* qkv, const T* k_cache, const T* v_cache,
                                                       const u32* block_tables, const u32* row_seq,
                                                       const u32* row_pos, u32 rows, u32 heads, u32 head_dim,
                                                       u32 block_size, u32 table_stride, u32 blocks_per_split,
                                                       u32 num_splits, float scale) {
    __shared__ float scratch[32];
    const u32 split = blockIdx.x;
    const u32 head = blockIdx.y;
    const u32 row = blockIdx.z;
    if (row >= rows || split >= num_splits) {
        return;
    }
    const u32 tid = threadIdx.x;
    const u32 kv_len = row_pos[row] + 1u;
    const u64 span = (u64)blocks_per_split * block_size;
    const u64 begin64 = (u64)split * span;
    const u32 begin = begin64 < kv_len ? (u32)begin64 : kv_len;
    const u32 end = begin64 + span < kv_len ? (u32)(begin64 + span) : kv_len;
    const u64 part = ((u64)row * heads + head) * num_splits + split;
    float* acc_out = part_acc + part * head_dim;
    if (begin >= end) {
        // Past this row's context: a partial that weighs nothing.
        if (tid == 0u) {
            part_max[part] = neg_inf();
            part_sum[part] = 0.0f;
        }
        for (u32 d = tid; d < head_dim; d += blockDim.x) {
            acc_out[d] = 0.0f;
        }
        return;
    }

    u64* offsets = reinterpret_cast<u64*>(dynamic_smem);  // [DEC_BLOCK_K] cache offsets
    float* q = reinterpret_cast<float*>(offsets + DEC_BLOCK_K);  // [head_dim]
    float* acc = q + head_dim;  // [head_dim]
    float* probs = acc + head_dim;  // [DEC_BLOCK_K]

    const u32 width = heads * head_dim;
    const u64 head_offset = (u64)head * head_dim;
    const u32* table = block_tables + (u64)row_seq[row] * table_stride;
    for (u32 d = tid; d < head_dim; d += blockDim.x) {
        q[d] = to_float(qkv[(u64)row * 3u * width + head_offset + d]);
        acc[d] = 0.0f;
    }

    const u32 lane = lane_id();
    float run_max = neg_inf();
    float run_sum = 0.0f;
    for (u32 tile = begin; tile < end; tile += DEC_BLOCK_K) {
        const u32 count = umin32(DEC_BLOCK_K, end - tile);
        // q is loaded, and the previous tile's readers are done with offsets and probs.
        __syncthreads();
        for (u32 j = tid; j < count; j += blockDim.x) {
            const u32 pos = tile + j;
            const u64 slot = (u64)table[pos / block_size] * block_size + pos % block_size;
            offsets[j] = slot * width + head_offset;
        }
        __syncthreads();

        // Scores: warp w takes positions w, w + warps, …; lanes split the dot product.
        for (u32 j = warp_id(); j < DEC_BLOCK_K; j += warps_per_block()) {
            float score = neg_inf();
            if (j < count) {
                const T* k = k_cache + offsets[j];
                float partial = 0.0f;
                for (u32 d = lane; d < head_dim; d += 32u) {
                    partial += q[d] * to_float(k[d]);
                }
                score = warp_sum(partial) * scale;
            }
            if (lane == 0u) {
                probs[j] = score;
            }
        }
        __syncthreads();

        float tile_max = neg_inf();
        for (u32 j = tid; j < DEC_BLOCK_K; j += blockDim.x) {
            tile_max = fmaxf(tile_max, probs[j]);
        }
        const float new_max = fmaxf(run_max, block_max(tile_max, scratch));
        const float alpha = run_max == neg_inf() ? 0.0f : expf(run_max - new_max);
        float tile_sum = 0.0f;
        for (u32 j = tid; j < DEC_BLOCK_K; j += blockDim.x) {
            const float p = j < count ? expf(probs[j] - new_max) : 0.0f;
            probs[j] = p;
            tile_sum += p;
        }
        // block_sum's barriers also publish probs.
        run_sum = run_sum * alpha + block_sum(tile_sum, scratch);
        run_max = new_max;

        for (u32 d = tid; d < head_dim; d += blockDim.x) {
            float a = acc[d] * alpha;
            for (u32 j = 0; j < count; ++j) {
                a += probs[j] * to_float(v_cache[offsets[j] + d]);
            }
            acc[d] = a;
        }
    }

    // Each thread stores the dimensions it accumulated.
    for (u32 d = tid; d < head_dim; d += blockDim.x) {
        acc_out[d] = acc[d];
    }
    if (tid == 0u) {
        part_max[part] = run_max;
        part_sum[part] = run_sum;
    }
}

template <class T>
__device__ __forceinline__ void attention_combine_head(T* out, const float* part_max, const float* part_sum,
                                                       const float* part_acc, u32 rows, u32 heads, u32 head_dim,
                                                       u32 num_splits) {
    const u32 head = blockIdx.x;
    const u32 row = blockIdx.y;
    if (row >= rows || head >= heads) {
        return;
    }
    const u64 base = ((u64)row * heads + head) * num_splits;
    float global_max = neg_inf();
    for (u32 s = 0; s < num_splits; ++s) {
        global_max = fmaxf(global_max, part_max[base + s]);
    }
    float total = 0.0f;
    for (u32 s = 0; s < num_splits; ++s) {
        const float m = part_max[base + s];
        if (m != neg_inf()) {
            total += part_sum[base + s] * expf(m - global_max);
        }
    }
    const float inv = 1.0f / total;
    T* dst = out + (u64)row * heads * head_dim + (u64)head * head_dim;
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (u32 s = 0; s < num_splits; ++s) {
            const float m = part_max[base + s];
            if (m != neg_inf()) {
                o += part_acc[(base + s) * head_dim + d] * expf(m - global_max);
            }
        }
        dst[d] = from_float<T>(o * inv);
    }
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_bf16(float* part_max, float* part_sum, float* part_acc, const bf16* qkv, const bf16* k_cache, const bf16* v_cache, const unsigned int* block_tables, const unsigned int* row_seq, const unsigned int* row_pos, unsigned int rows, unsigned int heads, unsigned int head_dim, unsigned int block_size, unsigned int table_stride, unsigned int blocks_per_split, unsigned int num_splits, float scale) {
    attention_decode_split<bf16>(part_max, part_sum, part_acc, qkv, k_cache, v_cache, block_tables, row_seq, row_pos, rows, heads, head_dim, block_size, table_stride, blocks_per_split, num_splits, scale);
}

extern "C" __global__ void __launch_bounds__(128) attention_decode_f16(float* part_max, float* part_sum, float* part_acc, const f16* qkv, const f16* k_cache, const f16* v_cache, const unsigned int* block_tables, const unsigned int* row_seq, const unsigned int* row_pos, unsigned int rows, unsigned int heads, unsigned int head_dim, unsigned int block_size, unsigned int table_stride, unsigned int blocks_per_split, unsigned int num_splits, float scale) {
    attention_decode_split<f16>(part_max, part_sum, part_acc, qkv, k_cache, v_cache, block_tables, row_seq, row_pos, rows, heads, head_dim, block_size, table_stride, blocks_per_split, num_splits, scale);
}

extern "C" __global__ void __launch_bounds__(128) attention_combine_bf16(bf16* out, const float* part_max, const float* part_sum, const float* part_acc, unsigned int rows, unsigned int heads, unsigned int head_dim, unsigned int num_splits) {
    attention_combine_head<bf16>(out, part_max, part_sum, part_acc, rows, heads, head_dim, num_splits);
}

extern "C" __global__ void __launch_bounds__(128) attention_combine_f16(f16* out, const float* part_max, const float* part_sum, const float* part_acc, unsigned int rows, unsigned int heads, unsigned int head_dim, unsigned int num_splits) {
    attention_combine_head<f16>(out, part_max, part_sum, part_acc, rows, heads, head_dim, num_splits);
}
