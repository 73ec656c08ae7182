//! Parallel loops that stay on the calling thread when the work is small. Handing an op to the
//! rayon pool costs a wake-up, work stealing and a latch wait (microseconds); decoding a small
//! model runs hundreds of ops per token whose work is smaller than that, so below
//! [`MIN_WORK`] elements (or multiply-adds) a loop runs serially. Results do not depend on the
//! choice: every item is computed the same way either way.

use rayon::prelude::*;

/// Work (elements touched or multiply-adds) below which a loop runs on the calling thread.
pub(crate) const MIN_WORK: usize = 1 << 15;

/// `f(i)` for `i` in `0..n`, collected in order.
pub(crate) fn map<R: Send>(n: usize, work: usize, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    if work < MIN_WORK {
        (0..n).map(f).collect()
    } else {
        (0..n).into_par_iter().map(f).collect()
    }
}

/// `f(i, piece)` for each `chunk`-sized piece of `out`.
pub(crate) fn chunks_mut<T: Send>(out: &mut [T], chunk: usize, work: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    let chunk = chunk.max(1);
    if work < MIN_WORK {
        out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
    }
}

/// `f` applied to every element.
pub(crate) fn map_values(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    if x.len() < MIN_WORK {
        x.iter().map(|&v| f(v)).collect()
    } else {
        x.par_iter().map(|&v| f(v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_and_parallel_paths_agree() {
        for n in [3, MIN_WORK + 5] {
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            assert_eq!(map_values(&x, |v| v * 2.0), x.iter().map(|v| v * 2.0).collect::<Vec<_>>());
            assert_eq!(map(n, n, |i| i * 3), (0..n).map(|i| i * 3).collect::<Vec<_>>());
            let mut out = vec![0usize; n];
            chunks_mut(&mut out, 7, n, |i, c| c.iter_mut().for_each(|v| *v = i));
            assert!(out.iter().enumerate().all(|(j, &v)| v == j / 7));
        }
    }
}
