// This rank's part of distributed sampling over a vocab-parallel LM head: per row, the
// record `tessera_runtime::sampling::local_record` builds on the CPU, bit for bit in every
// field but the two sums of exponentials (f32 sums in another order). The ranks' records
// are all-gathered and combined on the host.
//
// Record of a row (floats): raw max, raw sum-exp, processed max, processed sum-exp (both 0
// unless scaled_stats), candidate count, then `candidates` slots of (score, token id, raw
// logit), best first: higher score, then lower id; unused slots are (-inf, -1, 0).
#include "common.cuh"

// Per-row input; sources.rs mirrors it as SampleRowParams (eleven 32-bit words).
struct SampleRowParams {
    float temperature;
    float repetition_penalty;
    unsigned int seed_lo;
    unsigned int seed_hi;
    unsigned int position;
    unsigned int mode;
    unsigned int candidates;
    unsigned int scaled_stats;
    unsigned int penalty_begin;
    unsigned int penalty_end;
    unsigned int record_offset;
};

#define SAMPLE_GREEDY 0u
#define SAMPLE_FULL 1u
#define SAMPLE_TOP 2u

// Selection key of logit i for the top candidates: the processed logit in total order in
// the high word, the inverted index in the low word, so that a larger key is a better
// candidate (higher score, then lower id) and no two keys are equal.
__device__ __forceinline__ u64 top_key(float z, u32 i) {
    return ((u64)float_order_key(z) << 32) | (u64)(0xffffffffu - i);
}

// Max and sum of exp(v - max) of a row, written to record[0..2].
template <class Load>
__device__ __forceinline__ void max_sumexp(Load load, u32 n, float* scratch, float* record) {
    float m = neg_inf();
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = load(i);
        if (v > m) {
            m = v;
        }
    }
    m = block_max(m, scratch);
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        s += expf(load(i) - m);
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0u) {
        record[0] = m;
        record[1] = s;
    }
}

// Sorts `count` selection keys, stored as (high, low) word pairs, best first. A bitonic
// network whose comparators all point the same way, so the positions past `count` act as
// worst-possible padding and are never touched.
__device__ __forceinline__ void sort_keys_descending(u32* words, u32 count) {
    u32 size = 1u;
    while (size < count) {
        size <<= 1;
    }
    const u32 pairs = size / 2u;
    for (u32 k = 2u; k <= size; k <<= 1) {
        for (u32 j = k; j >= 2u; j >>= 1) {
            const u32 half = j / 2u;
            for (u32 t = threadIdx.x; t < pairs; t += blockDim.x) {
                u32 a, b;
                if (j == k) {
                    // First stage of a merge: compare mirrored positions of the k-block.
                    const u32 base = (t / half) * k;
                    const u32 off = t % half;
                    a = base + off;
                    b = base + k - 1u - off;
                } else {
                    a = (t / half) * j + t % half;
                    b = a + half;
                }
                if (b < count) {
                    const u64 ka = ((u64)words[2u * a] << 32) | words[2u * a + 1u];
                    const u64 kb = ((u64)words[2u * b] << 32) | words[2u * b + 1u];
                    if (kb > ka) {
                        words[2u * a] = (u32)(kb >> 32);
                        words[2u * a + 1u] = (u32)kb;
                        words[2u * b] = (u32)(ka >> 32);
                        words[2u * b + 1u] = (u32)ka;
                    }
                }
            }
            __syncthreads();
        }
    }
}

template <class T>
__device__ __forceinline__ void sample_stats_row(float* records, float* scratch, const T* logits,
                                                 const SampleRowParams* params, const u32* penalty_ids, u32 rows,
                                                 u32 n, u32 first_id) {
    __shared__ float reduce_scratch[32];
    __shared__ u64 best_keys[32];
    __shared__ u32 best_indices[32];
    __shared__ u32 histogram[256];
    __shared__ u32 selection[4];

    const u32 row = blockIdx.x;
    if (row >= rows) {
        return;
    }
    const u32 tid = threadIdx.x;
    const SampleRowParams prm = params[row];
    const T* x = logits + (u64)row * n;
    float* z = scratch + (u64)row * n;
    float* record = records + prm.record_offset;
    const bool greedy = prm.mode == SAMPLE_GREEDY;

    // Processed logits: the repetition penalty on the row's ids, then the temperature
    // (not when greedy), each an IEEE-rounded f32 operation as on the CPU.
    for (u32 i = tid; i < n; i += blockDim.x) {
        float v = to_float(x[i]);
        if (!greedy) {
            v = __fdiv_rn(v, prm.temperature);
        }
        z[i] = v;
    }
    __syncthreads();
    if (prm.repetition_penalty != 1.0f) {
        for (u32 k = prm.penalty_begin + tid; k < prm.penalty_end; k += blockDim.x) {
            const u32 id = penalty_ids[k];
            if (id >= first_id && id - first_id < n) {
                float v = to_float(x[id - first_id]);
                v = v < 0.0f ? __fmul_rn(v, prm.repetition_penalty) : __fdiv_rn(v, prm.repetition_penalty);
                if (!greedy) {
                    v = __fdiv_rn(v, prm.temperature);
                }
                z[id - first_id] = v;
            }
        }
        __syncthreads();
    }

    max_sumexp([&](u32 i) { return to_float(x[i]); }, n, reduce_scratch, record);
    if (prm.scaled_stats != 0u) {
        max_sumexp([&](u32 i) { return z[i]; }, n, reduce_scratch, record + 2);
    } else if (tid == 0u) {
        record[2] = 0.0f;
        record[3] = 0.0f;
    }

    float* slots = record + 5;
    if (prm.mode == SAMPLE_GREEDY || prm.mode == SAMPLE_FULL) {
        // One candidate: the first maximum of the processed logits (NaNs skipped, ±0
        // equal), or the Gumbel-max token in f64 (higher score, then lower id).
        u64 key = 0ull;
        u32 index = 0xffffffffu;
        const u64 row_key = gumbel_row_key(((u64)prm.seed_hi << 32) | prm.seed_lo, prm.position);
        for (u32 i = tid; i < n; i += blockDim.x) {
            u64 k;
            if (greedy) {
                const float v = z[i];
                k = v != v ? 0ull : (u64)float_order_key(v == 0.0f ? 0.0f : v);
            } else {
                k = double_order_key(__dadd_rn((double)z[i], gumbel_noise_of(row_key, first_id + i)));
            }
            if (beats(k, i, key, index)) {
                key = k;
                index = i;
            }
        }
        block_best(key, index, best_keys, best_indices);
        if (tid == 0u) {
            float score;
            if (greedy) {
                // No non-NaN logit: the CPU reports -inf for token first_id.
                score = key == 0ull ? neg_inf() : z[index];
                if (key == 0ull) {
                    index = 0u;
                }
            } else {
                score = __double2float_rn(__dadd_rn((double)z[index], gumbel_noise_of(row_key, first_id + index)));
            }
            record[4] = 1.0f;
            slots[0] = score;
            slots[1] = (float)(first_id + index);
            slots[2] = to_float(x[index]);
        }
        for (u32 c = 1u + tid; c < prm.candidates; c += blockDim.x) {
            slots[3u * c] = neg_inf();
            slots[3u * c + 1u] = -1.0f;
            slots[3u * c + 2u] = 0.0f;
        }
        return;
    }

    // Top candidates. Radix-select the `take`-th largest key, 8 bits per pass from the
    // top, narrowing to the keys that share the prefix chosen so far; stop as soon as the
    // bucket holding the boundary is taken whole. The kept set is then every key whose top
    // `bits` bits are at least the prefix's: exactly `take` keys.
    const u32 take = umin32(prm.candidates, n);
    if (take == 0u) {
        if (tid == 0u) {
            record[4] = 0.0f;
        }
        return;
    }
    u64 prefix = 0ull;
    u32 bits = 0u;
    u32 need = take;
    for (;;) {
        const u32 shift = 56u - bits;
        for (u32 b = tid; b < 256u; b += blockDim.x) {
            histogram[b] = 0u;
        }
        __syncthreads();
        for (u32 i = tid; i < n; i += blockDim.x) {
            const u64 k = top_key(z[i], i);
            if (bits == 0u || (k >> (64u - bits)) == (prefix >> (64u - bits))) {
                atomicAdd(&histogram[(u32)(k >> shift) & 255u], 1u);
            }
        }
        __syncthreads();
        if (tid == 0u) {
            u32 above = 0u;
            u32 digit = 255u;
            for (;;) {
                if (above + histogram[digit] >= need || digit == 0u) {
                    break;
                }
                above += histogram[digit];
                digit -= 1u;
            }
            const u32 still = need - above;
            selection[0] = digit;
            selection[1] = still;
            selection[2] = histogram[digit] == still ? 1u : 0u;
        }
        __syncthreads();
        prefix |= (u64)selection[0] << shift;
        need = selection[1];
        bits += 8u;
        const bool done = selection[2] != 0u;
        __syncthreads();
        if (done) {
            break;
        }
    }

    // Gather the kept keys into the record's slot area (two words each; 2·take <= 3·slots),
    // sort them there, then expand them in place into (score, id, raw logit) triples.
    u32* words = reinterpret_cast<u32*>(slots);
    if (tid == 0u) {
        selection[3] = 0u;
    }
    __syncthreads();
    for (u32 i = tid; i < n; i += blockDim.x) {
        const u64 k = top_key(z[i], i);
        if ((k >> (64u - bits)) >= (prefix >> (64u - bits))) {
            const u32 at = atomicAdd(&selection[3], 1u);
            words[2u * at] = (u32)(k >> 32);
            words[2u * at + 1u] = (u32)k;
        }
    }
    __syncthreads();
    sort_keys_descending(words, take);

    // Back to front, a block's worth at a time: the triples of entries >= base only cover
    // words >= 3·base >= 2·base, where no unread key is left.
    for (u32 base = (take - 1u) / blockDim.x * blockDim.x;; base -= blockDim.x) {
        const u32 i = base + tid;
        u32 low = 0u;
        if (i < take) {
            low = words[2u * i + 1u];
        }
        __syncthreads();
        if (i < take) {
            const u32 index = 0xffffffffu - low;
            slots[3u * i] = z[index];
            slots[3u * i + 1u] = (float)(first_id + index);
            slots[3u * i + 2u] = to_float(x[index]);
        }
        __syncthreads();
        if (base == 0u) {
            break;
        }
    }
    for (u32 c = take + tid; c < prm.candidates; c += blockDim.x) {
        slots[3u * c] = neg_inf();
        slots[3u * c + 1u] = -1.0f;
        slots[3u * c + 2u] = 0.0f;
    }
    if (tid == 0u) {
        record[4] = (float)take;
    }
}

extern "C" __global__ void __launch_bounds__(512) sample_stats_bf16(float* records, float* scratch, const bf16* logits, const SampleRowParams* params, const unsigned int* penalty_ids, unsigned int rows, unsigned int vocab, unsigned int first_id) {
    sample_stats_row<bf16>(records, scratch, logits, params, penalty_ids, rows, vocab, first_id);
}

extern "C" __global__ void __launch_bounds__(512) sample_stats_f16(float* records, float* scratch, const f16* logits, const SampleRowParams* params, const unsigned int* penalty_ids, unsigned int rows, unsigned int vocab, unsigned int first_id) {
    sample_stats_row<f16>(records, scratch, logits, params, penalty_ids, rows, vocab, first_id);
}

// The noise sample_stats adds, for ids first_id .. first_id + n at one (seed, position).
extern "C" __global__ void __launch_bounds__(256) gumbel_noise(double* out, unsigned long long seed, unsigned int position, unsigned int first_id, unsigned int n) {
    const u64 row_key = gumbel_row_key(seed, position);
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = gumbel_noise_of(row_key, first_id + (u32)i);
    }
}
