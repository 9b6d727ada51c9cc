// Shared definitions of Tessera's CUDA kernels, compiled at run time by NVRTC.
//
// No system or CUDA headers: the 16-bit storage types, their conversions, warp and block
// reductions, and the sampler's integer hash and logarithm are all defined here, so every
// kernel file is one self-contained program and means the same thing on every toolkit.
//
// Conventions: blocks are one-dimensional with blockDim.x a multiple of 32; every thread
// of a block reaches each block-wide helper below (they contain __syncthreads).
#ifndef TESSERA_COMMON_CUH
#define TESSERA_COMMON_CUH

typedef unsigned int u32;
typedef unsigned long long u64;

// Largest head size of the attention kernels (sources.rs: MAX_HEAD_DIM).
#define TESSERA_MAX_HEAD_DIM 256u

// The block's dynamic shared memory: as many bytes as the launch's shared_bytes.
extern __shared__ __align__(16) unsigned char dynamic_smem[];

// ---------------------------------------------------------------------------------------
// 16-bit storage types. Loads widen exactly to f32; stores round to nearest, ties to even.

// bfloat16: the upper half of an f32.
struct bf16 {
    unsigned short bits;
};

// IEEE 754 binary16.
struct f16 {
    unsigned short bits;
};

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }

__device__ __forceinline__ float to_float(bf16 v) { return __uint_as_float((u32)v.bits << 16); }

__device__ __forceinline__ float to_float(f16 v) {
    const u32 sign = ((u32)v.bits & 0x8000u) << 16;
    const u32 exponent = ((u32)v.bits >> 10) & 0x1fu;
    const u32 mantissa = (u32)v.bits & 0x3ffu;
    if (exponent == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (mantissa << 13));
    }
    if (exponent == 0u) {
        // Subnormal or zero: mantissa · 2^-24, exact in f32.
        const float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    return __uint_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

__device__ __forceinline__ bf16 bf16_from_float(float f) {
    u32 u = __float_as_uint(f);
    bf16 out;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        out.bits = (unsigned short)((u >> 16) | 0x40u);  // NaN stays NaN (quiet)
        return out;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    out.bits = (unsigned short)(u >> 16);
    return out;
}

__device__ __forceinline__ f16 f16_from_float(float f) {
    const u32 x = __float_as_uint(f);
    const u32 sign = (x >> 16) & 0x8000u;
    const u32 a = x & 0x7fffffffu;
    f16 out;
    if (a >= 0x7f800000u) {
        // Infinity, or NaN kept quiet with the top of its payload.
        out.bits = (unsigned short)(sign | (a == 0x7f800000u ? 0x7c00u : 0x7e00u | ((a >> 13) & 0x3ffu)));
    } else if (a >= 0x477ff000u) {
        // From 65520 up rounds past the largest finite half (65504).
        out.bits = (unsigned short)(sign | 0x7c00u);
    } else if (a >= 0x38800000u) {
        // Normal: rebias the exponent (127 → 15), round the mantissa from 23 to 10 bits;
        // a carry out of the mantissa correctly bumps the exponent.
        u32 r = a - 0x38000000u;
        r += 0x0fffu + ((r >> 13) & 1u);
        out.bits = (unsigned short)(sign | (r >> 13));
    } else if (a <= 0x33000000u) {
        // At most 2^-25 (half the smallest subnormal, a tie to the even zero).
        out.bits = (unsigned short)sign;
    } else {
        // Subnormal: the 24-bit significand in units of 2^-24, rounded to nearest even.
        const u32 exponent = a >> 23;
        const u32 significand = (a & 0x7fffffu) | 0x800000u;
        const u32 shift = 126u - exponent;
        u32 q = significand >> shift;
        const u32 rest = significand & ((1u << shift) - 1u);
        const u32 half = 1u << (shift - 1u);
        if (rest > half || (rest == half && (q & 1u))) {
            q += 1u;
        }
        out.bits = (unsigned short)(sign | q);
    }
    return out;
}

template <class T>
__device__ __forceinline__ T from_float(float f);

template <>
__device__ __forceinline__ bf16 from_float<bf16>(float f) {
    return bf16_from_float(f);
}

template <>
__device__ __forceinline__ f16 from_float<f16>(float f) {
    return f16_from_float(f);
}

template <class T>
__device__ __forceinline__ T zero_elem() {
    T z;
    z.bits = 0;
    return z;
}

__device__ __forceinline__ u32 umin32(u32 a, u32 b) { return a < b ? a : b; }

// ---------------------------------------------------------------------------------------
// Warp and block reductions. The xor butterfly leaves the same bits in every lane, so a
// block-wide result is identical in every thread.

#define TESSERA_FULL_MASK 0xffffffffu

__device__ __forceinline__ u32 lane_id() { return threadIdx.x & 31u; }
__device__ __forceinline__ u32 warp_id() { return threadIdx.x >> 5; }
__device__ __forceinline__ u32 warps_per_block() { return blockDim.x >> 5; }

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v += __shfl_xor_sync(TESSERA_FULL_MASK, v, offset);
    }
    return v;
}

// Largest value of the warp; NaNs are skipped (fmaxf), as the CPU sampler's max does.
__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(TESSERA_FULL_MASK, v, offset));
    }
    return v;
}

// Sum over the block, returned to every thread. `scratch`: 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    if (lane_id() == 0u) {
        scratch[warp_id()] = v;
    }
    __syncthreads();
    v = lane_id() < warps_per_block() ? scratch[lane_id()] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}

// Maximum over the block (NaNs skipped), returned to every thread.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    v = warp_max(v);
    if (lane_id() == 0u) {
        scratch[warp_id()] = v;
    }
    __syncthreads();
    v = lane_id() < warps_per_block() ? scratch[lane_id()] : neg_inf();
    v = warp_max(v);
    __syncthreads();
    return v;
}

// Whether candidate (key_a, index_a) beats (key_b, index_b): a larger key, then a lower
// index.
__device__ __forceinline__ bool beats(u64 key_a, u32 index_a, u64 key_b, u32 index_b) {
    return key_a > key_b || (key_a == key_b && index_a < index_b);
}

__device__ __forceinline__ void warp_best(u64& key, u32& index) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        const u64 other_key = __shfl_xor_sync(TESSERA_FULL_MASK, key, offset);
        const u32 other_index = __shfl_xor_sync(TESSERA_FULL_MASK, index, offset);
        if (beats(other_key, other_index, key, index)) {
            key = other_key;
            index = other_index;
        }
    }
}

// The best (key, index) pair of the block, returned to every thread. A thread without a
// candidate passes (0, 0xffffffff). `keys`, `indices`: 32 entries of shared memory each.
__device__ __forceinline__ void block_best(u64& key, u32& index, u64* keys, u32* indices) {
    warp_best(key, index);
    if (lane_id() == 0u) {
        keys[warp_id()] = key;
        indices[warp_id()] = index;
    }
    __syncthreads();
    if (lane_id() < warps_per_block()) {
        key = keys[lane_id()];
        index = indices[lane_id()];
    } else {
        key = 0ull;
        index = 0xffffffffu;
    }
    warp_best(key, index);
    __syncthreads();
}

// Keys whose unsigned order is the IEEE total order of the value (Rust's `total_cmp`):
// -NaN < -inf < … < -0 < +0 < … < +inf < +NaN.
__device__ __forceinline__ u32 float_order_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ u64 double_order_key(double d) {
    const u64 b = (u64)__double_as_longlong(d);
    return (b >> 63) ? ~b : (b | 0x8000000000000000ull);
}

// ---------------------------------------------------------------------------------------
// The sampler's noise, bit for bit as `tessera_runtime::sampling::gumbel`: 64-bit integer
// hashing, then a logarithm built from correctly rounded f64 operations only (each one
// spelled as an _rn intrinsic so it is never fused), in the same order as the Rust code.

__device__ __forceinline__ u64 splitmix64(u64 z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Natural logarithm of a positive normal double: x = 2^e · m with m in (√½, √2],
// ln m = 2·atanh(s) with s = (m - 1) / (m + 1), the series to s^21.
__device__ __forceinline__ double noise_ln(double x) {
    const u64 bits = (u64)__double_as_longlong(x);
    int e = (int)((bits >> 52) & 0x7ffull) - 1023;
    double m = __longlong_as_double((long long)((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull));
    if (m > 1.4142135623730951) {
        m = __dmul_rn(m, 0.5);
        e += 1;
    }
    const double f = __dadd_rn(m, -1.0);
    const double s = __ddiv_rn(f, __dadd_rn(2.0, f));
    const double z = __dmul_rn(s, s);
    double t = 0.047619047619047616;  // 1/21
    t = __dadd_rn(0.05263157894736842, __dmul_rn(z, t));  // 1/19
    t = __dadd_rn(0.058823529411764705, __dmul_rn(z, t));  // 1/17
    t = __dadd_rn(0.06666666666666667, __dmul_rn(z, t));  // 1/15
    t = __dadd_rn(0.07692307692307693, __dmul_rn(z, t));  // 1/13
    t = __dadd_rn(0.09090909090909091, __dmul_rn(z, t));  // 1/11
    t = __dadd_rn(0.1111111111111111, __dmul_rn(z, t));  // 1/9
    t = __dadd_rn(0.14285714285714285, __dmul_rn(z, t));  // 1/7
    t = __dadd_rn(0.2, __dmul_rn(z, t));  // 1/5
    t = __dadd_rn(0.3333333333333333, __dmul_rn(z, t));  // 1/3
    t = __dmul_rn(z, t);
    const double two_s = __dadd_rn(s, s);
    const double k = (double)e;
    // ln 2 split so that k · LN2_HI is exact.
    const double hi = __dmul_rn(k, 0.6931467056274414);
    const double lo = __dmul_rn(k, 4.7493250390316726e-07);
    return __dadd_rn(hi, __dadd_rn(two_s, __dadd_rn(__dmul_rn(two_s, t), lo)));
}

// The part of the noise key shared by every token of a row.
__device__ __forceinline__ u64 gumbel_row_key(u64 seed, u32 position) {
    return splitmix64(seed ^ splitmix64((u64)position ^ 0x5EED000000000000ull));
}

// Standard Gumbel noise of token `id` under a row key.
__device__ __forceinline__ double gumbel_noise_of(u64 row_key, u32 id) {
    const u64 bits = splitmix64(row_key ^ ((u64)id * 0xD1B54A32D192ED03ull));
    const double u = __ddiv_rn(__dadd_rn((double)(bits >> 11), 0.5), 9007199254740992.0);
    return -noise_ln(-noise_ln(u));
}

#endif  // TESSERA_COMMON_CUH
