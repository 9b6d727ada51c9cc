// Token and position embeddings of stage 0.
#include "common.cuh"

// Vocab-parallel gather: this rank holds table rows [first_id, first_id + table_rows);
// other ids give zero rows, which the TP all-reduce fills from the owning rank.
template <class T>
__device__ __forceinline__ void embed_rows(T* out, const T* table, const u32* ids, u32 rows, u32 cols,
                                           u32 first_id, u32 table_rows) {
    const u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const u32 id = ids[row];
    T* dst = out + (u64)row * cols;
    if (id >= first_id && id - first_id < table_rows) {
        const T* src = table + (u64)(id - first_id) * cols;
        for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
            dst[c] = src[c];
        }
    } else {
        for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
            dst[c] = zero_elem<T>();
        }
    }
}

// x[i] += table[positions[i]], the sum rounded once.
template <class T>
__device__ __forceinline__ void add_position_rows(T* x, const T* table, const u32* positions, u32 rows,
                                                  u32 cols) {
    const u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    T* dst = x + (u64)row * cols;
    const T* src = table + (u64)positions[row] * cols;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        dst[c] = from_float<T>(to_float(dst[c]) + to_float(src[c]));
    }
}

extern "C" __global__ void __launch_bounds__(256) embed_bf16(bf16* out, const bf16* table, const unsigned int* ids, unsigned int rows, unsigned int cols, unsigned int first_id, unsigned int table_rows) {
    embed_rows<bf16>(out, table, ids, rows, cols, first_id, table_rows);
}

extern "C" __global__ void __launch_bounds__(256) embed_f16(f16* out, const f16* table, const unsigned int* ids, unsigned int rows, unsigned int cols, unsigned int first_id, unsigned int table_rows) {
    embed_rows<f16>(out, table, ids, rows, cols, first_id, table_rows);
}

extern "C" __global__ void __launch_bounds__(256) add_positions_bf16(bf16* x, const bf16* table, const unsigned int* positions, unsigned int rows, unsigned int cols) {
    add_position_rows<bf16>(x, table, positions, rows, cols);
}

extern "C" __global__ void __launch_bounds__(256) add_positions_f16(f16* x, const f16* table, const unsigned int* positions, unsigned int rows, unsigned int cols) {
    add_position_rows<f16>(x, table, positions, rows, cols);
}
