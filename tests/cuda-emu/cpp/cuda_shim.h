// dsv4's CUDA emulator: what a kernel source sees when it is compiled as C++ for the host.
//
// build.rs compiles every backend-cuda kernel program (common.cuh + one .cu file, the exact
// text NVRTC gets) as its own C++17 translation unit that starts with this header, with
// -DDSV4_EMULATOR. The header provides exactly the device-side language that common.cuh allows
// a kernel to use, and nothing more: it includes no system header, so a kernel that reaches for
// anything else (std::, printf, atomics, size_t, ...) fails to build here as it would be
// refused by the rules, instead of silently working on the host only.
//
// Execution model (runtime.cpp): a launch runs its blocks one after another on the calling OS
// thread; the threads of a block are fibers scheduled cooperatively on that OS thread. So
//   * `__shared__` is `static thread_local`: one copy per OS thread, shared by the fibers of the
//     block that runs on it (blocks never overlap on one OS thread), separate for test threads
//     that launch concurrently;
//   * threadIdx / blockIdx / blockDim / gridDim are thread-locals the scheduler sets before it
//     resumes a fiber;
//   * __syncthreads() and __shfl_xor_sync() are calls into the scheduler: opaque to the
//     optimizer, so no value read from memory is kept in a register across them.

#ifndef DSV4_CUDA_SHIM_H
#define DSV4_CUDA_SHIM_H

#ifndef DSV4_EMULATOR
#error "cuda_shim.h is the host side of dsv4's CUDA emulator; compile with -DDSV4_EMULATOR"
#endif

// ---------------------------------------------------------------- qualifiers

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
// Dropped rather than mapped to the host's restrict: threads of a block write through one
// kernel's pointer and read through another's across a barrier, which a host compiler given
// `restrict` may assume cannot happen within one call.
#define __restrict__
#define __shared__ static thread_local

#include "dsv4emu_builtins.h"

// ---------------------------------------------------------------- warp shuffle

// On float and int only, the types common.cuh allows (CUDA has more overloads; another type is
// ambiguous here, a compile error). Every lane of the warp must take part: see
// dsv4emu_shfl_xor_bits.
static inline float __shfl_xor_sync(unsigned int mask, float v, int lane_mask) {
    unsigned int bits;
    __builtin_memcpy(&bits, &v, 4);
    bits = dsv4emu_shfl_xor_bits(mask, bits, lane_mask);
    __builtin_memcpy(&v, &bits, 4);
    return v;
}

static inline int __shfl_xor_sync(unsigned int mask, int v, int lane_mask) {
    return (int)dsv4emu_shfl_xor_bits(mask, (unsigned int)v, lane_mask);
}

// ---------------------------------------------------------------- dynamic shared memory

// A pointer to the launch's dynamic shared memory (see dsv4emu_dynamic_shared). Declare it in the
// body of the kernel or device function that uses it, not at file scope.
#define DSV4_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(dsv4emu_dynamic_shared())

// ---------------------------------------------------------------- math

// The host's libm, correctly rounded or within an ulp or two like CUDA's (not bit-identical to
// the GPU for expf / logf / log1pf; sqrtf, fmaf, fabsf, fmaxf, fminf, floorf, ldexpf and frexpf
// are exact in both).
extern "C" {
float expf(float) noexcept;
float logf(float) noexcept;
float log1pf(float) noexcept;
float sqrtf(float) noexcept;
float fabsf(float) noexcept;
float fmaxf(float, float) noexcept;
float fminf(float, float) noexcept;
float fmaf(float, float, float) noexcept;
float floorf(float) noexcept;
float ldexpf(float, int) noexcept;
float frexpf(float, int*) noexcept;
}

// CUDA's rsqrtf is a 2-ulp approximation; this one is correctly rounded (common.cuh asks kernels
// for dsv4_rsqrt, which is 1/sqrtf on both).
static inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

#define INFINITY (__builtin_inff())
#define NAN (__builtin_nanf(""))

static inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    __builtin_memcpy(&u, &f, 4);
    return u;
}
static inline float __uint_as_float(unsigned int u) {
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
static inline int __float_as_int(float f) {
    int i;
    __builtin_memcpy(&i, &f, 4);
    return i;
}
static inline float __int_as_float(int i) {
    float f;
    __builtin_memcpy(&f, &i, 4);
    return f;
}

#endif
