//! Host references for the communicator suites (`tests/local_comm.rs` on the in-process
//! communicator, `tests/ascend_hccl.rs` on HCCL): the same expectations for both
//! implementations of `dsv4_core::parallel::Communicator`.

use dsv4_core::backend::{Backend, DeviceTensor};
use dsv4_core::Error;

/// Distinct, irregular values (so that the order of a sum shows in its bits).
pub fn values(seed: usize, n: usize) -> Vec<f32> {
    (0..n).map(|i| (((seed * 7919 + i) as f32) * 0.618_034).sin() * 3.7 + 1e-3 * i as f32).collect()
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

pub fn up<B: Backend>(be: &B, data: &[f32], shape: &[usize]) -> B::Tensor {
    be.upload(data, shape).unwrap()
}

/// A tensor's shape and values.
pub fn down<B: Backend>(be: &B, t: &B::Tensor) -> (Vec<usize>, Vec<f32>) {
    (t.shape().to_vec(), be.download(t).unwrap())
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The rank-order sum `a[0] + a[1] + …`, elementwise.
pub fn rank_order_sum(parts: &[Vec<f32>]) -> Vec<f32> {
    let mut out = parts[0].clone();
    for p in &parts[1..] {
        for (o, v) in out.iter_mut().zip(p) {
            *o += *v;
        }
    }
    out
}

/// Concatenation along `dim` of `(shape, data)` parts.
pub fn concat(parts: &[(Vec<usize>, Vec<f32>)], dim: usize) -> (Vec<usize>, Vec<f32>) {
    let outer: usize = numel(&parts[0].0[..dim]);
    let mut shape = parts[0].0.clone();
    shape[dim] = parts.iter().map(|p| p.0[dim]).sum();
    let mut out = Vec::new();
    for o in 0..outer {
        for (s, d) in parts {
            let chunk = numel(&s[dim..]);
            out.extend_from_slice(&d[o * chunk..(o + 1) * chunk]);
        }
    }
    (shape, out)
}

/// (rank, size, message) of a communicator error; panics on any other error.
pub fn comm_err(e: Error) -> (usize, usize, String) {
    match e {
        Error::Comm { rank, size, msg } => (rank, size, msg),
        other => panic!("expected a communicator error, got {other}"),
    }
}
