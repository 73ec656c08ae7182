//! Index operations: `index_select`, `gather_last`, `index_add`, `topk`, `index_mask`,
//! `concat_index` and `offset_index` (kernels in `kernels/index.cu`).
//!
//! Shapes and, when an index's values are known on the host ([`CudaIndex::bounds`]), their
//! ranges are checked by `dsv4_core::backend_checks` first. Indices computed on the device (top-k
//! picks, routing) have no host values: the kernels bounds-check every index they read and treat
//! one outside its operand as "no entry" (zeros, or skipped), so a bad device index can give a
//! wrong value but never an out-of-bounds access.

use std::sync::Arc;

use dsv4_core::backend_checks as checks;
use dsv4_core::error::{Error, Result};

use crate::backend::CudaBackend;
use crate::device::{Device, KernelArg, LaunchConfig};
use crate::memory::elementwise_launch;
use crate::tensor::{CudaIndex, CudaTensor};

/// Threads per block of `dsv4_index_add` (its `DSV4_INDEX_ADD_THREADS`).
const INDEX_ADD_THREADS: u32 = 256;
/// Threads per block of the top-k kernels (`DSV4_TOPK_THREADS`).
const TOPK_THREADS: u32 = 256;
/// Most keys (8 bytes each) a top-k block sorts in shared memory: 32 KiB, within the 48 KiB a
/// launch gets without opting in.
const TOPK_SHARED_KEYS: usize = 4096;
/// Most blocks of a top-k launch whose keys live in a global scratch buffer (each block owns
/// `p` keys of it and walks the rows grid-stride), which bounds the scratch's size.
const TOPK_GLOBAL_BLOCKS: usize = 256;
/// Most blocks of the one-block-per-row kernels, which walk the rows grid-stride.
const MAX_ROW_BLOCKS: usize = 65_535;

/// How one `topk` call runs (see `kernels/index.cu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopkPlan {
    /// `dsv4_topk_shared` or `dsv4_topk_global`.
    pub kernel: &'static str,
    /// Radix-select the k picks first (long rows), rather than sorting the whole row.
    pub select: bool,
    /// Keys each block sorts: a power of two, at least n (whole-row sort) or k (select).
    pub p: usize,
    pub config: LaunchConfig,
    /// Bytes of the global scratch buffer (0 for the shared-memory kernel).
    pub scratch_bytes: usize,
}

/// The plan for `rows` rows of `n` entries, `k` picks each (`1 <= k <= n`, `rows >= 1`): rows
/// whose keys fit in shared memory are sorted whole; longer rows are radix-selected down to
/// their k picks, which are sorted in shared memory when they fit and in a global scratch
/// buffer otherwise.
pub(crate) fn topk_plan(rows: usize, n: usize, k: usize) -> TopkPlan {
    let (select, p) = if n.next_power_of_two() <= TOPK_SHARED_KEYS {
        (false, n.next_power_of_two())
    } else {
        (true, k.next_power_of_two())
    };
    let grid = |max: usize| u32::try_from(rows.clamp(1, max)).unwrap_or(u32::MAX);
    if p <= TOPK_SHARED_KEYS {
        let config = LaunchConfig {
            grid: (grid(MAX_ROW_BLOCKS), 1, 1),
            block: (TOPK_THREADS, 1, 1),
            shared_bytes: (p * 8) as u32,
        };
        TopkPlan { kernel: "dsv4_topk_shared", select, p, config, scratch_bytes: 0 }
    } else {
        let blocks = grid(TOPK_GLOBAL_BLOCKS);
        let config = LaunchConfig::linear(blocks, TOPK_THREADS);
        TopkPlan { kernel: "dsv4_topk_global", select, p, config, scratch_bytes: blocks as usize * p * 8 }
    }
}

/// The blocks of a one-block-per-row launch over `rows` rows.
fn row_blocks(rows: usize) -> u32 {
    u32::try_from(rows.clamp(1, MAX_ROW_BLOCKS)).unwrap_or(u32::MAX)
}

/// One part of a concatenation along `axis`: `(outer, chunk, out_chunk, at)`, the part being
/// `[outer, chunk]` and going into the result `[outer, out_chunk]` from column `at`.
pub(crate) fn concat_parts(out: &[usize], parts: &[&[usize]], axis: usize) -> Vec<(usize, usize, usize, usize)> {
    let outer: usize = out[..axis].iter().product();
    let out_chunk: usize = out[axis..].iter().product();
    let mut at = 0;
    parts
        .iter()
        .map(|p| {
            let chunk: usize = p[axis..].iter().product();
            let part = (outer, chunk, out_chunk, at);
            at += chunk;
            part
        })
        .collect()
}

impl<D: Device> CudaBackend<D> {
    pub(crate) fn index_select_op(&self, x: &CudaTensor<D>, idx: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        let shape = checks::index_select(Self::NAME, &x.shape, &idx.shape, idx.bounds())?;
        let out = self.new_tensor(&shape)?;
        let n: usize = idx.shape.iter().product();
        let row: usize = x.shape[1..].iter().product();
        if n * row > 0 {
            self.dev.launch(
                "dsv4_index_select",
                elementwise_launch(n * row),
                &[
                    KernelArg::Out(&out.buf, 0),
                    KernelArg::In(&x.buf, x.offset),
                    KernelArg::In(&idx.buf, idx.offset),
                    KernelArg::count(n),
                    KernelArg::count(row),
                    KernelArg::count(x.shape[0]),
                ],
            )?;
        }
        Ok(out)
    }

    pub(crate) fn gather_last_op(&self, x: &CudaTensor<D>, idx: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        let shape = checks::gather_last(Self::NAME, &x.shape, &idx.shape, idx.bounds())?;
        let out = self.new_tensor(&shape)?;
        let total: usize = shape.iter().product();
        if total > 0 {
            self.dev.launch(
                "dsv4_gather_last",
                elementwise_launch(total),
                &[
                    KernelArg::Out(&out.buf, 0),
                    KernelArg::In(&x.buf, x.offset),
                    KernelArg::In(&idx.buf, idx.offset),
                    KernelArg::count(total),
                    KernelArg::count(shape[shape.len() - 1]),
                    KernelArg::count(x.shape[x.shape.len() - 1]),
                ],
            )?;
        }
        Ok(out)
    }

    /// Deterministic: one block per destination row lists, in order, the entries aimed at it
    /// and adds them (no atomics; see `dsv4_index_add`).
    pub(crate) fn index_add_op(
        &self,
        dst: &CudaTensor<D>,
        idx: &CudaIndex<D>,
        src: &CudaTensor<D>,
    ) -> Result<CudaTensor<D>> {
        let shape = checks::index_add(Self::NAME, &dst.shape, &idx.shape, &src.shape, idx.bounds())?;
        let out = self.new_tensor(&shape)?;
        let rows = shape[0];
        let row: usize = shape[1..].iter().product();
        let n: usize = idx.shape.iter().product();
        if rows * row > 0 {
            self.dev.launch(
                "dsv4_index_add",
                LaunchConfig::linear(row_blocks(rows), INDEX_ADD_THREADS),
                &[
                    KernelArg::Out(&out.buf, 0),
                    KernelArg::In(&dst.buf, dst.offset),
                    KernelArg::In(&idx.buf, idx.offset),
                    KernelArg::In(&src.buf, src.offset),
                    KernelArg::count(rows),
                    KernelArg::count(row),
                    KernelArg::count(n),
                ],
            )?;
        }
        Ok(out)
    }

    /// Descending in `f32::total_cmp`'s order (as the CPU backend), ties to the lower index: the
    /// full sort's first k (see [`topk_plan`] and `kernels/index.cu`).
    pub(crate) fn topk_op(&self, x: &CudaTensor<D>, k: usize) -> Result<(CudaTensor<D>, CudaIndex<D>)> {
        let shape = checks::topk(Self::NAME, &x.shape, k)?;
        let n = x.shape[x.shape.len() - 1];
        if i32::try_from(n).is_err() {
            return Err(Error::backend(Self::NAME, format!("topk: rows of {n} entries do not fit i32 indices")));
        }
        let (vals, ids) = (self.new_tensor(&shape)?, self.new_index(&shape)?);
        let rows: usize = x.shape[..x.shape.len() - 1].iter().product();
        if rows * k == 0 {
            return Ok((vals, ids));
        }
        let plan = topk_plan(rows, n, k);
        let scratch = if plan.scratch_bytes > 0 { Some(self.dev.alloc_zeroed(plan.scratch_bytes)?) } else { None };
        let mut args: Vec<KernelArg<'_, D::Buffer>> = vec![KernelArg::Out(&vals.buf, 0), KernelArg::Out(&ids.buf, 0)];
        if let Some(scratch) = &scratch {
            args.push(KernelArg::Out(scratch, 0));
        }
        args.extend([
            KernelArg::In(&*x.buf, x.offset),
            KernelArg::count(rows),
            KernelArg::count(n),
            KernelArg::count(k),
            KernelArg::count(plan.p),
            KernelArg::I32(i32::from(plan.select)),
        ]);
        self.dev.launch(plan.kernel, plan.config, &args)?;
        Ok((vals, ids))
    }

    pub(crate) fn index_mask_op(&self, idx: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        let shape = checks::index_mask(Self::NAME, &idx.shape)?;
        let out = self.new_tensor(&shape)?;
        let n: usize = shape.iter().product();
        if n > 0 {
            self.dev.launch(
                "dsv4_index_mask",
                elementwise_launch(n),
                &[KernelArg::Out(&out.buf, 0), KernelArg::In(&idx.buf, idx.offset), KernelArg::count(n)],
            )?;
        }
        Ok(out)
    }

    /// One copy kernel per non-empty part; the values are kept on the host too when every
    /// part's are known.
    pub(crate) fn concat_index_op(&self, xs: &[&CudaIndex<D>], axis: usize) -> Result<CudaIndex<D>> {
        let shapes: Vec<&[usize]> = xs.iter().map(|x| &x.shape[..]).collect();
        let shape = checks::concat_index(Self::NAME, &shapes, axis)?;
        let mut out = self.new_index(&shape)?;
        let parts = concat_parts(&shape, &shapes, axis);
        if let Some(hosts) = xs.iter().map(|x| x.host.clone()).collect::<Option<Vec<_>>>() {
            let mut values = vec![0i32; shape.iter().product()];
            for (&(outer, chunk, out_chunk, at), h) in parts.iter().zip(&hosts) {
                for o in 0..outer {
                    values[o * out_chunk + at..o * out_chunk + at + chunk]
                        .copy_from_slice(&h[o * chunk..(o + 1) * chunk]);
                }
            }
            out.host = Some(Arc::from(values));
        }
        for (x, &(outer, chunk, out_chunk, at)) in xs.iter().zip(&parts) {
            if outer * chunk == 0 {
                continue;
            }
            self.dev.launch(
                "dsv4_concat_index_part",
                elementwise_launch(outer * chunk),
                &[
                    KernelArg::Out(&out.buf, 0),
                    KernelArg::In(&x.buf, x.offset),
                    KernelArg::count(outer),
                    KernelArg::count(chunk),
                    KernelArg::count(out_chunk),
                    KernelArg::count(at),
                ],
            )?;
        }
        Ok(out)
    }

    /// Keeps the host values when the input's are known (checked against overflow there); on
    /// the device the addition wraps rather than faulting.
    pub(crate) fn offset_index_op(&self, idx: &CudaIndex<D>, offset: i32) -> Result<CudaIndex<D>> {
        let shape = checks::offset_index(Self::NAME, &idx.shape, offset, idx.bounds())?;
        let mut out = self.new_index(&shape)?;
        out.host =
            idx.host.as_ref().map(|h| h.iter().map(|&v| if v == -1 { -1 } else { v.wrapping_add(offset) }).collect());
        let n: usize = shape.iter().product();
        if n > 0 {
            self.dev.launch(
                "dsv4_offset_index",
                elementwise_launch(n),
                &[
                    KernelArg::Out(&out.buf, 0),
                    KernelArg::In(&idx.buf, idx.offset),
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
    fn short_rows_are_sorted_whole_in_shared_memory() {
        let p = topk_plan(64, 37, 5);
        assert_eq!((p.kernel, p.select, p.p, p.scratch_bytes), ("dsv4_topk_shared", false, 64, 0));
        assert_eq!(p.config.grid, (64, 1, 1));
        assert_eq!(p.config.block, (TOPK_THREADS, 1, 1));
        assert_eq!(p.config.shared_bytes, 64 * 8);
        let p = topk_plan(1, 4096, 4096);
        assert_eq!((p.select, p.p, p.config.shared_bytes), (false, 4096, 32768));
        let p = topk_plan(1, 1, 1);
        assert_eq!((p.select, p.p), (false, 1));
    }

    #[test]
    fn long_rows_are_selected_then_sorted() {
        let p = topk_plan(3, 100_000, 2048);
        assert_eq!((p.kernel, p.select, p.p, p.config.shared_bytes), ("dsv4_topk_shared", true, 2048, 16384));
        let p = topk_plan(3, 4097, 4096);
        assert_eq!((p.kernel, p.select, p.p), ("dsv4_topk_shared", true, 4096));
        // k beyond shared memory: global scratch, p keys per block, at most 256 blocks.
        let p = topk_plan(1000, 100_000, 5000);
        assert_eq!((p.kernel, p.select, p.p), ("dsv4_topk_global", true, 8192));
        assert_eq!(p.config.grid, (256, 1, 1));
        assert_eq!((p.config.shared_bytes, p.scratch_bytes), (0, 256 * 8192 * 8));
        let p = topk_plan(2, 100_000, 5000);
        assert_eq!((p.config.grid, p.scratch_bytes), ((2, 1, 1), 2 * 8192 * 8));
    }

    #[test]
    fn many_rows_walk_the_grid() {
        assert_eq!(topk_plan(1 << 20, 8, 2).config.grid, (65_535, 1, 1));
        assert_eq!(row_blocks(0), 1);
        assert_eq!(row_blocks(7), 7);
        assert_eq!(row_blocks(1 << 20), 65_535);
    }

    #[test]
    fn concat_parts_place_each_part_in_every_outer_row() {
        // [2, 3] ++ [2, 1] along axis 1 → [2, 4].
        assert_eq!(concat_parts(&[2, 4], &[&[2, 3], &[2, 1]], 1), vec![(2, 3, 4, 0), (2, 1, 4, 3)]);
        // Along axis 0: one outer row, the parts one after the other.
        assert_eq!(concat_parts(&[4, 3], &[&[2, 3], &[2, 3]], 0), vec![(1, 6, 12, 0), (1, 6, 12, 6)]);
        // A middle axis.
        assert_eq!(
            concat_parts(&[2, 5, 3], &[&[2, 2, 3], &[2, 0, 3], &[2, 3, 3]], 1),
            vec![(2, 6, 15, 0), (2, 0, 15, 6), (2, 9, 15, 6)]
        );
    }
}
