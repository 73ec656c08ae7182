//! Fused attention-side V4 ops: sparse attention with sinks reading the paged pool, and the
//! lightning indexer's scoring and top-k (kernels in `kernels/attention.cu`).
//!
//! Both override the trait's default compositions (`dsv4_core::backend::composed`), which stay
//! their definition: the same f32 arithmetic in the same order where the order is the
//! composition's own (the softmax with its sink, the indexer's relu / scale / weight / sum over
//! heads and its mask), reading the selected pool rows in place instead of gathering them
//! (`pool_read`) first.
//!
//! * `sparse_attention`: one kernel, one block per (query, head) pair; the logits live in
//!   shared memory, or in a global scratch buffer when the key set is too long for it
//!   ([`attention_plan`]).
//! * `indexer_select`: `dsv4_indexer_scores` writes every query's masked scores over its keys,
//!   the backend's own top-k kernel (`topk`, kernels/index.cu: f32 total order, ties to the
//!   lower key number) ranks them, and `dsv4_indexer_picks` maps the picks to pool rows (`-1`
//!   for a pick whose score is `-inf`, exactly where the composition marks them). No host round
//!   trip: the result stays on the device. Queries go in passes whose scores stay within
//!   64 MiB ([`indexer_rows_per_pass`]). Scores are f32 whatever the activation precision
//!   (the trait allows BF16 kernels otherwise, but does not ask for them).
//!
//! Where the composition's behaviour is that of invalid inputs, the kernels keep to the trait's
//! contract instead: a pool row outside the pool (possible only for indices computed on the
//! device, which the host cannot check) is "no key" in sparse attention and a key that is never
//! picked in the indexer, and a key outside `valid[t]` is never picked even when its score is
//! NaN or `+inf` (which the composition's `-inf` mask would turn into a NaN, ranked first).

use std::ops::Range;

use dsv4_core::backend::{composed, IndexScores, RowFormat};
use dsv4_core::backend_checks as checks;
use dsv4_core::error::{Error, Result};

use crate::backend::CudaBackend;
use crate::device::{Device, KernelArg, LaunchConfig};
use crate::memory::elementwise_launch;
use crate::tensor::{CudaIndex, CudaPool, CudaTensor};

/// Dynamic shared memory a launch gets without opting in.
const SHARED_BYTES: usize = crate::device::DYNAMIC_SHARED_BUDGET;
/// Most warps per block of the attention and indexer kernels.
const MAX_WARPS: usize = 4;
/// Most blocks along a grid dimension the kernels walk grid-stride.
const MAX_BLOCKS: usize = 65_535;
/// Most blocks of `dsv4_sparse_attention_global`, each owning one slice of the scratch.
const GLOBAL_BLOCKS: usize = 1024;
/// `DSV4_INDEXER_GROUP`: the indexer's query heads padded to a multiple of this in shared memory.
const INDEXER_GROUP: usize = 32;
/// Most f32 scores of one indexer pass (64 MiB), as the composition bounds its own.
const INDEXER_PASS_SCORES: usize = 16 << 20;

/// The `DSV4_ATTN_*` code of a pool's row format, its fp8 rope width (0 otherwise) and its row
/// size in bytes.
pub(crate) fn format_args(format: RowFormat, width: usize) -> (i32, usize, usize) {
    match format {
        RowFormat::F32 => (0, 0, format.row_bytes(width)),
        RowFormat::Bf16 => (1, 0, format.row_bytes(width)),
        RowFormat::Fp8 { rope } => (2, rope.min(width), format.row_bytes(width)),
    }
}

/// How one `sparse_attention` call runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AttentionPlan {
    /// `dsv4_sparse_attention_shared` or `dsv4_sparse_attention_global`.
    pub kernel: &'static str,
    pub config: LaunchConfig,
    /// Bytes of the global scratch for the logits (0 for the shared-memory kernel).
    pub scratch_bytes: usize,
}

/// Threads per block of the attention kernel for head width `d` and `kk` keys: a warp per key
/// for the logits and a thread per channel for the weighted sum, so enough warps for the
/// larger of the two, at least one and at most [`MAX_WARPS`].
pub(crate) fn attention_threads(d: usize, kk: usize) -> u32 {
    (d.div_ceil(32).max(kk).clamp(1, MAX_WARPS) * 32) as u32
}

/// The plan for `pairs` (query, head) pairs (at least 1) of head width `d` over `kk` keys: the
/// logits in shared memory when they fit, else in a global scratch of `kk` floats per block.
pub(crate) fn attention_plan(pairs: usize, d: usize, kk: usize) -> AttentionPlan {
    let threads = attention_threads(d, kk);
    let shared = kk * 4;
    if shared <= SHARED_BYTES {
        let config = LaunchConfig {
            grid: (pairs.clamp(1, MAX_BLOCKS) as u32, 1, 1),
            block: (threads, 1, 1),
            shared_bytes: shared as u32,
        };
        AttentionPlan { kernel: "dsv4_sparse_attention_shared", config, scratch_bytes: 0 }
    } else {
        let blocks = pairs.clamp(1, GLOBAL_BLOCKS);
        let config = LaunchConfig::linear(blocks as u32, threads);
        AttentionPlan { kernel: "dsv4_sparse_attention_global", config, scratch_bytes: blocks * kk * 4 }
    }
}

/// Dynamic shared memory of `dsv4_indexer_scores`: the query row, heads padded to
/// [`INDEXER_GROUP`], and the head weights.
pub(crate) fn indexer_shared_bytes(nh: usize, dh: usize) -> usize {
    (nh.div_ceil(INDEXER_GROUP) * INDEXER_GROUP * dh + nh) * 4
}

/// Query rows per indexer pass over `n` keys, of `t` (at least 1): the pass's `[rows, n]`
/// scores stay within [`INDEXER_PASS_SCORES`].
pub(crate) fn indexer_rows_per_pass(t: usize, n: usize) -> usize {
    (INDEXER_PASS_SCORES / n.max(1)).clamp(1, t.max(1))
}

/// The launch of `dsv4_indexer_scores` over `rows` query rows and `n` keys with `nh` heads of
/// `dh`: one thread per key in tiles of up to 128, grid (key tiles, rows). None when the query
/// row does not fit in shared memory (the composition runs then).
pub(crate) fn indexer_launch(rows: usize, n: usize, nh: usize, dh: usize) -> Option<LaunchConfig> {
    let shared = indexer_shared_bytes(nh, dh);
    if shared > SHARED_BYTES {
        return None;
    }
    let threads = n.div_ceil(32).clamp(1, MAX_WARPS) * 32;
    let tiles = n.div_ceil(threads).clamp(1, MAX_BLOCKS);
    Some(LaunchConfig {
        grid: (tiles as u32, rows.clamp(1, MAX_BLOCKS) as u32, 1),
        block: (threads as u32, 1, 1),
        shared_bytes: shared as u32,
    })
}

impl<D: Device> CudaBackend<D> {
    /// [`dsv4_core::backend::Backend::sparse_attention`]: `dsv4_sparse_attention_*`.
    pub(crate) fn sparse_attention_op(
        &self,
        q: &CudaTensor<D>,
        kv: &CudaPool<D>,
        idx: &CudaIndex<D>,
        sinks: &CudaTensor<D>,
        scale: f32,
    ) -> Result<CudaTensor<D>> {
        let shape =
            checks::sparse_attention(Self::NAME, &q.shape, kv.rows, kv.width, &idx.shape, &sinks.shape, idx.bounds())?;
        let out = self.new_tensor(&shape)?;
        let (t, h, d, kk) = (shape[0], shape[1], shape[2], idx.shape[1]);
        if t * h * d == 0 {
            return Ok(out);
        }
        let (format, rope, row_bytes) = format_args(kv.format, kv.width);
        let plan = attention_plan(t * h, d, kk);
        let scratch = if plan.scratch_bytes > 0 { Some(self.dev.alloc_zeroed(plan.scratch_bytes)?) } else { None };
        let mut args: Vec<KernelArg<'_, D::Buffer>> = vec![KernelArg::Out(&out.buf, 0)];
        if let Some(scratch) = &scratch {
            args.push(KernelArg::Out(scratch, 0));
        }
        args.extend([
            KernelArg::In(&*q.buf, q.offset),
            KernelArg::In(&kv.buf, 0),
            KernelArg::In(&*idx.buf, idx.offset),
            KernelArg::In(&*sinks.buf, sinks.offset),
            KernelArg::count(t),
            KernelArg::count(h),
            KernelArg::count(d),
            KernelArg::count(kk),
            KernelArg::I32(format),
            KernelArg::count(rope),
            KernelArg::count(row_bytes),
            KernelArg::count(kv.rows),
            KernelArg::F32(scale),
        ]);
        self.dev.launch(plan.kernel, plan.config, &args)?;
        Ok(out)
    }

    /// [`dsv4_core::backend::Backend::indexer_select`] with f32 scores: per pass of query rows,
    /// `dsv4_indexer_scores`, `topk` and `dsv4_indexer_picks`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn indexer_select_op(
        &self,
        q: &CudaTensor<D>,
        keys: &CudaPool<D>,
        key_rows: &CudaIndex<D>,
        weights: &CudaTensor<D>,
        valid: &[Range<usize>],
        k: usize,
        offset: i32,
    ) -> Result<CudaIndex<D>> {
        let shape = checks::indexer_select(
            Self::NAME,
            &q.shape,
            keys.rows,
            keys.width,
            &key_rows.shape,
            key_rows.bounds(),
            &weights.shape,
            valid,
            k,
        )?;
        let (t, nh, dh, n) = (q.shape[0], q.shape[1], q.shape[2], key_rows.shape[0]);
        let out = self.new_index(&shape)?;
        if t * k == 0 {
            return Ok(out);
        }
        if i32::try_from(n).is_err() {
            return Err(Error::backend(Self::NAME, format!("indexer_select: {n} keys do not fit i32 key numbers")));
        }
        if indexer_launch(1, n, nh, dh).is_none() {
            // A query row too large for shared memory (far beyond V4's 64 heads of 128).
            return composed::indexer_select(self, q, keys, key_rows, weights, valid, k, offset, IndexScores::F32);
        }
        let ranges: Vec<i32> = valid.iter().flat_map(|r| [r.start as i32, r.end as i32]).collect();
        let ranges = self.upload_i32(&ranges, &[t, 2])?;
        let (format, rope, row_bytes) = format_args(keys.format, keys.width);
        let scale = (dh as f32).powf(-0.5);
        let per_pass = indexer_rows_per_pass(t, n);
        for r0 in (0..t).step_by(per_pass) {
            let rows = per_pass.min(t - r0);
            let config = indexer_launch(rows, n, nh, dh).expect("fits, as checked above");
            let scores = self.new_tensor(&[rows, n])?;
            self.dev.launch(
                "dsv4_indexer_scores",
                config,
                &[
                    KernelArg::Out(&scores.buf, 0),
                    KernelArg::In(&*q.buf, q.offset + r0 * nh * dh * 4),
                    KernelArg::In(&*weights.buf, weights.offset + r0 * nh * 4),
                    KernelArg::In(&keys.buf, 0),
                    KernelArg::In(&*key_rows.buf, key_rows.offset),
                    KernelArg::In(&*ranges.buf, r0 * 2 * 4),
                    KernelArg::count(rows),
                    KernelArg::count(n),
                    KernelArg::count(nh),
                    KernelArg::count(dh),
                    KernelArg::I32(format),
                    KernelArg::count(rope),
                    KernelArg::count(row_bytes),
                    KernelArg::count(keys.rows),
                    KernelArg::F32(scale),
                ],
            )?;
            let (vals, ids) = self.topk_op(&scores, k)?;
            self.dev.launch(
                "dsv4_indexer_picks",
                elementwise_launch(rows * k),
                &[
                    KernelArg::Out(&out.buf, r0 * k * 4),
                    KernelArg::In(&*vals.buf, vals.offset),
                    KernelArg::In(&*ids.buf, ids.offset),
                    KernelArg::In(&*key_rows.buf, key_rows.offset),
                    KernelArg::count(rows * k),
                    KernelArg::count(n),
                    KernelArg::I32(offset),
                ],
            )?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_map_to_the_kernel_codes_and_row_sizes() {
        assert_eq!(format_args(RowFormat::F32, 6), (0, 0, 24));
        assert_eq!(format_args(RowFormat::Bf16, 6), (1, 0, 12));
        // V4's attention row: 448 e4m3 codes, 64 BF16 rope values, 7 scale bytes, padded to 8.
        assert_eq!(format_args(RowFormat::Fp8 { rope: 64 }, 512), (2, 64, 448 + 128 + 7 + 1));
        // A rope wider than the row is the whole row.
        assert_eq!(format_args(RowFormat::Fp8 { rope: 9 }, 4), (2, 4, 8));
    }

    #[test]
    fn attention_threads_follow_the_work() {
        // Tiny heads and few keys: one warp; V4's 512-wide heads: four.
        assert_eq!(attention_threads(6, 1), 32);
        assert_eq!(attention_threads(6, 0), 32);
        assert_eq!(attention_threads(6, 5), 128);
        assert_eq!(attention_threads(40, 1), 64);
        assert_eq!(attention_threads(512, 640), 128);
    }

    #[test]
    fn attention_logits_go_to_shared_memory_when_they_fit() {
        let p = attention_plan(15, 6, 5);
        assert_eq!((p.kernel, p.scratch_bytes), ("dsv4_sparse_attention_shared", 0));
        assert_eq!(p.config, LaunchConfig { grid: (15, 1, 1), block: (128, 1, 1), shared_bytes: 20 });
        // V4 decode: 64 heads over 512 + 128 keys.
        let p = attention_plan(64, 512, 640);
        assert_eq!((p.config.grid, p.config.shared_bytes), ((64, 1, 1), 2560));
        // The most that fit; no keys at all.
        // (12 032 floats: 47 KiB, leaving 1 KiB of the 48 for the kernels' static arrays).
        assert_eq!(attention_plan(1, 512, 12_032).kernel, "dsv4_sparse_attention_shared");
        assert_eq!(attention_plan(1, 512, 12_033).kernel, "dsv4_sparse_attention_global");
        assert_eq!(attention_plan(3, 8, 0).config.shared_bytes, 0);
        // Many pairs walk the grid.
        assert_eq!(attention_plan(1 << 20, 512, 640).config.grid, (65_535, 1, 1));
    }

    #[test]
    fn long_key_sets_keep_their_logits_in_global_scratch() {
        let p = attention_plan(4, 512, 12_289);
        assert_eq!(p.kernel, "dsv4_sparse_attention_global");
        assert_eq!(p.config, LaunchConfig::linear(4, 128));
        assert_eq!(p.scratch_bytes, 4 * 12_289 * 4);
        let p = attention_plan(1 << 20, 512, 20_000);
        assert_eq!((p.config.grid, p.scratch_bytes), ((1024, 1, 1), 1024 * 20_000 * 4));
    }

    #[test]
    fn indexer_query_rows_sit_in_shared_memory() {
        // V4: 64 heads of 128, and the weights.
        assert_eq!(indexer_shared_bytes(64, 128), (64 * 128 + 64) * 4);
        // Heads padded to 32.
        assert_eq!(indexer_shared_bytes(2, 4), (32 * 4 + 2) * 4);
        let c = indexer_launch(6, 6, 2, 4).unwrap();
        assert_eq!(c, LaunchConfig { grid: (1, 6, 1), block: (32, 1, 1), shared_bytes: 520 });
        let c = indexer_launch(1, 16_384, 64, 128).unwrap();
        assert_eq!((c.grid, c.block), ((128, 1, 1), (128, 1, 1)));
        let c = indexer_launch(100_000, 1 << 30, 64, 128).unwrap();
        assert_eq!(c.grid, (65_535, 65_535, 1));
        // Too large for shared memory: the composition.
        assert_eq!(indexer_launch(1, 8, 64, 192), None);
        assert!(indexer_launch(1, 8, 64, 128).is_some());
        assert_eq!(indexer_launch(1, 8, 65, 128), None);
    }

    #[test]
    fn indexer_passes_bound_their_scores() {
        assert_eq!(indexer_rows_per_pass(7, 100), 7);
        assert_eq!(indexer_rows_per_pass(0, 0), 1);
        assert_eq!(indexer_rows_per_pass(8192, 1 << 18), 64);
        assert_eq!(indexer_rows_per_pass(8192, 1 << 30), 1);
    }
}
