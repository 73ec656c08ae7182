//! Parallel loops over the backend's thread team ([`crate::threads`]) that stay on the calling
//! thread when the work is small: below [`MIN_WORK`] elements (or multiply-adds) a loop runs
//! serially, since even a spinning team's hand-off (a cache-line transfer each way, and the
//! items' data moving between cores) costs about a microsecond. Results do not depend on the
//! choice: every item is computed the same way either way.

use std::mem::MaybeUninit;
use std::sync::Mutex;

use crate::threads;

/// Work (elements touched or multiply-adds) below which a loop runs on the calling thread.
pub(crate) const MIN_WORK: usize = 1 << 15;

/// Elements of an elementwise op per item handed out.
pub(crate) const VALUES_GRAIN: usize = 1 << 12;

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

/// `f(i, piece)` for each `chunk`-sized piece of `out`. Returns once `f` has run on every
/// piece, exactly once each; if a piece panics, panics after the others have run (`filled`'s
/// soundness rests on both).
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

/// A new vector of `len` values, filled by `f(i, piece)` for each `chunk`-sized piece (all zeros
/// when `f` is called): `chunks_mut` over `vec![0.0; len]`, without zeroing the whole vector on
/// the calling thread first. Each piece is zeroed by the task that fills it, so the zeroing is
/// spread over the team (and for pieces that fit, done in the cache `f` then writes to). (The
/// allocator hands a large vector back from memory it reuses, so `vec![0.0; len]` is a serial
/// `memset`: 2% of a 4096-token prefill's samples, with the rest of the team waiting.)
pub(crate) fn filled(len: usize, chunk: usize, work: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    chunks_mut(&mut out.spare_capacity_mut()[..len], chunk, work, |i, piece| {
        for v in piece.iter_mut() {
            v.write(0.0);
        }
        // SAFETY: every element of `piece` was written just above, and `MaybeUninit<f32>` has
        // the layout of `f32`.
        let piece = unsafe { &mut *(piece as *mut [MaybeUninit<f32>] as *mut [f32]) };
        f(i, piece)
    });
    // SAFETY: `chunks_mut` returns only once the closure has run on every piece of the first
    // `len` values (a panicking piece panics here, before this line), and the closure writes
    // every value of its piece (zeros, before `f`).
    unsafe { out.set_len(len) };
    out
}

/// `len` zeros, written by the team in pieces when `len` is large: for an output that its tasks
/// then fill through other splits than `chunks_mut`'s (a GEMM's rectangles, attention's heads),
/// where [`filled`] does not fit; half the serial `memset` of `vec![0.0; len]` on 2 threads.
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    filled(len, VALUES_GRAIN, len, |_, _| {})
}

/// A vector of `len` values not written yet, for parallel tasks that each write a disjoint
/// part of it (the rectangles of a GEMM's output: `ops::column_blocks` of [`Self::values`]):
/// the alternative, a zeroed vector, has every value written twice, the zeros first, from
/// memory on the calling thread or the team ([`zeroed`]), then the results, and the zeroing
/// alone was about 1% of a 512-token prefill of the 0.75 B benchmark model (`perf`: `memset`
/// under `linear` and the expert FFNs, some of it on the calling thread with the team idle).
pub(crate) struct Unwritten {
    /// Capacity at least `len`, length 0 until [`Self::assume_written`].
    buf: Vec<f32>,
    len: usize,
}

impl Unwritten {
    pub(crate) fn new(len: usize) -> Self {
        Unwritten { buf: Vec::with_capacity(len), len }
    }

    /// The `len` values, to be cut into the tasks' parts and written with [`write_mapped`]
    /// or [`zero`].
    pub(crate) fn values(&mut self) -> &mut [MaybeUninit<f32>] {
        &mut self.buf.spare_capacity_mut()[..self.len]
    }

    /// The written vector.
    ///
    /// # Safety
    ///
    /// Every value of [`Self::values`] has been written (by [`write_mapped`] or [`zero`]).
    pub(crate) unsafe fn assume_written(mut self) -> Vec<f32> {
        // SAFETY: `len <= capacity` (`new`), and the caller vouches that the first `len`
        // values are initialised.
        unsafe { self.buf.set_len(self.len) };
        self.buf
    }
}

/// `dst[i] = f(src[i])` for every value. Panics if the lengths differ (a part left partly
/// unwritten would break [`Unwritten::assume_written`]'s contract).
pub(crate) fn write_mapped(dst: &mut [MaybeUninit<f32>], src: &[f32], f: impl Fn(f32) -> f32) {
    assert_eq!(dst.len(), src.len(), "par::write_mapped: a part of {} values from {}", dst.len(), src.len());
    dst.iter_mut().zip(src).for_each(|(d, &v)| {
        d.write(f(v));
    });
}

/// `dst` zeroed, as values: for a kernel that writes into a `&mut [f32]`.
pub(crate) fn zero(dst: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for v in dst.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every value was written just above, and `MaybeUninit<f32>` has the layout of
    // `f32`.
    unsafe { &mut *(dst as *mut [MaybeUninit<f32>] as *mut [f32]) }
}

/// `f` applied to every element.
pub(crate) fn map_values(x: &[f32], f: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
    filled(x.len(), VALUES_GRAIN, x.len(), |i, o| {
        let src = &x[i * VALUES_GRAIN..i * VALUES_GRAIN + o.len()];
        o.iter_mut().zip(src).for_each(|(o, &v)| *o = f(v));
    })
}

/// `f(src, dst)` over pieces of `x` and of a new vector of its length, piece by piece (a
/// kernel that runs over whole slices, vectorised).
pub(crate) fn map_slices(x: &[f32], f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    filled(x.len(), VALUES_GRAIN, x.len(), |i, o| {
        let src = &x[i * VALUES_GRAIN..i * VALUES_GRAIN + o.len()];
        f(src, o)
    })
}

/// `f(a[i], b[i])` for every element of two equally long slices.
pub(crate) fn zip_values(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync) -> Vec<f32> {
    debug_assert_eq!(a.len(), b.len());
    filled(a.len(), VALUES_GRAIN, a.len(), |i, o| {
        let (a, b) = (&a[i * VALUES_GRAIN..], &b[i * VALUES_GRAIN..]);
        o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&x, &y))| *o = f(x, y));
    })
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
            // Every piece reaches `f` as zeros (an accumulating `f` relies on it), and every
            // value of the vector belongs to a piece.
            assert!(zeroed(n).iter().all(|&v| v.to_bits() == 0));
            let made = filled(n, 7, n, |i, c| c.iter_mut().for_each(|v| *v += i as f32 + 1.0));
            assert_eq!(made.len(), n);
            assert!(made.iter().enumerate().all(|(j, &v)| v == (j / 7) as f32 + 1.0));
        }
    }

    /// An `Unwritten` vector written through disjoint parts in parallel tasks gives what the
    /// parts wrote; `write_mapped` refuses a part of another length than its source (a part
    /// left partly unwritten would be read as values).
    #[test]
    fn unwritten_parts_make_the_vector() {
        let n = MIN_WORK + 37;
        let mut out = Unwritten::new(n);
        let parts: Vec<(usize, &mut [MaybeUninit<f32>])> = out.values().chunks_mut(1000).enumerate().collect();
        for_each_owned(parts, n, |(i, part)| match i % 3 {
            0 => zero(part).iter_mut().enumerate().for_each(|(j, v)| *v += (i * 1000 + j) as f32),
            1 => write_mapped(part, &(0..part.len()).map(|j| (i * 1000 + j) as f32).collect::<Vec<_>>(), |v| v),
            _ => write_mapped(part, &(0..part.len()).map(|j| (i * 1000 + j) as f32 - 1.0).collect::<Vec<_>>(), |v| {
                v + 1.0
            }),
        });
        // SAFETY: every part was written by one of the three arms.
        let out = unsafe { out.assume_written() };
        assert_eq!(out, (0..n).map(|j| j as f32).collect::<Vec<_>>());
        let mut short = Unwritten::new(4);
        let r =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| write_mapped(short.values(), &[1.0; 3], |v| v)));
        assert!(r.is_err());
    }

    /// `filled` at its edges: nothing to fill, a zero chunk (taken as 1), one chunk longer
    /// than the vector; and a panicking piece panics the call (no half-made vector comes back)
    /// without spoiling the next call.
    #[test]
    fn filled_at_its_edges() {
        assert!(filled(0, 4, 0, |_, _| panic!("no pieces")).is_empty());
        assert_eq!(filled(3, 0, 3, |i, c| c.fill(i as f32)), [0.0, 1.0, 2.0]);
        assert_eq!(filled(3, 10, 3, |i, c| c.fill(i as f32 + 5.0)), [5.0; 3]);
        for n in [100, MIN_WORK * 4] {
            let r = std::panic::catch_unwind(|| {
                filled(n, 16, n, |i, c| if i == 3 { panic!("piece 3") } else { c.fill(1.0) })
            });
            assert!(r.is_err(), "{n} values");
            assert!(filled(n, 16, n, |_, c| c.fill(2.0)).iter().all(|&v| v == 2.0));
        }
    }
}
