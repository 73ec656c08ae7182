//! The CUDA backend's fused attention-side ops (`backend-cuda/src/attention.rs`) on dsv4's CUDA
//! emulator, beyond the op-level suite's cases: their kernels actually run (and the
//! compositions' gathers and GEMMs do not), over shapes that take the other code paths (several
//! warps and head groups, fp8 rows spanning scale blocks, logits in global scratch, views at an
//! offset), each against the trait's default composition on the same device.

use std::ops::Range;

use dsv4_backend_cuda::CudaBackend;
use dsv4_core::backend::{Backend, Precision, RowFormat};
use dsv4_core::test_data::{assert_within, Rng};
use dsv4_cuda_emu::EmulatedDevice;
use dsv4_tests::backend_suite::PrimitivesOnly;

type Emu = CudaBackend<EmulatedDevice>;

/// The fused backend (`.0`) and the compositions over its primitives, one device.
fn backends() -> PrimitivesOnly<Emu> {
    PrimitivesOnly(CudaBackend::new(EmulatedDevice::new()))
}

/// A pool of `rows` rows of `width` in `format` holding `values` (one row each) at `slots`.
fn pool(
    be: &Emu,
    rows: usize,
    width: usize,
    format: RowFormat,
    slots: &[i32],
    values: &[f32],
) -> <Emu as Backend>::Pool {
    let mut p = be.alloc_pool(rows, width, format).unwrap();
    let s = be.upload_index(slots, &[slots.len()]).unwrap();
    be.pool_write(&mut p, &s, &be.upload(values, &[slots.len(), width]).unwrap()).unwrap();
    p
}

/// Kernels (and GEMMs, which the emulator does not count) the compositions would have used.
const COMPOSITION_KERNELS: [&str; 5] =
    ["dsv4_pool_read_f32", "dsv4_pool_read_bf16", "dsv4_pool_read_fp8", "dsv4_softmax_rows_f32", "dsv4_index_mask"];

fn launches(be: &Emu, kernels: &[&str]) -> Vec<u64> {
    kernels.iter().map(|k| be.device().launch_count(k)).collect()
}

/// Largest magnitude of `v`, at least `floor`.
fn largest(v: &[f32], floor: f64) -> f64 {
    v.iter().fold(floor, |m, &x| m.max((x as f64).abs()))
}

struct Attention {
    t: usize,
    h: usize,
    d: usize,
    kk: usize,
    q: Vec<f32>,
    idx: Vec<i32>,
    sinks: Vec<f32>,
    values: Vec<f32>,
    slots: Vec<i32>,
    rows: usize,
}

impl Attention {
    /// `t` queries of `h` heads of width `d` over `kk` listed rows (some `-1`) of `n` keys.
    fn new(seed: u64, t: usize, h: usize, d: usize, kk: usize, n: usize) -> Attention {
        let mut rng = Rng(seed);
        let rows = n + 3;
        // Keys at scattered rows (a permutation of part of the pool).
        let slots: Vec<i32> = (0..n).map(|j| ((j * 7 + 2) % rows) as i32).collect();
        let idx: Vec<i32> = (0..t * kk).map(|i| if i % 5 == 3 { -1 } else { slots[(i * 13 + i / kk) % n] }).collect();
        Attention {
            t,
            h,
            d,
            kk,
            q: rng.vec(t * h * d).iter().map(|v| v * 3.0).collect(),
            idx,
            sinks: (0..h).map(|i| [0.5, -1.0, 3.0, -20.0][i % 4]).collect(),
            values: rng.vec(n * d),
            slots,
            rows,
        }
    }

    /// The fused result and the composition's, on the same inputs in a pool of `format`; q is
    /// a view one query into a larger tensor.
    fn run(&self, c: &PrimitivesOnly<Emu>, format: RowFormat) -> (Vec<f32>, Vec<f32>) {
        let be = &c.0;
        let (t, h, d, kk) = (self.t, self.h, self.d, self.kk);
        let p = pool(be, self.rows, d, format, &self.slots, &self.values);
        let mut qdata = vec![7.0; h * d];
        qdata.extend(&self.q);
        let q = be.narrow(&be.upload(&qdata, &[t + 1, h, d]).unwrap(), 0, 1, t).unwrap();
        let idx = be.upload_index(&self.idx, &[t, kk]).unwrap();
        let sinks = be.upload(&self.sinks, &[h]).unwrap();
        let scale = (d as f32).powf(-0.5);
        let fused = be.sparse_attention(&q, &p, &idx, &sinks, scale, Precision::F32).unwrap();
        let composed = c.sparse_attention(&q, &p, &idx, &sinks, scale, Precision::F32).unwrap();
        (be.download(&fused).unwrap(), be.download(&composed).unwrap())
    }
}

#[test]
fn sparse_attention_runs_its_kernel_and_matches_the_composition() {
    let c = backends();
    let be = &c.0;
    // 72 channels: two fp8 scale blocks (one partial) before 4 rope values; four warps.
    let a = Attention::new(1, 3, 5, 72, 37, 50);
    for format in [RowFormat::F32, RowFormat::Bf16, RowFormat::Fp8 { rope: 4 }] {
        let before = launches(be, &COMPOSITION_KERNELS);
        let shared = be.device().launch_count("dsv4_sparse_attention_shared");
        let (got, want) = a.run(&c, format);
        assert_eq!(be.device().launch_count("dsv4_sparse_attention_shared"), shared + 1, "{format:?}");
        // The composition ran after the fused op: one launch of each of its kernels, for it.
        let after = launches(be, &COMPOSITION_KERNELS);
        let pool_read = match format {
            RowFormat::F32 => 0,
            RowFormat::Bf16 => 1,
            RowFormat::Fp8 { .. } => 2,
        };
        for (i, k) in COMPOSITION_KERNELS.iter().enumerate() {
            let want_runs = u64::from(i >= 3 || i == pool_read);
            assert_eq!(after[i] - before[i], want_runs, "{format:?}: {k} outside the composition");
        }
        let scale = largest(&want, 1.0);
        assert_within(
            &format!("sparse_attention {format:?}"),
            &got,
            &want.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            |_| 1e-5 * scale,
        );
    }
}

#[test]
fn sparse_attention_over_more_keys_than_shared_memory_holds() {
    let c = backends();
    let be = &c.0;
    // 12 289 logits do not fit in the 47 KiB of dynamic shared memory: they go to the global scratch.
    let a = Attention::new(2, 1, 2, 4, 12_289, 300);
    let (got, want) = a.run(&c, RowFormat::Bf16);
    assert_eq!(be.device().launch_count("dsv4_sparse_attention_global"), 1);
    assert_eq!(be.device().launch_count("dsv4_sparse_attention_shared"), 0);
    let scale = largest(&want, 1.0);
    assert_within(
        "sparse_attention (global scratch)",
        &got,
        &want.iter().map(|&v| v as f64).collect::<Vec<_>>(),
        |_| 1e-5 * scale,
    );
}

struct Indexer {
    t: usize,
    nh: usize,
    dh: usize,
    q: Vec<f32>,
    keys: Vec<f32>,
    w: Vec<f32>,
    valid: Vec<Range<usize>>,
    key_rows: Vec<i32>,
    rows: usize,
}

impl Indexer {
    /// Small integers, power-of-two weights and dI = 16 (scale 1/4): every score is exact in
    /// any summation order, so the picks are fully determined, ties included.
    fn new(seed: u64, t: usize, nh: usize, n: usize) -> Indexer {
        let mut rng = Rng(seed);
        let dh = 16;
        let rows = n + 5;
        let mut keys = rng.ints(n * dh, 2);
        // Repeated keys: ties for every query.
        for j in (3..n).step_by(4) {
            let first = keys[..dh].to_vec();
            keys[j * dh..(j + 1) * dh].copy_from_slice(&first);
        }
        let valid = (0..t)
            .map(|i| [0..n, 0..i.min(n), (i % 3)..n, 2.min(n)..(n - 1).max(2.min(n)), 0..0][i % 5].clone())
            .collect();
        Indexer {
            t,
            nh,
            dh,
            q: rng.ints(t * nh * dh, 2),
            keys,
            w: (0..t * nh).map(|i| [1.0, -0.5, 0.25, 2.0, -1.0, 0.0][i % 6]).collect(),
            valid,
            key_rows: (0..n).map(|j| ((j * 3 + 1) % rows) as i32).collect(),
            rows,
        }
    }

    fn run(&self, c: &PrimitivesOnly<Emu>, format: RowFormat, k: usize, offset: i32) -> (Vec<i32>, Vec<i32>) {
        let be = &c.0;
        let (t, nh, dh, n) = (self.t, self.nh, self.dh, self.key_rows.len());
        let p = pool(be, self.rows, dh, format, &self.key_rows, &self.keys);
        let q = be.upload(&self.q, &[t, nh, dh]).unwrap();
        let w = be.upload(&self.w, &[t, nh]).unwrap();
        let kr = be.upload_index(&self.key_rows, &[n]).unwrap();
        let fused = be.indexer_select(&q, &p, &kr, &w, &self.valid, k, offset, Precision::F32).unwrap();
        assert_eq!(dsv4_core::backend::DeviceTensor::shape(&fused), &[t, k]);
        let composed = c.indexer_select(&q, &p, &kr, &w, &self.valid, k, offset, Precision::F32).unwrap();
        (be.download_index(&fused).unwrap(), be.download_index(&composed).unwrap())
    }
}

#[test]
fn indexer_select_runs_its_kernels_and_picks_as_the_composition() {
    let c = backends();
    let be = &c.0;
    // 40 heads: two groups of 32, the second padded.
    let ix = Indexer::new(3, 11, 40, 45);
    for format in [RowFormat::F32, RowFormat::Bf16, RowFormat::Fp8 { rope: 4 }] {
        for (k, offset) in [(45, 0), (9, 1000), (1, 50)] {
            let before = launches(be, &COMPOSITION_KERNELS);
            let counts = |be: &Emu| {
                ["dsv4_indexer_scores", "dsv4_topk_shared", "dsv4_indexer_picks"].map(|k| be.device().launch_count(k))
            };
            let ran = counts(be);
            let (got, want) = ix.run(&c, format, k, offset);
            let after = launches(be, &COMPOSITION_KERNELS);
            // Each ran once for the fused op and the top-k once more for the composition.
            let now = counts(be);
            assert_eq!([now[0] - ran[0], now[1] - ran[1], now[2] - ran[2]], [1, 2, 1], "{format:?} k={k}");
            let pool_read =
                usize::from(format != RowFormat::F32) + usize::from(matches!(format, RowFormat::Fp8 { .. }));
            assert_eq!(after[pool_read] - before[pool_read], 1, "{format:?}: the composition's pool_read");
            assert_eq!(got, want, "indexer_select {format:?} k={k} offset={offset}");
            for (ti, r) in ix.valid.iter().enumerate() {
                let picks = &got[ti * k..(ti + 1) * k];
                assert_eq!(picks.iter().filter(|&&p| p != -1).count(), r.len().min(k), "query {ti}");
                for &p in picks.iter().filter(|&&p| p != -1) {
                    assert!(r.clone().any(|n| ix.key_rows[n] + offset == p), "query {ti} picked {p} outside {r:?}");
                }
            }
        }
    }
}

#[test]
fn indexer_select_with_nothing_to_pick() {
    let c = backends();
    let be = &c.0;
    let ix = Indexer::new(4, 3, 2, 6);
    let (got, want) = ix.run(&c, RowFormat::F32, 0, 5);
    assert!(got.is_empty() && want.is_empty());
    assert_eq!(be.device().launch_count("dsv4_indexer_scores"), 0);
}
