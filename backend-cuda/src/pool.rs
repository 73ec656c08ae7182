//! Pools of the paged decoding state: one zeroed device buffer of `rows` rows of
//! `format.row_bytes(width)` bytes, written in place by `pool_write` and decoded by `pool_read`
//! (kernels in `kernels/pool.cu`).
//!
//! Every [`RowFormat`] is supported, bit for bit as `RowFormat::encode` / `decode` define it:
//! f32 rows as f32, bf16 rows rounded to nearest even, and the official fp8 KV row (e4m3 codes in
//! blocks of 64 with a power-of-two scale byte each, the rope channels BF16). Zero bytes decode
//! to zeros in every format, so a fresh pool reads as zeros.
//!
//! Slots are checked against the pool on the host when their values are known there; slots
//! computed on the device are bounds-checked by the kernels (a write outside the pool is
//! skipped, a read gives zeros). `pool_write` takes distinct slots (the trait's contract, which
//! `dsv4_core::kv` keeps).

use dsv4_core::backend::RowFormat;
use dsv4_core::backend_checks as checks;
use dsv4_core::error::Result;

use crate::backend::CudaBackend;
use crate::device::{Device, KernelArg, LaunchConfig};
use crate::memory::elementwise_launch;
use crate::tensor::{CudaIndex, CudaPool, CudaTensor};

/// Channels per scale block of an fp8 row (`kv::format::FP8_KV_BLOCK`, `DSV4_FP8_BLOCK`).
const FP8_BLOCK: usize = dsv4_core::kv::format::FP8_KV_BLOCK;

/// The launch of `dsv4_pool_write_fp8` over `n` rows of `width` values, `rope` of them BF16:
/// one thread per scale block of the e4m3 part and one per rope value.
pub(crate) fn fp8_write_launch(n: usize, width: usize, rope: usize) -> LaunchConfig {
    let rope = rope.min(width);
    let units = (width - rope).div_ceil(FP8_BLOCK) + rope;
    elementwise_launch(n * units)
}

impl<D: Device> CudaBackend<D> {
    pub(crate) fn pool_supports(&self, format: RowFormat) -> bool {
        matches!(format, RowFormat::F32 | RowFormat::Bf16 | RowFormat::Fp8 { .. })
    }

    pub(crate) fn alloc_pool_op(&self, rows: usize, width: usize, format: RowFormat) -> Result<CudaPool<D>> {
        let bytes = checks::alloc_pool(Self::NAME, rows, width, format)?;
        Ok(CudaPool { buf: self.dev.alloc_zeroed(bytes)?, rows, width, format })
    }

    pub(crate) fn pool_write_op(
        &self,
        pool: &mut CudaPool<D>,
        slots: &CudaIndex<D>,
        values: &CudaTensor<D>,
    ) -> Result<()> {
        checks::pool_write(Self::NAME, pool.rows, pool.width, &slots.shape, &values.shape, slots.bounds())?;
        let (n, width) = (slots.shape[0], pool.width);
        if n * width == 0 {
            return Ok(());
        }
        let mut args: Vec<KernelArg<'_, D::Buffer>> = vec![
            KernelArg::Out(&pool.buf, 0),
            KernelArg::In(&slots.buf, slots.offset),
            KernelArg::In(&values.buf, values.offset),
            KernelArg::count(n),
            KernelArg::count(width),
        ];
        let (kernel, launch) = match pool.format {
            RowFormat::F32 => ("dsv4_pool_write_f32", elementwise_launch(n * width)),
            RowFormat::Bf16 => ("dsv4_pool_write_bf16", elementwise_launch(n * width)),
            RowFormat::Fp8 { rope } => {
                let rope = rope.min(width);
                args.extend([KernelArg::count(rope), KernelArg::count(pool.format.row_bytes(width))]);
                ("dsv4_pool_write_fp8", fp8_write_launch(n, width, rope))
            }
        };
        args.push(KernelArg::count(pool.rows));
        self.dev.launch(kernel, launch, &args)
    }

    pub(crate) fn pool_read_op(&self, pool: &CudaPool<D>, slots: &CudaIndex<D>) -> Result<CudaTensor<D>> {
        let shape = checks::pool_read(Self::NAME, pool.rows, pool.width, &slots.shape, slots.bounds())?;
        let out = self.new_tensor(&shape)?;
        let (n, width) = (slots.shape.iter().product::<usize>(), pool.width);
        if n * width == 0 {
            return Ok(out);
        }
        let mut args: Vec<KernelArg<'_, D::Buffer>> = vec![
            KernelArg::Out(&out.buf, 0),
            KernelArg::In(&pool.buf, 0),
            KernelArg::In(&slots.buf, slots.offset),
            KernelArg::count(n),
            KernelArg::count(width),
        ];
        let kernel = match pool.format {
            RowFormat::F32 => "dsv4_pool_read_f32",
            RowFormat::Bf16 => "dsv4_pool_read_bf16",
            RowFormat::Fp8 { rope } => {
                let rope = rope.min(width);
                args.extend([KernelArg::count(rope), KernelArg::count(pool.format.row_bytes(width))]);
                "dsv4_pool_read_fp8"
            }
        };
        args.push(KernelArg::count(pool.rows));
        self.dev.launch(kernel, elementwise_launch(n * width), &args)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_writes_take_one_thread_per_scale_block_and_rope_value() {
        // V4's attention row: 448 e4m3 values (7 blocks) and 64 rope values.
        assert_eq!(fp8_write_launch(2, 512, 64), elementwise_launch(2 * (7 + 64)));
        // A partial block; rope only; no rope.
        assert_eq!(fp8_write_launch(3, 76, 6), elementwise_launch(3 * (2 + 6)));
        assert_eq!(fp8_write_launch(1, 4, 4), elementwise_launch(4));
        assert_eq!(fp8_write_launch(1, 130, 0), elementwise_launch(3));
    }
}
