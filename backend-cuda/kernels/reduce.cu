// Reductions, softmax and RMSNorm (backend-cuda/src/reduce.rs).
//
// A tensor reduced (or normalised) along one axis is viewed as [outer, n, inner]:
// * inner == 1 (the axis is the last one that is not 1): the `_rows` kernels, one block per row
//   of n contiguous values (grid-stride over the outer rows), each thread accumulating the
//   values j ≡ threadIdx.x (mod blockDim.x) in order and the block combining the partials with
//   dsv4_block_sum / dsv4_block_max; blockDim.x a multiple of 32;
// * inner > 1: the `_cols` kernels, one thread per (outer, inner) lane walking its n values
//   in order (consecutive threads read consecutive addresses).
// Both accumulate in f32 in an order fixed by the launch configuration: deterministic.
//
// Operation codes are `#define`s here and constants in reduce.rs (checked against each other by
// a unit test there).

#define DSV4_REDUCE_SUM 0
#define DSV4_REDUCE_MAX 1
#define DSV4_REDUCE_MEAN 2

// out[row] = op(x[row·n .. row·n + n]) for row < rows. Sum of nothing is 0, its mean NaN (0/0),
// its max -inf.
extern "C" __global__ void dsv4_reduce_rows_f32(const float* x, float* out, i64 rows, i64 n, int op) {
    __shared__ float scratch[32];
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * n;
        float v;
        if (op == DSV4_REDUCE_MAX) {
            float m = -INFINITY;
            for (i64 j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, xr[j]);
            v = dsv4_block_max(m, scratch);
        } else {
            float s = 0.0f;
            for (i64 j = threadIdx.x; j < n; j += blockDim.x) s += xr[j];
            v = dsv4_block_sum(s, scratch);
            if (op == DSV4_REDUCE_MEAN) v = v / (float)n;
        }
        if (threadIdx.x == 0) out[row] = v;
    }
}

// x [outer, n, inner] → out [outer, 1, inner]: one thread per (o, i), the n values in order.
extern "C" __global__ void dsv4_reduce_cols_f32(const float* x, float* out, i64 outer, i64 n, i64 inner, int op) {
    const i64 lanes = outer * inner;
    for (i64 l = (i64)blockIdx.x * blockDim.x + threadIdx.x; l < lanes; l += (i64)gridDim.x * blockDim.x) {
        const i64 o = l / inner, i = l % inner;
        const float* xl = x + o * n * inner + i;
        float v;
        if (op == DSV4_REDUCE_MAX) {
            v = -INFINITY;
            for (i64 j = 0; j < n; ++j) v = fmaxf(v, xl[j * inner]);
        } else {
            v = 0.0f;
            for (i64 j = 0; j < n; ++j) v += xl[j * inner];
            if (op == DSV4_REDUCE_MEAN) v = v / (float)n;
        }
        out[l] = v;
    }
}

// Softmax of every row of n contiguous values: e = exp(x - max), out = e / Σe. -inf entries get
// weight 0; a row that is all -inf (no maximum) gets zeros, as the CPU backend gives.
extern "C" __global__ void dsv4_softmax_rows_f32(const float* x, float* out, i64 rows, i64 n) {
    __shared__ float scratch[32];
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * n;
        float* yr = out + row * n;
        float m = -INFINITY;
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, xr[j]);
        m = dsv4_block_max(m, scratch);
        if (m == -INFINITY) {
            for (i64 j = threadIdx.x; j < n; j += blockDim.x) yr[j] = 0.0f;
            continue;  // uniform across the block: every thread has the same m
        }
        float s = 0.0f;
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            const float e = expf(xr[j] - m);
            yr[j] = e;  // read back below by this same thread
            s += e;
        }
        s = dsv4_block_sum(s, scratch);
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) yr[j] = yr[j] / s;
    }
}

// Softmax along the middle axis of [outer, n, inner]: one thread per (o, i) lane.
extern "C" __global__ void dsv4_softmax_cols_f32(const float* x, float* out, i64 outer, i64 n, i64 inner) {
    const i64 lanes = outer * inner;
    for (i64 l = (i64)blockIdx.x * blockDim.x + threadIdx.x; l < lanes; l += (i64)gridDim.x * blockDim.x) {
        const i64 base = (l / inner) * n * inner + l % inner;
        float m = -INFINITY;
        for (i64 j = 0; j < n; ++j) m = fmaxf(m, x[base + j * inner]);
        if (m == -INFINITY) {
            for (i64 j = 0; j < n; ++j) out[base + j * inner] = 0.0f;
            continue;
        }
        float s = 0.0f;
        for (i64 j = 0; j < n; ++j) {
            const float e = expf(x[base + j * inner] - m);
            out[base + j * inner] = e;
            s += e;
        }
        for (i64 j = 0; j < n; ++j) out[base + j * inner] = out[base + j * inner] / s;
    }
}

// RMSNorm of every row of d contiguous values: r = 1 / sqrt(Σx² / d + eps), out = w · (x · r)
// (w[j] = 1 without a weight: has_weight 0, and w is then not read).
extern "C" __global__ void dsv4_rms_norm_f32(const float* x, const float* w, float* out, i64 rows, i64 d,
                                             float eps, int has_weight) {
    __shared__ float scratch[32];
    for (i64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * d;
        float* yr = out + row * d;
        float s = 0.0f;
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) s += xr[j] * xr[j];
        s = dsv4_block_sum(s, scratch);
        const float r = dsv4_rsqrt(s / (float)d + eps);
        for (i64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float v = xr[j] * r;
            yr[j] = has_weight ? w[j] * v : v;
        }
    }
}
