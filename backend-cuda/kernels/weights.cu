// Weight kernels (backend-cuda/src/weights.rs): BF16 widening for the f32 GEMMs, the
// small-batch GEMV that reads weights in their stored type, embedding rows, and the axis swap
// of grouped_linear's batched GEMM.

// out[i] = f32(in[i]) (exact).
extern "C" __global__ void dsv4_widen_bf16(float* out, const unsigned short* in, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = dsv4_bf16_to_f32(in[i]);
}

// ----------------------------------------------------------------------------------- GEMV

// Rows of x one GEMV launch takes (weights.rs: GEMV_MAX_ROWS).
#define DSV4_GEMV_MAX_M 8

static __device__ __forceinline__ float dsv4_weight_at(const float* w, i64 i) { return w[i]; }
static __device__ __forceinline__ float dsv4_weight_at(const unsigned short* w, i64 i) {
    return dsv4_bf16_to_f32(w[i]);
}

// y[i, j] = sum_c x[i * x_row + (j / r) * x_group + c] * w[j, c] for i < m <= 8, j < n, c < k:
// `linear` with r = n, x_row = k, x_group = 0, and the block-diagonal `grouped_linear` (x
// [m, g, k], w [g * r, k]) with x_row = g * k, x_group = k. One warp per output column j (a
// weight row, read once for all m rows), lanes strided over k, f32 accumulation.
template <typename W>
static __device__ void dsv4_gemv(float* y, const float* x, const W* w, i64 m, i64 n, i64 k, i64 r, i64 x_row,
                                 i64 x_group) {
    const unsigned int lane = threadIdx.x % DSV4_WARP;
    const i64 warps = (i64)gridDim.x * (blockDim.x / DSV4_WARP);
    for (i64 j = (i64)blockIdx.x * (blockDim.x / DSV4_WARP) + threadIdx.x / DSV4_WARP; j < n; j += warps) {
        const float* xj = x + (j / r) * x_group;
        const i64 wj = j * k;
        float acc[DSV4_GEMV_MAX_M];
        for (int i = 0; i < DSV4_GEMV_MAX_M; ++i) acc[i] = 0.0f;
        for (i64 c = lane; c < k; c += DSV4_WARP) {
            const float wv = dsv4_weight_at(w, wj + c);
            for (int i = 0; i < DSV4_GEMV_MAX_M; ++i)
                if (i < m) acc[i] += xj[i * x_row + c] * wv;
        }
        // m is the same for every lane, so the whole warp takes each shuffle; rows past m are
        // skipped (decode has m = 1: one reduction per column, not DSV4_GEMV_MAX_M).
        for (int i = 0; i < DSV4_GEMV_MAX_M; ++i) {
            if (i >= m) break;
            const float s = dsv4_warp_sum(acc[i]);
            if (lane == 0) y[i * n + j] = s;
        }
    }
}

extern "C" __global__ void dsv4_gemv_f32(float* y, const float* x, const float* w, i64 m, i64 n, i64 k, i64 r,
                                         i64 x_row, i64 x_group) {
    dsv4_gemv(y, x, w, m, n, k, r, x_row, x_group);
}

extern "C" __global__ void dsv4_gemv_bf16(float* y, const float* x, const unsigned short* w, i64 m, i64 n, i64 k,
                                          i64 r, i64 x_row, i64 x_group) {
    dsv4_gemv(y, x, w, m, n, k, r, x_row, x_group);
}

// ------------------------------------------------------------------------------ embedding

// out[i, c] = table[ids[i], c], zeros for an id outside 0..v. out [n, d].
extern "C" __global__ void dsv4_embedding_f32(float* out, const float* table, const int* ids, i64 n, i64 d, i64 v) {
    const i64 total = n * d;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / d;
        const int id = ids[i];
        out[e] = (id >= 0 && (i64)id < v) ? table[(i64)id * d + (e - i * d)] : 0.0f;
    }
}

// As dsv4_embedding_f32 from a BF16 table, each value widened (exact).
extern "C" __global__ void dsv4_embedding_bf16(float* out, const unsigned short* table, const int* ids, i64 n, i64 d,
                                               i64 v) {
    const i64 total = n * d;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / d;
        const int id = ids[i];
        out[e] = (id >= 0 && (i64)id < v) ? dsv4_bf16_to_f32(table[(i64)id * d + (e - i * d)]) : 0.0f;
    }
}

// ---------------------------------------------------------------------------- axis swap

// out [b, a, c] = in [a, b, c] with the first two axes swapped.
extern "C" __global__ void dsv4_swap01_f32(float* out, const float* in, i64 a, i64 b, i64 c) {
    const i64 total = a * b * c;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 ci = e % c, rest = e / c;
        const i64 ai = rest % a, bi = rest / a;
        out[e] = in[(ai * b + bi) * c + ci];
    }
}
