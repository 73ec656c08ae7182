//! `sparse_attention` on Huawei's V4 attention kernel `aclnnSparseFlashMla`, in the
//! "SWA sparse ori_kv" scenario (ops-transformer `attention/sparse_flash_mla/docs/
//! aclnnSparseFlashMla.md`): each query attends over an explicit list of rows of one shared
//! K = V tensor, with per-head sinks, which is exactly the trait's contract.
//!
//! * Used in `bf16` / `official` only (the kernel takes BF16/FP16 q and KV), with D = 512 (the
//!   kernel's only head size: 448 nope + 64 rope channels), a BF16 kv pool, and N1 query heads
//!   the SoC takes (1..=128; a power of two on Atlas A2/A3). Anything else composes.
//!   Opt-in (`DSV4_ASCEND_FUSED=all`, [`crate::kernels::KernelSpec::opt_in`]).
//! * The pool is passed as paged KV (layout PA_BBND): `[rows / bs, bs, 1, 512]` with an identity
//!   block table and `sequsedOriKv` = the rows the block holds, so the trait's pool rows are the
//!   kernel's logical indices. BF16 pools hold a multiple of 16 rows (128 from 128 rows on;
//!   padding, zero and never indexed: `pool::KERNEL_ROWS`), so every one can be paged (bs a
//!   multiple of 16 up to 1024). The A2/A3 kernels read sparse ori_kv rows through the block table only
//!   (`op_kernel/arch22`, `GetOriSparseKeyGmOffset`); the queries are one TND batch.
//! * The kernel wants each row's valid indices first, then padding: a descending aclnnTopk over
//!   the row (valid rows are ≥ 0, padding is -1) moves the -1s to the end, and
//!   `oriTopkLength` = Σ clamp(idx + 1, 0, 1). Attention over a set does not depend on its
//!   order; only the summation order differs from the composition.
//! * Mask and window arguments per SoC: A2/A3 take oriMaskMode 0 with non-negative windows and
//!   cmpMaskMode 3 (their error tables); the 950's host checker wants windows -1 and
//!   cmpMaskMode 0 when there is no band mask and no cmpKv.
//! * `aclnnSparseFlashMlaMetadata` (an AICPU pre-pass) computes the core split from the same
//!   lengths before every call.
//! * Numerics: the A2/A3 kernel casts the probabilities to the KV dtype (BF16) before `P·V`
//!   (`vec1ResGm` is `KV_T`), so the result differs from the composition (f32 P) by up to a
//!   few BF16 ulps of the values attended to.
//!
//! Checked against the composition on a tiny input when the device opens
//! ([`AscendBackend::self_test_attention`]); a failing call switches the kernel off.

use std::ptr::null_mut;

use dsv4_ascend_sys as sys;
use dsv4_ascend_sys::aclDataType as Dt;
use dsv4_core::backend::{composed, Backend, DevicePool, Precision, ReduceOp, RowFormat};
use dsv4_core::backend_checks as checks;
use dsv4_core::error::Result;

use crate::kernels::SocFamily;
use crate::{numel, AscendBackend, AscendIndex, AscendPool, AscendTensor, Mem};

/// The kernel's only head size.
const HEAD_DIM: usize = 512;

impl AscendBackend {
    /// Whether `aclnnSparseFlashMla` takes this call (else the composition runs).
    fn flash_mla_applies(&self, q: &AscendTensor, kv: &AscendPool, idx: &AscendIndex, act: Precision) -> bool {
        let [t, h, d] = q.shape[..] else { return false };
        let heads_ok =
            (1..=128).contains(&h) && (h.is_power_of_two() || SocFamily::of(&self.soc) == SocFamily::Ascend950);
        self.kernels.sparse_flash_mla.usable()
            && act.rounds_to_bf16()
            && d == HEAD_DIM
            && heads_ok
            && t > 0
            && idx.shape.get(1).is_some_and(|&k| k > 0)
            && kv.rows() > 0
            && kv.dtype() == Dt::ACL_BF16
            && i32::try_from(kv.stored_rows()).is_ok()
            && kv_block(kv.stored_rows()).is_some()
    }

    /// The fused attention, or None when the kernel does not apply.
    pub(crate) fn sparse_attention_fused(
        &self,
        q: &AscendTensor,
        kv: &AscendPool,
        idx: &AscendIndex,
        sinks: &AscendTensor,
        scale: f32,
        act: Precision,
    ) -> Result<Option<AscendTensor>> {
        checks::sparse_attention(self.name(), &q.shape, kv.rows(), kv.width(), &idx.shape, &sinks.shape, idx.bounds())?;
        if !self.flash_mla_applies(q, kv, idx, act) {
            return Ok(None);
        }
        self.fused(&self.kernels.sparse_flash_mla, || self.flash_mla(q, kv, idx, sinks, scale))
    }

    fn flash_mla(
        &self,
        q: &AscendTensor,
        kv: &AscendPool,
        idx: &AscendIndex,
        sinks: &AscendTensor,
        scale: f32,
    ) -> Result<AscendTensor> {
        let (t, h, k) = (q.shape[0], q.shape[1], idx.shape[1]);
        // Valid indices first: a descending sort of each row puts the -1 padding last.
        let sorted = self.alloc(t * k, Dt::ACL_INT32)?;
        let sorted_v = || self.cview(Mem { buf: &sorted, offset: 0, dtype: Dt::ACL_INT32 }, &[t, 1, k]);
        let order = self.alloc(t * k, Dt::ACL_INT64)?;
        {
            let (iv, sv) = (self.iv(idx)?, self.cview(Mem { buf: &sorted, offset: 0, dtype: Dt::ACL_INT32 }, &[t, k])?);
            let ov = self.cview(Mem { buf: &order, offset: 0, dtype: Dt::ACL_INT64 }, &[t, k])?;
            aclnn!(self, aclnnTopk / aclnnTopkGetWorkspaceSize(iv.ptr(), k as i64, 1, true, true, sv.ptr(), ov.ptr()))?;
        }
        // oriTopkLength = the number of non-negative entries, as INT32 [T, 1]:
        // Σ clamp(idx + 1, 0, 1) (exact: the sums are small integers).
        let idxf = self.new_tensor(&idx.shape)?;
        self.cast_into(self.iv(idx)?, self.tv(&idxf)?, Dt::ACL_FLOAT)?;
        let valid = self.reduce(&self.clamp(&self.affine(&idxf, 1.0, 1.0)?, 0.0, 1.0)?, 1, ReduceOp::Sum)?;
        let lens = self.alloc(t, Dt::ACL_INT32)?;
        let lens_v = || self.cview(Mem { buf: &lens, offset: 0, dtype: Dt::ACL_INT32 }, &[t, 1]);
        self.cast_into(self.cview(self.tmem(&valid), &[t, 1])?, lens_v()?, Dt::ACL_INT32)?;
        // BF16 queries (exact in bf16/official, whose activations are BF16 values already).
        let qb = self.cast_to(q, Dt::ACL_BF16)?;
        let qb_v = || self.cview(Mem { buf: &qb, offset: 0, dtype: Dt::ACL_BF16 }, &q.shape);
        // One TND batch of T queries over the whole pool, paged as `[rows / bs, bs, 1, D]`: the
        // rows the block holds, a multiple of 16 for BF16 pools (the padding is never indexed).
        let rows = kv.stored_rows();
        let bs = kv_block(rows).expect("checked by flash_mla_applies");
        let nb = rows / bs;
        let cu_q = self.upload_index(&[0, t as i32], &[2])?;
        let used_kv = self.upload_index(&[rows as i32], &[1])?;
        let table = self.upload_index(&(0..nb as i32).collect::<Vec<_>>(), &[1, nb])?;
        let meta = self.alloc(1024, Dt::ACL_INT32)?;
        let meta_v = || self.cview(Mem { buf: &meta, offset: 0, dtype: Dt::ACL_INT32 }, &[1024]);
        let (tnd, paged) = (c"TND", c"PA_BBND");
        let none = null_mut::<sys::aclTensor>;
        let args = MaskArgs::of(SocFamily::of(&self.soc));
        {
            let (cq, uk, lv, mv) = (self.iv(&cu_q)?, self.iv(&used_kv)?, lens_v()?, meta_v()?);
            aclnn!(
                self,
                aclnnSparseFlashMlaMetadata
                    / aclnnSparseFlashMlaMetadataGetWorkspaceSize(
                        cq.ptr(),
                        none(), // cuSeqlensOriKv: PA_BBND takes sequsedOriKv
                        none(),
                        none(),
                        uk.ptr(),
                        none(),
                        none(),
                        lv.ptr(),
                        none(),
                        h as i64,
                        1,               // numHeadsKv
                        HEAD_DIM as i64, // headDim
                        0,               // batchSize: from cuSeqlensQ (TND)
                        0,               // maxSeqlenQ: derived
                        0,               // maxSeqlenOriKv: derived
                        0,               // maxSeqlenCmpKv
                        k as i64,        // oriTopk
                        0,               // cmpTopk: no cmpKv
                        1,               // cmpRatio: SWA
                        0,               // oriMaskMode: none (the indices are the key set)
                        args.cmp_mask,
                        args.window,
                        args.window,
                        tnd.as_ptr(),
                        paged.as_ptr(),
                        true,  // hasOriKv
                        false, // hasCmpKv
                        mv.ptr()
                    )
            )?;
        }
        // Zeroed: the A2/A3 kernel does not write a TND row without valid indices (it can only
        // come from a caller outside the model: the window always holds the token itself).
        let out_b = self.alloc(numel(&q.shape), Dt::ACL_BF16)?;
        self.dev.zero(&out_b)?;
        let lse_buf = self.alloc(1, Dt::ACL_FLOAT)?;
        {
            let qv = qb_v()?;
            let kvv = self.cview(kv.mem(), &[nb, bs, 1, HEAD_DIM])?;
            let (sv, lv, mv, cq, uk, tv) =
                (sorted_v()?, lens_v()?, meta_v()?, self.iv(&cu_q)?, self.iv(&used_kv)?, self.iv(&table)?);
            let snk = self.tv(sinks)?;
            let ov = self.cview(Mem { buf: &out_b, offset: 0, dtype: Dt::ACL_BF16 }, &q.shape)?;
            // returnSoftmaxLse is false, but every published caller (the doc's example, the torch
            // extension) passes a placeholder FLOAT tensor rather than NULL.
            let lse = self.cview(Mem { buf: &lse_buf, offset: 0, dtype: Dt::ACL_FLOAT }, &[1])?;
            // The API takes the layouts as `char*`; it does not write through them.
            let (lq, lkv) = (tnd.as_ptr() as *mut std::ffi::c_char, paged.as_ptr() as *mut std::ffi::c_char);
            aclnn!(
                self,
                aclnnSparseFlashMla
                    / aclnnSparseFlashMlaGetWorkspaceSize(
                        qv.ptr(),
                        kvv.ptr(),
                        none(),
                        sv.ptr(),
                        none(),
                        tv.ptr(),
                        none(),
                        cq.ptr(),
                        none(),
                        none(),
                        none(),
                        uk.ptr(),
                        none(),
                        none(),
                        lv.ptr(),
                        none(),
                        snk.ptr(),
                        mv.ptr(),
                        scale as f64,
                        1, // cmpRatio
                        0, // oriMaskMode
                        args.cmp_mask,
                        args.window,
                        args.window,
                        lq,
                        lkv,
                        1,     // topkValueMode
                        false, // returnSoftmaxLse
                        ov.ptr(),
                        lse.ptr()
                    )
            )?;
        }
        let out = self.new_tensor(&q.shape)?;
        self.cast_into(
            self.cview(Mem { buf: &out_b, offset: 0, dtype: Dt::ACL_BF16 }, &q.shape)?,
            self.tv(&out)?,
            Dt::ACL_FLOAT,
        )?;
        Ok(out)
    }

    /// Runs `aclnnSparseFlashMla` on a tiny input (D = 512, two heads, padded key lists) against
    /// the composition, and switches the kernel off with the reason when they disagree by more
    /// than BF16 rounding of the probabilities and the output allows, or when the kernel fails
    /// (also when the runtime reports it at the next synchronisation); the device then opens
    /// and composes.
    pub(crate) fn self_test_attention(&self) -> Result<()> {
        self.self_test(&self.kernels.sparse_flash_mla, || self.compare_attention_with_composition())
    }

    fn compare_attention_with_composition(&self) -> Result<()> {
        let state = &self.kernels.sparse_flash_mla;
        // 1040 rows page as 5 blocks of 208, so the block table is exercised.
        let (t, h, rows, k) = (3usize, 2usize, 1040usize, 4usize);
        let bf16 = |v: f32| f32::from_bits(v.to_bits() & 0xffff_0000);
        let qv: Vec<f32> = (0..t * h * HEAD_DIM).map(|i| bf16(((i * 7 % 19) as f32 - 9.0) / 40.0)).collect();
        let kvv: Vec<f32> = (0..rows * HEAD_DIM).map(|i| bf16(((i * 5 % 23) as f32 - 11.0) / 30.0)).collect();
        let mut pool = self.alloc_pool(rows, HEAD_DIM, RowFormat::Bf16)?;
        let all = self.upload_index(&(0..rows as i32).collect::<Vec<_>>(), &[rows])?;
        self.pool_write(&mut pool, &all, &self.upload(&kvv, &[rows, HEAD_DIM])?)?;
        let q = self.upload(&qv, &[t, h, HEAD_DIM])?;
        // Padding inside and after the valid entries, rows from every block.
        let idx = self.upload_index(&[0, 700, -1, 205, -1, 1039, -1, -1, 416, -1, 833, 3], &[t, k])?;
        let sinks = self.upload(&[0.25, -1.5], &[h])?;
        let Some(got) = self.sparse_attention_fused(&q, &pool, &idx, &sinks, 0.05, Precision::Bf16)? else {
            return Ok(());
        };
        let got = self.download(&got)?;
        let want = self.download(&composed::sparse_attention(self, &q, &pool, &idx, &sinks, 0.05)?)?;
        // The kernel rounds the probabilities (relative 2^-9 each) and its output (2^-9) to
        // BF16: the output moves by at most ~2^-8 of the largest value attended to.
        let vmax = kvv.iter().fold(0f32, |m, v| m.max(v.abs()));
        if let Some((g, w)) = got.iter().zip(&want).find(|(g, w)| (*g - *w).abs() > 2f32.powi(-7) * vmax) {
            state.disable(format!("self-test disagreed with the composition: {g} vs {w}"));
        }
        Ok(())
    }
}

/// The mask and window arguments of the "SWA sparse ori_kv" call on a SoC family.
struct MaskArgs {
    /// oriWinLeft = oriWinRight (unused without a band mask).
    window: i64,
    /// cmpMaskMode (unused without cmpKv).
    cmp_mask: i64,
}

impl MaskArgs {
    fn of(family: SocFamily) -> MaskArgs {
        match family {
            // The 950's host checker (mask_checker CheckFeature): windows -1 unless oriMaskMode
            // is 4, cmpMaskMode 0 without cmpKv.
            SocFamily::Ascend950 => MaskArgs { window: -1, cmp_mask: 0 },
            // A2/A3 error tables: non-negative windows in this scenario, cmpMaskMode 3.
            _ => MaskArgs { window: 0, cmp_mask: 3 },
        }
    }
}

/// The block size the pool is paged with for the kernel: the largest multiple of 16 up to 1024
/// that divides the pool's rows (A2/A3 take multiples of 16 up to 1024); None when none does.
fn kv_block(rows: usize) -> Option<usize> {
    (1..=64).rev().map(|m| m * 16).find(|&bs| rows.is_multiple_of(bs))
}

#[cfg(test)]
mod tests {
    use super::kv_block;

    #[test]
    fn the_pool_is_paged_in_the_largest_block_that_divides_it() {
        assert_eq!(kv_block(1 << 20), Some(1024));
        assert_eq!(kv_block(384), Some(384));
        assert_eq!(kv_block(48), Some(48));
        assert_eq!(kv_block(1040), Some(208));
        assert_eq!(kv_block(40), None);
    }
}
