//! `sparse_attention` on Huawei's V4 attention kernel `aclnnSparseFlashMla`, in the
//! "SWA sparse ori_kv" scenario (ops-transformer `attention/sparse_flash_mla/docs/
//! aclnnSparseFlashMla.md`): each query attends over an explicit list of rows of one shared
//! K = V tensor, with per-head sinks, which is exactly the trait's contract.
//!
//! * Used in `bf16` / `official` only (the kernel takes BF16/FP16 q and KV), with D = 512 (the
//!   kernel's only head size: 448 nope + 64 rope channels), a BF16 kv pool, and N1 query heads
//!   the SoC takes (1..=128; a power of two on Atlas A2/A3). Anything else composes.
//! * The pool is passed whole as one TND "sequence" (`cuSeqlensOriKv = [0, rows]`), so the
//!   trait's pool rows are the kernel's logical indices; the queries are one TND batch.
//! * The kernel wants each row's valid indices first, then padding: a descending aclnnTopk over
//!   the row (valid rows are ≥ 0, padding is -1) moves the -1s to the end, and the count of
//!   non-negative entries is `oriTopkLength`. Attention over a set does not depend on its
//!   order; only the f32 summation order differs from the composition.
//! * `aclnnSparseFlashMlaMetadata` (an AICPU pre-pass) computes the core split from the same
//!   lengths before every call.
//!
//! Checked against the composition on a tiny input when the device opens
//! ([`AscendBackend::self_test_attention`]); a failing call switches the kernel off.

use std::ptr::null_mut;

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
            && i32::try_from(kv.rows()).is_ok()
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
        {
            let (iv, fv) = (self.iv(idx)?, self.tv(&idxf)?);
            aclnn!(self, aclnnCast / aclnnCastGetWorkspaceSize(iv.ptr(), Dt::ACL_FLOAT, fv.ptr()))?;
        }
        let valid = self.reduce(&self.clamp(&self.affine(&idxf, 1.0, 1.0)?, 0.0, 1.0)?, 1, ReduceOp::Sum)?;
        let lens = self.alloc(t, Dt::ACL_INT32)?;
        let lens_v = || self.cview(Mem { buf: &lens, offset: 0, dtype: Dt::ACL_INT32 }, &[t, 1]);
        {
            let (vv, lv) = (self.cview(self.tmem(&valid), &[t, 1])?, lens_v()?);
            aclnn!(self, aclnnCast / aclnnCastGetWorkspaceSize(vv.ptr(), Dt::ACL_INT32, lv.ptr()))?;
        }
        // BF16 queries (exact in bf16/official, whose activations are BF16 values already).
        let qb = self.alloc(numel(&q.shape), Dt::ACL_BF16)?;
        let qb_v = || self.cview(Mem { buf: &qb, offset: 0, dtype: Dt::ACL_BF16 }, &q.shape);
        {
            let (qv, bv) = (self.tv(q)?, qb_v()?);
            aclnn!(self, aclnnCast / aclnnCastGetWorkspaceSize(qv.ptr(), Dt::ACL_BF16, bv.ptr()))?;
        }
        // One TND batch of T queries over the whole pool.
        let cu_q = self.upload_index(&[0, t as i32], &[2])?;
        let cu_kv = self.upload_index(&[0, kv.rows() as i32], &[2])?;
        let meta = self.alloc(1024, Dt::ACL_INT32)?;
        let meta_v = || self.cview(Mem { buf: &meta, offset: 0, dtype: Dt::ACL_INT32 }, &[1024]);
        let tnd = c"TND";
        let none = || -> *mut dsv4_ascend_sys::aclTensor { null_mut() };
        {
            let (cq, ck, lv, mv) = (self.iv(&cu_q)?, self.iv(&cu_kv)?, lens_v()?, meta_v()?);
            aclnn!(
                self,
                aclnnSparseFlashMlaMetadata
                    / aclnnSparseFlashMlaMetadataGetWorkspaceSize(
                        cq.ptr(),
                        ck.ptr(),
                        none(),
                        none(),
                        none(),
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
                        3,               // cmpMaskMode: A2/A3 accept only 3, the 950 0 or 3
                        0,               // oriWinLeft (unused without a mask)
                        0,               // oriWinRight
                        tnd.as_ptr(),
                        tnd.as_ptr(),
                        true,  // hasOriKv
                        false, // hasCmpKv
                        mv.ptr()
                    )
            )?;
        }
        let out_b = self.alloc(numel(&q.shape), Dt::ACL_BF16)?;
        {
            let qv = qb_v()?;
            let kvv = self.cview(kv.mem(), &[kv.rows(), 1, HEAD_DIM])?;
            let (sv, lv, mv, cq, ck) = (sorted_v()?, lens_v()?, meta_v()?, self.iv(&cu_q)?, self.iv(&cu_kv)?);
            let snk = self.tv(sinks)?;
            let ov = self.cview(Mem { buf: &out_b, offset: 0, dtype: Dt::ACL_BF16 }, &q.shape)?;
            // The API takes the layouts as `char*`; it does not write through them.
            let layout = tnd.as_ptr() as *mut std::ffi::c_char;
            aclnn!(
                self,
                aclnnSparseFlashMla
                    / aclnnSparseFlashMlaGetWorkspaceSize(
                        qv.ptr(),
                        kvv.ptr(),
                        none(),
                        sv.ptr(),
                        none(),
                        none(),
                        none(),
                        cq.ptr(),
                        ck.ptr(),
                        none(),
                        none(),
                        none(),
                        none(),
                        none(),
                        lv.ptr(),
                        none(),
                        snk.ptr(),
                        mv.ptr(),
                        scale as f64,
                        1, // cmpRatio
                        0, // oriMaskMode
                        3, // cmpMaskMode
                        0, // oriWinLeft
                        0, // oriWinRight
                        layout,
                        layout,
                        1,     // topkValueMode
                        false, // returnSoftmaxLse
                        ov.ptr(),
                        none()
                    )
            )?;
        }
        let out = self.new_tensor(&q.shape)?;
        let (bv, ov) = (self.cview(Mem { buf: &out_b, offset: 0, dtype: Dt::ACL_BF16 }, &q.shape)?, self.tv(&out)?);
        aclnn!(self, aclnnCast / aclnnCastGetWorkspaceSize(bv.ptr(), Dt::ACL_FLOAT, ov.ptr()))?;
        Ok(out)
    }

    /// Runs `aclnnSparseFlashMla` on a tiny input (D = 512, two heads, padded key lists) against
    /// the composition, and switches the kernel off with the reason when they disagree by more
    /// than BF16 output rounding.
    pub(crate) fn self_test_attention(&self) -> Result<()> {
        let state = &self.kernels.sparse_flash_mla;
        if !state.usable() {
            return Ok(());
        }
        let (t, h, rows, k) = (3usize, 2usize, 6usize, 4usize);
        let bf16 = |v: f32| f32::from_bits(v.to_bits() & 0xffff_0000);
        let qv: Vec<f32> = (0..t * h * HEAD_DIM).map(|i| bf16(((i * 7 % 19) as f32 - 9.0) / 40.0)).collect();
        let kvv: Vec<f32> = (0..rows * HEAD_DIM).map(|i| bf16(((i * 5 % 23) as f32 - 11.0) / 30.0)).collect();
        let mut pool = self.alloc_pool(rows, HEAD_DIM, RowFormat::Bf16)?;
        let all = self.upload_index(&(0..rows as i32).collect::<Vec<_>>(), &[rows])?;
        self.pool_write(&mut pool, &all, &self.upload(&kvv, &[rows, HEAD_DIM])?)?;
        let q = self.upload(&qv, &[t, h, HEAD_DIM])?;
        let idx = self.upload_index(&[0, 2, -1, 5, -1, -1, -1, -1, 4, -1, 1, 3], &[t, k])?;
        let sinks = self.upload(&[0.25, -1.5], &[h])?;
        let got = match self.sparse_attention_fused(&q, &pool, &idx, &sinks, 0.05, Precision::Bf16)? {
            Some(g) => self.download(&g)?,
            None => return Ok(()),
        };
        let want = self.download(&composed::sparse_attention(self, &q, &pool, &idx, &sinks, 0.05)?)?;
        // The kernel rounds its output to BF16 (relative 2^-9); allow twice that.
        if let Some((g, w)) = got.iter().zip(&want).find(|(g, w)| (*g - *w).abs() > 2f32.powi(-8) * w.abs().max(1e-3)) {
            state.disable(format!("self-test disagreed with the composition: {g} vs {w}"));
        }
        Ok(())
    }
}
