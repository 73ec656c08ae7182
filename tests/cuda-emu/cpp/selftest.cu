// Kernels for the emulator's own tests (tests/cuda-emu/tests/runtime.rs), compiled like the
// backend's: common.cuh, then this file, through cuda_shim.h. Not part of dsv4's CUDA backend.

// all[b * blockDim.x + t] = Σ in[b * n_per_block + i] over i < n_per_block, for every thread t of
// block b (dsv4_block_sum gives every thread the total).
extern "C" __global__ void dsv4emu_test_block_sum(const float* in, float* all, int n_per_block) {
    __shared__ float scratch[32];
    float v = 0.0f;
    for (int i = threadIdx.x; i < n_per_block; i += blockDim.x) v += in[(i64)blockIdx.x * n_per_block + i];
    const float total = dsv4_block_sum(v, scratch);
    all[(i64)blockIdx.x * blockDim.x + threadIdx.x] = total;
}

// As dsv4emu_test_block_sum, with dsv4_block_max.
extern "C" __global__ void dsv4emu_test_block_max(const float* in, float* all, int n_per_block) {
    __shared__ float scratch[32];
    float v = -INFINITY;
    for (int i = threadIdx.x; i < n_per_block; i += blockDim.x) v = fmaxf(v, in[(i64)blockIdx.x * n_per_block + i]);
    const float m = dsv4_block_max(v, scratch);
    all[(i64)blockIdx.x * blockDim.x + threadIdx.x] = m;
}

// One shuffle per thread, float and int: fout[i] = fin[i ^ lane_mask within the warp], same for
// ints; wsum[i] = dsv4_warp_sum over the warp of fin.
extern "C" __global__ void dsv4emu_test_shuffle(const float* fin, const int* iin, float* fout, int* iout, float* wsum,
                                                int lane_mask) {
    const i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    fout[i] = __shfl_xor_sync(0xffffffffu, fin[i], lane_mask);
    iout[i] = __shfl_xor_sync(0xffffffffu, iin[i], lane_mask);
    wsum[i] = dsv4_warp_sum(fin[i]);
}

// Inclusive prefix sum within each block through static shared memory (Hillis-Steele: two
// barriers per step), so a barrier that lets a thread through early gives wrong numbers.
extern "C" __global__ void dsv4emu_test_scan(const int* in, int* out) {
    __shared__ int buf[1024];
    const unsigned int t = threadIdx.x;
    const i64 i = (i64)blockIdx.x * blockDim.x + t;
    buf[t] = in[i];
    __syncthreads();
    for (unsigned int o = 1; o < blockDim.x; o <<= 1) {
        const int v = t >= o ? buf[t - o] : 0;
        __syncthreads();
        buf[t] += v;
        __syncthreads();
    }
    out[i] = buf[t];
}

// Reverses each block's slice through dynamic shared memory (blockDim.x floats).
extern "C" __global__ void dsv4emu_test_reverse(const float* in, float* out) {
    DSV4_DYNAMIC_SHARED(float, buf);
    const unsigned int t = threadIdx.x;
    const i64 base = (i64)blockIdx.x * blockDim.x;
    buf[t] = in[base + t];
    __syncthreads();
    out[base + t] = buf[blockDim.x - 1 - t];
}

// out[i] = what dynamic shared memory word i holds before anyone writes it (the poison).
extern "C" __global__ void dsv4emu_test_read_shared(int* out) {
    DSV4_DYNAMIC_SHARED(int, buf);
    out[threadIdx.x] = buf[threadIdx.x];
}

// Writes one float past `words` floats of dynamic shared memory.
extern "C" __global__ void dsv4emu_test_shared_overflow(int words) {
    DSV4_DYNAMIC_SHARED(float, buf);
    if (threadIdx.x == 0) buf[words] = 1.0f;
}

// Threads below `split` wait at a barrier the others never reach.
extern "C" __global__ void dsv4emu_test_divergent_sync(float* out, unsigned int split) {
    if (threadIdx.x < split) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Threads at or above n return before a barrier the rest reach.
extern "C" __global__ void dsv4emu_test_early_exit_sync(float* out, unsigned int n) {
    if (threadIdx.x >= n) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Half of each warp shuffles while the other half waits at __syncthreads: a deadlock.
extern "C" __global__ void dsv4emu_test_deadlock(float* out) {
    float v = 1.0f;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else __syncthreads();
    out[threadIdx.x] = v;
}

// A shuffle with a caller-chosen mask and lane mask (for the misuse checks).
extern "C" __global__ void dsv4emu_test_shuffle_args(float* out, unsigned int mask, int lane_mask) {
    out[threadIdx.x] = __shfl_xor_sync(mask, (float)threadIdx.x, lane_mask);
}

// Records every thread's coordinates: out[4 * g + 0..4] = (threadIdx.x, .y, .z, block linear
// index) where g is the global linear thread index, x fastest.
extern "C" __global__ void dsv4emu_test_indices(int* out) {
    const unsigned int block =
        blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned int per_block = blockDim.x * blockDim.y * blockDim.z;
    const unsigned int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const i64 g = (i64)block * per_block + t;
    out[4 * g + 0] = (int)threadIdx.x;
    out[4 * g + 1] = (int)threadIdx.y;
    out[4 * g + 2] = (int)threadIdx.z;
    out[4 * g + 3] = (int)block;
}

// Every kind of parameter, echoed: out = [a[0], i, u, lo 32 bits of l, hi 32 bits of l, f] as
// raw 32-bit words.
extern "C" __global__ void dsv4emu_test_params(const float* a, unsigned int* out, int i, unsigned int u, long long l,
                                               float f) {
    if (threadIdx.x != 0) return;
    out[0] = __float_as_uint(a[0]);
    out[1] = (unsigned int)i;
    out[2] = u;
    out[3] = (unsigned int)(l & 0xffffffffll);
    out[4] = (unsigned int)((unsigned long long)l >> 32);
    out[5] = __float_as_uint(f);
}

// No parameters at all.
extern "C" __global__ void dsv4emu_test_noop() {}

// Math helpers of common.cuh: out[i] = f(in[i]) for a fixed list of functions (see the test).
extern "C" __global__ void dsv4emu_test_math(const float* in, float* out, unsigned short* bf16, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float x = in[i];
        out[8 * i + 0] = expf(x);
        out[8 * i + 1] = logf(fabsf(x));
        out[8 * i + 2] = dsv4_rsqrt(fabsf(x));
        out[8 * i + 3] = fmaf(x, x, 1.0f);
        out[8 * i + 4] = floorf(x);
        int e = 0;
        out[8 * i + 5] = frexpf(x, &e);
        out[8 * i + 6] = ldexpf(1.0f, e);
        out[8 * i + 7] = dsv4_bf16_to_f32(dsv4_f32_to_bf16(x));
        bf16[i] = dsv4_f32_to_bf16(x);
    }
}

// A deliberate race: every thread writes out[blockIdx.x] with no barrier, so the value left is
// the last writer's, which on the emulator is the last thread to start: blockDim.x - 1 in the
// usual order, 0 in reverse order (EmulatedDevice::reverse_thread_order).
extern "C" __global__ void dsv4emu_test_last_writer(int* out) { out[blockIdx.x] = (int)threadIdx.x; }
