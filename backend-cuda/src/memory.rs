//! Uploads, downloads and `full`.

use std::sync::Arc;

use dsv4_core::backend_checks as checks;
use dsv4_core::error::Result;

use crate::backend::CudaBackend;
use crate::device::{Device, KernelArg, LaunchConfig};
use crate::tensor::{CudaIndex, CudaTensor};

/// Threads per block of the one-thread-per-element kernels.
pub(crate) const THREADS: u32 = 256;

/// A 1-D launch covering `n` elements with [`THREADS`] threads per block (at least one block,
/// so a launch over nothing is still well-formed; the kernels check `i < n`).
pub(crate) fn elementwise_launch(n: usize) -> LaunchConfig {
    // The kernels loop grid-stride, so the grid is capped (CUDA's gridDim.x limit is 2^31 - 1;
    // 2^16 blocks of 256 threads fill any GPU).
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 16);
    LaunchConfig::linear(blocks as u32, THREADS)
}

impl<D: Device> CudaBackend<D> {
    /// A new f32 tensor of `shape` for an op to write whole: its contents are unspecified
    /// (`Device::alloc_uninit`; NaN on the emulator), so every op writes every element.
    pub(crate) fn new_tensor(&self, shape: &[usize]) -> Result<CudaTensor<D>> {
        let n: usize = shape.iter().product();
        Ok(CudaTensor { buf: Arc::new(self.dev.alloc_uninit(n * 4)?), offset: 0, shape: shape.to_vec() })
    }

    /// A new i32 index tensor of `shape` for an op to write whole (contents unspecified, as
    /// [`Self::new_tensor`]), values unknown on the host.
    pub(crate) fn new_index(&self, shape: &[usize]) -> Result<CudaIndex<D>> {
        let n: usize = shape.iter().product();
        Ok(CudaIndex { buf: Arc::new(self.dev.alloc_uninit(n * 4)?), offset: 0, shape: shape.to_vec(), host: None })
    }

    pub(crate) fn upload_f32(&self, data: &[f32], shape: &[usize]) -> Result<CudaTensor<D>> {
        checks::upload(Self::NAME, data.len(), shape)?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(CudaTensor { buf: Arc::new(self.dev.upload(&bytes)?), offset: 0, shape: shape.to_vec() })
    }

    pub(crate) fn download_f32(&self, t: &CudaTensor<D>) -> Result<Vec<f32>> {
        let mut bytes = vec![0u8; t.shape.iter().product::<usize>() * 4];
        self.dev.download(&t.buf, t.offset, &mut bytes)?;
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub(crate) fn upload_i32(&self, data: &[i32], shape: &[usize]) -> Result<CudaIndex<D>> {
        checks::upload_index(Self::NAME, data.len(), shape)?;
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        Ok(CudaIndex {
            buf: Arc::new(self.dev.upload(&bytes)?),
            offset: 0,
            shape: shape.to_vec(),
            host: Some(data.into()),
        })
    }

    pub(crate) fn download_i32(&self, t: &CudaIndex<D>) -> Result<Vec<i32>> {
        let mut bytes = vec![0u8; t.shape.iter().product::<usize>() * 4];
        self.dev.download(&t.buf, t.offset, &mut bytes)?;
        Ok(bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    /// `full`: kernel `dsv4_fill_f32` (elementwise.cu).
    pub(crate) fn fill(&self, shape: &[usize], value: f32) -> Result<CudaTensor<D>> {
        let shape = checks::full(Self::NAME, shape)?;
        let out = self.new_tensor(&shape)?;
        let n = out.shape.iter().product::<usize>();
        if n > 0 {
            self.dev.launch(
                "dsv4_fill_f32",
                elementwise_launch(n),
                &[KernelArg::Out(&out.buf, 0), KernelArg::count(n), KernelArg::F32(value)],
            )?;
        }
        Ok(out)
    }
}
