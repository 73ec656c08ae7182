// Fused V4 ops besides attention (backend-cuda/src/fused.rs): the mHC pre-mapping, Sinkhorn,
// post-mapping and head, compressor pooling, the clamped SwiGLU and MoE routing.
//
// Each kernel computes what the op's definition (dsv4_core::backend::composed and the trait's
// default bodies) computes from the primitives, step by step with the same f32 operations (the
// programs are compiled with --fmad=false: a product and a sum stay two roundings, as in two
// kernels), in one launch and with no temporaries. Sums run in index order, as the definitions
// state, except where the primitive they replace reduces a contiguous row with a block
// reduction (dsv4_block_sum): there the same block reduction with the same blockDim gives the
// same bits (the RMS of hc_pre / hc_head, moe_route's softmax and weight sum).
//
// Scoring codes are `#define`s here and constants in fused.rs (checked by a unit test there).

#define DSV4_SCORE_SQRTSOFTPLUS 0
#define DSV4_SCORE_SIGMOID 1
#define DSV4_SCORE_SOFTMAX 2

// The `unary` op's Sigmoid and Silu (elementwise.cu).
static __device__ __forceinline__ float dsv4_fused_sigmoid(float v) { return 1.0f / (1.0f + expf(-v)); }
static __device__ __forceinline__ float dsv4_fused_silu(float v) { return v / (1.0f + expf(-v)); }

// ------------------------------------------------------------------------------------ mHC

// 1 / sqrt(Σ xr² / len + eps) over xr[0..len), as dsv4_rms_norm_f32 computes it (same
// per-thread strides and block reduction, so the same bits for the same blockDim). Every thread
// of the block must call it; all get the result.
static __device__ float dsv4_hc_rms_scale(const float* xr, i64 len, float eps, float* scratch) {
    float s = 0.0f;
    for (i64 j = threadIdx.x; j < len; j += blockDim.x) s += xr[j] * xr[j];
    s = dsv4_block_sum(s, scratch);
    return dsv4_rsqrt(s / (float)len + eps);
}

// Softmax of m[0..len) in place (e = exp(v - max), e / Σe, the sum in index order; all -inf
// gives zeros, as dsv4_softmax_rows_f32), then `· 1 + add` (the composition's affine).
static __device__ void dsv4_hc_softmax_line(float* m, i64 len, float add) {
    float mx = -INFINITY;
    for (i64 i = 0; i < len; ++i) mx = fmaxf(mx, m[i]);
    if (mx == -INFINITY) {
        for (i64 i = 0; i < len; ++i) m[i] = 0.0f * 1.0f + add;
        return;
    }
    float s = 0.0f;
    for (i64 i = 0; i < len; ++i) {
        const float e = expf(m[i] - mx);
        m[i] = e;
        s += e;
    }
    for (i64 i = 0; i < len; ++i) m[i] = (m[i] / s) * 1.0f + add;
}

// Sinkhorn normalisation of one rows × cols matrix m (row-major) in place, as composed::sinkhorn:
// the columns normalised, then iters − 1 rounds of rows then columns; each line divided by its
// sum (in index order, from 0) · 1 + eps. iters 0 acts as 1 (the columns once).
static __device__ void dsv4_sinkhorn_matrix(float* m, i64 rows, i64 cols, i64 iters, float eps) {
    for (i64 round = 0; round < iters || round == 0; ++round) {
        if (round > 0) {
            for (i64 r = 0; r < rows; ++r) {
                float s = 0.0f;
                for (i64 c = 0; c < cols; ++c) s += m[r * cols + c];
                s = s * 1.0f + eps;
                for (i64 c = 0; c < cols; ++c) m[r * cols + c] = m[r * cols + c] / s;
            }
        }
        for (i64 c = 0; c < cols; ++c) {
            float s = 0.0f;
            for (i64 r = 0; r < rows; ++r) s += m[r * cols + c];
            s = s * 1.0f + eps;
            for (i64 r = 0; r < rows; ++r) m[r * cols + c] = m[r * cols + c] / s;
        }
    }
}

// One mixing value: the linear of the raw streams times the RMS scale r (= linear of the
// normalised streams up to rounding); 0 when there are no streams to norm (the composition's
// linear over nothing).
static __device__ __forceinline__ float dsv4_hc_mix(float raw, float r, i64 nd) { return nd > 0 ? raw * r : 0.0f; }

// Σ_j pre[j] · x[j, c] over the n streams of one token, in order (the composition's binary
// product and its reduce over the streams), for the channels c of this thread.
static __device__ void dsv4_hc_collapse(const float* xt, const float* pre, float* out, i64 n, i64 d) {
    for (i64 c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (i64 j = 0; j < n; ++j) acc += pre[j] * xt[j * d + c];
        out[c] = acc;
    }
}

// mHC pre-mapping (spec §B.2) of t tokens, from x [t, n, d] and mixes [t, (2+n)n] = x · fn_wᵀ
// (the linear of the streams before their RMS norm; the norm's scale is applied here), base
// [(2+n)n] and scale [3]:
//   pre  = sigmoid(mix[0..n) · s0 + base) · 1 + hc_eps          (kept in shared memory)
//   post = sigmoid(mix[n..2n) · s1 + base) · 2 + 0               → post [t, n]
//   comb = sinkhorn(softmax_rows(mix[2n..) · s2 + base) · 1 + hc_eps) → comb [t, n, n]
//   collapsed[c] = Σ_j pre[j] · x[j, c]                          → collapsed [t, d]
// One block per token (grid-stride over tokens), blockDim a multiple of 32; dynamic shared
// memory: n + n·n floats (pre, then the token's comb).
extern "C" __global__ void dsv4_hc_pre_f32(const float* x, const float* mixes, const float* base, const float* scale,
                                           float* collapsed, float* post, float* comb, i64 t, i64 n, i64 d,
                                           i64 iters, float hc_eps, float norm_eps) {
    DSV4_DYNAMIC_SHARED(float, dsv4_hc_pre_shared);
    __shared__ float scratch[32];
    float* pre = dsv4_hc_pre_shared;
    float* cm = dsv4_hc_pre_shared + n;
    const i64 nd = n * d, width = (2 + n) * n, nn = n * n;
    const float s0 = scale[0], s1 = scale[1], s2 = scale[2];
    for (i64 row = blockIdx.x; row < t; row += gridDim.x) {
        const float* xt = x + row * nd;
        const float r = dsv4_hc_rms_scale(xt, nd, norm_eps, scratch);
        const float* mr = mixes + row * width;
        for (i64 i = threadIdx.x; i < width; i += blockDim.x) {
            const float m = dsv4_hc_mix(mr[i], r, nd);
            if (i < n) {
                pre[i] = dsv4_fused_sigmoid(m * s0 + base[i]) * 1.0f + hc_eps;
            } else if (i < 2 * n) {
                post[row * n + (i - n)] = dsv4_fused_sigmoid(m * s1 + base[i]) * 2.0f + 0.0f;
            } else {
                cm[i - 2 * n] = m * s2 + base[i];
            }
        }
        __syncthreads();
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) dsv4_hc_softmax_line(cm + j * n, n, hc_eps);
        __syncthreads();
        // Sinkhorn is sequential and tiny (n = 4 in V4): one thread, while the others collapse.
        if (threadIdx.x == 0) dsv4_sinkhorn_matrix(cm, n, n, iters, hc_eps);
        dsv4_hc_collapse(xt, pre, collapsed + row * d, n, d);
        __syncthreads();
        for (i64 i = threadIdx.x; i < nn; i += blockDim.x) comb[row * nn + i] = cm[i];
        __syncthreads();  // pre and cm are the next token's
    }
}

// Final stream collapse (spec §B.6 steps 1-3) of t tokens, from x [t, n, d] and mixes [t, n] =
// x · fn_wᵀ (before the RMS norm, whose scale is applied here), base [n], scale [1]:
// pre = sigmoid(mix · s0 + base) · 1 + hc_eps, out[c] = Σ_j pre[j] · x[j, c] → out [t, d].
// One block per token (grid-stride), blockDim a multiple of 32; dynamic shared memory: n floats.
extern "C" __global__ void dsv4_hc_head_f32(const float* x, const float* mixes, const float* base, const float* scale,
                                            float* out, i64 t, i64 n, i64 d, float hc_eps, float norm_eps) {
    DSV4_DYNAMIC_SHARED(float, dsv4_hc_head_pre);
    __shared__ float scratch[32];
    const i64 nd = n * d;
    const float s0 = scale[0];
    for (i64 row = blockIdx.x; row < t; row += gridDim.x) {
        const float* xt = x + row * nd;
        const float r = dsv4_hc_rms_scale(xt, nd, norm_eps, scratch);
        for (i64 j = threadIdx.x; j < n; j += blockDim.x) {
            const float m = dsv4_hc_mix(mixes[row * n + j], r, nd);
            dsv4_hc_head_pre[j] = dsv4_fused_sigmoid(m * s0 + base[j]) * 1.0f + hc_eps;
        }
        __syncthreads();
        dsv4_hc_collapse(xt, dsv4_hc_head_pre, out + row * d, n, d);
        __syncthreads();  // the pre of the next token
    }
}

// Sinkhorn of each of the t matrices [rows, cols] of comb into out (dsv4_sinkhorn_matrix): one
// thread per matrix, in place in out.
extern "C" __global__ void dsv4_sinkhorn_f32(const float* comb, float* out, i64 t, i64 rows, i64 cols, i64 iters,
                                             float eps) {
    const i64 size = rows * cols;
    for (i64 m = (i64)blockIdx.x * blockDim.x + threadIdx.x; m < t; m += (i64)gridDim.x * blockDim.x) {
        float* o = out + m * size;
        for (i64 i = 0; i < size; ++i) o[i] = comb[m * size + i];
        dsv4_sinkhorn_matrix(o, rows, cols, iters, eps);
    }
}

// mHC post-mapping (spec §B.3): out[t, k, c] = post[t, k] · y[t, c] + Σ_j comb[t, j, k] · x[t, j, c]
// (row j of comb = source stream, column k = destination; the sum over j in order). x and out
// [t, n, d], y [t, d], post [t, n], comb [t, n, n]. One thread per output element.
extern "C" __global__ void dsv4_hc_post_f32(const float* x, const float* y, const float* post, const float* comb,
                                            float* out, i64 t, i64 n, i64 d) {
    const i64 total = t * n * d;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 c = e % d, k = (e / d) % n, ti = e / (n * d);
        const float* xt = x + ti * n * d;
        const float* ct = comb + ti * n * n;
        float acc = 0.0f;
        for (i64 j = 0; j < n; ++j) acc += ct[j * n + k] * xt[j * d + c];
        out[e] = post[ti * n + k] * y[ti * d + c] + acc;
    }
}

// -------------------------------------------------------------------------- compressor

// Compressor pooling (spec §B.4.3): kv and score [w, l, c] → out [w, c], out[wi, ci] =
// Σ_li softmax_li(score[wi, :, ci]) · kv[wi, li, ci]: per channel, max, Σ exp(s - max) in
// order, each weight exp(s - max) / Σ times kv, summed in order (a channel whose scores are all
// -inf has weights 0). One thread per (wi, ci).
extern "C" __global__ void dsv4_compressor_pool_f32(const float* kv, const float* score, float* out, i64 w, i64 l,
                                                    i64 c) {
    const i64 lanes = w * c;
    for (i64 lane = (i64)blockIdx.x * blockDim.x + threadIdx.x; lane < lanes; lane += (i64)gridDim.x * blockDim.x) {
        const i64 base = (lane / c) * l * c + lane % c;
        float mx = -INFINITY;
        for (i64 j = 0; j < l; ++j) mx = fmaxf(mx, score[base + j * c]);
        float acc = 0.0f;
        if (mx == -INFINITY) {
            for (i64 j = 0; j < l; ++j) acc += 0.0f * kv[base + j * c];
        } else {
            float s = 0.0f;
            for (i64 j = 0; j < l; ++j) s += expf(score[base + j * c] - mx);
            for (i64 j = 0; j < l; ++j) acc += (expf(score[base + j * c] - mx) / s) * kv[base + j * c];
        }
        out[lane] = acc;
    }
}

// ------------------------------------------------------------------------------- SwiGLU

// Clamped SwiGLU (spec §B.5 step 4): out = silu(min(g, limit)) · clamp(u, -limit, limit), the
// clamps as the `clamp` op (fminf(fmaxf(v, lo), hi)).
extern "C" __global__ void dsv4_swiglu_f32(const float* gate, const float* up, float* out, i64 n, float limit) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const float g = fminf(fmaxf(gate[i], -INFINITY), limit);
        const float u = fminf(fmaxf(up[i], -limit), limit);
        out[i] = dsv4_fused_silu(g) * u;
    }
}

// ---------------------------------------------------------------------------- routing
//
// One block per token (grid-stride), blockDim a multiple of 32. The scores of the token's e
// experts go to dynamic shared memory (e floats), as the composition's `unary` ops or its row
// softmax (dsv4_softmax_rows_f32's arithmetic and block reductions) give them.

// The position of v in f32::total_cmp's ascending order (index.cu's dsv4_total_order).
static __device__ __forceinline__ unsigned int dsv4_route_order(float v) {
    const unsigned int u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static __device__ __forceinline__ float dsv4_route_score(int scoring, float v) {
    switch (scoring) {
        // softplus with torch's threshold (above 20 the value itself), as the `unary` op.
        case DSV4_SCORE_SQRTSOFTPLUS: return sqrtf(v > 20.0f ? v : log1pf(expf(v)));
        case DSV4_SCORE_SIGMOID: return dsv4_fused_sigmoid(v);
        default: return NAN;
    }
}

// The scores of one token's logits lr[0..e) into s[0..e). Every thread of the block must call
// it; s is complete for all when it returns.
static __device__ void dsv4_route_scores(const float* lr, i64 e, int scoring, float* s, float* scratch) {
    if (scoring == DSV4_SCORE_SOFTMAX) {
        float mx = -INFINITY;
        for (i64 j = threadIdx.x; j < e; j += blockDim.x) mx = fmaxf(mx, lr[j]);
        mx = dsv4_block_max(mx, scratch);
        if (mx == -INFINITY) {
            for (i64 j = threadIdx.x; j < e; j += blockDim.x) s[j] = 0.0f;
        } else {
            float sum = 0.0f;
            for (i64 j = threadIdx.x; j < e; j += blockDim.x) {
                const float v = expf(lr[j] - mx);
                s[j] = v;
                sum += v;
            }
            sum = dsv4_block_sum(sum, scratch);
            for (i64 j = threadIdx.x; j < e; j += blockDim.x) s[j] = s[j] / sum;
        }
    } else {
        for (i64 j = threadIdx.x; j < e; j += blockDim.x) s[j] = dsv4_route_score(scoring, lr[j]);
    }
    __syncthreads();
}

// The score of pick j of a token: s[id] for an id in 0..e, else 0 (gather_last's "no entry").
static __device__ __forceinline__ float dsv4_route_pick(const float* s, const int* ids, i64 j, i64 e) {
    const int id = ids[j];
    return (id >= 0 && (i64)id < e) ? s[id] : 0.0f;
}

// wr[j] = pick_j / (Σ picks · 1 + 1e-20) · routed_scale + 0 for the k picks of a token: the
// composition's gather_last, its row reduce (the same per-thread strides and block reduction as
// dsv4_reduce_rows_f32), affine, division and affine. Every thread of the block must call it.
static __device__ void dsv4_route_weights(const float* s, const int* ids, float* wr, i64 e, i64 k, float routed_scale,
                                          float* scratch) {
    float part = 0.0f;
    for (i64 j = threadIdx.x; j < k; j += blockDim.x) part += dsv4_route_pick(s, ids, j, e);
    const float denom = dsv4_block_sum(part, scratch) * 1.0f + 1e-20f;
    for (i64 j = threadIdx.x; j < k; j += blockDim.x) wr[j] = (dsv4_route_pick(s, ids, j, e) / denom) * routed_scale + 0.0f;
}

// Routing by top-k: the k experts with the largest score (+ bias[j] when has_bias; the bias
// only steers the choice), descending in f32::total_cmp's order with ties to the lower expert
// (the `topk` op's order), into ids [t, k]; their weights into weights [t, k]. logits [t, e],
// bias [e] (not read without has_bias). The pick of rank q is the expert that exactly q others
// beat, so every thread ranks its own experts against the row (no sort, no atomics). Dynamic
// shared memory: 2·e words (the scores, then the selection keys).
extern "C" __global__ void dsv4_moe_route_topk_f32(int* ids, float* weights, const float* logits, const float* bias,
                                                   i64 t, i64 e, i64 k, int scoring, int has_bias, float routed_scale) {
    DSV4_DYNAMIC_SHARED(float, dsv4_route_shared);
    __shared__ float scratch[32];
    float* s = dsv4_route_shared;
    unsigned int* key = (unsigned int*)(dsv4_route_shared + e);
    for (i64 row = blockIdx.x; row < t; row += gridDim.x) {
        dsv4_route_scores(logits + row * e, e, scoring, s, scratch);
        // Ascending in key = descending in value.
        for (i64 j = threadIdx.x; j < e; j += blockDim.x) key[j] = ~dsv4_route_order(has_bias ? s[j] + bias[j] : s[j]);
        __syncthreads();
        int* ir = ids + row * k;
        for (i64 j = threadIdx.x; j < e; j += blockDim.x) {
            const unsigned int kj = key[j];
            i64 rank = 0;
            for (i64 q = 0; q < e && rank < k; ++q) rank += (key[q] < kj || (key[q] == kj && q < j)) ? 1 : 0;
            if (rank < k) ir[rank] = (int)j;
        }
        __syncthreads();
        dsv4_route_weights(s, ir, weights + row * k, e, k, routed_scale, scratch);
        __syncthreads();  // s and key are the next token's
    }
}

// Routing by given ids (hash layers): ids [t, k] (each in 0..e; another reads as score 0), the
// weights of those picks into weights [t, k]. logits [t, e]. Dynamic shared memory: e floats.
extern "C" __global__ void dsv4_moe_route_hash_f32(float* weights, const float* logits, const int* ids, i64 t, i64 e,
                                                   i64 k, int scoring, float routed_scale) {
    DSV4_DYNAMIC_SHARED(float, dsv4_route_hash_scores);
    __shared__ float scratch[32];
    for (i64 row = blockIdx.x; row < t; row += gridDim.x) {
        dsv4_route_scores(logits + row * e, e, scoring, dsv4_route_hash_scores, scratch);
        dsv4_route_weights(dsv4_route_hash_scores, ids + row * k, weights + row * k, e, k, routed_scale, scratch);
        __syncthreads();  // the scores are the next token's
    }
}
