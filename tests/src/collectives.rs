//! The communicator suite and its host references: the same expectations for every
//! implementation of `dsv4_core::parallel::Communicator` (`tests/local_comm.rs` on the
//! in-process communicator, `tests/ascend_hccl.rs` on HCCL, `tests/cuda_nccl.rs` on NCCL, each
//! through a [`World`]).

use dsv4_core::backend::{Backend, DeviceTensor};
use dsv4_core::parallel::{CollectiveKind, Communicator};
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

/// Rank `r`'s part of a reduce-scatter of `sum` (of `shape`) along `dim` over `n` ranks: its
/// shape and values (the `r`-th of `n` equal slices of every outer row).
pub fn scattered_part(sum: &[f32], shape: &[usize], dim: usize, n: usize, r: usize) -> (Vec<usize>, Vec<f32>) {
    let (outer, len, inner) = (numel(&shape[..dim]), shape[dim], numel(&shape[dim + 1..]));
    let part = len / n;
    let mut want_shape = shape.to_vec();
    want_shape[dim] = part;
    let want = (0..outer)
        .flat_map(|o| {
            let start = (o * len + r * part) * inner;
            sum[start..start + part * inner].to_vec()
        })
        .collect();
    (want_shape, want)
}

/// A tensor on the host: its shape and values.
pub type Part = (Vec<usize>, Vec<f32>);

/// The rows each of `n` ranks sends to each (`count(s, r)` from rank s to rank r) and each
/// rank's input: `[rows, rest..]` of distinct values (`values(seed + s, ..)`).
pub fn all_to_all_inputs(
    n: usize,
    count: impl Fn(usize, usize) -> usize,
    rest: &[usize],
    seed: usize,
) -> (Vec<Vec<usize>>, Vec<Part>) {
    let sends: Vec<Vec<usize>> = (0..n).map(|s| (0..n).map(|r| count(s, r)).collect()).collect();
    let inputs = sends
        .iter()
        .enumerate()
        .map(|(s, to)| {
            let rows: usize = to.iter().sum();
            ([&[rows][..], rest].concat(), values(seed + s, rows * numel(rest)))
        })
        .collect();
    (sends, inputs)
}

/// What rank `r` receives in an all-to-all-v where rank s sends `sends[s][j]` consecutive rows
/// of `inputs[s]` (rows of `width` values) to each rank j: the rows from each rank, and the
/// rows themselves in rank order.
pub fn received(
    inputs: &[(Vec<usize>, Vec<f32>)],
    sends: &[Vec<usize>],
    r: usize,
    width: usize,
) -> (Vec<usize>, Vec<f32>) {
    let counts: Vec<usize> = sends.iter().map(|s| s[r]).collect();
    let mut rows = Vec::new();
    for (s, input) in inputs.iter().enumerate() {
        let start: usize = sends[s][..r].iter().sum();
        rows.extend_from_slice(&input.1[start * width..(start + counts[s]) * width]);
    }
    (counts, rows)
}

/// A communicator under test: `n` ranks of one world, each on its own thread (and device).
pub trait World<B: Backend>: Sync {
    /// Runs `f(backend, communicator)` on every rank of a new world of `n` ranks; results in
    /// rank order.
    fn run<R: Send>(&self, n: usize, f: impl Fn(&B, &dyn Communicator<B>) -> R + Sync) -> Vec<R>;

    /// The most ranks a world can have: 4 (the suite's largest) unless the implementation is
    /// bounded by hardware (real NCCL needs one GPU per rank).
    fn max_ranks(&self) -> usize {
        4
    }
}

/// The world sizes the suite runs: 1 to 4, or fewer where the world is bounded.
fn sizes<B: Backend>(w: &impl World<B>) -> std::ops::RangeInclusive<usize> {
    1..=w.max_ranks().min(4)
}

// The semantics every communicator must have, on 1-4 ranks (fewer where `max_ranks` says) against host references: one suite
// for the in-process communicator (`tests/local_comm.rs`), HCCL on the Ascend emulator
// (`tests/ascend_hccl.rs`) and NCCL on the CUDA emulator (`tests/cuda_nccl.rs`), as
// `backend_suite` is for the ops.

pub fn all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere<B: Backend>(w: &impl World<B>) {
    for n in sizes(w) {
        let shape = [3, 5, 2];
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| values(r, numel(&shape))).collect();
        let want = rank_order_sum(&inputs);
        let want_twice = rank_order_sum(&vec![want.clone(); n]);
        let out = w.run(n, |be, c| {
            let x = up(be, &inputs[c.rank()], &shape);
            // Twice, the second on the first's output: stream order between collectives.
            let once = c.all_reduce_sum(be, &x).unwrap();
            let twice = c.all_reduce_sum(be, &once).unwrap();
            // The input is left as it was.
            (down(be, &once), down(be, &twice).1, down(be, &x).1)
        });
        for (r, ((s, d), twice, x)) in out.iter().enumerate() {
            assert_eq!(s, &shape, "n {n} rank {r}");
            assert_eq!(bits(d), bits(&want), "n {n} rank {r}");
            assert_eq!(bits(twice), bits(&want_twice), "n {n} rank {r}: the same bits on every rank");
            assert_eq!(bits(x), bits(&inputs[r]), "n {n} rank {r}");
        }
    }
}

pub fn all_gather_concatenates_along_any_dim_in_rank_order<B: Backend>(w: &impl World<B>) {
    type Shapes = [fn(usize) -> Vec<usize>; 3];
    for n in sizes(w) {
        // Each rank a different size in the gathered dim; all the same size; some ranks (all,
        // on one rank) with none.
        let uneven: Shapes = [|r| vec![r + 1, 4], |r| vec![2, r + 1, 3], |r| vec![2, 3, r + 2]];
        let even: Shapes = [|_| vec![2, 4], |_| vec![2, 3, 3], |_| vec![2, 3, 2]];
        let empty: Shapes = [|r| vec![r % 2, 4], |r| vec![2, 2 * (r % 2), 3], |r| vec![2, 3, r % 2]];
        for shapes in [uneven, even, empty] {
            for (dim, shape_of) in shapes.iter().enumerate() {
                let parts: Vec<(Vec<usize>, Vec<f32>)> = (0..n)
                    .map(|r| {
                        let s = shape_of(r);
                        let d = values(10 * r + dim, numel(&s));
                        (s, d)
                    })
                    .collect();
                let want = concat(&parts, dim);
                let out = w.run(n, |be, c| {
                    let (s, d) = &parts[c.rank()];
                    let t = (c.all_gather(be, &up(be, d, s), dim).unwrap(), c.traffic());
                    (down(be, &t.0), t.1)
                });
                for (r, (got, traffic)) in out.iter().enumerate() {
                    assert_eq!(got.0, want.0, "n {n} dim {dim} rank {r} {:?}", parts[r].0);
                    assert_eq!(bits(&got.1), bits(&want.1), "n {n} dim {dim} rank {r} {:?}", parts[r].0);
                    let bytes = numel(&parts[r].0) as u64 * 4;
                    assert_eq!(traffic.by_kind[&CollectiveKind::AllGather], (1, bytes), "n {n} dim {dim} rank {r}");
                    assert_eq!(traffic.calls(), 1, "n {n} dim {dim} rank {r}: the shape exchange is not counted");
                }
            }
        }
    }
}

pub fn reduce_scatter_gives_rank_r_part_r_of_the_sum<B: Backend>(w: &impl World<B>) {
    for n in sizes(w) {
        // Odd row widths; the scattered dim first, in the middle and last.
        for (shape, dim) in [(vec![2 * n, 7], 0), (vec![3, 2 * n, 5], 1), (vec![3, n], 1)] {
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| values(100 + r, numel(&shape))).collect();
            let sum = rank_order_sum(&inputs);
            let out = w.run(n, |be, c| {
                let x = up(be, &inputs[c.rank()], &shape);
                down(be, &c.reduce_scatter_sum(be, &x, dim).unwrap())
            });
            for (r, (s, d)) in out.iter().enumerate() {
                let (want_shape, want) = scattered_part(&sum, &shape, dim, n, r);
                assert_eq!(s, &want_shape, "n {n} {shape:?} dim {dim} rank {r}");
                assert_eq!(bits(d), bits(&want), "n {n} {shape:?} dim {dim} rank {r}");
            }
        }
    }
}

pub fn all_to_all_v_routes_rows_with_empty_parts<B: Backend>(w: &impl World<B>) {
    for n in sizes(w) {
        // Rows rank s sends to rank r; the last rank of a multi-rank world receives none.
        let count = |s: usize, r: usize| if n > 1 && r == n - 1 { 0 } else { (s + 2 * r) % 3 };
        let rest = [2, 3];
        let width = numel(&rest);
        let (sends, inputs) = all_to_all_inputs(n, count, &rest, 200);
        let out = w.run(n, |be, c| {
            let (s, d) = &inputs[c.rank()];
            let (t, counts) = c.all_to_all_v(be, &up(be, d, s), &sends[c.rank()]).unwrap();
            (down(be, &t), counts)
        });
        for (r, ((shape, data), counts)) in out.iter().enumerate() {
            let (want_counts, want) = received(&inputs, &sends, r, width);
            assert_eq!(counts, &want_counts, "n {n} rank {r}");
            assert_eq!(shape, &vec![want_counts.iter().sum::<usize>(), rest[0], rest[1]], "n {n} rank {r}");
            assert_eq!(bits(data), bits(&want), "n {n} rank {r}");
        }
        if n > 1 {
            assert_eq!(out[n - 1].0 .0, vec![0, 2, 3]);
        }
    }
}

pub fn broadcast_from_every_root<B: Backend>(w: &impl World<B>) {
    for n in sizes(w) {
        let shape = [2, 3];
        let out = w.run(n, |be, c| {
            let x = up(be, &values(300 + c.rank(), 6), &shape);
            let got: Vec<_> = (0..n).map(|root| down(be, &c.broadcast(be, &x, root).unwrap())).collect();
            // Every rank's own tensor is left as it was.
            (got, down(be, &x).1)
        });
        for (r, (got, x)) in out.iter().enumerate() {
            for (root, (s, d)) in got.iter().enumerate() {
                assert_eq!(s, &shape, "n {n} root {root} rank {r}");
                assert_eq!(bits(d), bits(&values(300 + root, 6)), "n {n} root {root} rank {r}");
            }
            assert_eq!(bits(x), bits(&values(300 + r, 6)), "n {n} rank {r}");
        }
    }
}
