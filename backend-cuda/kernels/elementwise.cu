// Elementwise kernels: one thread per element, grid-stride loops (backend-cuda/src/elementwise.rs).
//
// Operation codes are `#define`s here and constants in elementwise.rs; a unit test there reads
// these lines and checks that both agree.

#define DSV4_UNARY_SIGMOID 0
#define DSV4_UNARY_SILU 1
#define DSV4_UNARY_SOFTPLUS 2
#define DSV4_UNARY_SQRT 3
#define DSV4_UNARY_RSQRT 4
#define DSV4_UNARY_EXP 5
#define DSV4_UNARY_RELU 6
#define DSV4_UNARY_NEG 7
#define DSV4_UNARY_SQUARE 8

#define DSV4_BINARY_ADD 0
#define DSV4_BINARY_SUB 1
#define DSV4_BINARY_MUL 2
#define DSV4_BINARY_DIV 3
#define DSV4_BINARY_MAX 4
#define DSV4_BINARY_MIN 5

// Dimensions a dsv4_binary_f32 launch indexes (the host coalesces and loops over the rest).
#define DSV4_BINARY_DIMS 6

extern "C" __global__ void dsv4_fill_f32(float* out, i64 n, float value) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) out[i] = value;
}

static __device__ __forceinline__ float dsv4_ew_unary(int op, float v) {
    switch (op) {
        case DSV4_UNARY_SIGMOID: return 1.0f / (1.0f + expf(-v));
        case DSV4_UNARY_SILU: return v / (1.0f + expf(-v));
        // torch's threshold: above 20 the value itself (no exp, so no overflow).
        case DSV4_UNARY_SOFTPLUS: return v > 20.0f ? v : log1pf(expf(v));
        case DSV4_UNARY_SQRT: return sqrtf(v);
        case DSV4_UNARY_RSQRT: return dsv4_rsqrt(v);
        case DSV4_UNARY_EXP: return expf(v);
        case DSV4_UNARY_RELU: return fmaxf(v, 0.0f);
        case DSV4_UNARY_NEG: return -v;
        case DSV4_UNARY_SQUARE: return v * v;
        default: return NAN;
    }
}

// out[i] = op(x[i]) for i < n.
extern "C" __global__ void dsv4_unary_f32(const float* x, float* out, i64 n, int op) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        out[i] = dsv4_ew_unary(op, x[i]);
    }
}

static __device__ __forceinline__ float dsv4_ew_binary(int op, float x, float y) {
    switch (op) {
        case DSV4_BINARY_ADD: return x + y;
        case DSV4_BINARY_SUB: return x - y;
        case DSV4_BINARY_MUL: return x * y;
        case DSV4_BINARY_DIV: return x / y;
        case DSV4_BINARY_MAX: return fmaxf(x, y);
        case DSV4_BINARY_MIN: return fminf(x, y);
        default: return NAN;
    }
}

// out[i] = op(a[offset_a(i)], b[offset_b(i)]) for the n = d0·…·d(rank-1) elements of a
// contiguous output: element i has the multi-index (c0, …, c(rank-1)) of i in the dimensions
// d0.. (row-major) and reads a at Σ ck·sak and b at Σ ck·sbk (element strides; 0 where an
// operand is broadcast along k). 0 <= rank <= DSV4_BINARY_DIMS; rank 0 is one element.
extern "C" __global__ void dsv4_binary_f32(const float* a, const float* b, float* out, int op, i64 n, int rank,
                                           i64 d0, i64 d1, i64 d2, i64 d3, i64 d4, i64 d5,
                                           i64 sa0, i64 sa1, i64 sa2, i64 sa3, i64 sa4, i64 sa5,
                                           i64 sb0, i64 sb1, i64 sb2, i64 sb3, i64 sb4, i64 sb5) {
    const i64 dims[DSV4_BINARY_DIMS] = {d0, d1, d2, d3, d4, d5};
    const i64 sa[DSV4_BINARY_DIMS] = {sa0, sa1, sa2, sa3, sa4, sa5};
    const i64 sb[DSV4_BINARY_DIMS] = {sb0, sb1, sb2, sb3, sb4, sb5};
    if (rank < 0 || rank > DSV4_BINARY_DIMS) return;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        i64 oa, ob;
        dsv4_strided_offsets(i, rank, dims, sa, sb, &oa, &ob);
        out[i] = dsv4_ew_binary(op, a[oa], b[ob]);
    }
}

// out[i] = x[i] · mul + add.
extern "C" __global__ void dsv4_affine_f32(const float* x, float* out, i64 n, float mul, float add) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        out[i] = x[i] * mul + add;
    }
}

// out[i] = min(max(x[i], lo), hi), NaN-ignoring as fmaxf/fminf (Rust's f32::max/min).
extern "C" __global__ void dsv4_clamp_f32(const float* x, float* out, i64 n, float lo, float hi) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        out[i] = fminf(fmaxf(x[i], lo), hi);
    }
}

// Every value rounded to the nearest BF16 (ties to even) and widened back, on the raw bits (no
// float arithmetic, so no flush of subnormals): exactly dsv4_core::precision::round_bf16.
extern "C" __global__ void dsv4_round_bf16_f32(const unsigned int* x, unsigned int* out, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        out[i] = ((unsigned int)dsv4_f32_to_bf16(__uint_as_float(x[i]))) << 16;
    }
}

// Interleaved-pair RoPE. x and out [t, heads, d]; cs (cos) and sn (sin) [t, half]. The trailing 2·half
// channels of every head rotate pair by pair (channels d - 2·half + 2i and + 2i + 1 by the angle
// of pair i of the token), the others are copied; `inverse` rotates by the negative angle.
// One thread per output element.
extern "C" __global__ void dsv4_rope_f32(const float* x, const float* cs, const float* sn, float* out, i64 t,
                                         i64 heads, i64 d, i64 half, int inverse) {
    const i64 n = t * heads * d;
    const i64 first = d - 2 * half;  // first rotated channel
    if (half < 0 || first < 0) return;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 c = i % d;
        if (c < first) {
            out[i] = x[i];
            continue;
        }
        const i64 token = i / (heads * d);
        const i64 pair = (c - first) / 2;
        const i64 even = i - ((c - first) & 1);
        const float e = x[even], o = x[even + 1];
        const float co = cs[token * half + pair];
        const float si = inverse ? -sn[token * half + pair] : sn[token * half + pair];
        out[i] = ((c - first) & 1) == 0 ? e * co - o * si : o * co + e * si;
    }
}
