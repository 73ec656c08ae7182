//! The machine's limits, measured in the same run as `dsv4 bench` so that its speeds can be read
//! against them:
//!
//! * **read bandwidth**: a read-only streaming sum over a buffer much larger than the last-level
//!   cache, split across threads (each sums its own contiguous part, which it also wrote first,
//!   so its pages are local), best of several passes. Only bytes read are counted: decode reads
//!   weights, it does not copy them.
//! * **f32 FMA peak**: independent chains of fused multiply-adds (enough of them to hide the
//!   latency) on every thread, 2 FLOP per multiply-add per lane.
//! * **BF16 dot-product peak** (`vdpbf16ps`, AVX-512 BF16 only): 2 FLOP per bf16 product.
//!
//! Kernels are picked at run time: the instruction set the CPU backend's kernels use
//! ([`crate::kernels::Isa::active`]: the best the CPU has, lowered by `DSV4_CPU_ISA`), so that a
//! run forced onto the AVX2 path is read against the AVX2 limits (on a CPU with two 512-bit FMA
//! units, half the AVX-512 peak); the BF16 peak only where those kernels multiply in BF16. The
//! intrinsics run inside `#[target_feature]` functions, which are only called after the
//! detection says the CPU has the features.

use std::sync::Barrier;
use std::time::{Duration, Instant};

/// The CPU features reported, under the names `/proc/cpuinfo` uses.
pub const FEATURE_NAMES: [&str; 8] =
    ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "amx_bf16"];

/// Whether the CPU has each of [`FEATURE_NAMES`].
pub fn features() -> Vec<(&'static str, bool)> {
    FEATURE_NAMES.iter().map(|&f| (f, has_feature(f))).collect()
}

#[cfg(target_arch = "x86_64")]
fn has_feature(name: &str) -> bool {
    match name {
        "avx2" => is_x86_feature_detected!("avx2"),
        "fma" => is_x86_feature_detected!("fma"),
        "f16c" => is_x86_feature_detected!("f16c"),
        "avx512f" => is_x86_feature_detected!("avx512f"),
        "avx512bw" => is_x86_feature_detected!("avx512bw"),
        "avx512_bf16" => is_x86_feature_detected!("avx512bf16"),
        "avx512_vnni" => is_x86_feature_detected!("avx512vnni"),
        // AMX-TILE and AMX-BF16 by CPUID (whether the system grants the tiles: `amx_flops_per_sec`).
        "amx_bf16" => crate::kernels::amx::cpu_has_amx_bf16(),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn has_feature(_name: &str) -> bool {
    false
}

/// The CPU's model name (`model name` in /proc/cpuinfo), or `unknown`.
pub fn cpu_model_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A sysfs cache size (`32768K`, `2M`) in bytes.
fn parse_cache_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, mult) = match s.chars().last()? {
        'K' => (&s[..s.len() - 1], 1 << 10),
        'M' => (&s[..s.len() - 1], 1 << 20),
        'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok().map(|n| n * mult)
}

/// The last-level cache of the whole machine in bytes: the highest cache level's size times
/// the number of distinct instances of it (one per socket or per CCD), from sysfs.
pub fn last_level_cache_bytes() -> Option<usize> {
    use std::collections::BTreeMap;
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).ok();
    // level -> (size of one instance, distinct shared_cpu_list values)
    let mut levels: BTreeMap<usize, (usize, std::collections::BTreeSet<String>)> = BTreeMap::new();
    for cpu in std::fs::read_dir("/sys/devices/system/cpu").ok()?.flatten() {
        let name = cpu.file_name().to_string_lossy().into_owned();
        if !name.strip_prefix("cpu").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let Ok(indexes) = std::fs::read_dir(cpu.path().join("cache")) else { continue };
        for index in indexes.flatten() {
            let p = index.path();
            let (Some(level), Some(size)) = (read(p.join("level")), read(p.join("size"))) else { continue };
            let (Ok(level), Some(size)) = (level.trim().parse::<usize>(), parse_cache_size(&size)) else { continue };
            let shared = read(p.join("shared_cpu_list")).unwrap_or_default().trim().to_string();
            let e = levels.entry(level).or_insert((size, Default::default()));
            e.0 = e.0.max(size);
            e.1.insert(shared);
        }
    }
    let (_, (size, instances)) = levels.into_iter().next_back()?;
    Some(size * instances.len().max(1))
}

/// How long and how hard to measure.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Threads for the all-thread figures.
    pub threads: usize,
    /// Size of the streamed buffer (rounded down to whole 64-byte lines per thread).
    pub read_bytes: usize,
    /// Passes over the buffer with all threads; the best counts.
    pub read_passes: usize,
    /// Whether to also time one thread reading the whole buffer (best of 3).
    pub one_thread: bool,
    /// Length of one compute-peak run.
    pub compute_run: Duration,
    /// Compute-peak runs; the best counts.
    pub compute_runs: usize,
}

impl Settings {
    /// What `dsv4 bench` uses: a buffer of 8x the last-level cache and at least 1 GiB (at most a
    /// quarter of the available memory), 5 passes, 7 runs of ~60 ms per compute peak.
    pub fn for_bench(threads: usize) -> Settings {
        let llc = last_level_cache_bytes().unwrap_or(32 << 20);
        let mut bytes = (8 * llc).max(1 << 30);
        if let Some(a) = crate::host_memory::available() {
            bytes = bytes.min(a / 4).max(64 << 20);
        }
        Settings {
            threads: threads.max(1),
            read_bytes: bytes,
            read_passes: 5,
            one_thread: true,
            compute_run: Duration::from_millis(60),
            compute_runs: 7,
        }
    }
}

/// The figures measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    pub cpu: String,
    pub features: Vec<(&'static str, bool)>,
    pub threads: usize,
    /// Size of the buffer the read bandwidth streams.
    pub read_buffer_bytes: usize,
    /// `avx512`, `avx2` or `scalar`.
    pub read_kernel: &'static str,
    /// Bytes read per second with every thread.
    pub read_bytes_per_sec: f64,
    /// Bytes read per second by one thread (None when not measured).
    pub read_bytes_per_sec_one_thread: Option<f64>,
    /// `avx512f`, `avx2+fma` or `scalar`.
    pub fma_kernel: &'static str,
    /// f32 FLOP/s with every thread (2 per multiply-add).
    pub fma_flops_per_sec: f64,
    /// BF16 dot-product FLOP/s with every thread (2 per product), None without AVX-512 BF16.
    pub bf16_flops_per_sec: Option<f64>,
    /// AMX BF16 tile FLOP/s (`tdpbf16ps`) with every thread (2 per product), None where the
    /// prefill GEMMs do not use AMX (`kernels::amx_available`).
    pub amx_flops_per_sec: Option<f64>,
}

/// Measures everything in `s`. Takes about a second and a half with the bench settings (half a
/// second more where the AMX peak is measured).
pub fn measure(s: &Settings) -> Machine {
    let threads = s.threads.max(1);
    let simd = Simd::active();
    let (read_bytes, all, one) = read_bandwidth(simd, threads, s.read_bytes, s.read_passes.max(1), s.one_thread);
    let fma = compute_peak(Peak::Fma(simd), threads, s.compute_run, s.compute_runs.max(1));
    let bf16 = (simd == Simd::Avx512 && Simd::has_bf16())
        .then(|| compute_peak(Peak::Bf16, threads, s.compute_run, s.compute_runs.max(1)));
    let amx =
        crate::kernels::amx::chosen().then(|| compute_peak(Peak::Amx, threads, s.compute_run, s.compute_runs.max(1)));
    Machine {
        cpu: cpu_model_name(),
        features: features(),
        threads,
        read_buffer_bytes: read_bytes,
        read_kernel: simd.read_name(),
        read_bytes_per_sec: all,
        read_bytes_per_sec_one_thread: one,
        fma_kernel: simd.fma_name(),
        fma_flops_per_sec: fma,
        bf16_flops_per_sec: bf16,
        amx_flops_per_sec: amx,
    }
}

/// The vector width the kernels run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Simd {
    Scalar,
    /// AVX2 and FMA (ymm).
    Avx2,
    /// AVX-512 F (zmm).
    Avx512,
}

impl Simd {
    /// The width of the backend's kernels ([`Isa::active`](crate::kernels::Isa::active)); each
    /// set implies the features of its `Simd` (AVX2 with FMA; AVX-512 F).
    fn active() -> Simd {
        use crate::kernels::Isa;
        match Isa::active() {
            Isa::Avx512 => Simd::Avx512,
            Isa::Avx2 => Simd::Avx2,
            Isa::Scalar => Simd::Scalar,
        }
    }

    fn has_bf16() -> bool {
        has_feature("avx512f") && has_feature("avx512_bf16")
    }

    fn read_name(self) -> &'static str {
        match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }

    fn fma_name(self) -> &'static str {
        match self {
            Simd::Scalar => "scalar",
            Simd::Avx2 => "avx2+fma",
            Simd::Avx512 => "avx512f",
        }
    }
}

/// One cache line of f32 values, aligned, so that every vector load is aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Runs `work(i)` on `threads` scoped threads at once and returns the wall time from a common
/// start (all threads released by one barrier) to the last one finishing.
fn timed_on_threads<T: Send>(threads: usize, work: impl Fn(usize) -> T + Sync) -> (Duration, Vec<T>) {
    let barrier = Barrier::new(threads + 1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (barrier, work) = (&barrier, &work);
                scope.spawn(move || {
                    barrier.wait();
                    work(i)
                })
            })
            .collect();
        barrier.wait();
        let start = Instant::now();
        let out: Vec<T> = handles.into_iter().map(|h| h.join().expect("a measuring thread panicked")).collect();
        (start.elapsed(), out)
    })
}

/// (buffer bytes, all-thread read bytes/s, one-thread read bytes/s).
fn read_bandwidth(simd: Simd, threads: usize, bytes: usize, passes: usize, one: bool) -> (usize, f64, Option<f64>) {
    let per_thread = (bytes / 64 / threads).max(1);
    let n = per_thread * threads;
    // Anonymous memory advised for transparent huge pages, as `--weight-memory resident` holds
    // the weights (the bandwidth is the limit of that layout; on 4 KiB pages a stream pays a
    // TLB miss every 4 KiB). Best effort: without THP the pages are ordinary ones. Mapped
    // lazily: thread i writes part i (the part it will read) first, so first touch puts its
    // pages on that thread's NUMA node, with non-zero values so that reads hit real memory,
    // not the shared zero page.
    let mut map = memmap2::MmapMut::map_anon(n * 64).expect("an anonymous map for the read-bandwidth buffer");
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    // SAFETY: the map is page-aligned (so 64-byte aligned for `Line`), n · 64 bytes long, and
    // zero-filled, which is a valid `Line` (sixteen 0.0 f32s); `map` outlives `buf`.
    let buf: &mut [Line] = unsafe { std::slice::from_raw_parts_mut(map.as_mut_ptr().cast::<Line>(), n) };
    {
        let parts: Vec<Option<&mut [Line]>> = buf.chunks_mut(per_thread).map(Some).collect();
        let parts = std::sync::Mutex::new(parts);
        timed_on_threads(threads, |i| {
            let part = parts.lock().unwrap_or_else(|e| e.into_inner())[i].take();
            for (j, l) in part.into_iter().flatten().enumerate() {
                *l = Line([1.0 + (j % 7) as f32; 16]);
            }
        });
    }
    let buf: &[Line] = buf;
    let total = (n * 64) as f64;
    let mut best = Duration::MAX;
    for _ in 0..passes {
        let (t, sums) = timed_on_threads(threads, |i| sum_lines(simd, &buf[i * per_thread..(i + 1) * per_thread]));
        std::hint::black_box(sums);
        best = best.min(t);
    }
    let all = total / best.as_secs_f64();
    let one = one.then(|| {
        let mut best = Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            std::hint::black_box(sum_lines(simd, buf));
            best = best.min(t.elapsed());
        }
        total / best.as_secs_f64()
    });
    (n * 64, all, one)
}

fn sum_lines(simd: Simd, lines: &[Line]) -> f32 {
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the guard detected avx512f, the function's only feature.
        Simd::Avx512 if has_feature("avx512f") => unsafe { x86::sum_avx512(lines) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the guard detected avx2 and fma, the function's features.
        Simd::Avx2 if has_feature("avx2") && has_feature("fma") => unsafe { x86::sum_avx2(lines) },
        _ => sum_portable(lines),
    }
}

/// 16 independent lane accumulators: the compiler vectorises this with the baseline SIMD.
fn sum_portable(lines: &[Line]) -> f32 {
    let mut acc = [0f32; 16];
    for l in lines {
        for (a, v) in acc.iter_mut().zip(&l.0) {
            *a += v;
        }
    }
    acc.iter().sum()
}

/// What a compute-peak run executes.
#[derive(Debug, Clone, Copy)]
enum Peak {
    Fma(Simd),
    Bf16,
    /// `tdpbf16ps` on AMX tiles.
    Amx,
}

/// Independent accumulator chains per thread in the compute kernels: FMA latency (4-5 cycles)
/// times two issue ports needs at least 10 to keep both ports busy.
const CHAINS: usize = 12;

impl Peak {
    /// FLOP of one loop iteration of the kernel.
    fn flops_per_iter(self) -> f64 {
        if matches!(self, Peak::Amx) {
            return crate::kernels::amx::PEAK_FLOPS_PER_ITER;
        }
        let lanes = match self {
            Peak::Fma(Simd::Avx512) => 16,
            Peak::Fma(Simd::Avx2) => 8,
            Peak::Fma(Simd::Scalar) => 1,
            // vdpbf16ps zmm: 16 f32 lanes, each adding two bf16 products.
            Peak::Bf16 => 32,
            Peak::Amx => unreachable!("returned above"),
        };
        (CHAINS * lanes * 2) as f64
    }

    fn run(self, iters: u64) -> f32 {
        let iters = std::hint::black_box(iters);
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the guard detected avx512f, the function's only feature.
            Peak::Fma(Simd::Avx512) if has_feature("avx512f") => unsafe { x86::fma_avx512(iters) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the guard detected avx2 and fma, the function's features.
            Peak::Fma(Simd::Avx2) if has_feature("avx2") && has_feature("fma") => unsafe { x86::fma_avx2(iters) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the guard detected avx512f and avx512bf16, the function's features.
            Peak::Bf16 if Simd::has_bf16() => unsafe { x86::dp_bf16(iters) },
            // `measure` runs it only where the prefill uses AMX (`amx::chosen`).
            Peak::Amx => crate::kernels::amx::peak_loop(iters).expect("the AMX peak is measured only where AMX runs"),
            _ => mul_add_portable(iters),
        }
    }
}

/// Scalar multiply-adds in [`CHAINS`] chains (a multiply and an add each: a CPU without FMA).
fn mul_add_portable(iters: u64) -> f32 {
    let a = std::hint::black_box(0.999_999f32);
    let b = std::hint::black_box(1e-6f32);
    let mut acc = [1f32; CHAINS];
    for _ in 0..iters {
        for x in acc.iter_mut() {
            *x = *x * a + b;
        }
    }
    acc.iter().sum()
}

/// Best FLOP/s over `runs` runs of about `run` each, every thread running the kernel.
fn compute_peak(peak: Peak, threads: usize, run: Duration, runs: usize) -> f64 {
    // Calibrate on one thread: iterations that take about `run`.
    let mut iters = 1u64 << 12;
    loop {
        let t = Instant::now();
        std::hint::black_box(peak.run(iters));
        let e = t.elapsed();
        if e >= run / 8 || iters >= 1 << 40 {
            let scale = run.as_secs_f64() / e.as_secs_f64().max(1e-9);
            iters = ((iters as f64 * scale) as u64).max(1);
            break;
        }
        iters *= 4;
    }
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let (t, out) = timed_on_threads(threads, |_| peak.run(iters));
        std::hint::black_box(out);
        best = best.min(t);
    }
    peak.flops_per_iter() * iters as f64 * threads as f64 / best.as_secs_f64()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Line, CHAINS};

    /// Sum of every value, 8 zmm accumulators (one line each per step).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn sum_avx512(lines: &[Line]) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 8];
        let chunks = lines.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, l) in acc.iter_mut().zip(c) {
                // SAFETY: a Line is 64 bytes aligned to 64: one aligned zmm load.
                *a = _mm512_add_ps(*a, unsafe { _mm512_load_ps(l.0.as_ptr()) });
            }
        }
        for l in rest {
            // SAFETY: as above.
            acc[0] = _mm512_add_ps(acc[0], unsafe { _mm512_load_ps(l.0.as_ptr()) });
        }
        let s = acc.iter().fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
        _mm512_reduce_add_ps(s)
    }

    /// Sum of every value, 8 ymm accumulators (4 lines per step).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sum_avx2(lines: &[Line]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 8];
        let chunks = lines.chunks_exact(4);
        let rest = chunks.remainder();
        for c in chunks {
            for (k, l) in c.iter().enumerate() {
                let p = l.0.as_ptr();
                // SAFETY: a Line is 64 bytes aligned to 64: two aligned ymm loads.
                unsafe {
                    acc[2 * k] = _mm256_add_ps(acc[2 * k], _mm256_load_ps(p));
                    acc[2 * k + 1] = _mm256_add_ps(acc[2 * k + 1], _mm256_load_ps(p.add(8)));
                }
            }
        }
        for l in rest {
            let p = l.0.as_ptr();
            // SAFETY: as above.
            unsafe {
                acc[0] = _mm256_add_ps(acc[0], _mm256_load_ps(p));
                acc[1] = _mm256_add_ps(acc[1], _mm256_load_ps(p.add(8)));
            }
        }
        let s = acc.iter().fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
        let mut out = [0f32; 8];
        // SAFETY: `out` has room for 8 f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    /// `iters` x [`CHAINS`] zmm FMAs. acc = acc * a + b converges to b / (1 - a) = 1: no
    /// overflow, no denormals.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma_avx512(iters: u64) -> f32 {
        let a = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm512_set1_ps(std::hint::black_box(1e-6));
        let mut acc = [_mm512_set1_ps(0.5); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, b);
            }
        }
        let s = acc.iter().fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
        _mm512_reduce_add_ps(s)
    }

    /// `iters` x [`CHAINS`] ymm FMAs (as [`fma_avx512`]).
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn fma_avx2(iters: u64) -> f32 {
        let a = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let b = _mm256_set1_ps(std::hint::black_box(1e-6));
        let mut acc = [_mm256_set1_ps(0.5); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm256_fmadd_ps(*x, a, b);
            }
        }
        let s = acc.iter().fold(_mm256_setzero_ps(), |s, &x| _mm256_add_ps(s, x));
        let mut out = [0f32; 8];
        // SAFETY: `out` has room for 8 f32.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), s) };
        out.iter().sum()
    }

    /// `iters` x [`CHAINS`] `vdpbf16ps` (32 bf16 products into 16 f32 lanes each). The products
    /// are 1.0 x 2^-10, so the sums stay small and exact enough: no overflow, no denormals.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dp_bf16(iters: u64) -> f32 {
        let one = _mm512_set1_ps(std::hint::black_box(1.0));
        let small = _mm512_set1_ps(std::hint::black_box(1.0 / 1024.0));
        let a = _mm512_cvtne2ps_pbh(one, one);
        let b = _mm512_cvtne2ps_pbh(small, small);
        let mut acc = [_mm512_setzero_ps(); CHAINS];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, b);
            }
        }
        let s = acc.iter().fold(_mm512_setzero_ps(), |s, &x| _mm512_add_ps(s, x));
        _mm512_reduce_add_ps(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_parse() {
        assert_eq!(parse_cache_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_cache_size("2M"), Some(2 << 20));
        assert_eq!(parse_cache_size("512"), Some(512));
        assert_eq!(parse_cache_size("x"), None);
    }

    #[test]
    fn every_kernel_computes_the_sum() {
        let lines: Vec<Line> = (0..37).map(|i| Line([i as f32; 16])).collect();
        let want = 16.0 * (0..37).sum::<i32>() as f32;
        for simd in [Simd::Scalar, Simd::Avx2, Simd::Avx512] {
            let usable = match simd {
                Simd::Scalar => true,
                Simd::Avx2 => has_feature("avx2") && has_feature("fma"),
                Simd::Avx512 => has_feature("avx512f"),
            };
            if usable {
                assert_eq!(sum_lines(simd, &lines), want, "{simd:?}");
            }
        }
    }

    #[test]
    fn compute_kernels_stay_finite() {
        let mut peaks = vec![Peak::Fma(Simd::Scalar)];
        if has_feature("avx2") && has_feature("fma") {
            peaks.push(Peak::Fma(Simd::Avx2));
        }
        if has_feature("avx512f") {
            peaks.push(Peak::Fma(Simd::Avx512));
        }
        if Simd::has_bf16() {
            peaks.push(Peak::Bf16);
        }
        for p in peaks {
            let v = p.run(100_000);
            assert!(v.is_finite() && v > 0.0, "{p:?}: {v}");
        }
        if Simd::has_bf16() {
            // 12 chains x 16 lanes x 2 products of 2^-10 per iteration.
            assert_eq!(Peak::Bf16.run(1024), (CHAINS * 16 * 2) as f32);
        }
    }

    #[test]
    fn a_small_measurement_gives_positive_figures() {
        let s = Settings {
            threads: 2,
            read_bytes: 4 << 20,
            read_passes: 2,
            one_thread: true,
            compute_run: Duration::from_millis(2),
            compute_runs: 2,
        };
        let m = measure(&s);
        assert_eq!(m.read_buffer_bytes, 4 << 20);
        assert!(m.read_bytes_per_sec > 0.0 && m.read_bytes_per_sec.is_finite());
        assert!(m.read_bytes_per_sec_one_thread.is_some_and(|b| b > 0.0));
        assert!(m.fma_flops_per_sec > 0.0 && m.fma_flops_per_sec.is_finite());
        // The figures of the kernels' instruction set.
        let (fma, bf16) = match crate::kernels::Isa::active() {
            crate::kernels::Isa::Avx512 => ("avx512f", Simd::has_bf16()),
            crate::kernels::Isa::Avx2 => ("avx2+fma", false),
            crate::kernels::Isa::Scalar => ("scalar", false),
        };
        assert_eq!(m.fma_kernel, fma);
        assert_eq!(m.bf16_flops_per_sec.is_some(), bf16);
        assert_eq!(m.bf16_flops_per_sec.is_some(), crate::kernels::bf16_gemm::available());
        assert_eq!(m.amx_flops_per_sec.is_some(), crate::kernels::amx::chosen());
        assert!(m.amx_flops_per_sec.is_none_or(|f| f > 0.0 && f.is_finite()));
        assert_eq!(m.features.len(), FEATURE_NAMES.len());
    }
}
