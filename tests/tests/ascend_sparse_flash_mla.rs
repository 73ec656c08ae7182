//! `aclnnSparseFlashMla` (+ `aclnnSparseFlashMlaMetadata`) on the emulator posing as an Atlas
//! A2 (the default SoC): the backend's `sparse_attention` in bf16 on the kernel against the
//! composition, when it is (not) used, and the emulator's documented argument checks through
//! the raw FFI. The fixture suite with the kernel runs in `ascend_fused_attention_a3.rs` and
//! `ascend_emulator_950.rs`. Emulator-verified, not hardware-verified.

use std::ffi::{c_char, c_void};
use std::ptr::null_mut;
use std::sync::Mutex;

use dsv4_ascend_sys::*;
use dsv4_backend_ascend::{emulator_launches, AscendBackend, FusedPolicy};
use dsv4_core::backend::{composed, Backend, Precision, RowFormat};
use dsv4_core::test_data::Rng;
use dsv4_tests::raw_acl;

const D: usize = 512;

/// The kernel is opt-in (`DSV4_ASCEND_FUSED=all`).
fn backend() -> AscendBackend {
    dsv4_tests::use_ascend_emulator();
    dsv4_backend_ascend::open_with(0, FusedPolicy::All).unwrap_or_else(|e| panic!("{e}"))
}

/// The emulator's launch counts are per process: tests that read them run one at a time.
static COUNTING: Mutex<()> = Mutex::new(());

fn launches() -> u64 {
    emulator_launches("aclnnSparseFlashMla").unwrap()
}

fn bf16(v: f32) -> f32 {
    f32::from_bits(v.to_bits() & 0xffff_0000)
}

#[allow(clippy::too_many_arguments)]
/// One `sparse_attention` call on the kernel and on the composition; returns (fused, composed,
/// whether the kernel ran).
fn both(
    be: &AscendBackend,
    rng: &mut Rng,
    t: usize,
    h: usize,
    rows: usize,
    idx: &[i32],
    format: RowFormat,
    act: Precision,
) -> (Vec<f32>, Vec<f32>, bool) {
    let k = idx.len() / t;
    let q: Vec<f32> = (0..t * h * D).map(|_| bf16(rng.f32() * 0.6)).collect();
    let kv: Vec<f32> = (0..rows * D).map(|_| bf16(rng.f32() * 0.6)).collect();
    let sinks: Vec<f32> = (0..h).map(|_| rng.f32()).collect();
    let mut pool = be.alloc_pool(rows, D, format).unwrap();
    let all = be.upload_index(&(0..rows as i32).collect::<Vec<_>>(), &[rows]).unwrap();
    be.pool_write(&mut pool, &all, &be.upload(&kv, &[rows, D]).unwrap()).unwrap();
    let (qt, st) = (be.upload(&q, &[t, h, D]).unwrap(), be.upload(&sinks, &[h]).unwrap());
    let it = be.upload_index(idx, &[t, k]).unwrap();
    let before = launches();
    let scale = (D as f32).powf(-0.5);
    let got = be.download(&be.sparse_attention(&qt, &pool, &it, &st, scale, act).unwrap()).unwrap();
    let ran = launches() > before;
    let want = be.download(&composed::sparse_attention(be, &qt, &pool, &it, &st, scale).unwrap()).unwrap();
    (got, want, ran)
}

/// The kernel rounds each probability to BF16 before `P·V` (relative 2^-9) and its output
/// (2^-9): the result moves by at most about 2^-8 of the largest value attended to, plus one
/// output rounding.
fn assert_close(got: &[f32], want: &[f32], vmax: f32, what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 2f32.powi(-8) * (vmax + w.abs()), "{what}: element {i}: {g} vs {w}");
    }
}

#[test]
fn the_kernel_matches_the_composition_in_bf16() {
    let _one = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let be = backend();
    let used = be.fused_kernels().into_iter().find(|c| c.name.contains("aclnnSparseFlashMla")).unwrap();
    assert!(used.used, "{used:?}");
    let mut rng = Rng(7);
    // (T, H, pool rows, K): padding anywhere in a row, rows with no valid entry, a long list.
    for &(t, h, rows, k) in &[(1usize, 1usize, 16usize, 2usize), (4, 2, 48, 5), (3, 8, 64, 24), (2, 64, 1040, 6)] {
        let idx: Vec<i32> = (0..t * k)
            .map(|i| if i % 3 == 1 || i / k == t - 1 && t > 2 { -1 } else { (rng.next_u64() % rows as u64) as i32 })
            .collect();
        let (got, want, ran) = both(&be, &mut rng, t, h, rows, &idx, RowFormat::Bf16, Precision::Bf16);
        assert!(ran, "T {t} H {h}: the kernel did not run");
        assert_close(&got, &want, 0.6, &format!("T {t} H {h} rows {rows} K {k}"));
        if t > 2 {
            // A query without keys attends to its sink only: zero output, as in the composition.
            assert!(got[(t - 1) * h * D..].iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn the_kernel_runs_only_where_it_applies() {
    let _one = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let be = backend();
    let mut rng = Rng(8);
    let idx = [0, 1, -1, 2];
    // f32 activations keep the f32 composition (the kernel would round q to BF16).
    let (_, _, ran) = both(&be, &mut rng, 2, 2, 16, &idx, RowFormat::Bf16, Precision::F32);
    assert!(!ran, "f32 must not use the BF16 kernel");
    // An f32 pool is not the kernel's dtype.
    let (_, _, ran) = both(&be, &mut rng, 2, 2, 16, &idx, RowFormat::F32, Precision::Bf16);
    assert!(!ran, "an f32 pool must compose");
    // Atlas A2 takes only power-of-two head counts.
    let (got, want, ran) = both(&be, &mut rng, 2, 3, 16, &idx, RowFormat::Bf16, Precision::Bf16);
    assert!(!ran, "3 heads on an A2 must compose");
    assert_eq!(got, want);
    // official (bf16 activations) uses it.
    let (_, _, ran) = both(&be, &mut rng, 2, 2, 16, &idx, RowFormat::Bf16, Precision::Official);
    assert!(ran);
    // A pool of 40 rows holds 48 (its BF16 block is padded to a multiple of 16), so the kernel
    // pages it too; the padding is never indexed.
    let (got, want, ran) = both(&be, &mut rng, 2, 2, 40, &[0, 39, -1, 38], RowFormat::Bf16, Precision::Bf16);
    assert!(ran, "40 rows: the padded pool is paged");
    assert_close(&got, &want, 0.6, "40 rows");
    // The default policy leaves the opt-in kernel off.
    let auto = dsv4_backend_ascend::open(0).unwrap();
    let choice = auto.fused_kernels().into_iter().find(|c| c.name.contains("aclnnSparseFlashMla")).unwrap();
    assert!(!choice.used && choice.why.contains("DSV4_ASCEND_FUSED=all"), "{choice:?}");
    let (_, _, ran) = both(&auto, &mut rng, 2, 2, 16, &idx, RowFormat::Bf16, Precision::Bf16);
    assert!(!ran, "the default policy must compose");
}

// ------------------------------------------------------------------------ the raw FFI checks

fn dims(d: &[usize]) -> Vec<i64> {
    d.iter().map(|&v| v as i64).collect()
}

fn i32s(api: &Api, v: &[i32], d: &[usize]) -> *mut aclTensor {
    raw_acl::i32_tensor(api, &dims(d), v)
}

fn zeros(api: &Api, d: &[usize], dtype: aclDataType, esize: usize) -> *mut aclTensor {
    raw_acl::zero_tensor(api, &dims(d), dtype, esize)
}

/// Every argument of one SWA-sparse-ori_kv call (TND), valid by default; tests change one.
struct Call {
    t: usize,
    h: usize,
    d: usize,
    rows: usize,
    k: usize,
    q_dtype: aclDataType,
    idx: Vec<i32>,
    lens: Vec<i32>,
    ori_mask: i64,
    cmp_mask: i64,
    cmp_ratio: i64,
    layout_q: &'static [u8],
    layout_kv: &'static [u8],
    /// Rows per KV block (the pool's rows are `rows`, paged with an identity block table).
    block: usize,
    /// oriWinLeft = oriWinRight.
    window: i64,
    /// Metadata planned for this oriTopk (None: the call's K).
    meta_k: Option<usize>,
    /// Skip the metadata pre-pass (pass an all-zero tensor).
    no_meta: bool,
    with_cmp_kv: bool,
    no_sinks: bool,
}

impl Default for Call {
    fn default() -> Call {
        Call {
            t: 2,
            h: 2,
            d: D,
            rows: 32,
            k: 3,
            q_dtype: aclDataType::ACL_BF16,
            idx: vec![0, 3, -1, 2, -1, -1],
            lens: vec![2, 1],
            ori_mask: 0,
            cmp_mask: 3,
            cmp_ratio: 1,
            layout_q: b"TND\0",
            layout_kv: b"PA_BBND\0",
            block: 16,
            window: 0,
            meta_k: None,
            no_meta: false,
            with_cmp_kv: false,
            no_sinks: false,
        }
    }
}

/// Plans (and with `launch`, runs and synchronises) the metadata pre-pass and the kernel;
/// Err(message) at the first failure.
fn call(c: &Call, launch: bool) -> Result<(), String> {
    let _one = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
    let api = raw_acl::api();
    let esize = if c.q_dtype == aclDataType::ACL_FLOAT { 4 } else { 2 };
    let q = zeros(api, &[c.t, c.h, c.d], c.q_dtype, esize);
    let kv = zeros(api, &[c.rows / c.block, c.block, 1, c.d], c.q_dtype, esize);
    let table = i32s(api, &(0..(c.rows / c.block) as i32).collect::<Vec<_>>(), &[1, c.rows / c.block]);
    let used = i32s(api, &[c.rows as i32], &[1]);
    let cmp = if c.with_cmp_kv { zeros(api, &[2, 1, c.d], c.q_dtype, esize) } else { null_mut() };
    let idx = i32s(api, &c.idx, &[c.t, 1, c.k]);
    let lens = i32s(api, &c.lens, &[c.t, 1]);
    let cu_q = i32s(api, &[0, c.t as i32], &[2]);
    let sinks = if c.no_sinks { null_mut() } else { zeros(api, &[c.h], aclDataType::ACL_FLOAT, 4) };
    let meta = zeros(api, &[1024], aclDataType::ACL_INT32, 4);
    let out = zeros(api, &[c.t, c.h, c.d], c.q_dtype, esize);
    let n = null_mut::<aclTensor>();
    let run =
        |ex: *mut aclOpExecutor,
         ws: u64,
         f: unsafe extern "C" fn(*mut c_void, u64, *mut aclOpExecutor, aclrtStream) -> aclnnStatus| {
            if !launch {
                return Ok(());
            }
            let w = raw_acl::malloc(api, ws as usize);
            // SAFETY: the executor just planned, a workspace of its size, the default stream.
            let st = unsafe { f(w, ws, ex, null_mut()) };
            // SAFETY: the default stream.
            let sync = unsafe { api.aclrtSynchronizeStream().unwrap()(null_mut()) };
            if st != ACLNN_SUCCESS || sync != ACL_SUCCESS {
                return Err(raw_acl::recent_error(api));
            }
            Ok(())
        };
    let (lq, lkv) = (c.layout_q.as_ptr() as *mut c_char, c.layout_kv.as_ptr() as *mut c_char);
    if !c.no_meta {
        let (mut ws, mut ex) = (0u64, null_mut());
        // SAFETY: live tensors or NULL, NUL-terminated layouts, out-pointers.
        let st = unsafe {
            api.aclnnSparseFlashMlaMetadataGetWorkspaceSize().unwrap()(
                cu_q,
                n,
                n,
                n,
                used,
                n,
                n,
                lens,
                n,
                c.h as i64,
                1,
                c.d as i64,
                0,
                0,
                0,
                0,
                c.meta_k.unwrap_or(c.k) as i64,
                0,
                c.cmp_ratio,
                c.ori_mask,
                c.cmp_mask,
                c.window,
                c.window,
                lq,
                lkv,
                true,
                false,
                meta,
                &mut ws,
                &mut ex,
            )
        };
        if st != ACLNN_SUCCESS {
            return Err(raw_acl::recent_error(api));
        }
        run(ex, ws, api.aclnnSparseFlashMlaMetadata().unwrap())?;
    }
    let (mut ws, mut ex) = (0u64, null_mut());
    // SAFETY: as above.
    let st = unsafe {
        api.aclnnSparseFlashMlaGetWorkspaceSize().unwrap()(
            q,
            kv,
            cmp,
            idx,
            n,
            table,
            n,
            cu_q,
            n,
            n,
            n,
            used,
            n,
            n,
            lens,
            n,
            sinks,
            meta,
            0.05,
            c.cmp_ratio,
            c.ori_mask,
            c.cmp_mask,
            c.window,
            c.window,
            lq,
            lkv,
            1,
            false,
            out,
            n,
            &mut ws,
            &mut ex,
        )
    };
    if st != ACLNN_SUCCESS {
        return Err(raw_acl::recent_error(api));
    }
    run(ex, ws, api.aclnnSparseFlashMla().unwrap())
}

fn refused(c: Call, launch: bool, want: &str) {
    let e = call(&c, launch).expect_err(want);
    assert!(e.contains(want), "expected {want:?} in: {e}");
}

#[test]
fn a_valid_raw_call_runs() {
    call(&Call::default(), true).unwrap();
}

#[test]
fn the_emulator_refuses_what_the_docs_refuse() {
    refused(Call { d: 256, ..Call::default() }, false, "headDim 256: only 512");
    refused(Call { q_dtype: aclDataType::ACL_FLOAT, ..Call::default() }, false, "q must be BFLOAT16 or FLOAT16");
    refused(Call { h: 3, ..Call::default() }, false, "power of two");
    refused(Call { ori_mask: 4, ..Call::default() }, false, "oriMaskMode 4");
    refused(Call { cmp_mask: 0, ..Call::default() }, false, "cmpMaskMode 0");
    refused(Call { cmp_ratio: 4, ..Call::default() }, false, "cmpRatio 4");
    refused(Call { layout_kv: b"TND\0", ..Call::default() }, false, "oriBlockTable only");
    refused(Call { block: 8, ..Call::default() }, false, "a multiple of 16");
    refused(Call { window: -1, ..Call::default() }, false, "non-negative windows");
    refused(Call { with_cmp_kv: true, ..Call::default() }, false, "not emulated");
    refused(Call { no_sinks: true, ..Call::default() }, false, "sinksOptional is required");
}

#[test]
fn the_emulator_checks_the_values_when_the_stream_runs() {
    // Metadata for another call, or none at all.
    refused(Call { meta_k: Some(5), ..Call::default() }, true, "computed for other parameters");
    refused(Call { no_meta: true, ..Call::default() }, true, "holds no metadata");
    // A valid entry outside the KV rows; a length beyond K.
    refused(Call { idx: vec![0, 32, -1, 2, -1, -1], ..Call::default() }, true, "names KV row 32");
    refused(Call { idx: vec![0, -1, -1, 2, -1, -1], ..Call::default() }, true, "names KV row -1");
    refused(Call { lens: vec![4, 1], ..Call::default() }, true, "outside 0..=3");
}
