//! Moves checkpoint tensors onto a backend, checking every shape against the config.

use crate::backend::Backend;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::tensor::StoredWeight;

/// Called after each tensor is uploaded: (tensors done, tensors total, bytes done).
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, u64);

pub struct Loader<'a, B: Backend> {
    pub be: &'a B,
    pub ckpt: &'a Checkpoint,
    done: usize,
    total: usize,
    bytes: u64,
    progress: Progress<'a>,
}

impl<'a, B: Backend> Loader<'a, B> {
    pub fn new(be: &'a B, ckpt: &'a Checkpoint, progress: Progress<'a>) -> Self {
        let total = ckpt.len();
        Loader { be, ckpt, done: 0, total, bytes: 0, progress }
    }

    fn tick(&mut self, bytes: usize) {
        self.done += 1;
        self.bytes += bytes as u64;
        (self.progress)(self.done.min(self.total), self.total, self.bytes);
    }

    /// A matrix or table, kept by the backend in its preferred form.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<B::Weight> {
        let t = self.ckpt.require(name, shape)?;
        let stored = StoredWeight::float(t.clone())?;
        self.upload(&stored)
    }

    /// Uploads an already-described weight (e.g. a slice of a fused expert tensor).
    pub fn upload(&mut self, w: &StoredWeight) -> Result<B::Weight> {
        let out = self.be.upload_weight(w)?;
        self.tick(w.size_bytes());
        Ok(out)
    }

    /// A small parameter used as an f32 activation-side tensor (norm weights, biases, sinks).
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        let t = self.ckpt.require(name, shape)?;
        let data = t.to_f32_vec()?;
        if let Some(bad) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::Tensor {
                name: name.into(),
                file: t.source.clone(),
                msg: format!("element {bad} is not finite ({})", data[bad]),
            });
        }
        let out = self.be.upload(&data, shape)?;
        self.tick(t.size_bytes());
        Ok(out)
    }

    /// An integer table kept on the host (e.g. `tid2eid`), range-checked.
    pub fn host_ints(&mut self, name: &str, shape: &[usize], upper: i64) -> Result<Vec<i32>> {
        let t = self.ckpt.require(name, shape)?;
        let v = t.to_i64_vec()?;
        if let Some(bad) = v.iter().position(|&x| x < 0 || x >= upper) {
            return Err(Error::Tensor {
                name: name.into(),
                file: t.source.clone(),
                msg: format!("entry {bad} is {}, outside 0..{upper}", v[bad]),
            });
        }
        self.tick(t.size_bytes());
        Ok(v.into_iter().map(|x| x as i32).collect())
    }
}
