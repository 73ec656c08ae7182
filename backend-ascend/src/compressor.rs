//! `compressor_step` on Huawei's `aclnnCompressor` (ops-transformer
//! `attention/compressor/docs/aclnnCompressor.md`; semantics pinned down by the operator's golden
//! `attention/compressor/tests/pytest/compressor_golden.py`): one compressor's projections
//! `wkv·x` and `wgate·x`, the position bias, the state update and the softmax pooling of every
//! window the step completes, in one launch, instead of two Matmuls, IndexSelect, Add, the carry
//! gathers, SoftMax, Mul and ReduceSum.
//!
//! * Used in `bf16` and `official` (the kernel takes BF16 tokens and weights and returns BF16
//!   entries; the compressor's weights are BF16 in V4 checkpoints, and its input is not
//!   quantised under `official`), on Atlas A3 and the 950, with a hidden size in
//!   1024..=10240 that is a multiple of 512 and one of the kernel's three shapes: C4A (CSA
//!   attention, D = 512, overlapping windows of 4), C4Li (the indexer's, D = 128) and C128A
//!   (HCA, D = 512, windows of 128). Anything else composes, as on Atlas A2, where
//!   `aclnnCompressor.md` lists the kernel as unsupported.
//! * **State.** The kernel keeps one F32 row `[kv | score + ape]` (2·c·D values) per position,
//!   addressed through a block table by position. dsv4's carry (`dsv4_core::kv`) keeps, per
//!   window block, the rows of the incomplete window (and with overlap the window before it) as
//!   projection rows then score rows. So each call builds a scratch state for just this step:
//!   block size = the ratio, the positions counted from the carry's first row (`carry_base`, a
//!   window start, so `p mod ratio` and the window boundaries are unchanged), the carried rows
//!   copied in front, the step's rows written by the kernel behind them. Afterwards the rows the
//!   carry keeps are gathered from the scratch state and written to the carry pool exactly as
//!   the composition writes them. Block 0 is never named in the table (the kernel reads entry 0
//!   as "do not write").
//! * The kernel's output `[min(S, S/ratio + 1), D]` holds the completed windows first, in order.
//!
//! Checked against the composition on a tiny input when the device opens
//! ([`AscendBackend::self_test_compressor`]); a failing launch switches the kernel off and
//! composes (nothing is written to the carry before the launch succeeded; a failure after the
//! carry write is an error).

use std::ptr::null_mut;

use dsv4_ascend_sys::aclDataType as Dt;
use dsv4_core::backend::{composed, CompressorStepOf, DevicePool, DeviceTensor, Precision};
use dsv4_core::error::Result;
use dsv4_core::kv::layout::CompressorShape;
use dsv4_core::kv::SeqCompressPlan;
use dsv4_core::Backend;

use crate::{moe, AscendBackend, AscendPool, AscendTensor, AscendWeight, Mem};

/// The hidden sizes the kernel takes: 1K to 10K, a multiple of 512.
fn hidden_supported(h: usize) -> bool {
    (1024..=10240).contains(&h) && h.is_multiple_of(512)
}

/// The kernel's three shapes (entry width D, overlap, ratio): C4A, C4Li, C128A.
fn shape_supported(dim: usize, overlap: bool, ratio: usize) -> bool {
    matches!((dim, overlap, ratio), (512, true, 4) | (128, true, 4) | (512, false, 128))
}

impl AscendBackend {
    /// The fused step, or None when the kernel does not apply (then the composition runs).
    /// `Some(None)`: the kernel ran and the step completes no window.
    pub(crate) fn compressor_step_fused(
        &self,
        step: &CompressorStepOf<'_, Self>,
        carry: &mut AscendPool,
        act: Precision,
    ) -> Result<Option<Option<AscendTensor>>> {
        let state = &self.kernels.compressor;
        // The kernel returns BF16 entries: only where the caller rounds them to BF16 next.
        if !state.usable() || !act.rounds_to_bf16() {
            return Ok(None);
        }
        let x = step.x;
        let (s, h) = match x.shape.as_slice() {
            [s, h] => (*s, *h),
            _ => return Ok(None),
        };
        let width = if step.overlap { 2 * step.dim } else { step.dim };
        let bf16_weight = |w: &AscendWeight| moe::holds_bf16(w) && w.shape == [width, h];
        if s == 0
            || !x.bf16
            || !hidden_supported(h)
            || !shape_supported(step.dim, step.overlap, step.ratio)
            || !bf16_weight(step.wkv)
            || !bf16_weight(step.wgate)
            || step.ape.shape != [step.ratio, width]
            || carry.width() != width
            || carry.format() != dsv4_core::backend::RowFormat::F32
            || step.carry_base > step.start
            || !step.carry_base.is_multiple_of(step.ratio)
        {
            return Ok(None);
        }
        // The caller's contract (a wrong carry plan is a graph bug, not a kernel failure).
        let c = step.start - step.carry_base;
        let read = step.carry_read.map_or(0, |idx| idx.numel());
        if read != 2 * c {
            return Err(crate::acl::err(format!(
                "compressor_step: {read} carry rows to read for {c} carried positions (expected {})",
                2 * c
            )));
        }
        let Some((scratch, entries)) = self.fused(state, || self.compressor(step, carry, s, h, width))? else {
            return Ok(None);
        };
        // The carry is written last and outside `fused`: once the pool is written, a failure is
        // an error, never a fall-back to the composition (which would read the rows just
        // overwritten). The same source rows as the composition's, now scratch rows.
        if let Some((src, dst)) = step.carry_write {
            let rows = self.index_select(&scratch, &self.offset_index(src, step.ratio as i32)?)?; // [k, 2·width]
            let kv = self.narrow(&rows, 1, 0, width)?;
            let score = self.narrow(&rows, 1, width, width)?;
            self.pool_write(carry, dst, &self.concat(&[&kv, &score], 0)?)?;
        }
        Ok(Some(entries))
    }

    /// The launch: the scratch state after it (`[(1 + blocks)·ratio, 2·width]`, row
    /// `ratio + p` = position `carry_base + p`) and the entries. Reads the carry, writes nothing
    /// but temporaries.
    fn compressor(
        &self,
        step: &CompressorStepOf<'_, Self>,
        carry: &AscendPool,
        s: usize,
        h: usize,
        width: usize,
    ) -> Result<(AscendTensor, Option<AscendTensor>)> {
        let m = step.ratio;
        let coff = if step.overlap { 2 } else { 1 };
        // One state row: kv, then score + ape.
        let row = 2 * width;
        // Positions from carry_base: the carried rows 0..c, the step's c..c + s.
        let c = step.start - step.carry_base;
        let blocks = (c + s).div_ceil(m);
        // The scratch state [1 + blocks, m, row]: block 0 unused, block 1 + w = window w. Not
        // cleared: the kernel reads only the carried rows (copied in below) and writes the
        // step's before anything reads them; nothing reads the rest.
        let scratch = self.new_tensor(&[(1 + blocks) * m, row])?;
        if let Some(idx) = step.carry_read {
            let carried = self.pool_read(carry, idx)?; // [2c, width]: projections, then scores
            let sm = self.tmem(&scratch);
            for (half, col) in [(0, 0), (c, width)] {
                let dst = self.view(sm, &[c, width], &[row, 1], m * row + col)?;
                let src = self.view(self.tmem(&carried), &[c, width], &[width, 1], half * width)?;
                self.copy(&dst, &src)?;
            }
        }

        let xb = self.cast_to(step.x, Dt::ACL_BF16)?;
        let wkv = self.bf16_weight(step.wkv)?;
        let wgate = self.bf16_weight(step.wgate)?;
        let table: Vec<i32> = (1..=blocks as i32).collect();
        let table = self.upload_index(&table, &[1, blocks])?;
        let cu = self.upload_index(&[0, s as i32], &[2])?;
        let start = self.upload_index(&[c as i32], &[1])?;
        let out_rows = s.min(s / m + 1);
        let out = self.alloc(out_rows * step.dim, Dt::ACL_BF16)?;
        // The backward pass's intermediates: required arguments, written only with gradEnabled
        // (the operator's torch wrapper passes them always, FLOAT [rows, coff·ratio, D]).
        let mid = [out_rows, coff as usize * m, step.dim];
        let (probs, weighted) =
            (self.alloc(mid.iter().product(), Dt::ACL_FLOAT)?, self.alloc(mid.iter().product(), Dt::ACL_FLOAT)?);
        {
            let xv = self.cview(Mem::bf16(&xb), &[s, h])?;
            let kv = self.cview(Mem::bf16(wkv.as_ref().unwrap_or(&step.wkv.buf)), &[width, h])?;
            let gv = self.cview(Mem::bf16(wgate.as_ref().unwrap_or(&step.wgate.buf)), &[width, h])?;
            let sv = self.cview(self.tmem(&scratch), &[1 + blocks, m, row])?;
            let av = self.tv(step.ape)?;
            let (tv, cv, pv) = (self.iv(&table)?, self.iv(&cu)?, self.iv(&start)?);
            let ov = self.cview(Mem::bf16(&out), &[out_rows, step.dim])?;
            let (mv, wv) = (
                self.cview(Mem { buf: &probs, offset: 0, dtype: Dt::ACL_FLOAT }, &mid)?,
                self.cview(Mem { buf: &weighted, offset: 0, dtype: Dt::ACL_FLOAT }, &mid)?,
            );
            aclnn!(
                self,
                aclnnCompressor
                    / aclnnCompressorGetWorkspaceSize(
                        xv.ptr(),
                        kv.ptr(),
                        gv.ptr(),
                        sv.ptr(),
                        av.ptr(),
                        tv.ptr(),
                        cv.ptr(),
                        null_mut(), // sequsedOptional: every token
                        pv.ptr(),
                        m as i64,
                        coff,
                        1,                // cacheMode: block table (the ring buffer is 950-only)
                        (m * row) as i64, // stateCacheStrideDim0
                        false,            // gradEnabled
                        ov.ptr(),
                        mv.ptr(),
                        wv.ptr()
                    )
            )?;
        }

        let windows = (step.start + s) / m - step.start / m;
        if windows == 0 {
            return Ok((scratch, None));
        }
        let pooled = self.new_tensor(&[windows, step.dim])?;
        self.cast_into(self.cview(Mem::bf16(&out), &[windows, step.dim])?, self.tv(&pooled)?, Dt::ACL_FLOAT)?;
        Ok((scratch, Some(AscendTensor { bf16: true, ..pooled })))
    }

    /// Runs `aclnnCompressor` on a tiny indexer-shaped compressor (H = 1024, D = 128, windows
    /// of 4 with overlap) against the composition, over four steps: a start at 0, a step inside
    /// a window that completes none, one that starts inside a window (the carry read back) and
    /// completes three, and one that starts at a window boundary (the previous window read back
    /// whole); compares the entries (within a BF16 rounding) and the carry the steps leave
    /// (within f32 summation-order noise), and switches the kernel off with the reason when they
    /// differ, the kernel declines the step, or anything fails (the device still opens,
    /// composing).
    pub(crate) fn self_test_compressor(&self) -> Result<()> {
        self.self_test(&self.kernels.compressor, || self.compare_compressor_with_composition())
    }

    fn compare_compressor_with_composition(&self) -> Result<()> {
        use dsv4_core::tensor::{DType, HostTensor, StoredWeight};
        let state = &self.kernels.compressor;
        let (h, dim, ratio) = (1024, 128, 4);
        let shape = CompressorShape { ratio, overlap: true, dim };
        let width = shape.width();
        let bf16 = |v: f32| f32::from_bits(v.to_bits() & 0xffff_0000);
        // Deterministic values of either sign, spread enough that the softmax weights differ.
        let wave = |i: usize, k: f32| bf16(((i as f32 * k).sin() * 1.5).clamp(-2.0, 2.0));
        let weight = |name: &str, k: f32| -> Result<AscendWeight> {
            let bytes: Vec<u8> =
                (0..width * h).flat_map(|i| ((wave(i, k).to_bits() >> 16) as u16).to_le_bytes()).collect();
            self.upload_weight(&StoredWeight::float(HostTensor::from_bytes(name, DType::BF16, vec![width, h], bytes)?)?)
        };
        let (wkv, wgate) = (weight("self-test wkv", 0.37)?, weight("self-test wgate", 0.61)?);
        let ape_v: Vec<f32> = (0..ratio * width).map(|i| wave(i, 1.3)).collect();
        let ape = self.upload(&ape_v, &[ratio, width])?;
        let mut fused_carry = self.alloc_pool(2 * shape.carry_rows(), width, dsv4_core::backend::RowFormat::F32)?;
        let mut composed_carry = self.alloc_pool(2 * shape.carry_rows(), width, dsv4_core::backend::RowFormat::F32)?;
        let mut start = 0;
        for len in [6, 1, 9, 4] {
            let xv: Vec<f32> = (0..len * h).map(|i| wave(i + start * h, 0.013) / 16.0).collect();
            let x = AscendTensor { bf16: true, ..self.upload(&xv, &[len, h])? };
            let plan = SeqCompressPlan::lone(self, &shape, start, len)?;
            let step = plan.compressor_step(&shape, &x, &wkv, &wgate, &ape);
            let got = match self.compressor_step_fused(&step, &mut fused_carry, Precision::Bf16)? {
                Some(g) => g,
                // The kernel failed and `fused` switched it off with the reason.
                None if !state.usable() => return Ok(()),
                None => {
                    return Err(crate::acl::err(format!(
                        "the kernel did not take the self-test's step at {start} of {len} tokens"
                    )))
                }
            };
            let want = composed::compressor_step(self, &step, &mut composed_carry)?
                .map(|p| self.round_to_bf16(&p))
                .transpose()?;
            let at = format!("step at {start} of {len} tokens");
            match (&got, &want) {
                (Some(g), Some(w)) => {
                    if let Some(why) = self.bf16_disagreement(g, w)? {
                        state.disable(format!("self-test disagreed with the composition ({at}): entries {why}"));
                        return Ok(());
                    }
                }
                (None, None) => {}
                _ => {
                    state.disable(format!(
                        "self-test disagreed with the composition ({at}): {} entries vs {}",
                        got.as_ref().map_or(0, |g| g.shape[0]),
                        want.as_ref().map_or(0, |w| w.shape[0])
                    ));
                    return Ok(());
                }
            }
            let all = self.upload_index(&(0..fused_carry.rows() as i32).collect::<Vec<_>>(), &[fused_carry.rows()])?;
            let (g, w) = (
                self.download(&self.pool_read(&fused_carry, &all)?)?,
                self.download(&self.pool_read(&composed_carry, &all)?)?,
            );
            let scale = w.iter().fold(0f32, |a, v| a.max(v.abs()));
            if let Some(i) = g.iter().zip(&w).position(|(a, b)| (a - b).abs() > 2f32.powi(-16) * scale) {
                state.disable(format!(
                    "self-test disagreed with the composition ({at}): carry value {i} is {} vs {}",
                    g[i], w[i]
                ));
                return Ok(());
            }
            start += len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_v4_shapes_and_hidden_sizes() {
        assert!(shape_supported(512, true, 4));
        assert!(shape_supported(128, true, 4));
        assert!(shape_supported(512, false, 128));
        assert!(!shape_supported(512, true, 128));
        assert!(!shape_supported(256, true, 4));
        assert!(!shape_supported(128, false, 4));
        for (h, ok) in
            [(512, false), (1024, true), (1536, true), (4096, true), (7168, true), (1000, false), (10752, false)]
        {
            assert_eq!(hidden_supported(h), ok, "H = {h}");
        }
    }
}
