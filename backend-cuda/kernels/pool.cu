// Pool kernels: rows of the paged decoding state written in place and read back decoded
// (backend-cuda/src/pool.rs). The row formats are dsv4_core::kv::format::RowFormat's, bit for
// bit: f32, bf16 (round to nearest even) and the official fp8 KV row (e4m3 codes in blocks of 64
// with one UE8M0 power-of-two scale each, then the rope channels as little-endian BF16, then the
// scale bytes, then zero padding to a multiple of 8 bytes, which the zeroed allocation holds and
// no write touches).
//
// Slots may come from the device: a slot outside 0..rows is skipped by a write and reads as
// zeros (-1 is "no entry").

#define DSV4_FP8_BLOCK 64
#define DSV4_E4M3_MAX 448.0f

// ------------------------------------------------------------------------------ f32, bf16

// pool[slots[i], c] = values[i, c] (f32 rows). values [n, width].
extern "C" __global__ void dsv4_pool_write_f32(float* pool, const int* slots, const float* values, i64 n, i64 width,
                                               i64 rows) {
    const i64 total = n * width;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / width;
        const int s = slots[i];
        if (s >= 0 && (i64)s < rows) pool[(i64)s * width + (e - i * width)] = values[e];
    }
}

// As dsv4_pool_write_f32, each value rounded to BF16 (nearest even).
extern "C" __global__ void dsv4_pool_write_bf16(unsigned short* pool, const int* slots, const float* values, i64 n,
                                                i64 width, i64 rows) {
    const i64 total = n * width;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / width;
        const int s = slots[i];
        if (s >= 0 && (i64)s < rows) pool[(i64)s * width + (e - i * width)] = dsv4_f32_to_bf16(values[e]);
    }
}

// out[i, c] = pool[slots[i], c], zeros for a slot outside the pool. out [n, width].
extern "C" __global__ void dsv4_pool_read_f32(float* out, const float* pool, const int* slots, i64 n, i64 width,
                                              i64 rows) {
    const i64 total = n * width;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / width;
        const int s = slots[i];
        out[e] = (s >= 0 && (i64)s < rows) ? pool[(i64)s * width + (e - i * width)] : 0.0f;
    }
}

extern "C" __global__ void dsv4_pool_read_bf16(float* out, const unsigned short* pool, const int* slots, i64 n,
                                               i64 width, i64 rows) {
    const i64 total = n * width;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / width;
        const int s = slots[i];
        out[e] = (s >= 0 && (i64)s < rows) ? dsv4_bf16_to_f32(pool[(i64)s * width + (e - i * width)]) : 0.0f;
    }
}

// ------------------------------------------------------------------------------------ fp8

// Round to nearest, ties to even, of a non-negative x below 2^22.
static __device__ __forceinline__ int dsv4_round_even(float x) {
    const float f = floorf(x);
    const float d = x - f;  // exact
    const int i = (int)f;
    if (d > 0.5f) return i + 1;
    if (d < 0.5f) return i;
    return (i & 1) ? i + 1 : i;
}

// kv::format::e4m3_encode: the e4m3fn code nearest to v (ties to even), |v| <= 448 or NaN.
// Computed arithmetically: below 2^-6 the codes are multiples of 2^-9; above, 8 codes per binade.
static __device__ unsigned char dsv4_e4m3_encode(float v) {
    const unsigned int sign = (__float_as_uint(v) >> 24) & 0x80u;
    const float a = fabsf(v);
    if (a != a) return 0x7F;
    if (a < 0.015625f) return (unsigned char)(sign | (unsigned int)dsv4_round_even(a * 512.0f));
    const int e = (int)((__float_as_uint(a) >> 23) & 0xffu) - 127;  // a is normal here
    const int q = dsv4_round_even(ldexpf(a, 3 - e));                 // 8..16 (a <= 448: at most 14 at e = 8)
    return (unsigned char)(sign | (unsigned int)(((e + 7) << 3) + (q - 8)));
}

// quant::E4M3_TO_F32[b] (both NaN codes are +NaN there).
static __device__ float dsv4_e4m3_to_f32(unsigned int b) {
    const unsigned int exp = (b >> 3) & 15u, mant = b & 7u;
    if (exp == 15u && mant == 7u) return __uint_as_float(0x7fc00000u);
    const float mag = exp == 0u ? (float)mant * (1.0f / 512.0f) : __uint_as_float(((exp + 120u) << 23) | (mant << 20));
    return (b & 0x80u) ? -mag : mag;
}

// kv::format::fp8_scale_exponent: e = ceil(log2(max(amax, 1e-4) / 448)) (448 for a non-finite
// amax), computed exactly as the smallest e with 448 * 2^e >= amax; e is in -22..=120.
static __device__ int dsv4_fp8_scale_exponent(float amax) {
    const float a = amax <= 3.40282347e38f ? fmaxf(amax, 1e-4f) : DSV4_E4M3_MAX;
    const int top = (int)((__float_as_uint(a) >> 23) & 0xffu) - 127;  // 2^top <= a < 2^(top+1)
    int e = top - 8;                                                    // 448 = 1.75 * 2^8
    if (ldexpf(DSV4_E4M3_MAX, e) < a) e += 1;
    return e;
}

// Encodes row i of values [n, width] at slot slots[i] of a pool of fp8 rows of `row_bytes`
// bytes: one thread per scale block of the first width - rope values (amax, scale byte, codes)
// and one per rope value (BF16 bytes).
extern "C" __global__ void dsv4_pool_write_fp8(unsigned char* pool, const int* slots, const float* values, i64 n,
                                               i64 width, i64 rope, i64 row_bytes, i64 rows) {
    const i64 nope = width - rope;
    const i64 blocks = (nope + DSV4_FP8_BLOCK - 1) / DSV4_FP8_BLOCK;
    const i64 units = blocks + rope;
    const i64 total = n * units;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / units, u = e - i * units;
        const int s = slots[i];
        if (s < 0 || (i64)s >= rows) continue;
        const float* v = values + i * width;
        unsigned char* row = pool + (i64)s * row_bytes;
        if (u < blocks) {
            const i64 lo = u * DSV4_FP8_BLOCK;
            const i64 hi = lo + DSV4_FP8_BLOCK < nope ? lo + DSV4_FP8_BLOCK : nope;
            float amax = 0.0f;
            for (i64 j = lo; j < hi; ++j) amax = fmaxf(amax, fabsf(v[j]));
            const int x = dsv4_fp8_scale_exponent(amax);
            row[nope + 2 * rope + u] = (unsigned char)(x + 127);
            const float inv = ldexpf(1.0f, -x);
            for (i64 j = lo; j < hi; ++j) {
                float q = v[j] * inv;
                if (q > DSV4_E4M3_MAX) q = DSV4_E4M3_MAX;  // NaN compares false and stays NaN
                if (q < -DSV4_E4M3_MAX) q = -DSV4_E4M3_MAX;
                row[j] = dsv4_e4m3_encode(q);
            }
        } else {
            const i64 j = u - blocks;
            const unsigned short b = dsv4_f32_to_bf16(v[nope + j]);
            row[nope + 2 * j] = (unsigned char)(b & 0xffu);
            row[nope + 2 * j + 1] = (unsigned char)(b >> 8);
        }
    }
}

// out[i, c] = the decoded value c of fp8 row slots[i], zeros for a slot outside the pool.
extern "C" __global__ void dsv4_pool_read_fp8(float* out, const unsigned char* pool, const int* slots, i64 n, i64 width,
                                              i64 rope, i64 row_bytes, i64 rows) {
    const i64 nope = width - rope;
    const i64 total = n * width;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / width, c = e - i * width;
        const int s = slots[i];
        if (s < 0 || (i64)s >= rows) {
            out[e] = 0.0f;
            continue;
        }
        const unsigned char* row = pool + (i64)s * row_bytes;
        if (c < nope) {
            const int scale = (int)row[nope + 2 * rope + c / DSV4_FP8_BLOCK];
            out[e] = dsv4_e4m3_to_f32(row[c]) * ldexpf(1.0f, scale - 127);
        } else {
            const i64 j = c - nope;
            const unsigned int b = (unsigned int)row[nope + 2 * j] | ((unsigned int)row[nope + 2 * j + 1] << 8);
            out[e] = dsv4_bf16_to_f32((unsigned short)b);
        }
    }
}
