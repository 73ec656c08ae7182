// Index kernels: gathers, the ordered scatter-add, top-k, masks and index arithmetic
// (backend-cuda/src/index.rs).
//
// Indices are i32 and may come from the device (top-k, routing) with no host check: every index
// read from memory is bounds-checked here, and one outside its operand reads as "no entry"
// (zeros) or is skipped, never dereferenced.

// ------------------------------------------------------------------------------- gathers

// out[i, c] = x[idx[i], c] for idx[i] in 0..rows, else 0 (-1 is "no entry"). out [n, row].
extern "C" __global__ void dsv4_index_select(float* out, const float* x, const int* idx, i64 n, i64 row, i64 rows) {
    const i64 total = n * row;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 i = e / row, c = e - i * row;
        const int id = idx[i];
        out[e] = (id >= 0 && (i64)id < rows) ? x[(i64)id * row + c] : 0.0f;
    }
}

// out[r, j] = x[r, idx[r, j]] for idx in 0..n, else 0. out and idx [total / k, k], x [.., n].
extern "C" __global__ void dsv4_gather_last(float* out, const float* x, const int* idx, i64 total, i64 k, i64 n) {
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 r = e / k;
        const int id = idx[e];
        out[e] = (id >= 0 && (i64)id < n) ? x[r * n + id] : 0.0f;
    }
}

// ------------------------------------------------------------------------ block helpers

static __device__ __forceinline__ int dsv4_warp_sum_int(int v) {
    for (int o = DSV4_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Exclusive prefix sum of `v` over the threads of a 1-D block, in thread order; `*total` gets
// the sum over the block. `s` is __shared__ int[blockDim.x], not otherwise used between the
// barriers. Every thread of the block must call it.
static __device__ int dsv4_block_exclusive_scan(int v, int* s, int* total) {
    const unsigned int t = threadIdx.x;
    s[t] = v;
    __syncthreads();
    for (unsigned int off = 1; off < blockDim.x; off <<= 1) {
        const int add = t >= off ? s[t - off] : 0;
        __syncthreads();
        s[t] += add;
        __syncthreads();
    }
    const int inclusive = s[t];
    *total = s[blockDim.x - 1];
    __syncthreads();
    return inclusive - v;
}

// --------------------------------------------------------------------------- index_add

// Threads per block of dsv4_index_add (the `hits` list holds one chunk of idx).
#define DSV4_INDEX_ADD_THREADS 256

// out = dst, then out[idx[i]] += src[i] along axis 0 in order of i. One block per destination
// row r (grid-stride): the block scans idx in chunks, lists the i with idx[i] == r in order,
// and each thread adds the listed source rows into its own columns of row r. A column is only
// ever touched by one thread, so the sums run in order of i with no atomics. Entries outside
// 0..rows match no row and are skipped. dst and out [rows, row], idx [n], src [n, row].
extern "C" __global__ void dsv4_index_add(float* out, const float* dst, const int* idx, const float* src, i64 rows,
                                          i64 row, i64 n) {
    __shared__ int scan[DSV4_INDEX_ADD_THREADS];
    __shared__ int hits[DSV4_INDEX_ADD_THREADS];
    const unsigned int t = threadIdx.x, threads = blockDim.x;
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        float* o = out + r * row;
        for (i64 c = t; c < row; c += threads) o[c] = dst[r * row + c];
        for (i64 base = 0; base < n; base += threads) {
            const i64 i = base + t;
            const int hit = (i < n && (i64)idx[i] == r) ? 1 : 0;
            int count = 0;
            const int at = dsv4_block_exclusive_scan(hit, scan, &count);
            if (hit) hits[at] = (int)t;
            __syncthreads();
            for (int h = 0; h < count; ++h) {
                const float* s = src + (base + hits[h]) * row;
                for (i64 c = t; c < row; c += threads) o[c] += s[c];
            }
            __syncthreads();
        }
    }
}

// -------------------------------------------------------------------------------- top-k
//
// Order: descending by value in f32::total_cmp's total order (-NaN < -inf < .. < -0 < +0 <
// .. < inf < +NaN, as the CPU backend), ties to the lower index. Each entry becomes one unique
// 64-bit key, (~ord(value) << 32) | index, whose ascending order is exactly that order; top-k
// is then the k smallest keys, sorted.
//
// One block per row (grid-stride), DSV4_TOPK_THREADS threads:
//   * `select == 0` (short rows): every entry's key goes into `buf` (p >= n, a power of two,
//     padded with the largest key), which is sorted;
//   * `select == 1` (long rows): a radix select over the 32 value bits (8 passes of 4 bits,
//     per-thread counters reduced over the block) finds the value of the k-th key and how many
//     entries of that value are taken (the first ones by index); one ordered pass over the row
//     writes exactly the k chosen keys into `buf` (p >= k), which is sorted.
// `buf` is dynamic shared memory (dsv4_topk_shared) or the block's slice of a global scratch
// buffer (dsv4_topk_global, for k beyond shared memory).

#define DSV4_TOPK_THREADS 256
// Entries per thread per chunk of the ordered pass of a select.
#define DSV4_TOPK_ITEMS 16

typedef unsigned long long u64;

// The position of v in f32::total_cmp's ascending order, as an unsigned integer.
static __device__ __forceinline__ unsigned int dsv4_total_order(float v) {
    const unsigned int u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Ascending in this key = descending in value.
static __device__ __forceinline__ unsigned int dsv4_topk_desc(float v) { return ~dsv4_total_order(v); }

static __device__ __forceinline__ u64 dsv4_topk_key(unsigned int desc, i64 index) {
    return ((u64)desc << 32) | (u64)(unsigned int)index;
}

// Ascending bitonic sort of a[0..p), p a power of two. Every thread of the block must call it.
static __device__ void dsv4_bitonic_sort_u64(u64* a, i64 p) {
    for (i64 size = 2; size <= p; size <<= 1) {
        for (i64 stride = size >> 1; stride > 0; stride >>= 1) {
            for (i64 q = threadIdx.x; q < p / 2; q += blockDim.x) {
                const i64 i = 2 * stride * (q / stride) + (q % stride), j = i + stride;
                const u64 x = a[i], y = a[j];
                const bool ascending = (i & size) == 0;
                if ((x > y) == ascending) {
                    a[i] = y;
                    a[j] = x;
                }
            }
            __syncthreads();
        }
    }
}

// The value of the k-th smallest key's value part among xr[0..n) (1 <= k <= n), and in *need
// how many entries of that value belong to the k smallest keys. Every thread of the block must
// call it; all get the same results.
static __device__ unsigned int dsv4_topk_radix_select(const float* xr, i64 n, i64 k, i64* need) {
    __shared__ int counts[(DSV4_TOPK_THREADS / DSV4_WARP) * 16];
    __shared__ int totals[16];
    const unsigned int t = threadIdx.x, lane = t % DSV4_WARP, warp = t / DSV4_WARP;
    const unsigned int warps = blockDim.x / DSV4_WARP;
    unsigned int prefix = 0, mask = 0;
    i64 left = k;
    for (int shift = 28; shift >= 0; shift -= 4) {
        int c[16];
        for (int b = 0; b < 16; ++b) c[b] = 0;
        for (i64 j = t; j < n; j += blockDim.x) {
            const unsigned int key = dsv4_topk_desc(xr[j]);
            if ((key & mask) == prefix) {
                const unsigned int d = (key >> shift) & 15u;
                for (int b = 0; b < 16; ++b) c[b] += d == (unsigned int)b ? 1 : 0;
            }
        }
        for (int b = 0; b < 16; ++b) {
            const int v = dsv4_warp_sum_int(c[b]);
            if (lane == 0) counts[warp * 16 + b] = v;
        }
        __syncthreads();
        if (t < 16) {
            int s = 0;
            for (unsigned int w = 0; w < warps; ++w) s += counts[w * 16 + t];
            totals[t] = s;
        }
        __syncthreads();
        // The digit whose cumulative count reaches `left`; the same in every thread.
        i64 below = 0;
        unsigned int digit = 15;
        for (int b = 0; b < 16; ++b) {
            if (below + totals[b] >= left) {
                digit = (unsigned int)b;
                break;
            }
            below += totals[b];
        }
        left -= below;
        prefix |= digit << shift;
        mask |= 15u << shift;
    }
    *need = left;
    return prefix;
}

// Writes into buf[0..k) the keys of the entries whose value key is below `thr`, then the first
// `need` (by index) whose value key equals `thr`, in one ordered pass. Every thread of the block
// must call it.
static __device__ void dsv4_topk_gather(const float* xr, i64 n, i64 k, unsigned int thr, i64 need, u64* buf) {
    __shared__ int scan[DSV4_TOPK_THREADS];
    const unsigned int t = threadIdx.x;
    const i64 chunk = (i64)blockDim.x * DSV4_TOPK_ITEMS;
    const i64 less = k - need;
    i64 less_seen = 0, equal_seen = 0;
    for (i64 base = 0; base < n; base += chunk) {
        const i64 lo = base + (i64)t * DSV4_TOPK_ITEMS;
        const i64 hi = lo + DSV4_TOPK_ITEMS < n ? lo + DSV4_TOPK_ITEMS : n;
        int lt = 0, eq = 0;
        for (i64 j = lo; j < hi; ++j) {
            const unsigned int key = dsv4_topk_desc(xr[j]);
            lt += key < thr ? 1 : 0;
            eq += key == thr ? 1 : 0;
        }
        // At most blockDim * ITEMS = 4096 of each per chunk: both fit in 16 bits.
        int total = 0;
        const int before = dsv4_block_exclusive_scan(lt | (eq << 16), scan, &total);
        i64 lt_at = less_seen + (before & 0xffff), eq_at = equal_seen + (before >> 16);
        for (i64 j = lo; j < hi; ++j) {
            const unsigned int key = dsv4_topk_desc(xr[j]);
            if (key < thr) {
                if (lt_at < less) buf[lt_at] = dsv4_topk_key(key, j);
                ++lt_at;
            } else if (key == thr) {
                if (eq_at < need) buf[less + eq_at] = dsv4_topk_key(key, j);
                ++eq_at;
            }
        }
        less_seen += total & 0xffff;
        equal_seen += total >> 16;
    }
}

static __device__ void dsv4_topk_rows(float* vals, int* ids, const float* x, i64 rows, i64 n, i64 k, i64 p, int select,
                                      u64* buf) {
    const unsigned int t = threadIdx.x;
    const u64 pad = ~(u64)0;  // above every real key (an index is below 2^31)
    for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * n;
        i64 filled = n;
        if (select) {
            i64 need = 0;
            const unsigned int thr = dsv4_topk_radix_select(xr, n, k, &need);
            dsv4_topk_gather(xr, n, k, thr, need, buf);
            filled = k;
        } else {
            for (i64 j = t; j < n; j += blockDim.x) buf[j] = dsv4_topk_key(dsv4_topk_desc(xr[j]), j);
        }
        for (i64 j = filled + t; j < p; j += blockDim.x) buf[j] = pad;
        __syncthreads();
        dsv4_bitonic_sort_u64(buf, p);
        for (i64 j = t; j < k; j += blockDim.x) {
            const u64 key = buf[j];
            const i64 at = (i64)(key & 0xffffffffull);
            const bool real = key != pad && at < n;
            ids[r * k + j] = real ? (int)at : -1;
            vals[r * k + j] = real ? xr[at] : 0.0f;
        }
        __syncthreads();
    }
}

// Top-k with the keys in dynamic shared memory (p keys of 8 bytes).
extern "C" __global__ void dsv4_topk_shared(float* vals, int* ids, const float* x, i64 rows, i64 n, i64 k, i64 p,
                                            int select) {
    DSV4_DYNAMIC_SHARED(u64, dsv4_topk_keys);
    dsv4_topk_rows(vals, ids, x, rows, n, k, p, select, dsv4_topk_keys);
}

// Top-k with the keys in `scratch`, p keys per block of the grid.
extern "C" __global__ void dsv4_topk_global(float* vals, int* ids, u64* scratch, const float* x, i64 rows, i64 n, i64 k,
                                            i64 p, int select) {
    dsv4_topk_rows(vals, ids, x, rows, n, k, p, select, scratch + (i64)blockIdx.x * p);
}

// ------------------------------------------------------------------- index arithmetic

// 0 where idx >= 0, -inf elsewhere.
extern "C" __global__ void dsv4_index_mask(float* out, const int* idx, i64 n) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = idx[i] >= 0 ? 0.0f : -INFINITY;
}

// One part of a concatenation: src [outer, chunk] into out [outer, out_chunk] at column `at`.
extern "C" __global__ void dsv4_concat_index_part(int* out, const int* src, i64 outer, i64 chunk, i64 out_chunk,
                                                  i64 at) {
    const i64 total = outer * chunk;
    for (i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (i64)gridDim.x * blockDim.x) {
        const i64 o = e / chunk;
        out[o * out_chunk + at + (e - o * chunk)] = src[e];
    }
}

// idx + offset where idx != -1 (wrapping, as two's complement: no undefined overflow).
extern "C" __global__ void dsv4_offset_index(int* out, const int* idx, i64 n, int offset) {
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int v = idx[i];
        out[i] = v == -1 ? -1 : (int)((unsigned int)v + (unsigned int)offset);
    }
}
