// CUDA's built-in variables and the scheduler calls behind __syncthreads / __shfl_xor_sync /
// DSV4_DYNAMIC_SHARED: declared for the kernels (through cuda_shim.h) and defined by
// runtime.cpp. Free of system headers, like cuda_shim.h.

#ifndef DSV4EMU_BUILTINS_H
#define DSV4EMU_BUILTINS_H

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};

// `__thread` rather than `thread_local`: trivially initialised, so accesses are direct TLS
// loads, not calls to a lazy-initialisation wrapper.
extern __thread uint3 threadIdx;
extern __thread uint3 blockIdx;
extern __thread dim3 blockDim;
extern __thread dim3 gridDim;

// Block barrier. Reported as a launch error (never a hang): reached by some threads of a block
// while others have exited, or a deadlock with threads waiting in different places.
void __syncthreads();

// Raw 32-bit exchange of one __shfl_xor_sync: every lane of the warp must take part (mask
// 0xffffffff, block size a multiple of 32), lane_mask in 0..31, all lanes at the same shuffle.
unsigned int dsv4emu_shfl_xor_bits(unsigned int mask, unsigned int bits, int lane_mask);

// The launch's dynamic shared memory (`shared_bytes` of the launch config, 16-byte aligned),
// filled with 0xff bytes (NaN as float, -1 as int) at the start of every block; a write past
// its end is reported after the block.
void* dsv4emu_dynamic_shared();

#endif
