// The C interface between dsv4's CUDA emulator runtime (C++) and its Rust side
// (tests/cuda-emu/src/ffi.rs mirrors these declarations; keep the two in step).
//
// No exception ever crosses it: every entry point returns a status code and leaves a message
// for dsv4emu_last_error() (per OS thread).

#ifndef DSV4EMU_ABI_H
#define DSV4EMU_ABI_H

// Kinds of kernel parameter (dsv4emu_param::kind).
#define DSV4EMU_PARAM_POINTER 1
#define DSV4EMU_PARAM_INT 2       // int or unsigned int
#define DSV4EMU_PARAM_LONG_LONG 3 // long long
#define DSV4EMU_PARAM_FLOAT 4     // float

// Status codes of dsv4emu_launch.
#define DSV4EMU_OK 0
#define DSV4EMU_BAD_CONFIG 1       // grid, block or shared memory out of CUDA's limits
#define DSV4EMU_BARRIER_MISUSE 2   // divergent __syncthreads / __shfl_xor_sync
#define DSV4EMU_DEADLOCK 3         // every live thread waits, and no barrier can complete
#define DSV4EMU_SHUFFLE_MISUSE 4   // mask, lane mask or block size a shuffle cannot have
#define DSV4EMU_SHARED_OVERFLOW 5  // a write past the end of the dynamic shared memory
#define DSV4EMU_INTERNAL 6         // the emulator itself failed (out of memory, ...)

extern "C" {

// One parameter of a kernel, derived from its C++ type by templates (dsv4emu_table.h).
struct dsv4emu_param {
    unsigned int kind;           // DSV4EMU_PARAM_*
    unsigned int size;           // sizeof the parameter
    unsigned int pointee_const;  // pointer to const
    unsigned int pointee_align;  // alignof the pointee (pointers), else 0
    const char* type_name;       // "const float*", "long long", ...
};

// One kernel: its name, its source file, the trampoline that calls it with CUDA-style
// kernelParams (an array of pointers to each argument's value), and its parameters.
struct dsv4emu_kernel {
    const char* name;
    const char* file;
    void (*entry)(void* const* params);
    unsigned int arity;
    const dsv4emu_param* params;
};

// Every kernel compiled into the emulator (backend-cuda/kernels and cpp/selftest.cu).
unsigned long dsv4emu_kernel_count(void);
const dsv4emu_kernel* dsv4emu_kernel_at(unsigned long i);

// Runs `kernel` over grid x block threads on the calling OS thread and returns when it is done.
// `params` as cuLaunchKernel's kernelParams. The caller has checked the arguments.
// Threads of each block start in reverse order (the last first) in this OS thread's launches
// from now on when `reverse` is non-zero (a way to expose intra-block races; see runtime.cpp).
void dsv4emu_set_reverse_order(unsigned int reverse);

int dsv4emu_launch(const dsv4emu_kernel* kernel, void* const* params, const unsigned int grid[3],
                   const unsigned int block[3], unsigned int shared_bytes);

// The message of the last failed dsv4emu_launch on this OS thread.
const char* dsv4emu_last_error(void);
}

#endif
