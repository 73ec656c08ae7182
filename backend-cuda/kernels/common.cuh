// Prelude of every dsv4 CUDA kernel source (prepended by backend-cuda/src/kernels.rs).
//
// The same sources are compiled two ways: by NVRTC for the GPU, and as C++ for the host by
// dsv4's CUDA emulator (tests/cuda-emu), which runs each block's threads cooperatively. So a
// kernel may use only what both provide:
//   * `extern "C" __global__ void dsv4_<name>(...)` entry points; parameters are pointers
//     (`float*`, `const float*`, `int*`, `const int*`, `unsigned char*`, `const unsigned short*`,
//     ...), `int`, `unsigned int`, `long long` and `float`;
//   * `__device__` helper functions (static inline), `threadIdx`, `blockIdx`, `blockDim`,
//     `gridDim`, `__syncthreads()`, `__shfl_xor_sync(0xffffffffu, v, lane_mask)` on float or
//     int (blockDim a multiple of 32 wherever a shuffle is used), statically sized `__shared__`
//     arrays, and DSV4_DYNAMIC_SHARED(type, name) for dynamic shared memory;
//   * float math: expf, logf, log1pf, sqrtf, rsqrtf (see below), fabsf, fmaxf, fminf, fmaf,
//     floorf, ldexpf, frexpf, INFINITY, NAN; __float_as_uint / __uint_as_float /
//     __float_as_int / __int_as_float.
// No #include, no atomics (results must be deterministic), no textures, no cooperative groups,
// no printf. Every index read from memory is bounds-checked by the kernel.

#ifndef DSV4_EMULATOR
#define DSV4_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#define INFINITY __int_as_float(0x7f800000)
#define NAN __int_as_float(0x7fffffff)
#endif

#define DSV4_WARP 32

typedef long long i64;

// rsqrtf on the GPU is an approximation (2 ulp); 1/sqrtf is correctly rounded in both places,
// which is what the f32 conformance tolerances assume.
static __device__ __forceinline__ float dsv4_rsqrt(float x) { return 1.0f / sqrtf(x); }

// BF16 is handled as raw bits (no cuda_bf16.h under NVRTC without the toolkit's headers).
static __device__ __forceinline__ float dsv4_bf16_to_f32(unsigned short b) {
    return __uint_as_float(((unsigned int)b) << 16);
}

// Round to nearest even; NaN stays a (quiet) NaN.
static __device__ __forceinline__ unsigned short dsv4_f32_to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    unsigned int rounding = 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)((u + rounding) >> 16);
}

static __device__ __forceinline__ float dsv4_warp_sum(float v) {
    for (int o = DSV4_WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float dsv4_warp_max(float v) {
    for (int o = DSV4_WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum of `v` over the block (blockDim.x a multiple of 32, at most 1024, 1-D blocks); every
// thread gets the result. `scratch` is a __shared__ float[32] the block does not otherwise use
// between the two barriers.
static __device__ __forceinline__ float dsv4_block_sum(float v, float* scratch) {
    const unsigned int lane = threadIdx.x % DSV4_WARP, warp = threadIdx.x / DSV4_WARP;
    const unsigned int warps = blockDim.x / DSV4_WARP;
    v = dsv4_warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (unsigned int w = 0; w < warps; ++w) total += scratch[w];  // same order in every thread
    return total;
}

// Maximum of `v` over the block; as dsv4_block_sum.
static __device__ __forceinline__ float dsv4_block_max(float v, float* scratch) {
    const unsigned int lane = threadIdx.x % DSV4_WARP, warp = threadIdx.x / DSV4_WARP;
    const unsigned int warps = blockDim.x / DSV4_WARP;
    v = dsv4_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float m = -INFINITY;
    for (unsigned int w = 0; w < warps; ++w) m = fmaxf(m, scratch[w]);
    return m;
}

// The offsets of element i of a row-major index space of `rank` dimensions `dims` in two
// strided operands: with (c0, …, c(rank-1)) the multi-index of i, *o0 = Σ ck·s0[k] and
// *o1 = Σ ck·s1[k] (element strides; 0 where an operand is broadcast along k). Dimensions of
// size 1 contribute nothing. Shared by the broadcasting binary op and the strided copy.
static __device__ __forceinline__ void dsv4_strided_offsets(i64 i, int rank, const i64* dims, const i64* s0,
                                                            const i64* s1, i64* o0, i64* o1) {
    i64 r = i, a = 0, b = 0;
    for (int k = rank - 1; k >= 0; --k) {
        const i64 dk = dims[k];
        if (dk <= 1) continue;
        const i64 c = r % dk;
        r /= dk;
        a += c * s0[k];
        b += c * s1[k];
    }
    *o0 = a;
    *o1 = b;
}
