//! `Recording<B>`: [`dsv4_core::primitives_only::PrimitivesOnly`] that also records the input
//! shape of every `round_to_bf16` call. Fused ops run as the trait's default compositions, so
//! the record is every rounding point of a `bf16` forward pass in graph order, the experts'
//! included (`tests/tests/precision.rs` snapshots it, so a rounding point added or dropped
//! anywhere shows up as a snapshot change).

use std::sync::Mutex;

use dsv4_core::backend::{Backend, DeviceTensor};
use dsv4_core::error::Result;

pub struct Recording<B: Backend>(pub B, pub Mutex<Vec<Vec<usize>>>);

impl<B: Backend> Recording<B> {
    pub fn new(be: B) -> Self {
        Recording(be, Mutex::new(vec![]))
    }

    /// The shapes recorded so far, and a fresh start.
    pub fn take(&self) -> Vec<Vec<usize>> {
        std::mem::take(&mut *self.1.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl<B: Backend> Backend for Recording<B> {
    dsv4_core::forward_primitives!(B, 0);

    fn describe(&self) -> String {
        format!("{} (recording round_to_bf16; fused ops composed)", self.0.describe())
    }
    fn round_to_bf16(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.1.lock().unwrap_or_else(|p| p.into_inner()).push(x.shape().to_vec());
        self.0.round_to_bf16(x)
    }
}
