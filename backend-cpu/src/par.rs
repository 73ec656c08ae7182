//! Parallel loops over the backend's thread team ([`crate::threads`]) that stay on the calling
//! thread when the work is small: below [`MIN_WORK`] elements (or multiply-adds) a loop runs
//! serially, since even a spinning team's hand-off (a cache-line transfer each way, and the
//! items' data moving between cores) costs about a microsecond. Results do not depend on the
//! choice: every item is computed the same way either way.

use std::sync::Mutex;

use crate::threads;

/// Work (elements touched or multiply-adds) below which a loop runs on the calling thread.
pub(crate) const MIN_WORK: usize = 1 << 15;

/// Elements of an elementwise op per item handed out.
const VALUES_GRAIN: usize = 1 << 12;

/// `f(i)` for `i` in `0..n`, collected in order.
pub(crate) fn map<R: Send>(n: usize, work: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    if work < MIN_WORK || n <= 1 {
        return (0..n).map(f).collect();
    }
    // One slot per item, each locked once (uncontended).
    let out: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    threads::for_each(n, 1, work, MIN_WORK, |i| {
        let r = f(i);
        *out[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    });
    out.into_iter().map(|v| v.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every item ran")).collect()
}

/// `f(item)` for every item (disjoint mutable borrows, e.g. rows split off a buffer), in
/// parallel when `work` is large.
pub(crate) fn for_each_owned<T: Send>(items: Vec<T>, work: usize, f: impl Fn(T) + Sync) {
    if work < MIN_WORK || items.len() <= 1 {
        items.into_iter().for_each(f);
        return;
    }
    // One slot per item, each taken once (uncontended).
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    threads::for_each(slots.len(), 1, work, MIN_WORK, |i| {
        if let Some(t) = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take() {
            f(t)
        }
    });
}

/// `f(i, piece)` for each `chunk`-sized piece of `out`.
pub(crate) fn chunks_mut<T: Send>(out: &mut [T], chunk: usize, work: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let chunk = chunk.max(1);
    if work < MIN_WORK || out.len() <= chunk {
        out.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    // One lock per piece, each taken once (uncontended): the pieces are disjoint.
    let pieces: Vec<Mutex<&mut [T]>> = out.chunks_mut(chunk).map(Mutex::new).collect();
    threads::for_each(pieces.len(), 1, work, MIN_WORK, |i| {
        let mut piece = pieces[i].lock().unwrap_or_else(|e| e.into_inner());
        f(i, &mut piece)
    });
}

/// `f` applied to every element.
pub(crate) fn map_values(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    chunks_mut(&mut out, VALUES_GRAIN, x.len(), |i, o| {
        let src = &x[i * VALUES_GRAIN..i * VALUES_GRAIN + o.len()];
        o.iter_mut().zip(src).for_each(|(o, &v)| *o = f(v));
    });
    out
}

/// `f(src, dst)` over pieces of `x` and of a new vector of its length, piece by piece (a
/// kernel that runs over whole slices, vectorised).
pub(crate) fn map_slices(x: &[f32], f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    chunks_mut(&mut out, VALUES_GRAIN, x.len(), |i, o| {
        let src = &x[i * VALUES_GRAIN..i * VALUES_GRAIN + o.len()];
        f(src, o)
    });
    out
}

/// `f(a[i], b[i])` for every element of two equally long slices.
pub(crate) fn zip_values(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    debug_assert_eq!(a.len(), b.len());
    let mut out = vec![0f32; a.len()];
    chunks_mut(&mut out, VALUES_GRAIN, a.len(), |i, o| {
        let (a, b) = (&a[i * VALUES_GRAIN..], &b[i * VALUES_GRAIN..]);
        o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&x, &y))| *o = f(x, y));
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_and_parallel_paths_agree() {
        for n in [3, MIN_WORK + 5] {
            let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            assert_eq!(map_values(&x, |v| v * 2.0), x.iter().map(|v| v * 2.0).collect::<Vec<_>>());
            assert_eq!(zip_values(&x, &x, |a, b| a * b + 1.0), x.iter().map(|v| v * v + 1.0).collect::<Vec<_>>());
            assert_eq!(map(n, n, |i| i * 3), (0..n).map(|i| i * 3).collect::<Vec<_>>());
            let mut out = vec![0usize; n];
            chunks_mut(&mut out, 7, n, |i, c| c.iter_mut().for_each(|v| *v = i));
            assert!(out.iter().enumerate().all(|(j, &v)| v == j / 7));
        }
    }
}
