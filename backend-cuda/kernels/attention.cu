// Sparse attention with sinks over the paged pool, and the lightning indexer's scores
// (backend-cuda/src/attention.rs).
//
// Both read the selected pool rows in place, decoding each value exactly as
// RowFormat::decode does (and as pool.cu's read kernels): f32, bf16, and the fp8 KV row (e4m3
// codes in blocks of 64 with one power-of-two scale byte each, then the rope channels as
// little-endian BF16, then the scale bytes). Everything else is f32.
//
// Pool rows come from index tensors that may have been computed on the device: a row outside
// 0..pool_rows is never dereferenced. In sparse attention it is "no key" (as -1); for the
// indexer, a key whose row is outside the pool is never picked.

#define DSV4_ATTN_F32 0
#define DSV4_ATTN_BF16 1
#define DSV4_ATTN_FP8 2
#define DSV4_ATTN_FP8_BLOCK 64

// quant::E4M3_TO_F32[b] (both NaN codes are +NaN there); as pool.cu's dsv4_e4m3_to_f32.
static __device__ __forceinline__ float dsv4_attn_e4m3(unsigned int b) {
    const unsigned int exp = (b >> 3) & 15u, mant = b & 7u;
    if (exp == 15u && mant == 7u) return __uint_as_float(0x7fc00000u);
    const float mag = exp == 0u ? (float)mant * (1.0f / 512.0f) : __uint_as_float(((exp + 120u) << 23) | (mant << 20));
    return (b & 0x80u) ? -mag : mag;
}

// Value c of the pool row starting at byte `row`, in `format` (DSV4_ATTN_*). For fp8 rows,
// nope = width - rope values are e4m3 codes, the last rope BF16.
static __device__ __forceinline__ float dsv4_attn_decode(const unsigned char* row, int format, i64 c, i64 nope,
                                                         i64 rope) {
    if (format == DSV4_ATTN_F32) return ((const float*)row)[c];
    if (format == DSV4_ATTN_BF16) return dsv4_bf16_to_f32(((const unsigned short*)row)[c]);
    if (c < nope) {
        const int scale = (int)row[nope + 2 * rope + c / DSV4_ATTN_FP8_BLOCK];
        return dsv4_attn_e4m3(row[c]) * ldexpf(1.0f, scale - 127);
    }
    const i64 j = c - nope;
    const unsigned int b = (unsigned int)row[nope + 2 * j] | ((unsigned int)row[nope + 2 * j + 1] << 8);
    return dsv4_bf16_to_f32((unsigned short)b);
}

// ----------------------------------------------------------------------- sparse attention
//
// composed::sparse_attention, fused: for query t and head h, logits l_j = (q·k_j)·scale over
// the K listed pool rows (-inf for none), a softmax over [l_0 .. l_{K-1}, sinks[h]] (max
// subtracted; a row whose maximum is -inf gives zeros, as dsv4_softmax_rows_f32), and
// out = Σ_j p_j · k_j (V = K). One block per (t, h) pair (grid-stride), blockDim.x a multiple
// of 32: warps take keys in turn for the logits (lanes split the channels, one warp sum), then
// threads take channels for the weighted sum, keys in order. `sc` holds the K logits, then the
// probabilities: dynamic shared memory, or the block's slice of a global scratch buffer when K
// is too long for it. q and out [T, H, d], idx [T, K], sinks [H].

static __device__ void dsv4_sparse_attention_pairs(float* out, const float* q, const unsigned char* pool,
                                                   const int* idx, const float* sinks, i64 t, i64 h, i64 d, i64 kk,
                                                   int format, i64 rope, i64 row_bytes, i64 pool_rows, float scale,
                                                   float* sc) {
    __shared__ float red[32];
    const unsigned int tid = threadIdx.x, lane = tid % DSV4_WARP, warp = tid / DSV4_WARP;
    const unsigned int warps = blockDim.x / DSV4_WARP;
    const i64 nope = d - rope;
    for (i64 p = blockIdx.x; p < t * h; p += gridDim.x) {
        const i64 ti = p / h, hi = p - ti * h;
        const float* qp = q + p * d;
        const int* ir = idx + ti * kk;
        float* op = out + p * d;

        // Logits, one warp per key.
        for (i64 j = warp; j < kk; j += warps) {
            const int s = ir[j];
            if (s < 0 || (i64)s >= pool_rows) {  // the same for every lane of the warp
                if (lane == 0) sc[j] = -INFINITY;
                continue;
            }
            const unsigned char* row = pool + (i64)s * row_bytes;
            float part = 0.0f;
            for (i64 c = lane; c < d; c += DSV4_WARP) part += qp[c] * dsv4_attn_decode(row, format, c, nope, rope);
            const float dot = dsv4_warp_sum(part);
            if (lane == 0) sc[j] = dot * scale + 0.0f;
        }
        __syncthreads();

        // Softmax with the sink logit.
        float m = -INFINITY;
        for (i64 j = tid; j < kk; j += blockDim.x) m = fmaxf(m, sc[j]);
        const float sink = sinks[hi];
        m = fmaxf(dsv4_block_max(m, red), sink);
        if (m == -INFINITY) {  // uniform: every thread has the same m
            for (i64 c = tid; c < d; c += blockDim.x) op[c] = 0.0f;
        } else {
            float sum = 0.0f;
            for (i64 j = tid; j < kk; j += blockDim.x) {
                const float e = expf(sc[j] - m);
                sc[j] = e;  // read back below by this same thread
                sum += e;
            }
            sum = dsv4_block_sum(sum, red) + expf(sink - m);
            for (i64 j = tid; j < kk; j += blockDim.x) sc[j] = sc[j] / sum;
            __syncthreads();

            // P·V, one thread per channel, keys in order.
            for (i64 c = tid; c < d; c += blockDim.x) {
                float acc = 0.0f;
                for (i64 j = 0; j < kk; ++j) {
                    const int s = ir[j];
                    if (s < 0 || (i64)s >= pool_rows) continue;
                    acc += sc[j] * dsv4_attn_decode(pool + (i64)s * row_bytes, format, c, nope, rope);
                }
                op[c] = acc;
            }
        }
        __syncthreads();  // sc is rewritten by the next pair
    }
}

// Logits in dynamic shared memory (kk floats).
extern "C" __global__ void dsv4_sparse_attention_shared(float* out, const float* q, const unsigned char* pool,
                                                        const int* idx, const float* sinks, i64 t, i64 h, i64 d,
                                                        i64 kk, int format, i64 rope, i64 row_bytes, i64 pool_rows,
                                                        float scale) {
    DSV4_DYNAMIC_SHARED(float, dsv4_attn_logits);
    dsv4_sparse_attention_pairs(out, q, pool, idx, sinks, t, h, d, kk, format, rope, row_bytes, pool_rows, scale,
                                dsv4_attn_logits);
}

// Logits in `scratch`, kk floats per block of the grid.
extern "C" __global__ void dsv4_sparse_attention_global(float* out, float* scratch, const float* q,
                                                        const unsigned char* pool, const int* idx, const float* sinks,
                                                        i64 t, i64 h, i64 d, i64 kk, int format, i64 rope,
                                                        i64 row_bytes, i64 pool_rows, float scale) {
    dsv4_sparse_attention_pairs(out, q, pool, idx, sinks, t, h, d, kk, format, rope, row_bytes, pool_rows, scale,
                                scratch + (i64)blockIdx.x * kk);
}

// ------------------------------------------------------------------------ lightning indexer
//
// composed::indexer_select (IndexScores::F32) up to its top-k: the score of key n for query t
// is Σ_h (relu(q_h·k_n)·scale + 0)·w_h, summed over the heads in order from 0 as the
// composition's relu, affine, product and reduction do, plus 0 (so -0 reads as +0, as its
// mask addition makes it); keys outside valid[t] (and keys whose row is outside the pool)
// score -inf, as the mask makes them. The top-k (dsv4_topk_*, index.cu) and
// dsv4_indexer_picks then finish the selection.
//
// One thread per key (its dot products sequential over the channels, for all heads at once),
// grid (key tiles, query rows), both grid-stride. The block's query row sits in dynamic shared
// memory transposed, qs[c·hp + h] (hp = heads rounded up to DSV4_INDEXER_GROUP, the padding
// zero), followed by the row's head weights: (hp·dh + nh) floats.

#define DSV4_INDEXER_GROUP 32

// scores [rows, n]; q [rows, nh, dh]; w [rows, nh]; valid [rows, 2] (start, end) key numbers;
// key_rows [n] pool rows.
extern "C" __global__ void dsv4_indexer_scores(float* scores, const float* q, const float* w,
                                               const unsigned char* pool, const int* key_rows, const int* valid,
                                               i64 rows, i64 n, i64 nh, i64 dh, int format, i64 rope, i64 row_bytes,
                                               i64 pool_rows, float scale) {
    DSV4_DYNAMIC_SHARED(float, dsv4_indexer_query);
    const i64 hp = (nh + DSV4_INDEXER_GROUP - 1) / DSV4_INDEXER_GROUP * DSV4_INDEXER_GROUP;
    float* qs = dsv4_indexer_query;
    float* ws = dsv4_indexer_query + hp * dh;
    const i64 nope = dh - rope;
    const i64 tiles = (n + blockDim.x - 1) / blockDim.x;
    for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
        const float* qr = q + r * nh * dh;
        __syncthreads();  // the previous row's readers are done with qs and ws
        for (i64 e = threadIdx.x; e < hp * dh; e += blockDim.x) {
            const i64 c = e / hp, hh = e - c * hp;
            qs[e] = hh < nh ? qr[hh * dh + c] : 0.0f;
        }
        for (i64 hh = threadIdx.x; hh < nh; hh += blockDim.x) ws[hh] = w[r * nh + hh];
        __syncthreads();
        i64 lo = valid[2 * r], hi = valid[2 * r + 1];
        if (lo < 0) lo = 0;
        if (hi > n) hi = n;
        for (i64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
            const i64 j = tile * blockDim.x + threadIdx.x;
            if (j >= n) continue;
            const int s = key_rows[j];
            float v = -INFINITY;
            if (j >= lo && j < hi && s >= 0 && (i64)s < pool_rows) {
                const unsigned char* row = pool + (i64)s * row_bytes;
                v = 0.0f;
                for (i64 g = 0; g < hp; g += DSV4_INDEXER_GROUP) {
                    float acc[DSV4_INDEXER_GROUP];
                    for (int u = 0; u < DSV4_INDEXER_GROUP; ++u) acc[u] = 0.0f;
                    for (i64 c = 0; c < dh; ++c) {
                        const float kc = dsv4_attn_decode(row, format, c, nope, rope);
                        const float* qc = qs + c * hp + g;
                        for (int u = 0; u < DSV4_INDEXER_GROUP; ++u) acc[u] += qc[u] * kc;
                    }
                    for (int u = 0; u < DSV4_INDEXER_GROUP; ++u) {
                        if (g + u < nh) v += (fmaxf(acc[u], 0.0f) * scale + 0.0f) * ws[g + u];
                    }
                }
                v = v + 0.0f;
            }
            scores[r * n + j] = v;
        }
    }
}

// The picks of the top-k: out[e] = key_rows[ids[e]] + offset (wrapping), or -1 where the
// pick's score is -inf (outside valid, as the composition marks them) or its key number is
// outside 0..n. out, vals and ids [total].
extern "C" __global__ void dsv4_indexer_picks(int* out, const float* vals, const int* ids, const int* key_rows,
                                              i64 total, i64 n, int offset) {
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const int id = ids[e];
        const bool none = vals[e] == -INFINITY || id < 0 || (i64)id >= n;
        out[e] = none ? -1 : (int)((unsigned int)key_rows[id] + (unsigned int)offset);
    }
}
