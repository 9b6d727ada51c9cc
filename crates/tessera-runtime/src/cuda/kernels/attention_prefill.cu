// Causal attention of a step's new tokens over the paged KV cache (prefill and chunked
// prefill), flash-attention style.
//
// A block owns PF_BLOCK_Q query rows of one (sequence, head). It streams the sequence's
// cached positions PF_BLOCK_K at a time through shared memory (gathered through the block
// table) and keeps a running max, sum and weighted value sum per row (online softmax), so
// the scores never leave the chip. Warp w owns rows 4w .. 4w+3 of the tile; within a warp,
// lane j scores position j of the tile and owns head dimensions lane + 32·c of the output.
#include "common.cuh"

#define PF_BLOCK_Q 16u
#define PF_BLOCK_K 32u
#define PF_ROWS_PER_WARP 4u
#define PF_CHUNKS (TESSERA_MAX_HEAD_DIM / 32u)

// Elements per K row of the shared tile: an odd number of 32-bit words, so the 32 lanes,
// each reading its own row, hit 32 different banks (sources.rs: prefill_k_stride).
__device__ __forceinline__ u32 prefill_k_stride(u32 head_dim) {
    u32 words = (head_dim + 1u) / 2u;
    if ((words & 1u) == 0u) {
        words += 1u;
    }
    return 2u * words;
}

template <class T>
__device__ __forceinline__ void attention_prefill_tile(T* out, const T* qkv, const T* k_cache, const T* v_cache,
                                                       const u32* block_tables, const u32* seq_rows,
                                                       const u32* seq_start_pos, u32 num_seqs, u32 heads,
                                                       u32 head_dim, u32 block_size, u32 table_stride,
                                                       float scale) {
    const u32 seq = blockIdx.z;
    const u32 head = blockIdx.y;
    if (seq >= num_seqs) {
        return;
    }
    const u32 row_begin = seq_rows[seq];
    const u32 new_rows = seq_rows[seq + 1u] - row_begin;
    const u32 q_first = blockIdx.x * PF_BLOCK_Q;
    if (q_first >= new_rows) {
        return;
    }
    const u32 q_count = umin32(PF_BLOCK_Q, new_rows - q_first);
    const u32 start_pos = seq_start_pos[seq];
    // Positions any row of this tile attends to: [0, kv_len).
    const u32 kv_len = start_pos + q_first + q_count;
    const u32 width = heads * head_dim;
    const u64 head_offset = (u64)head * head_dim;
    const u32* table = block_tables + (u64)seq * table_stride;
    const u32 k_stride = prefill_k_stride(head_dim);

    float* probs = reinterpret_cast<float*>(dynamic_smem);  // [PF_BLOCK_Q][PF_BLOCK_K]
    T* q_tile = reinterpret_cast<T*>(dynamic_smem + 4u * PF_BLOCK_Q * PF_BLOCK_K);  // [PF_BLOCK_Q][head_dim]
    T* k_tile = q_tile + PF_BLOCK_Q * head_dim;  // [PF_BLOCK_K][k_stride]
    T* v_tile = k_tile + PF_BLOCK_K * k_stride;  // [PF_BLOCK_K][head_dim]

    const u32 tid = threadIdx.x;
    const u32 lane = lane_id();
    const u32 first_row = warp_id() * PF_ROWS_PER_WARP;

    for (u32 i = tid; i < PF_BLOCK_Q * head_dim; i += blockDim.x) {
        const u32 r = i / head_dim;
        const u32 d = i - r * head_dim;
        q_tile[i] = r < q_count ? qkv[(u64)(row_begin + q_first + r) * 3u * width + head_offset + d] : zero_elem<T>();
    }

    bool active[PF_ROWS_PER_WARP];
    u32 q_pos[PF_ROWS_PER_WARP];
    float row_max[PF_ROWS_PER_WARP];
    float row_sum[PF_ROWS_PER_WARP];
    float acc[PF_ROWS_PER_WARP][PF_CHUNKS];
#pragma unroll
    for (u32 r = 0; r < PF_ROWS_PER_WARP; ++r) {
        active[r] = first_row + r < q_count;
        q_pos[r] = start_pos + q_first + first_row + r;
        row_max[r] = neg_inf();
        row_sum[r] = 0.0f;
#pragma unroll
        for (u32 c = 0; c < PF_CHUNKS; ++c) {
            acc[r][c] = 0.0f;
        }
    }

    for (u32 tile = 0; tile < kv_len; tile += PF_BLOCK_K) {
        // The previous tile's readers are done with k_tile, v_tile and probs.
        __syncthreads();
        for (u32 i = tid; i < PF_BLOCK_K * head_dim; i += blockDim.x) {
            const u32 j = i / head_dim;
            const u32 d = i - j * head_dim;
            const u32 pos = tile + j;
            T k = zero_elem<T>();
            T v = zero_elem<T>();
            if (pos < kv_len) {
                const u64 slot = (u64)table[pos / block_size] * block_size + pos % block_size;
                const u64 at = slot * width + head_offset + d;
                k = k_cache[at];
                v = v_cache[at];
            }
            k_tile[j * k_stride + d] = k;
            v_tile[j * head_dim + d] = v;
        }
        __syncthreads();

        // Scores of position `tile + lane` against the warp's rows.
        const u32 pos = tile + lane;
        const T* k_row = k_tile + lane * k_stride;
        float dot[PF_ROWS_PER_WARP];
#pragma unroll
        for (u32 r = 0; r < PF_ROWS_PER_WARP; ++r) {
            dot[r] = 0.0f;
        }
        for (u32 d = 0; d < head_dim; ++d) {
            const float k = to_float(k_row[d]);
#pragma unroll
            for (u32 r = 0; r < PF_ROWS_PER_WARP; ++r) {
                dot[r] += to_float(q_tile[(first_row + r) * head_dim + d]) * k;
            }
        }
#pragma unroll
        for (u32 r = 0; r < PF_ROWS_PER_WARP; ++r) {
            const bool visible = active[r] && pos <= q_pos[r];
            const float score = visible ? dot[r] * scale : neg_inf();
            const float new_max = fmaxf(row_max[r], warp_max(score));
            const float p = visible ? expf(score - new_max) : 0.0f;
            const float alpha = row_max[r] == neg_inf() ? 0.0f : expf(row_max[r] - new_max);
            row_sum[r] = row_sum[r] * alpha + warp_sum(p);
            row_max[r] = new_max;
            probs[(first_row + r) * PF_BLOCK_K + lane] = p;
#pragma unroll
            for (u32 c = 0; c < PF_CHUNKS; ++c) {
                acc[r][c] *= alpha;
            }
        }
        __syncwarp();

        // Weighted values: lane owns dimensions lane + 32·c.
        const u32 count = umin32(PF_BLOCK_K, kv_len - tile);
        for (u32 j = 0; j < count; ++j) {
            const T* v_row = v_tile + j * head_dim;
            float p[PF_ROWS_PER_WARP];
#pragma unroll
            for (u32 r = 0; r < PF_ROWS_PER_WARP; ++r) {
                p[r] = probs[(first_row + r) * PF_BLOCK_K + j];
            }
#pragma unroll
            for (u32 c = 0; c < PF_CHUNKS; ++c) {
                const u32 d = lane + 32u * c;
                if (d < head_dim) {
                    const float v = to_float(v_row[d]);
#pragma unroll
                    for (u32 r = 0; r < PF_ROWS_PER_WARP; ++r) {
                        acc[r][c] += p[r] * v;
                    }
                }
            }
        }
    }

#pragma unroll
    for (u32 r = 0; r < PF_ROWS_PER_WARP; ++r) {
        if (active[r]) {
            const float inv = 1.0f / row_sum[r];
            T* dst = out + (u64)(row_begin + q_first + first_row + r) * width + head_offset;
#pragma unroll
            for (u32 c = 0; c < PF_CHUNKS; ++c) {
                const u32 d = lane + 32u * c;
                if (d < head_dim) {
                    dst[d] = from_float<T>(acc[r][c] * inv);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) attention_prefill_bf16(bf16* out, const bf16* qkv, const bf16* k_cache, const bf16* v_cache, const unsigned int* block_tables, const unsigned int* seq_rows, const unsigned int* seq_start_pos, unsigned int num_seqs, unsigned int heads, unsigned int head_dim, unsigned int block_size, unsigned int table_stride, float scale) {
    attention_prefill_tile<bf16>(out, qkv, k_cache, v_cache, block_tables, seq_rows, seq_start_pos, num_seqs, heads, head_dim, block_size, table_stride, scale);
}

extern "C" __global__ void __launch_bounds__(128) attention_prefill_f16(f16* out, const f16* qkv, const f16* k_cache, const f16* v_cache, const unsigned int* block_tables, const unsigned int* seq_rows, const unsigned int* seq_start_pos, unsigned int num_seqs, unsigned int heads, unsigned int head_dim, unsigned int block_size, unsigned int table_stride, float scale) {
    attention_prefill_tile<f16>(out, qkv, k_cache, v_cache, block_tables, seq_rows, seq_start_pos, num_seqs, heads, head_dim, block_size, table_stride, scale);
}
