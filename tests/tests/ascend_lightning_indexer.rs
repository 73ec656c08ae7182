//! `indexer_select` on Huawei's `aclnnLightningIndexerV2` (`--precision bf16`) and the
//! emulator's implementation of that operator and its metadata pre-pass. Emulator-verified,
//! not hardware-verified.
//!
//! * The fused path picks the same key sets per query as the composition (`composed::
//!   indexer_select`, f32 scores) on BF16-exact random data, for decode and prefill shapes,
//!   every visibility form (all keys, CSA's causal pattern of compressed keys, arbitrary
//!   per-query counts including 0 and fewer than k), keys that are whole pool blocks, scattered
//!   rows and rows computed on the device; on the Atlas A2, A3 and 950 SoC names (each in a child
//!   process, since the emulator's SoC is fixed per process), with the kernel really launched
//!   (and the metadata pre-pass on the 950 only).
//! * f32, official and official-f32 precisions, `DSV4_ASCEND_FUSED=off`, F32 pools and index
//!   head dims other than 128 compose (no launch).
//! * The emulated operator: its picks and values against a host reference (BSND, TND and paged
//!   keys, both mask modes with compression), and misuse (head dim, dtypes, layouts, missing or
//!   extra optional tensors, per-SoC limits, run-time faults, stale metadata) refused with a
//!   message that names the problem.

use std::ffi::{c_char, c_void, CStr};
use std::ops::Range;
use std::ptr::null_mut;
use std::sync::{Mutex, MutexGuard};

use dsv4_ascend_sys::*;
use dsv4_backend_ascend::{AscendBackend, FusedPolicy};
use dsv4_core::backend::{composed, Backend, DeviceTensor, IndexScores, Precision, RowFormat};
use dsv4_tests::raw_acl;

const D: usize = 128;
const SOC_VAR: &str = "DSV4_ASCEND_EMU_SOC";
const CHILD_VAR: &str = "DSV4_TEST_LIV2_CHILD";
const SOCS: [&str; 3] = ["Ascend910B3", "Ascend910_9391", "Ascend950PR_9599"];
const OP: &str = "aclnnLightningIndexerV2";
const META_OP: &str = "aclnnLightningIndexerV2Metadata";

/// The emulator's launch counters are per process: the tests of this binary take turns.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn launches(op: &str) -> u64 {
    dsv4_backend_ascend::emulator_launches(op).expect("running on the emulator")
}

fn open(policy: FusedPolicy) -> AscendBackend {
    dsv4_tests::use_ascend_emulator();
    dsv4_backend_ascend::open_with(0, policy).unwrap_or_else(|e| panic!("{e}"))
}

fn kernel_used(be: &AscendBackend) -> bool {
    be.fused_kernels().iter().any(|c| c.name.contains(OP) && c.used)
}

/// Deterministic pseudo-random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        self.next() as usize % n.max(1)
    }

    /// BF16-exact values in [-1, 1).
    fn bf16s(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| bf16((self.next() as f64 / (1u64 << 30) as f64 - 1.0) as f32)).collect()
    }

    fn perm(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            v.swap(i, self.below(i + 1));
        }
        v
    }
}

fn bf16(v: f32) -> f32 {
    f32::from_bits(v.to_bits() & 0xffff_0000)
}

// -------------------------------------------------------------- the backend's fused path

/// Where the sequence's keys are in the pool.
#[derive(Clone, Copy, Debug)]
enum Rows {
    /// Whole aligned blocks of 32 pool rows, in shuffled block order (dsv4's paged state).
    Blocks,
    /// Scattered rows.
    Scattered,
    /// Scattered rows computed on the device (not known on the host).
    Device,
}

/// Each query's visible key count.
#[derive(Clone, Debug)]
enum Vis {
    All,
    /// CSA's pattern: queries at positions `start..start + t`, keys compressed by `ratio`.
    Causal {
        ratio: usize,
        start: usize,
    },
    /// Arbitrary counts.
    Counts(Vec<usize>),
}

struct Case {
    t: usize,
    heads: usize,
    k: usize,
    rows: Rows,
    vis: Vis,
}

impl Case {
    /// (N keys, each query's visible count).
    fn lengths(&self, rng: &mut Rng) -> (usize, Vec<usize>) {
        match &self.vis {
            Vis::All => {
                let n = self.k + 5 + rng.below(60);
                (n, vec![n; self.t])
            }
            Vis::Causal { ratio, start } => {
                let end = start + self.t;
                ((end / ratio), (*start..end).map(|p| (p + 1) / ratio).collect())
            }
            Vis::Counts(c) => (*c.iter().max().unwrap(), c.clone()),
        }
    }
}

/// Query `row`'s scores of keys `0..n` in f64 from the BF16 values (the composition's scale
/// included), for the tie tolerance.
fn host_scores(q: &[f32], keys: &[f32], w: &[f32], heads: usize, n: usize, row: usize) -> Vec<f64> {
    (0..n)
        .map(|j| {
            (0..heads)
                .map(|h| {
                    let qh = &q[(row * heads + h) * D..(row * heads + h + 1) * D];
                    let dot: f64 = qh.iter().zip(&keys[j * D..(j + 1) * D]).map(|(a, b)| *a as f64 * *b as f64).sum();
                    w[row * heads + h] as f64 * dot.max(0.0) / (D as f64).sqrt()
                })
                .sum()
        })
        .collect()
}

/// Runs one case through the fused path (which must launch the kernel) and the composition on
/// `be`, and compares the picks.
fn check_case(be: &AscendBackend, rng: &mut Rng, case: &Case, what: &str) {
    let (n, ends) = case.lengths(rng);
    let (t, heads, k) = (case.t, case.heads, case.k.min(n));
    let pool_rows = n.div_ceil(32) * 32 + 64;
    let key_rows: Vec<i32> = match case.rows {
        Rows::Blocks => {
            let blocks = rng.perm(pool_rows / 32);
            (0..n).map(|j| (blocks[j / 32] * 32 + j % 32) as i32).collect()
        }
        Rows::Scattered | Rows::Device => rng.perm(pool_rows)[..n].iter().map(|&r| r as i32).collect(),
    };
    let keys = rng.bf16s(n * D);
    let q = rng.bf16s(t * heads * D);
    let w: Vec<f32> = rng.bf16s(t * heads).iter().map(|v| v * 2.0).collect();
    let mut pool = be.alloc_pool(pool_rows, D, RowFormat::Bf16).unwrap();
    be.pool_write(&mut pool, &be.upload_index(&key_rows, &[n]).unwrap(), &be.upload(&keys, &[n, D]).unwrap()).unwrap();
    let rows_idx = match case.rows {
        Rows::Device => {
            // The top-n of a vector that ranks row key_rows[j] j-th: the rows, from the device.
            let mut rank = vec![-1f32; pool_rows];
            for (j, &r) in key_rows.iter().enumerate() {
                rank[r as usize] = (n - j) as f32;
            }
            let (_, idx) = be.topk(&be.upload(&rank, &[pool_rows]).unwrap(), n).unwrap();
            assert_eq!(be.download_index(&idx).unwrap(), key_rows);
            idx
        }
        _ => be.upload_index(&key_rows, &[n]).unwrap(),
    };
    let (qt, wt) = (be.upload(&q, &[t, heads, D]).unwrap(), be.upload(&w, &[t, heads]).unwrap());
    let valid: Vec<Range<usize>> = ends.iter().map(|&e| 0..e).collect();
    let offset = 1000;
    let before = launches(OP);
    let fused = be.indexer_select(&qt, &pool, &rows_idx, &wt, &valid, k, offset, Precision::Bf16).unwrap();
    assert_eq!(launches(OP), before + 1, "{what}: the kernel was not launched");
    let composed =
        composed::indexer_select(be, &qt, &pool, &rows_idx, &wt, &valid, k, offset, IndexScores::F32).unwrap();
    assert_eq!(fused.shape(), [t, k]);
    let (got, want) = (be.download_index(&fused).unwrap(), be.download_index(&composed).unwrap());
    let row_of: std::collections::HashMap<i32, usize> =
        key_rows.iter().enumerate().map(|(j, &r)| (r + offset, j)).collect();
    for i in 0..t {
        let (g, c) = (&got[i * k..(i + 1) * k], &want[i * k..(i + 1) * k]);
        let nones = g.iter().filter(|&&p| p == -1).count();
        assert_eq!(nones, k - k.min(ends[i]), "{what}: query {i} (sees {}): {g:?}", ends[i]);
        assert!(
            g.iter().all(|p| *p == -1 || row_of.get(p).is_some_and(|&j| j < ends[i])),
            "{what}: query {i} picked a key it may not see: {g:?} (sees {})",
            ends[i]
        );
        let mut picked: Vec<i32> = g.iter().copied().filter(|&p| p >= 0).collect();
        picked.sort_unstable();
        picked.dedup();
        assert_eq!(picked.len(), k - nones, "{what}: query {i} repeats a pick: {g:?}");
        let (mut gs, mut cs) = (g.to_vec(), c.to_vec());
        gs.sort_unstable();
        cs.sort_unstable();
        if gs != cs {
            // Only keys whose scores tie (within f32 rounding) with the k-th may differ.
            let s = host_scores(&q, &keys, &w, heads, ends[i], i);
            let mut sorted = s.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k.min(ends[i]) - 1];
            let scale = sorted.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
            for p in gs.iter().filter(|p| !cs.contains(p)).chain(cs.iter().filter(|p| !gs.contains(p))) {
                let d = (s[row_of[p]] - kth).abs() / scale;
                assert!(
                    d < 1e-5,
                    "{what}: query {i}: fused {g:?} vs composed {c:?}; key {p} is {d:e} from the k-th score"
                );
            }
        }
    }
}

fn cases() -> Vec<Case> {
    let mut c = vec![
        // Decode: one query over every key.
        Case { t: 1, heads: 64, k: 16, rows: Rows::Blocks, vis: Vis::All },
        Case { t: 1, heads: 8, k: 32, rows: Rows::Scattered, vis: Vis::All },
        // Decode in CSA: one query over the keys compressed so far, with keys from the device.
        Case { t: 1, heads: 4, k: 8, rows: Rows::Device, vis: Vis::Causal { ratio: 4, start: 130 } },
        // Chunked prefill in CSA (ratio 4), from the start and mid-sequence.
        Case { t: 37, heads: 4, k: 8, rows: Rows::Blocks, vis: Vis::Causal { ratio: 4, start: 0 } },
        Case { t: 23, heads: 2, k: 16, rows: Rows::Scattered, vis: Vis::Causal { ratio: 4, start: 61 } },
        Case { t: 9, heads: 3, k: 5, rows: Rows::Device, vis: Vis::Causal { ratio: 4, start: 102 } },
        // Other ratios, including plain right-down causal (ratio 1).
        Case { t: 12, heads: 2, k: 6, rows: Rows::Blocks, vis: Vis::Causal { ratio: 1, start: 20 } },
        Case { t: 11, heads: 2, k: 4, rows: Rows::Scattered, vis: Vis::Causal { ratio: 7, start: 40 } },
        // Arbitrary counts: zero, fewer than k, all.
        Case { t: 6, heads: 5, k: 6, rows: Rows::Scattered, vis: Vis::Counts(vec![0, 3, 50, 6, 0, 49]) },
        Case { t: 5, heads: 2, k: 10, rows: Rows::Blocks, vis: Vis::Counts(vec![70, 2, 0, 69, 35]) },
        Case { t: 4, heads: 1, k: 3, rows: Rows::Device, vis: Vis::Counts(vec![1, 0, 33, 7]) },
    ];
    // Only the last query sees any keys.
    c.push(Case { t: 3, heads: 2, k: 4, rows: Rows::Scattered, vis: Vis::Counts(vec![0, 0, 9]) });
    c
}

/// Runs in a child process per SoC name (the emulator's SoC is fixed per process).
fn fused_path_on_this_soc(soc: &str) {
    let be = open(FusedPolicy::All);
    assert_eq!(be.soc(), soc);
    assert!(kernel_used(&be), "{:?}", be.fused_kernels());
    let (ops, metas) = (launches(OP), launches(META_OP));
    let mut rng = Rng(0x11ce + soc.len() as u64);
    let cases = cases();
    for (i, case) in cases.iter().enumerate() {
        check_case(&be, &mut rng, case, &format!("{soc} case {i} ({:?}, {:?}, t {})", case.rows, case.vis, case.t));
    }
    assert!(kernel_used(&be), "the kernel was switched off: {:?}", be.fused_kernels());
    let runs = cases.len() as u64;
    assert_eq!(launches(OP) - ops, runs);
    // The AICPU pre-pass runs on the 950 only.
    let want_meta = if soc.starts_with("Ascend950") { runs } else { 0 };
    assert_eq!(launches(META_OP) - metas, want_meta, "{soc}: metadata launches");
    println!("{soc}: {runs} fused calls, each picked what the composition picks; {} metadata pre-passes", want_meta);
    per_soc_limits(soc);
}

#[test]
fn fused_indexer_picks_what_the_composition_picks_on_a2_a3_and_950() {
    if let Ok(soc) = std::env::var(CHILD_VAR) {
        // The child process for one SoC name.
        return fused_path_on_this_soc(&soc);
    }
    let _g = serial();
    dsv4_tests::use_ascend_emulator();
    for soc in SOCS {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "fused_indexer_picks_what_the_composition_picks_on_a2_a3_and_950", "--nocapture"])
            .env(CHILD_VAR, soc)
            .env(SOC_VAR, soc)
            .env_remove("DSV4_ASCEND_FUSED")
            .env(EMULATOR_VAR, std::env::var_os(EMULATOR_VAR).unwrap())
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("1 passed"), "{soc}:\n{text}");
    }
}

#[test]
fn other_precisions_policies_and_shapes_compose() {
    let _g = serial();
    let be = open(FusedPolicy::All);
    assert!(kernel_used(&be), "{:?}", be.fused_kernels());
    let mut rng = Rng(5);
    let (t, heads, n, k) = (3usize, 2usize, 20usize, 4usize);
    let run = |be: &AscendBackend, rng: &mut Rng, d: usize, format: RowFormat, act: Precision| -> u64 {
        let mut pool = be.alloc_pool(n, d, format).unwrap();
        let rows: Vec<i32> = (0..n as i32).collect();
        be.pool_write(
            &mut pool,
            &be.upload_index(&rows, &[n]).unwrap(),
            &be.upload(&rng.bf16s(n * d), &[n, d]).unwrap(),
        )
        .unwrap();
        let q = be.upload(&rng.bf16s(t * heads * d), &[t, heads, d]).unwrap();
        let w = be.upload(&rng.bf16s(t * heads), &[t, heads]).unwrap();
        let valid = vec![0..n, 0..5, 0..n];
        let before = launches(OP);
        let out = be.indexer_select(&q, &pool, &be.upload_index(&rows, &[n]).unwrap(), &w, &valid, k, 0, act).unwrap();
        assert_eq!(out.shape(), [t, k]);
        launches(OP) - before
    };
    assert_eq!(run(&be, &mut rng, D, RowFormat::Bf16, Precision::Bf16), 1, "bf16 uses the kernel");
    for act in [Precision::F32, Precision::Official, Precision::OfficialF32] {
        assert_eq!(run(&be, &mut rng, D, RowFormat::Bf16, act), 0, "{act:?} must compose");
    }
    assert_eq!(run(&be, &mut rng, D, RowFormat::F32, Precision::Bf16), 0, "an F32 pool composes");
    assert_eq!(run(&be, &mut rng, 64, RowFormat::Bf16, Precision::Bf16), 0, "dI = 64 composes");
    let off = open(FusedPolicy::Off);
    assert!(!kernel_used(&off));
    assert_eq!(run(&off, &mut rng, D, RowFormat::Bf16, Precision::Bf16), 0, "DSV4_ASCEND_FUSED=off composes");
    // Opt-in: the default policy leaves it off.
    let auto = open(FusedPolicy::Auto);
    assert!(!kernel_used(&auto));
    assert_eq!(run(&auto, &mut rng, D, RowFormat::Bf16, Precision::Bf16), 0, "DSV4_ASCEND_FUSED=auto composes");
    assert!(kernel_used(&be), "{:?}", be.fused_kernels());
}

// ------------------------------------------------------------- the emulated operator (FFI)

/// A tensor over fresh device memory holding `bytes`, with explicit strides (storage: `storage`
/// elements of `esize` bytes).
fn strided(api: &Api, dims: &[i64], st: &[i64], storage: i64, dt: aclDataType, bytes: &[u8]) -> *mut aclTensor {
    let esize = match dt {
        aclDataType::ACL_BF16 | aclDataType::ACL_FLOAT16 => 2,
        _ => 4,
    };
    let p = raw_acl::malloc(api, storage as usize * esize);
    raw_acl::upload_bytes(api, p, bytes);
    raw_acl::strided_tensor(api, p, dims, st, storage, dt)
}

fn t_bf16(api: &Api, dims: &[i64], v: &[f32]) -> *mut aclTensor {
    let bytes: Vec<u8> = v.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect();
    strided(api, dims, &raw_acl::contiguous_strides(dims), dims.iter().product(), aclDataType::ACL_BF16, &bytes)
}

fn t_f32(api: &Api, dims: &[i64], v: &[f32]) -> *mut aclTensor {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    strided(api, dims, &raw_acl::contiguous_strides(dims), dims.iter().product(), aclDataType::ACL_FLOAT, &bytes)
}

fn t_i32(api: &Api, dims: &[i64], v: &[i32]) -> *mut aclTensor {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    strided(api, dims, &raw_acl::contiguous_strides(dims), dims.iter().product(), aclDataType::ACL_INT32, &bytes)
}

/// An uninitialised tensor (NaN / -1 bytes, as fresh emulator memory).
fn t_out(api: &Api, dims: &[i64], dt: aclDataType) -> (*mut aclTensor, *mut c_void) {
    let n: i64 = dims.iter().product();
    let p = raw_acl::malloc(api, n as usize * 4);
    (raw_acl::strided_tensor(api, p, dims, &raw_acl::contiguous_strides(dims), n, dt), p)
}

/// The arguments of aclnnLightningIndexerV2GetWorkspaceSize.
#[derive(Clone, Copy)]
struct Li {
    q: *mut aclTensor,
    k: *mut aclTensor,
    w: *mut aclTensor,
    cu_q: *mut aclTensor,
    cu_k: *mut aclTensor,
    used_q: *mut aclTensor,
    used_k: *mut aclTensor,
    residual: *mut aclTensor,
    table: *mut aclTensor,
    offset: *mut aclTensor,
    meta: *mut aclTensor,
    topk: i64,
    max_q: i64,
    layout_q: Option<&'static CStr>,
    layout_k: Option<&'static CStr>,
    mask: i64,
    ratio: i64,
    ret: i64,
    idx: *mut aclTensor,
    vals: *mut aclTensor,
    /// Device addresses of idx and vals, to read the results, and their element count.
    idx_p: *mut c_void,
    vals_p: *mut c_void,
    len: usize,
}

fn text(s: Option<&'static CStr>) -> *mut c_char {
    s.map_or(null_mut(), |s| s.as_ptr() as *mut c_char)
}

fn plan_li(api: &Api, a: &Li) -> Result<(*mut aclOpExecutor, u64), String> {
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: live objects (or ones the emulator rejects), C strings that outlive the call and
    // out-pointers to locals.
    let st = unsafe {
        api.aclnnLightningIndexerV2GetWorkspaceSize().unwrap()(
            a.q,
            a.k,
            a.w,
            a.cu_q,
            a.cu_k,
            a.used_q,
            a.used_k,
            a.residual,
            a.table,
            a.offset,
            a.meta,
            a.topk,
            a.max_q,
            text(a.layout_q),
            text(a.layout_k),
            a.mask,
            a.ratio,
            a.ret,
            a.idx,
            a.vals,
            &mut ws,
            &mut ex,
        )
    };
    if st == ACLNN_SUCCESS {
        Ok((ex, ws))
    } else {
        assert_eq!(st, ACLNN_ERR_PARAM_INVALID);
        Err(raw_acl::recent_error(api))
    }
}

/// Plans, launches with a fresh workspace and synchronises; the message of whatever failed.
fn launch_planned(api: &Api, ex: *mut aclOpExecutor, ws: u64, f: pfn::aclnnLightningIndexerV2) -> Result<(), String> {
    let w = if ws > 0 { raw_acl::malloc(api, ws as usize) } else { null_mut() };
    // SAFETY: the executor just planned, a workspace of its size, the default stream.
    if unsafe { f(w, ws, ex, null_mut()) } != ACLNN_SUCCESS {
        return Err(raw_acl::recent_error(api));
    }
    // SAFETY: the default stream.
    match unsafe { api.aclrtSynchronizeStream().unwrap()(null_mut()) } {
        ACL_SUCCESS => Ok(()),
        _ => Err(raw_acl::recent_error(api)),
    }
}

fn run_li(api: &Api, a: &Li) -> Result<(Vec<i32>, Vec<f32>), String> {
    let (ex, ws) = plan_li(api, a)?;
    launch_planned(api, ex, ws, api.aclnnLightningIndexerV2().unwrap())?;
    Ok((
        i32s(&raw_acl::download_bytes(api, a.idx_p, a.len * 4)),
        f32s(&raw_acl::download_bytes(api, a.vals_p, a.len * 4)),
    ))
}

fn i32s(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// The metadata pre-pass: Ok(metadata tensor) after it ran, or the message.
#[allow(clippy::too_many_arguments)]
fn metadata(
    api: &Api,
    cu_q: *mut aclTensor,
    used_k: *mut aclTensor,
    residual: *mut aclTensor,
    heads: i64,
    topk: i64,
    batch: i64,
    layout_q: &'static CStr,
    mask: i64,
    ratio: i64,
) -> Result<*mut aclTensor, String> {
    let (m, _) = t_out(api, &[1024], aclDataType::ACL_INT32);
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: as plan_li.
    let st = unsafe {
        api.aclnnLightningIndexerV2MetadataGetWorkspaceSize().unwrap()(
            cu_q,
            null_mut(),
            null_mut(),
            used_k,
            residual,
            heads,
            1,
            D as i64,
            topk,
            batch,
            -1,
            -1,
            text(Some(layout_q)),
            text(Some(c"PA_BBND")),
            mask,
            ratio,
            m,
            &mut ws,
            &mut ex,
        )
    };
    if st != ACLNN_SUCCESS {
        return Err(raw_acl::recent_error(api));
    }
    launch_planned(api, ex, ws, api.aclnnLightningIndexerV2Metadata().unwrap())?;
    Ok(m)
}

/// The reference: per query, the visible keys by descending f64 score (ties to the lower key).
fn reference(scores: &[f64], visible: usize, topk: usize) -> (Vec<i32>, Vec<f32>) {
    let mut order: Vec<usize> = (0..visible).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut idx = vec![-1; topk];
    let mut val = vec![f32::NEG_INFINITY; topk];
    for (s, &j) in order.iter().take(topk).enumerate() {
        idx[s] = j as i32;
        val[s] = scores[j] as f32;
    }
    (idx, val)
}

fn score(q: &[f32], key: &[f32], w: &[f32]) -> f64 {
    let heads = w.len();
    (0..heads)
        .map(|h| {
            let dot: f64 = q[h * D..(h + 1) * D].iter().zip(key).map(|(a, b)| *a as f64 * *b as f64).sum();
            w[h] as f64 * dot.max(0.0)
        })
        .sum()
}

/// The visible key count of query `i` of `s1` over `s2` keys with mask mode 3 (the operator's
/// right-down causal rule over compressed keys).
fn causal_visible(s1: usize, s2: usize, i: usize, ratio: usize, residual: usize) -> usize {
    let end = (s2 * ratio + residual) as i64 - s1 as i64 + i as i64 + 1;
    if end < 0 {
        0
    } else {
        (end as usize / ratio).min(s2)
    }
}

/// A valid baseline on any SoC: TND q [4, 2, 128] BF16 (one batch), keys paged in 2 blocks of 16
/// (block table [1, 0], 20 keys used), w [4, 2], topk 8, mask 0; indices and values [4, 1, 8].
fn baseline(api: &Api, rng: &mut Rng) -> Li {
    let (t, heads, topk) = (4i64, 2i64, 8i64);
    let (idx, idx_p) = t_out(api, &[t, 1, topk], aclDataType::ACL_INT32);
    let (vals, vals_p) = t_out(api, &[t, 1, topk], aclDataType::ACL_FLOAT);
    Li {
        q: t_bf16(api, &[t, heads, D as i64], &rng.bf16s((t * heads) as usize * D)),
        k: t_bf16(api, &[2, 16, 1, D as i64], &rng.bf16s(32 * D)),
        w: t_f32(api, &[t, heads], &rng.bf16s((t * heads) as usize)),
        cu_q: t_i32(api, &[2], &[0, t as i32]),
        cu_k: null_mut(),
        used_q: null_mut(),
        used_k: t_i32(api, &[1], &[20]),
        residual: null_mut(),
        table: t_i32(api, &[1, 2], &[1, 0]),
        offset: null_mut(),
        meta: null_mut(),
        topk,
        max_q: -1,
        layout_q: Some(c"TND"),
        layout_k: Some(c"PA_BBND"),
        mask: 0,
        ratio: 1,
        ret: 0,
        idx,
        vals,
        idx_p,
        vals_p,
        len: (t * topk) as usize,
    }
}

/// `baseline` with the 950's metadata when the SoC needs it.
fn baseline_for(api: &Api, rng: &mut Rng, soc: &str) -> Li {
    let mut a = baseline(api, rng);
    if soc.starts_with("Ascend950") {
        a.meta = metadata(api, a.cu_q, a.used_k, null_mut(), 2, a.topk, 1, c"TND", 0, 1).unwrap();
    }
    a
}

#[test]
fn emulated_operator_matches_a_host_reference() {
    let _g = serial();
    let api = raw_acl::api();
    let mut rng = Rng(21);
    let (heads, topk) = (3usize, 4usize);

    // BSND q and k, B = 2, S1 = 12, S2 = 4; mask 3 with cmpRatio 2 and residuals [1, 0] (the
    // first queries see nothing: their end is negative); values returned.
    let (b, s1, s2, ratio, residuals) = (2usize, 12usize, 4usize, 2usize, [1usize, 0]);
    let q = rng.bf16s(b * s1 * heads * D);
    let k = rng.bf16s(b * s2 * D);
    let w: Vec<f32> = rng.bf16s(b * s1 * heads);
    let (idx, idx_p) = t_out(api, &[b as i64, s1 as i64, 1, topk as i64], aclDataType::ACL_INT32);
    let (vals, vals_p) = t_out(api, &[b as i64, s1 as i64, 1, topk as i64], aclDataType::ACL_FLOAT);
    let mut a = baseline(api, &mut rng);
    a = Li {
        q: t_bf16(api, &[b as i64, s1 as i64, heads as i64, D as i64], &q),
        k: t_bf16(api, &[b as i64, s2 as i64, 1, D as i64], &k),
        w: t_f32(api, &[b as i64, s1 as i64, heads as i64], &w),
        cu_q: null_mut(),
        used_k: null_mut(),
        table: null_mut(),
        residual: t_i32(api, &[2], &[residuals[0] as i32, residuals[1] as i32]),
        topk: topk as i64,
        layout_q: Some(c"BSND"),
        layout_k: Some(c"BSND"),
        mask: 3,
        ratio: ratio as i64,
        ret: 1,
        idx,
        vals,
        idx_p,
        vals_p,
        len: b * s1 * topk,
        ..a
    };
    let (gi, gv) = run_li(api, &a).unwrap_or_else(|m| panic!("{m}"));
    let (mut saw_none, mut saw_partial) = (false, false);
    for bi in 0..b {
        for i in 0..s1 {
            let row = bi * s1 + i;
            let vis = causal_visible(s1, s2, i, ratio, residuals[bi]);
            saw_none |= vis == 0;
            saw_partial |= vis > 0 && vis < topk;
            let scores: Vec<f64> = (0..s2)
                .map(|j| {
                    score(
                        &q[row * heads * D..(row + 1) * heads * D],
                        &k[(bi * s2 + j) * D..(bi * s2 + j + 1) * D],
                        &w[row * heads..(row + 1) * heads],
                    )
                })
                .collect();
            let (wi, wv) = reference(&scores, vis, topk);
            assert_eq!(&gi[row * topk..(row + 1) * topk], &wi[..], "BSND batch {bi} query {i} (sees {vis})");
            assert_eq!(&gv[row * topk..(row + 1) * topk], &wv[..], "BSND batch {bi} query {i} values");
        }
    }
    assert!(saw_none && saw_partial, "the case must have queries that see no keys and fewer than topk");

    // TND q and k: batches of 2 and 3 queries over 7 and 3 keys, no mask, indices only.
    let (cu_q, cu_k) = ([0usize, 2, 5], [0usize, 7, 10]);
    let q = rng.bf16s(5 * heads * D);
    let k = rng.bf16s(10 * D);
    let w = rng.bf16s(5 * heads);
    let (idx, idx_p) = t_out(api, &[5, 1, topk as i64], aclDataType::ACL_INT32);
    let (vals, vals_p) = t_out(api, &[5, 1, topk as i64], aclDataType::ACL_FLOAT);
    let a = Li {
        q: t_bf16(api, &[5, heads as i64, D as i64], &q),
        k: t_bf16(api, &[10, 1, D as i64], &k),
        w: t_f32(api, &[5, heads as i64], &w),
        cu_q: t_i32(api, &[3], &cu_q.map(|v| v as i32)),
        cu_k: t_i32(api, &[3], &cu_k.map(|v| v as i32)),
        residual: null_mut(),
        layout_q: Some(c"TND"),
        layout_k: Some(c"TND"),
        mask: 0,
        ratio: 1,
        ret: 0,
        idx,
        vals,
        idx_p,
        vals_p,
        len: 5 * topk,
        ..a
    };
    let before = f32s(&raw_acl::download_bytes(api, vals_p, 5 * topk * 4));
    let (gi, gv) = run_li(api, &a).unwrap_or_else(|m| panic!("{m}"));
    for bi in 0..2 {
        for row in cu_q[bi]..cu_q[bi + 1] {
            let keys = cu_k[bi]..cu_k[bi + 1];
            let scores: Vec<f64> = keys
                .clone()
                .map(|j| {
                    score(
                        &q[row * heads * D..(row + 1) * heads * D],
                        &k[j * D..(j + 1) * D],
                        &w[row * heads..(row + 1) * heads],
                    )
                })
                .collect();
            let (wi, _) = reference(&scores, keys.len(), topk);
            assert_eq!(&gi[row * topk..(row + 1) * topk], &wi[..], "TND row {row}");
        }
    }
    assert_eq!(
        gv.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        before.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "returnValue 0 leaves sparseValues untouched"
    );

    // Paged keys (blocks of 16, a strided block axis) with BSND q: B = 2, S1 = 2, the block
    // table [[2, 0], [1, 1]] with 20 and 5 keys; mask 3, cmpRatio 1 (plain right-down causal).
    let (b, s1, bs, used) = (2usize, 2usize, 16usize, [20usize, 5]);
    let table = [2usize, 0, 1, 1];
    let q = rng.bf16s(b * s1 * heads * D);
    let blocks = rng.bf16s(3 * bs * D);
    // Each block is followed by one block of padding in storage (stride 2 · 16 · 128).
    let mut storage = vec![0f32; 6 * bs * D];
    for blk in 0..3 {
        storage[2 * blk * bs * D..(2 * blk + 1) * bs * D].copy_from_slice(&blocks[blk * bs * D..(blk + 1) * bs * D]);
    }
    let bytes: Vec<u8> = storage.iter().flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes()).collect();
    let kv = strided(
        api,
        &[3, bs as i64, 1, D as i64],
        &[2 * (bs * D) as i64, D as i64, D as i64, 1],
        (6 * bs * D) as i64,
        aclDataType::ACL_BF16,
        &bytes,
    );
    let w = rng.bf16s(b * s1 * heads);
    let (idx, idx_p) = t_out(api, &[b as i64, s1 as i64, 1, topk as i64], aclDataType::ACL_INT32);
    let (vals, vals_p) = t_out(api, &[b as i64, s1 as i64, 1, topk as i64], aclDataType::ACL_FLOAT);
    let a = Li {
        q: t_bf16(api, &[b as i64, s1 as i64, heads as i64, D as i64], &q),
        k: kv,
        w: t_f32(api, &[b as i64, s1 as i64, heads as i64], &w),
        cu_q: null_mut(),
        cu_k: null_mut(),
        used_k: t_i32(api, &[2], &used.map(|v| v as i32)),
        table: t_i32(api, &[2, 2], &table.map(|v| v as i32)),
        layout_q: Some(c"BSND"),
        layout_k: Some(c"PA_BBND"),
        mask: 3,
        ratio: 1,
        ret: 1,
        idx,
        vals,
        idx_p,
        vals_p,
        len: b * s1 * topk,
        ..a
    };
    let (gi, gv) = run_li(api, &a).unwrap_or_else(|m| panic!("{m}"));
    for bi in 0..b {
        for i in 0..s1 {
            let row = bi * s1 + i;
            let vis = causal_visible(s1, used[bi], i, 1, 0);
            let scores: Vec<f64> = (0..used[bi])
                .map(|j| {
                    let blk = table[bi * 2 + j / bs];
                    let key = &blocks[(blk * bs + j % bs) * D..(blk * bs + j % bs + 1) * D];
                    score(&q[row * heads * D..(row + 1) * heads * D], key, &w[row * heads..(row + 1) * heads])
                })
                .collect();
            let (wi, wv) = reference(&scores, vis, topk);
            assert_eq!(&gi[row * topk..(row + 1) * topk], &wi[..], "paged batch {bi} query {i} (sees {vis})");
            assert_eq!(&gv[row * topk..(row + 1) * topk], &wv[..], "paged batch {bi} query {i} values");
        }
    }
}

/// Asserts that planning `a` fails with a message containing every part of `want`.
fn refused(api: &Api, a: &Li, want: &[&str], what: &str) {
    match plan_li(api, a) {
        Ok(_) => panic!("{what}: planned, but should be refused with {want:?}"),
        Err(m) => assert!(want.iter().all(|w| m.contains(w)), "{what}: {m}"),
    }
}

/// Asserts that `a` plans but its run fails with a message containing every part of `want`.
fn faults(api: &Api, a: &Li, want: &[&str], what: &str) {
    match run_li(api, a) {
        Ok(_) => panic!("{what}: ran, but should fault with {want:?}"),
        Err(m) => assert!(want.iter().all(|w| m.contains(w)), "{what}: {m}"),
    }
}

#[test]
fn emulated_operator_refuses_misuse_with_a_reason() {
    let _g = serial();
    let api = raw_acl::api();
    let mut rng = Rng(33);
    let a = baseline(api, &mut rng);
    run_li(api, &a).unwrap_or_else(|m| panic!("the baseline must run: {m}"));
    let bf = |dims: &[i64]| t_bf16(api, dims, &vec![0.5; dims.iter().product::<i64>() as usize]);
    let fl = |dims: &[i64]| t_f32(api, dims, &vec![0.5; dims.iter().product::<i64>() as usize]);
    let int = |dims: &[i64], v: &[i32]| t_i32(api, dims, v);
    let cases: Vec<(Li, Vec<&str>, &str)> = vec![
        (Li { q: bf(&[4, 2, 64]), ..a }, vec!["q has head dim D = 64", "only 128"], "q D 64"),
        (Li { k: bf(&[2, 16, 1, 64]), ..a }, vec!["k has head dim D = 64"], "k D 64"),
        (Li { q: fl(&[4, 2, 128]), ..a }, vec!["q must be BFLOAT16 or FLOAT16", "FLOAT"], "FLOAT q"),
        (Li { w: bf(&[4, 2]), ..a }, vec!["w must be FLOAT", "BFLOAT16"], "BF16 w"),
        (
            Li { k: t_f32(api, &[2, 16, 1, 128], &vec![0.0; 32 * 128]), ..a },
            vec!["k (FLOAT) must have q's dtype (BFLOAT16)"],
            "k dtype differs",
        ),
        (Li { w: fl(&[4, 3]), ..a }, vec!["w has shape [4, 3], expected [4, 2]"], "w shape"),
        (Li { k: bf(&[2, 16, 2, 128]), ..a }, vec!["N2 = 2", "only 1"], "two key heads"),
        (Li { q: bf(&[4, 65, 128]), w: fl(&[4, 65]), ..a }, vec!["N1 = 65", "1..=64"], "65 heads"),
        (
            Li { layout_q: Some(c"BSND"), ..a },
            vec!["q has shape [4, 2, 128]; layoutQ BSND takes (B, S1, N1, D)"],
            "q rank",
        ),
        (Li { layout_q: Some(c"PA_BBND"), ..a }, vec!["layoutQ \"PA_BBND\" is not supported (BSND or TND)"], "paged q"),
        (Li { layout_k: Some(c"BSND"), ..a }, vec!["layoutQ TND and layoutK BSND must be the same"], "TND q, BSND k"),
        (Li { layout_k: None, ..a }, vec!["layoutK is NULL"], "no layoutK"),
        (Li { layout_k: Some(c"NTD"), ..a }, vec!["layoutK \"NTD\" is not supported"], "unknown layout"),
        (
            Li { table: null_mut(), ..a },
            vec!["blockTableOptional is required when layoutK is PA_BBND"],
            "no block table",
        ),
        (Li { used_k: null_mut(), ..a }, vec!["sequsedKOptional is required when layoutK is PA_BBND"], "no sequsedK"),
        (Li { cu_q: null_mut(), ..a }, vec!["cuSeqlensQOptional is required when layoutQ is TND"], "no cuSeqlensQ"),
        (
            Li { cu_k: int(&[2], &[0, 32]), ..a },
            vec!["cuSeqlensKOptional must be NULL here (layoutK is PA_BBND)"],
            "cuSeqlensK with PA",
        ),
        (
            Li { k: bf(&[4, 8, 1, 128]), ..a },
            vec!["block_size 8 must be a multiple of 16 in 16..=1024"],
            "block size 8",
        ),
        (Li { table: int(&[2, 2], &[0, 1, 0, 1]), ..a }, vec!["blockTableOptional must be INT32 (B = 1"], "table rows"),
        (
            Li { used_k: int(&[2], &[1, 1]), ..a },
            vec!["sequsedKOptional has shape [2]", "(B) = [1]"],
            "sequsedK length",
        ),
        (Li { topk: 0, ..a }, vec!["topk 0 is outside 1..=8192"], "topk 0"),
        (Li { mask: 1, ..a }, vec!["maskMode 1 is not 0 (no mask) or 3"], "mask 1"),
        (Li { ratio: 0, ..a }, vec!["cmpRatio 0 is outside 1..=128"], "ratio 0"),
        (Li { ret: 2, ..a }, vec!["returnValue 2"], "returnValue 2"),
        (
            Li { mask: 3, ratio: 4, ..a },
            vec!["cmpResidualKOptional is required when cmpRatio (4) is not 1 and maskMode is 3"],
            "no residual",
        ),
        (
            Li { residual: int(&[1], &[0]), ..a },
            vec!["cmpResidualKOptional must be NULL unless"],
            "residual without compression",
        ),
        (
            Li { idx: t_out(api, &[4, 1, 7], aclDataType::ACL_INT32).0, ..a },
            vec!["sparseIndices has shape [4, 1, 7], expected [4, 1, 8]"],
            "indices shape",
        ),
        (
            Li { idx: t_out(api, &[4, 1, 8], aclDataType::ACL_FLOAT).0, ..a },
            vec!["sparseIndices must be INT32"],
            "indices dtype",
        ),
        (Li { vals: null_mut(), ..a }, vec!["sparseValues", "NULL"], "no values tensor"),
        (
            Li { offset: int(&[1], &[5]), ..a },
            vec!["outputIdxOffsetOptional is not supported on Ascend910B3"],
            "offset on A2",
        ),
        (
            Li { q: bf(&[0, 2, 128]), w: fl(&[0, 2]), cu_q: int(&[2], &[0, 0]), ..a },
            vec!["q [0, 2, 128] is empty"],
            "empty q",
        ),
    ];
    for (args, want, what) in &cases {
        refused(api, args, want, what);
    }
    // A BSND k must be contiguous; a paged one may be strided along its blocks only.
    let strided_inner = strided(
        api,
        &[2, 16, 1, 128],
        &[16 * 256, 256, 128, 1],
        2 * 16 * 256,
        aclDataType::ACL_BF16,
        &[0; 2 * 16 * 512],
    );
    refused(api, &Li { k: strided_inner, ..a }, &["only axis 0 may be non-contiguous"], "strided rows in PA_BBND");

    // Faults found when the kernel runs (device values).
    faults(
        api,
        &Li { cu_q: int(&[2], &[0, 3]), ..a },
        &["cuSeqlensQOptional ends at Some(3), but the tensor has 4 tokens"],
        "cuSeqlensQ end",
    );
    faults(api, &Li { cu_q: int(&[2], &[1, 4]), ..a }, &["cuSeqlensQOptional must start at 0"], "cuSeqlensQ start");
    faults(
        api,
        &Li { used_k: int(&[1], &[33]), ..a },
        &["sequsedKOptional[0] = 33 needs more than the block table's 2 blocks of 16 tokens"],
        "too many keys",
    );
    faults(
        api,
        &Li { used_k: int(&[1], &[-1]), ..a },
        &["sequsedKOptional has the negative length -1"],
        "negative length",
    );
    faults(
        api,
        &Li { table: int(&[1, 2], &[1, 2]), ..a },
        &["blockTableOptional[0][1] = 2 is outside the 2 blocks of k"],
        "bad block id",
    );
    faults(
        api,
        &Li { mask: 3, ratio: 4, residual: int(&[1], &[4]), ..a },
        &["cmpResidualKOptional has 4; every element must be below cmpRatio 4"],
        "residual too large",
    );
    per_soc_limits("Ascend910B3");
}

/// What differs between the SoCs (run on the emulator's SoC, which must be `soc`).
fn per_soc_limits(soc: &str) {
    let api = raw_acl::api();
    let mut rng = Rng(77);
    let is950 = soc.starts_with("Ascend950");
    let a = baseline_for(api, &mut rng, soc);
    run_li(api, &a).unwrap_or_else(|m| panic!("{soc}: the baseline must run: {m}"));
    let int = |dims: &[i64], v: &[i32]| t_i32(api, dims, v);
    // topk 3000: the 950 only; 3072 everywhere.
    for (topk, ok) in [(3000i64, is950), (3072, true), (2048, true), (8193, false)] {
        let (idx, _) = t_out(api, &[4, 1, topk], aclDataType::ACL_INT32);
        let (vals, _) = t_out(api, &[4, 1, topk], aclDataType::ACL_FLOAT);
        let mut b = Li { topk, idx, vals, ..a };
        if is950 && ok {
            b.meta = metadata(api, a.cu_q, a.used_k, null_mut(), 2, topk, 1, c"TND", 0, 1).unwrap();
        }
        match plan_li(api, &b) {
            Ok(_) => assert!(ok, "{soc}: topk {topk} must be refused"),
            Err(m) => assert!(!ok && m.contains(&format!("topk {topk}")), "{soc}: topk {topk}: {m}"),
        }
    }
    if is950 {
        refused(
            api,
            &Li { meta: null_mut(), ..a },
            &["metadataOptional is required on the Ascend 950"],
            "950 without metadata",
        );
        // Metadata from another call's lengths (40 keys instead of 20) is stale.
        let other = metadata(api, a.cu_q, int(&[1], &[40]), null_mut(), 2, a.topk, 1, c"TND", 0, 1).unwrap();
        faults(
            api,
            &Li { meta: other, ..a },
            &["metadataOptional was computed for different sequence lengths"],
            "stale metadata",
        );
        let other = metadata(api, a.cu_q, a.used_k, null_mut(), 4, a.topk, 1, c"TND", 0, 1).unwrap();
        faults(
            api,
            &Li { meta: other, ..a },
            &["metadataOptional was computed for different arguments (numHeadsQ: 4 there, 2 here)"],
            "heads",
        );
        // Metadata the pre-pass never wrote.
        faults(
            api,
            &Li { meta: t_i32(api, &[1024], &[0; 1024]), ..a },
            &["was not written by aclnnLightningIndexerV2Metadata"],
            "zeros",
        );
        // sequsedQ is supported: the padded queries get no picks.
        let mut b = Li { used_q: int(&[1], &[2]), ..a };
        b.meta = metadata_with_used_q(api, a.cu_q, b.used_q, a.used_k, 2, a.topk);
        let (idx, _) = run_li(api, &b).unwrap_or_else(|m| panic!("{m}"));
        assert!(idx[..2 * 8].iter().all(|&v| v >= 0) && idx[2 * 8..].iter().all(|&v| v == -1), "{idx:?}");
        refused(
            api,
            &Li { offset: int(&[1], &[5]), ..a },
            &["outputIdxOffsetOptional is not emulated"],
            "offset on 950",
        );
        // The pre-pass checks its own arguments.
        let e = metadata(api, a.cu_q, a.used_k, null_mut(), 65, a.topk, 1, c"TND", 0, 1).unwrap_err();
        assert!(e.contains("numHeadsQ 65 is outside 1..=64"), "{e}");
        let e = metadata(api, a.cu_q, null_mut(), null_mut(), 2, a.topk, 1, c"TND", 0, 1).unwrap_err();
        assert!(e.contains("sequsedKOptional is required when layoutKOptional is PA_BBND"), "{e}");
        let e = metadata(api, a.cu_q, a.used_k, null_mut(), 2, a.topk, 1, c"TND", 3, 4).unwrap_err();
        assert!(e.contains("cmpResidualKOptional is required"), "{e}");
    } else {
        for (b, want) in [
            (Li { used_q: int(&[1], &[2]), ..a }, format!("sequsedQOptional is not supported on {soc}")),
            (Li { max_q: 4, ..a }, format!("maxSeqlenQ 4: not supported on {soc} (pass -1)")),
            (Li { meta: int(&[1024], &[0; 1024]), ..a }, format!("metadataOptional on {soc} is not emulated")),
        ] {
            refused(api, &b, &[&want], &want);
        }
    }
}

fn metadata_with_used_q(
    api: &Api,
    cu_q: *mut aclTensor,
    used_q: *mut aclTensor,
    used_k: *mut aclTensor,
    heads: i64,
    topk: i64,
) -> *mut aclTensor {
    let (m, _) = t_out(api, &[1024], aclDataType::ACL_INT32);
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: as plan_li.
    let st = unsafe {
        api.aclnnLightningIndexerV2MetadataGetWorkspaceSize().unwrap()(
            cu_q,
            null_mut(),
            used_q,
            used_k,
            null_mut(),
            heads,
            1,
            D as i64,
            topk,
            0,
            -1,
            -1,
            text(Some(c"TND")),
            text(Some(c"PA_BBND")),
            0,
            1,
            m,
            &mut ws,
            &mut ex,
        )
    };
    assert_eq!(st, ACLNN_SUCCESS, "{}", raw_acl::recent_error(api));
    launch_planned(api, ex, ws, api.aclnnLightningIndexerV2Metadata().unwrap()).unwrap();
    m
}
