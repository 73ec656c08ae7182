//! `Recording<B>`: [`dsv4_core::primitives_only::PrimitivesOnly`] that also records every
//! `round_to_bf16` call (as its input shape, `[20, 64]`), `fake_quant` call (`fake_quant
//! E4m3 { block: 128 } [20, 64]`) and `hadamard` call (`hadamard [20, 4, 64]`). Fused ops run as
//! the trait's default compositions, so the record is every rounding and quantisation point of
//! a forward pass in graph order, the experts' included (`tests/tests/precision.rs` snapshots
//! it, so a point added or dropped anywhere shows up as a snapshot change).

use std::sync::Mutex;

use dsv4_core::backend::{Backend, DeviceTensor, FakeQuant};
use dsv4_core::error::Result;

pub struct Recording<B: Backend>(pub B, pub Mutex<Vec<String>>);

impl<B: Backend> Recording<B> {
    pub fn new(be: B) -> Self {
        Recording(be, Mutex::new(vec![]))
    }

    /// The calls recorded so far, and a fresh start.
    pub fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.1.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn record(&self, entry: String) {
        self.1.lock().unwrap_or_else(|p| p.into_inner()).push(entry);
    }
}

impl<B: Backend> Backend for Recording<B> {
    dsv4_core::forward_primitives!(B, 0);

    fn describe(&self) -> String {
        format!("{} (recording round_to_bf16, fake_quant, hadamard; fused ops composed)", self.0.describe())
    }
    fn round_to_bf16(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.record(format!("{:?}", x.shape()));
        self.0.round_to_bf16(x)
    }
    fn fake_quant(&self, x: &Self::Tensor, q: FakeQuant) -> Result<Self::Tensor> {
        self.record(format!("fake_quant {q:?} {:?}", x.shape()));
        self.0.fake_quant(x, q)
    }
    fn hadamard(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.record(format!("hadamard {:?}", x.shape()));
        self.0.hadamard(x)
    }
}
