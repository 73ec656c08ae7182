//! Device values of the CUDA backend: activations, indices, weights and pools.

use std::sync::Arc;

use dsv4_core::backend::{DevicePool, DeviceTensor, RowFormat};
use dsv4_core::backend_checks::IndexBounds;

use crate::device::{Device, GemmType};

/// An f32 activation tensor: a contiguous row-major view into a device buffer, starting at
/// byte `offset`. Immutable, so `reshape` and axis-0 `narrow` share the buffer.
pub struct CudaTensor<D: Device> {
    pub(crate) buf: Arc<D::Buffer>,
    pub(crate) offset: usize,
    pub(crate) shape: Vec<usize>,
}

impl<D: Device> Clone for CudaTensor<D> {
    fn clone(&self) -> Self {
        CudaTensor { buf: self.buf.clone(), offset: self.offset, shape: self.shape.clone() }
    }
}

impl<D: Device> DeviceTensor for CudaTensor<D> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// An i32 index tensor (`-1` = no entry), contiguous from byte `offset` of its buffer.
pub struct CudaIndex<D: Device> {
    pub(crate) buf: Arc<D::Buffer>,
    pub(crate) offset: usize,
    pub(crate) shape: Vec<usize>,
    /// The values, when they are known on the host (`upload_index`, and `offset_index` /
    /// `concat_index` of such indices): the range checks of `dsv4_core::backend_checks` use
    /// them without a download. Kernels bounds-check every index they read regardless.
    pub(crate) host: Option<Arc<[i32]>>,
}

impl<D: Device> CudaIndex<D> {
    /// The smallest and largest value, when the values are known on the host.
    pub(crate) fn bounds(&self) -> Option<IndexBounds> {
        self.host.as_deref().and_then(IndexBounds::of)
    }
}

impl<D: Device> Clone for CudaIndex<D> {
    fn clone(&self) -> Self {
        CudaIndex { buf: self.buf.clone(), offset: self.offset, shape: self.shape.clone(), host: self.host.clone() }
    }
}

impl<D: Device> DeviceTensor for CudaIndex<D> {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// A weight in device memory: its logical shape, row-major, in the element type it is kept in
/// (see `weights.rs` for which stored form becomes which).
pub struct CudaWeight<D: Device> {
    pub(crate) buf: D::Buffer,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: GemmType,
}

/// A pool of the paged decoding state: `rows` rows of `width` values in `format`, one buffer,
/// written in place by `pool_write`.
pub struct CudaPool<D: Device> {
    pub(crate) buf: D::Buffer,
    pub(crate) rows: usize,
    pub(crate) width: usize,
    pub(crate) format: RowFormat,
}

impl<D: Device> DevicePool for CudaPool<D> {
    fn rows(&self) -> usize {
        self.rows
    }
    fn width(&self) -> usize {
        self.width
    }
    fn format(&self) -> RowFormat {
        self.format
    }
}
