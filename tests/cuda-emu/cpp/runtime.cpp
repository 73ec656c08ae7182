// dsv4's CUDA emulator runtime: runs one kernel launch on the calling OS thread.
//
// Blocks run one after another in (z, y, x) order. Within a block every CUDA thread runs on a
// fiber (64 KiB stacks with a guard page, from a pool kept per OS thread), scheduled
// cooperatively:
//   * a fiber runs threads to completion, one after another, as long as they do not wait: a
//     kernel without barriers costs one switch into the block and one out of it;
//   * a thread that waits (__syncthreads, __shfl_xor_sync) keeps its fiber, and the next
//     runnable fiber (a released waiter, else a fresh thread on a parked fiber) takes over
//     directly, without going through the scheduler;
//   * the last thread to reach a barrier releases the others and carries on.
// A fiber is created with ucontext (getcontext / makecontext) and entered the first time with
// setcontext; every later switch is sigsetjmp(.., 0) / siglongjmp, which unlike swapcontext
// makes no system call (swapcontext's sigprocmask made a barrier cost ~0.5 us per thread).
//
// Misuse is reported as a launch error, never as a hang or an abort: a __syncthreads that some
// threads reach after (or while) others exit, a shuffle with a lane gone, a deadlock (every
// live thread waits and no barrier can complete), a shuffle in a block that is not a whole
// number of warps or with a mask other than 0xffffffff, a write past the dynamic shared memory.
// The fibers of a failed block are abandoned (kernel code holds no resources) and their
// stacks reused from scratch.
//
// Nothing here is process-global and mutable: the scheduler is per OS thread, so test threads
// can launch concurrently. No exception leaves this file; no allocation happens on a fiber
// (messages are formatted into a fixed buffer).

// siglongjmp from one fiber's stack to another's is what this file does on purpose; the
// fortified longjmp (__longjmp_chk) would take it for stack corruption.
#ifdef _FORTIFY_SOURCE
#undef _FORTIFY_SOURCE
#endif

#include "dsv4emu_abi.h"
#include "dsv4emu_builtins.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdarg>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <vector>

__thread uint3 threadIdx;
__thread uint3 blockIdx;
__thread dim3 blockDim;
__thread dim3 gridDim;

namespace {

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr unsigned int kWarp = 32;
constexpr unsigned int kNoThread = ~0u;
constexpr std::size_t kSharedAlign = 16;
constexpr std::size_t kSharedCanary = 64;
constexpr unsigned char kSharedPoison = 0xff;
constexpr unsigned char kSharedCanaryByte = 0xa5;

// CUDA's limits (compute capability 7.0 and later).
constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr unsigned int kMaxBlockX = 1024, kMaxBlockY = 1024, kMaxBlockZ = 64;
constexpr unsigned int kMaxGridX = 0x7fffffffu, kMaxGridYZ = 65535;
constexpr unsigned int kMaxDynamicShared = 48 * 1024;

struct Fiber {
    sigjmp_buf jb;   // where it was suspended
    ucontext_t uc;   // its start (fiber_main on its stack), while fresh
    void* mapping = nullptr;  // guard page, then the stack
    std::size_t mapping_bytes = 0;
    std::size_t guard_bytes = 0;
    std::size_t color = 0;     // bytes left unused at the stack's top (see ensure_fibers)
    bool fresh = true;         // starts at fiber_main when next switched to
    unsigned int tid = kNoThread;  // linear index of the thread it runs, kNoThread when parked

    Fiber() = default;
    Fiber(const Fiber&) = delete;
    Fiber& operator=(const Fiber&) = delete;
    ~Fiber() {
        if (mapping != nullptr) munmap(mapping, mapping_bytes);
    }
};

enum class State : unsigned char { Unstarted, Running, AtSyncthreads, AtShuffle, Exited };

struct ThreadState {
    uint3 idx;  // threadIdx
    State state = State::Unstarted;
    unsigned long long shuffles = 0;  // shuffles this thread has taken part in
};

struct WarpState {
    unsigned int waiting = 0;  // lanes waiting at the current shuffle
    unsigned int exited = 0;
    // Double-buffered exchange slots: shuffle k uses slots[k % 2]. A lane can only write the
    // same half again at shuffle k + 2, after every lane has left shuffle k + 1, so after
    // every lane has read its value of shuffle k: one warp barrier per shuffle suffices.
    unsigned int slots[2][kWarp];
    Fiber* waiters[kWarp];
};

struct Scheduler {
    sigjmp_buf main;  // the launching thread's own stack, in run_block
    std::vector<std::unique_ptr<Fiber>> fibers;  // every fiber of this OS thread
    std::vector<Fiber*> parked;                  // fibers holding no thread
    Fiber* current = nullptr;
    bool in_launch = false;

    // The launch.
    const dsv4emu_kernel* kernel = nullptr;
    void* const* params = nullptr;
    unsigned int nthreads = 0;
    unsigned char* shared = nullptr;  // dynamic shared memory, kSharedCanary bytes of canary after it
    std::size_t shared_bytes = 0;
    std::vector<unsigned char> shared_storage;

    // The block.
    unsigned int next_unstarted = 0;
    unsigned int exited = 0;
    unsigned int at_syncthreads = 0;
    std::vector<ThreadState> threads;
    std::vector<WarpState> warps;
    std::vector<Fiber*> syncthreads_waiters;
    std::vector<Fiber*> ready;  // ring buffer of runnable fibers; each thread is in it at most once
    std::size_t ready_head = 0, ready_count = 0;

    // Failure of the launch.
    bool failed = false;
    int status = DSV4EMU_OK;
    char error[2048];

    ~Scheduler() = default;
};

thread_local std::unique_ptr<Scheduler> tls_scheduler;
// Threads of a block start in reverse order (N-1 first) on this OS thread's launches: with the
// emulator interleaving threads only at barriers, running both orders exposes a kernel that
// reads, before a barrier, what another thread of the block writes (a race on a GPU).
thread_local bool tls_reverse_order = false;
thread_local std::vector<char> tls_last_error;

void set_last_error(const char* msg) {
    std::size_t n = std::strlen(msg);
    tls_last_error.assign(msg, msg + n);
    tls_last_error.push_back('\0');
}

// Formats the failure of the launch into the scheduler's fixed buffer (no allocation: this may
// run on a fiber). The first failure wins.
__attribute__((format(printf, 3, 4))) void record_failure(Scheduler& s, int status, const char* fmt, ...) {
    if (s.failed) return;
    s.failed = true;
    s.status = status;
    int n = std::snprintf(s.error, sizeof s.error, "kernel %s, block (%u, %u, %u): ", s.kernel->name, blockIdx.x,
                          blockIdx.y, blockIdx.z);
    if (n < 0 || (std::size_t)n >= sizeof s.error) return;
    va_list ap;
    va_start(ap, fmt);
    std::vsnprintf(s.error + n, sizeof s.error - (std::size_t)n, fmt, ap);
    va_end(ap);
}

void fiber_main();

// Enters fresh fiber `f` at fiber_main, on its own stack; does not return.
[[noreturn]] void start(Fiber* f) {
    f->fresh = false;
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = static_cast<char*>(f->mapping) + f->guard_bytes;
    f->uc.uc_stack.ss_size = kStackBytes - f->color;
    f->uc.uc_link = nullptr;  // fiber_main never returns
    makecontext(&f->uc, fiber_main, 0);
    setcontext(&f->uc);
    __builtin_unreachable();  // setcontext returns only on failure, which it cannot have here
}

// Suspends the calling context (saved in `from`) and runs fiber `to`, or the scheduler when
// `to` is null; returns when something switches back to `from`.
void switch_to(Scheduler& s, sigjmp_buf& from, Fiber* to) {
    if (sigsetjmp(from, 0) != 0) return;  // resumed
    if (to == nullptr) {
        s.current = nullptr;
        siglongjmp(s.main, 1);
    }
    s.current = to;
    if (to->fresh) start(to);
    if (to->tid != kNoThread) threadIdx = s.threads[to->tid].idx;
    siglongjmp(to->jb, 1);
}

// What runs next: a released waiter, else a parked fiber for the next unstarted thread; null
// when neither (the block is done, deadlocked or failed: the scheduler tells which).
Fiber* pick_next(Scheduler& s) {
    if (s.failed) return nullptr;
    if (s.ready_count > 0) {
        Fiber* f = s.ready[s.ready_head];
        s.ready_head = (s.ready_head + 1) % s.ready.size();
        --s.ready_count;
        return f;
    }
    if (s.next_unstarted < s.nthreads && !s.parked.empty()) {
        Fiber* f = s.parked.back();
        s.parked.pop_back();
        return f;
    }
    return nullptr;
}

void make_ready(Scheduler& s, Fiber* f) {
    s.ready[(s.ready_head + s.ready_count) % s.ready.size()] = f;
    ++s.ready_count;
    s.threads[f->tid].state = State::Running;
}

// Leaves the running fiber `self` (its thread waits) for whatever runs next, and returns when
// `self` is resumed.
void suspend(Scheduler& s, Fiber* self) {
    switch_to(s, self->jb, pick_next(s));
    s.current = self;
    if (self->tid != kNoThread) threadIdx = s.threads[self->tid].idx;
}

// Ends the launch from a fiber: back to the scheduler, for good (the fiber is abandoned).
[[noreturn]] void abandon(Scheduler& s, Fiber* self) {
    self->fresh = true;
    s.current = nullptr;
    siglongjmp(s.main, 1);  // a failed launch never resumes its fibers
}

void thread_exited(Scheduler& s, Fiber* self) {
    const unsigned int tid = self->tid;
    s.threads[tid].state = State::Exited;
    ++s.exited;
    WarpState& w = s.warps[tid / kWarp];
    ++w.exited;
    const uint3 t = threadIdx;
    if (s.at_syncthreads > 0) {
        record_failure(s, DSV4EMU_BARRIER_MISUSE,
                       "thread (%u, %u, %u) exited while %u thread(s) of the block wait at __syncthreads(): "
                       "every thread of a block must reach each __syncthreads() or none may (divergent barrier)",
                       t.x, t.y, t.z, s.at_syncthreads);
        abandon(s, self);
    }
    if (w.waiting > 0) {
        record_failure(s, DSV4EMU_BARRIER_MISUSE,
                       "thread (%u, %u, %u) exited while %u lane(s) of its warp %u wait at __shfl_xor_sync: every "
                       "lane of the warp must take part in each shuffle (divergent shuffle)",
                       t.x, t.y, t.z, w.waiting, tid / kWarp);
        abandon(s, self);
    }
}

// Each fiber: runs unstarted threads of the current block to completion while there are any,
// then parks. A parked fiber is resumed for the next unstarted thread, in this block or a
// later one (or launch).
void fiber_main() {
    Scheduler& s = *tls_scheduler;
    Fiber* self = s.current;
    for (;;) {
        while (!s.failed && s.next_unstarted < s.nthreads) {
            const unsigned int started = s.next_unstarted++;
            const unsigned int tid = tls_reverse_order ? s.nthreads - 1 - started : started;
            self->tid = tid;
            threadIdx = s.threads[tid].idx;
            s.threads[tid].state = State::Running;
            s.kernel->entry(s.params);
            thread_exited(s, self);
        }
        self->tid = kNoThread;
        s.parked.push_back(self);  // capacity reserved: no allocation
        suspend(s, self);
    }
}

Fiber* running_fiber(Scheduler*& s) {
    s = tls_scheduler.get();
    if (s == nullptr || !s->in_launch || s->current == nullptr) return nullptr;
    return s->current;
}

// Why the block cannot go on, when every live thread waits.
void report_deadlock(Scheduler& s) {
    unsigned int at_sync = 0, at_shuffle = 0, exited = 0;
    for (const ThreadState& t : s.threads) {
        at_sync += t.state == State::AtSyncthreads;
        at_shuffle += t.state == State::AtShuffle;
        exited += t.state == State::Exited;
    }
    record_failure(s, DSV4EMU_DEADLOCK,
                   "deadlock: of %u threads, %u wait at __syncthreads(), %u at __shfl_xor_sync and %u exited, and "
                   "no barrier can complete (threads of the block, or lanes of a warp, wait at different barriers)",
                   s.nthreads, at_sync, at_shuffle, exited);
}

// After a failed block: every fiber is abandoned where it was and starts afresh next time.
void reset_fibers(Scheduler& s) {
    s.parked.clear();
    for (auto& f : s.fibers) {
        f->fresh = true;
        f->tid = kNoThread;
        s.parked.push_back(f.get());
    }
}

// Gives the scheduler at least `n` fibers (all parked: called between launches).
bool ensure_fibers(Scheduler& s, std::size_t n) {
    const std::size_t page = (std::size_t)sysconf(_SC_PAGESIZE);
    s.parked.reserve(n);
    while (s.fibers.size() < n) {
        auto f = std::make_unique<Fiber>();
        f->guard_bytes = page;
        f->mapping_bytes = page + kStackBytes;
        // Stacks are page-aligned, so without an offset every fiber's hot top-of-stack lines
        // would fall into the same cache sets and evict each other at every switch.
        f->color = (s.fibers.size() % 61) * 64;
        void* m = mmap(nullptr, f->mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) return false;
        f->mapping = m;
        if (mprotect(m, page, PROT_NONE) != 0) return false;
        s.parked.push_back(f.get());
        s.fibers.push_back(std::move(f));
    }
    return true;
}

bool shared_canary_intact(const Scheduler& s) {
    for (std::size_t i = 0; i < kSharedCanary; ++i)
        if (s.shared[s.shared_bytes + i] != kSharedCanaryByte) return false;
    return true;
}

// Runs the block at blockIdx; on return either every thread exited or s.failed.
void run_block(Scheduler& s) {
    s.next_unstarted = 0;
    s.exited = 0;
    s.at_syncthreads = 0;
    for (ThreadState& t : s.threads) {
        t.state = State::Unstarted;
        t.shuffles = 0;
    }
    for (WarpState& w : s.warps) {
        w.waiting = 0;
        w.exited = 0;
    }
    s.syncthreads_waiters.clear();
    s.ready_head = 0;
    s.ready_count = 0;
    std::memset(s.shared, kSharedPoison, s.shared_bytes);

    switch_to(s, s.main, pick_next(s));

    if (!s.failed && s.exited != s.nthreads) report_deadlock(s);
    if (!s.failed && !shared_canary_intact(s))
        record_failure(s, DSV4EMU_SHARED_OVERFLOW,
                       "a thread wrote past the end of the %zu bytes of dynamic shared memory "
                       "(LaunchConfig::shared_bytes)",
                       s.shared_bytes);
    if (s.failed) reset_fibers(s);
}

const char* check_config(const unsigned int grid[3], const unsigned int block[3], unsigned int shared_bytes,
                         char* buf, std::size_t len) {
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (block[0] == 0 || block[1] == 0 || block[2] == 0 || block[0] > kMaxBlockX || block[1] > kMaxBlockY ||
        block[2] > kMaxBlockZ || threads > kMaxThreadsPerBlock) {
        std::snprintf(buf, len,
                      "block (%u, %u, %u): every dimension must be at least 1, x and y at most 1024, z at most 64, "
                      "and the block at most 1024 threads",
                      block[0], block[1], block[2]);
        return buf;
    }
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > kMaxGridX || grid[1] > kMaxGridYZ ||
        grid[2] > kMaxGridYZ) {
        std::snprintf(buf, len,
                      "grid (%u, %u, %u): every dimension must be at least 1, x at most 2^31-1, y and z at most 65535",
                      grid[0], grid[1], grid[2]);
        return buf;
    }
    if (shared_bytes > kMaxDynamicShared) {
        std::snprintf(buf, len, "%u bytes of dynamic shared memory: at most 49152 (48 KiB)", shared_bytes);
        return buf;
    }
    return nullptr;
}

int launch(const dsv4emu_kernel* kernel, void* const* params, const unsigned int grid[3], const unsigned int block[3],
           unsigned int shared_bytes) {
    char msg[512];
    if (const char* bad = check_config(grid, block, shared_bytes, msg, sizeof msg)) {
        char full[640];
        std::snprintf(full, sizeof full, "kernel %s: %s", kernel->name, bad);
        set_last_error(full);
        return DSV4EMU_BAD_CONFIG;
    }
    if (!tls_scheduler) tls_scheduler = std::make_unique<Scheduler>();
    Scheduler& s = *tls_scheduler;
    if (s.in_launch) {
        set_last_error("dsv4emu_launch called during a launch on the same thread");
        return DSV4EMU_INTERNAL;
    }

    const unsigned int nthreads = block[0] * block[1] * block[2];
    if (!ensure_fibers(s, nthreads)) {
        set_last_error("could not map the fiber stacks for a block (out of memory?)");
        return DSV4EMU_INTERNAL;
    }
    s.kernel = kernel;
    s.params = params;
    s.nthreads = nthreads;
    s.threads.assign(nthreads, ThreadState{});
    for (unsigned int tid = 0; tid < nthreads; ++tid)  // CUDA's order: x fastest, then y, then z
        s.threads[tid].idx = uint3{tid % block[0], (tid / block[0]) % block[1], tid / (block[0] * block[1])};
    s.warps.assign((nthreads + kWarp - 1) / kWarp, WarpState{});
    s.syncthreads_waiters.clear();
    s.syncthreads_waiters.reserve(nthreads);
    s.ready.assign(nthreads, nullptr);
    s.shared_bytes = shared_bytes;
    s.shared_storage.assign(shared_bytes + kSharedCanary + kSharedAlign, kSharedCanaryByte);
    {
        std::size_t addr = reinterpret_cast<std::size_t>(s.shared_storage.data());
        s.shared = s.shared_storage.data() + ((kSharedAlign - addr % kSharedAlign) % kSharedAlign);
        std::memset(s.shared + shared_bytes, kSharedCanaryByte, kSharedCanary);
    }
    s.failed = false;
    s.status = DSV4EMU_OK;
    s.error[0] = '\0';
    s.in_launch = true;

    gridDim = dim3{grid[0], grid[1], grid[2]};
    blockDim = dim3{block[0], block[1], block[2]};
    for (unsigned int z = 0; z < grid[2] && !s.failed; ++z)
        for (unsigned int y = 0; y < grid[1] && !s.failed; ++y)
            for (unsigned int x = 0; x < grid[0] && !s.failed; ++x) {
                blockIdx = uint3{x, y, z};
                run_block(s);
            }

    s.in_launch = false;
    s.current = nullptr;
    s.params = nullptr;
    if (s.failed) {
        set_last_error(s.error);
        return s.status;
    }
    return DSV4EMU_OK;
}

}  // namespace

void __syncthreads() {
    Scheduler* sp;
    Fiber* self = running_fiber(sp);
    if (self == nullptr) return;  // not in a launch: nothing to wait for
    Scheduler& s = *sp;
    const unsigned int tid = self->tid;
    if (s.exited > 0) {
        const uint3 t = threadIdx;
        record_failure(s, DSV4EMU_BARRIER_MISUSE,
                       "thread (%u, %u, %u) reached __syncthreads() after %u thread(s) of the block exited: every "
                       "thread of a block must reach each __syncthreads() or none may (divergent barrier)",
                       t.x, t.y, t.z, s.exited);
        abandon(s, self);
    }
    if (++s.at_syncthreads == s.nthreads) {
        for (Fiber* f : s.syncthreads_waiters) make_ready(s, f);
        s.syncthreads_waiters.clear();
        s.at_syncthreads = 0;
        return;
    }
    s.threads[tid].state = State::AtSyncthreads;
    s.syncthreads_waiters.push_back(self);  // capacity reserved: no allocation
    suspend(s, self);
}

unsigned int dsv4emu_shfl_xor_bits(unsigned int mask, unsigned int bits, int lane_mask) {
    Scheduler* sp;
    Fiber* self = running_fiber(sp);
    if (self == nullptr) return bits;  // not in a launch: a warp of one
    Scheduler& s = *sp;
    const unsigned int tid = self->tid;
    const uint3 t = threadIdx;
    if (mask != 0xffffffffu) {
        record_failure(s, DSV4EMU_SHUFFLE_MISUSE,
                       "thread (%u, %u, %u): __shfl_xor_sync with mask 0x%08x; dsv4 kernels use the full mask "
                       "0xffffffff only (common.cuh)",
                       t.x, t.y, t.z, mask);
        abandon(s, self);
    }
    if (s.nthreads % kWarp != 0) {
        record_failure(s, DSV4EMU_SHUFFLE_MISUSE,
                       "__shfl_xor_sync in a block of %u threads, not a multiple of 32: the last warp is partial "
                       "and the full-mask shuffle undefined",
                       s.nthreads);
        abandon(s, self);
    }
    if (lane_mask < 0 || lane_mask >= (int)kWarp) {
        record_failure(s, DSV4EMU_SHUFFLE_MISUSE,
                       "thread (%u, %u, %u): __shfl_xor_sync lane mask %d is outside 0..31", t.x, t.y, t.z,
                       lane_mask);
        abandon(s, self);
    }
    const unsigned int lane = tid % kWarp;
    WarpState& w = s.warps[tid / kWarp];
    if (w.exited > 0) {
        record_failure(s, DSV4EMU_BARRIER_MISUSE,
                       "thread (%u, %u, %u) reached __shfl_xor_sync after %u lane(s) of its warp %u exited: every "
                       "lane of the warp must take part in each shuffle (divergent shuffle)",
                       t.x, t.y, t.z, w.exited, tid / kWarp);
        abandon(s, self);
    }
    ThreadState& me = s.threads[tid];
    const unsigned int half = (unsigned int)(me.shuffles & 1);
    ++me.shuffles;
    w.slots[half][lane] = bits;
    if (++w.waiting == kWarp) {
        for (unsigned int i = 0; i + 1 < kWarp; ++i) make_ready(s, w.waiters[i]);
        w.waiting = 0;
    } else {
        w.waiters[w.waiting - 1] = self;
        me.state = State::AtShuffle;
        suspend(s, self);
    }
    return w.slots[half][lane ^ (unsigned int)lane_mask];
}

void* dsv4emu_dynamic_shared() {
    Scheduler* s = tls_scheduler.get();
    return s != nullptr && s->in_launch ? s->shared : nullptr;
}

extern "C" void dsv4emu_set_reverse_order(unsigned int reverse) { tls_reverse_order = reverse != 0; }

extern "C" int dsv4emu_launch(const dsv4emu_kernel* kernel, void* const* params, const unsigned int grid[3],
                              const unsigned int block[3], unsigned int shared_bytes) {
    try {
        return launch(kernel, params, grid, block, shared_bytes);
    } catch (const std::bad_alloc&) {
        if (tls_scheduler) tls_scheduler->in_launch = false;
        set_last_error("out of host memory setting up the launch");
        return DSV4EMU_INTERNAL;
    } catch (...) {
        if (tls_scheduler) tls_scheduler->in_launch = false;
        set_last_error("internal error setting up the launch");
        return DSV4EMU_INTERNAL;
    }
}

extern "C" const char* dsv4emu_last_error(void) {
    return tls_last_error.empty() ? "" : tls_last_error.data();
}
