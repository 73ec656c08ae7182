//! The CUDA backend's communicator (`dsv4_backend_cuda::NcclCommunicator`) and its launcher
//! (`run_ranks`) over NCCL's API, on the emulator's NCCL (`dsv4_cuda_emu::EmuComm`), with one
//! emulated device per rank: every collective on 1–4 ranks against a host reference
//! (all-reduce with the same bits on every rank), also on inputs that are axis-0 `narrow` views
//! into bigger tensors (a byte offset into a shared buffer), subgroups working concurrently, the
//! TP / EP groups of a 2 × 2 layout, traffic counted exactly like the in-process communicator, and
//! errors (invalid arguments and disagreeing shapes fail on every rank with one message; a
//! backend of another device is refused; the failing rank's own error ends the run; a rank
//! that leaves or goes silent fails the others within a bounded time). The same suite as
//! `tests/ascend_hccl.rs` on HCCL. The `gpu` module runs the suite on real NCCL, one rank per
//! GPU (`ci/gpu-check.sh`; on one H200 so far, so in worlds of one rank).

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use dsv4_backend_cpu::CpuBackend;
use dsv4_backend_cuda::tensor::CudaTensor;
use dsv4_backend_cuda::{run_ranks, CudaBackend, NcclCommunicator};
use dsv4_core::backend::Backend;
use dsv4_core::parallel::{CollectiveKind, Communicator, LocalComm, ParallelLayout, RankContext, Traffic};
use dsv4_core::Error;
use dsv4_cuda_emu::{EmuComm, EmulatedDevice};
use dsv4_tests::collectives::{self, bits, comm_err, concat, down, numel, rank_order_sum, up, values, World};

type Gpu = CudaBackend<Arc<EmulatedDevice>>;
type Nccl = NcclCommunicator<EmulatedDevice, EmuComm>;
type GpuTensor = CudaTensor<Arc<EmulatedDevice>>;

/// How long an emulated NCCL call waits for its peers here: far more than any call of a
/// healthy test takes, and short enough that a broken one fails instead of hanging (the
/// default, `DSV4_COMM_TIMEOUT_S`, is 600 s).
const TIMEOUT: Duration = Duration::from_secs(30);

/// How long a failure that must not wait for the timeout may take.
const PROMPT: Duration = Duration::from_secs(5);

/// `n` distinct emulated GPUs.
fn devices(n: usize) -> Vec<Arc<EmulatedDevice>> {
    (0..n).map(|_| Arc::new(EmulatedDevice::new())).collect()
}

/// An emulated NCCL world over `devices` (`ncclCommInitAll`), member `r` on `devices[r]`.
fn members(devices: &[Arc<EmulatedDevice>], timeout: Duration) -> Vec<EmuComm> {
    let refs: Vec<&EmulatedDevice> = devices.iter().map(|d| &**d).collect();
    EmuComm::world_with_timeout(&refs, timeout).unwrap()
}

/// `n` ranks of one world communicator, each on its own thread and emulated device, whose
/// calls give up after `timeout`; `f(backend, communicator)` per rank, results in rank order.
fn world_with_timeout<R: Send>(n: usize, timeout: Duration, f: impl Fn(&Gpu, Nccl) -> R + Sync) -> Vec<R> {
    let devs = devices(n);
    let comms = members(&devs, timeout);
    thread::scope(|s| {
        let handles: Vec<_> = devs
            .into_iter()
            .zip(comms)
            .enumerate()
            .map(|(r, (dev, member))| {
                let f = &f;
                s.spawn(move || {
                    let be = CudaBackend::new(dev.clone());
                    let c = NcclCommunicator::new(dev, member);
                    assert_eq!((c.rank(), c.size()), (r, n));
                    f(&be, c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// [`world_with_timeout`] with the suite's [`TIMEOUT`].
fn world<R: Send>(n: usize, f: impl Fn(&Gpu, Nccl) -> R + Sync) -> Vec<R> {
    world_with_timeout(n, TIMEOUT, f)
}

/// The shared suite's world: [`world`]'s emulated GPUs and NCCL.
struct EmulatedNccl;

impl World<Gpu> for EmulatedNccl {
    fn run<R: Send>(&self, n: usize, f: impl Fn(&Gpu, &dyn Communicator<Gpu>) -> R + Sync) -> Vec<R> {
        world(n, |be, c| f(be, &c))
    }
}

#[test]
fn all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere() {
    collectives::all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere(&EmulatedNccl);
}

#[test]
fn all_gather_concatenates_along_any_dim_in_rank_order() {
    collectives::all_gather_concatenates_along_any_dim_in_rank_order(&EmulatedNccl);
}

#[test]
fn reduce_scatter_gives_rank_r_part_r_of_the_sum() {
    collectives::reduce_scatter_gives_rank_r_part_r_of_the_sum(&EmulatedNccl);
}

#[test]
fn all_to_all_v_routes_rows_with_empty_parts() {
    collectives::all_to_all_v_routes_rows_with_empty_parts(&EmulatedNccl);
}

#[test]
fn broadcast_from_every_root() {
    collectives::broadcast_from_every_root(&EmulatedNccl);
}

/// A view like the ones the model's layers pass: `data` (of `shape`) as
/// `be.narrow(&big, 0, start, shape[0])` of a bigger uploaded tensor `big`, with `start` rows of
/// other values before it and two rows after. On the CUDA backend an axis-0 narrow shares
/// `big`'s buffer at a byte offset, which every collective must honour. Returns the view, `big`
/// and `big`'s values (for checking that the collective left it as it was).
fn narrow_view(be: &Gpu, data: &[f32], shape: &[usize], start: usize) -> (GpuTensor, GpuTensor, Vec<f32>) {
    assert!(start > 0, "a view at offset 0 would not tell the offset from the buffer's start");
    let row = numel(&shape[1..]);
    let mut big_shape = shape.to_vec();
    big_shape[0] += start + 2;
    let mut all = values(9000 + start, start * row);
    all.extend_from_slice(data);
    all.extend(values(9500 + start, 2 * row));
    let big = up(be, &all, &big_shape);
    let view = be.narrow(&big, 0, start, shape[0]).unwrap();
    assert_eq!(down(be, &view), (shape.to_vec(), data.to_vec()));
    (view, big, all)
}

/// Where rank `r`'s view starts in its bigger tensor (a different offset on every rank).
fn view_start(r: usize) -> usize {
    r + 1
}

#[test]
fn all_reduce_and_broadcast_of_narrow_views_read_them_at_their_offset() {
    for n in 1..=4 {
        let shape = [3, 5];
        let inputs: Vec<Vec<f32>> = (0..n).map(|r| values(400 + r, numel(&shape))).collect();
        let want = rank_order_sum(&inputs);
        let out = world(n, |be, c| {
            let (x, big, all) = narrow_view(be, &inputs[c.rank()], &shape, view_start(c.rank()));
            let sum = down(be, &c.all_reduce_sum(be, &x).unwrap());
            let got: Vec<_> = (0..n).map(|root| down(be, &c.broadcast(be, &x, root).unwrap())).collect();
            // The bigger tensor (the view included) is left as it was.
            assert_eq!(bits(&down(be, &big).1), bits(&all), "n {n} rank {}", c.rank());
            (sum, got)
        });
        for (r, ((s, d), got)) in out.iter().enumerate() {
            assert_eq!(s, &shape, "n {n} rank {r}");
            assert_eq!(bits(d), bits(&want), "n {n} rank {r}: all_reduce");
            for (root, (s, d)) in got.iter().enumerate() {
                assert_eq!(s, &shape, "n {n} root {root} rank {r}");
                assert_eq!(bits(d), bits(&inputs[root]), "n {n} root {root} rank {r}: broadcast");
            }
        }
    }
}

#[test]
fn all_gather_of_narrow_views_along_dims_0_and_1() {
    type Shapes = [fn(usize) -> Vec<usize>; 2];
    for n in 1..=4 {
        // By dim gathered: all ranks the same size (each sends its view itself), and different
        // sizes (the largest part is sent as it is, the others padded first).
        let even: Shapes = [|_| vec![2, 4], |_| vec![3, 2, 2]];
        let uneven: Shapes = [|r| vec![r + 1, 4], |r| vec![3, r + 1]];
        for shapes in [even, uneven] {
            for (dim, shape_of) in shapes.iter().enumerate() {
                let parts: Vec<(Vec<usize>, Vec<f32>)> = (0..n)
                    .map(|r| {
                        let s = shape_of(r);
                        let d = values(500 + 10 * r + dim, numel(&s));
                        (s, d)
                    })
                    .collect();
                let want = concat(&parts, dim);
                let out = world(n, |be, c| {
                    let (s, d) = &parts[c.rank()];
                    let (x, big, all) = narrow_view(be, d, s, view_start(c.rank()));
                    let got = down(be, &c.all_gather(be, &x, dim).unwrap());
                    assert_eq!(bits(&down(be, &big).1), bits(&all), "n {n} dim {dim} rank {}", c.rank());
                    got
                });
                for (r, (s, d)) in out.iter().enumerate() {
                    assert_eq!(s, &want.0, "n {n} dim {dim} rank {r} {:?}", parts[r].0);
                    assert_eq!(bits(d), bits(&want.1), "n {n} dim {dim} rank {r} {:?}", parts[r].0);
                }
            }
        }
    }
}

#[test]
fn reduce_scatter_of_narrow_views_along_dims_0_and_1() {
    for n in 1..=4 {
        // Along dim 0 the view is sent as it is; along dim 1 it is rearranged first.
        for (shape, dim) in [(vec![2 * n, 3], 0), (vec![3, 2 * n], 1), (vec![2, n, 3], 1)] {
            let inputs: Vec<Vec<f32>> = (0..n).map(|r| values(600 + r, numel(&shape))).collect();
            let sum = rank_order_sum(&inputs);
            let out = world(n, |be, c| {
                let (x, big, all) = narrow_view(be, &inputs[c.rank()], &shape, view_start(c.rank()));
                let got = down(be, &c.reduce_scatter_sum(be, &x, dim).unwrap());
                assert_eq!(bits(&down(be, &big).1), bits(&all), "n {n} {shape:?} dim {dim} rank {}", c.rank());
                got
            });
            for (r, (s, d)) in out.iter().enumerate() {
                let (want_shape, want) = collectives::scattered_part(&sum, &shape, dim, n, r);
                assert_eq!(s, &want_shape, "n {n} {shape:?} dim {dim} rank {r}");
                assert_eq!(bits(d), bits(&want), "n {n} {shape:?} dim {dim} rank {r}");
            }
        }
    }
}

#[test]
fn all_to_all_v_of_narrow_views_sends_the_views_rows() {
    for n in 1..=4 {
        // Rows rank s sends to rank r, some of them none.
        let count = |s: usize, r: usize| (2 * s + r + 1) % 3;
        let rest = [2, 3];
        let width = numel(&rest);
        let (sends, inputs) = collectives::all_to_all_inputs(n, count, &rest, 700);
        let out = world(n, |be, c| {
            let (s, d) = &inputs[c.rank()];
            let (x, big, all) = narrow_view(be, d, s, view_start(c.rank()));
            let (t, counts) = c.all_to_all_v(be, &x, &sends[c.rank()]).unwrap();
            assert_eq!(bits(&down(be, &big).1), bits(&all), "n {n} rank {}", c.rank());
            (down(be, &t), counts)
        });
        for (r, ((shape, data), counts)) in out.iter().enumerate() {
            let (want_counts, want) = collectives::received(&inputs, &sends, r, width);
            assert_eq!(counts, &want_counts, "n {n} rank {r}");
            assert_eq!(shape, &vec![want_counts.iter().sum::<usize>(), rest[0], rest[1]], "n {n} rank {r}");
            assert_eq!(bits(data), bits(&want), "n {n} rank {r}");
        }
    }
}

#[test]
fn barriers_and_splits_subgroups_run_collectives_concurrently() {
    let out = world(4, |be, c| {
        for _ in 0..3 {
            c.barrier().unwrap();
        }
        let colour = c.rank() % 2;
        let sub = c.split(colour).unwrap();
        let x = up(be, &values(c.rank(), 4), &[4]);
        let mut sums = Vec::new();
        for _ in 0..10 {
            sums.push(down(be, &sub.all_reduce_sum(be, &x).unwrap()).1);
        }
        let gathered = down(be, &sub.all_gather(be, &x, 0).unwrap()).1;
        sub.barrier().unwrap();
        // A split of the subgroup: one group per rank.
        let single = sub.split(sub.rank()).unwrap();
        let alone = down(be, &single.all_reduce_sum(be, &x).unwrap()).1;
        // The world still works after the splits.
        let total = down(be, &c.all_reduce_sum(be, &x).unwrap()).1;
        (colour, sub.rank(), sub.size(), (single.rank(), single.size()), sums, gathered, alone, total)
    });
    let all: Vec<Vec<f32>> = (0..4).map(|r| values(r, 4)).collect();
    for (r, (colour, sub_rank, sub_size, single, sums, gathered, alone, total)) in out.into_iter().enumerate() {
        assert_eq!((colour, sub_rank, sub_size, single), (r % 2, r / 2, 2, (0, 1)), "rank {r}");
        let members = [colour, colour + 2];
        let want = rank_order_sum(&[values(members[0], 4), values(members[1], 4)]);
        for s in &sums {
            assert_eq!(bits(s), bits(&want), "rank {r}");
        }
        assert_eq!(bits(&gathered), bits(&[values(members[0], 4), values(members[1], 4)].concat()), "rank {r}");
        assert_eq!(bits(&alone), bits(&values(r, 4)), "rank {r}");
        assert_eq!(bits(&total), bits(&rank_order_sum(&all)), "rank {r}");
    }
}

#[test]
fn run_ranks_gives_every_rank_its_tp_and_ep_groups() {
    // 2 × 2 mesh: TP groups {0,1},{2,3}; EP groups {0,2},{1,3}.
    let layout = ParallelLayout { world: 4, tp: 2, ep: 2, ..ParallelLayout::SINGLE };
    let devs = devices(4);
    let out = run_ranks(devs.clone(), members(&devs, TIMEOUT), layout, |be: &Gpu, ctx: RankContext<Gpu>| {
        let r = ctx.layout.rank;
        let (tp, ep) = (ctx.tp.clone().unwrap(), ctx.ep.clone().unwrap());
        let x = up(be, &values(r, 6), &[2, 3]);
        let tp_sum = down(be, &tp.all_reduce_sum(be, &x)?).1;
        let ep_sum = down(be, &ep.all_reduce_sum(be, &x)?).1;
        let logits = down(be, &tp.all_gather(be, &x, 1)?);
        // Rank r runs on devices[r]: its groups take a backend on that device and refuse one on
        // any other.
        let here = CudaBackend::new(devs[r].clone());
        let again = down(&here, &ep.all_reduce_sum(&here, &x)?).1;
        let refused: Vec<String> = (1..4)
            .map(|k| {
                let there = CudaBackend::new(devs[(r + k) % 4].clone());
                tp.all_reduce_sum(&there, &x).map(drop).unwrap_err().to_string()
            })
            .collect();
        Ok::<_, Error>((r, (tp.rank(), tp.size()), (ep.rank(), ep.size()), tp_sum, ep_sum, logits, again, refused))
    })
    .unwrap();
    for (r, (rank, tp, ep, tp_sum, ep_sum, (shape, logits), again, refused)) in out.into_iter().enumerate() {
        assert_eq!(rank, r);
        assert_eq!((tp, ep), ((r % 2, 2), (r / 2, 2)), "rank {r}");
        let tp_members = [r / 2 * 2, r / 2 * 2 + 1];
        let ep_members = [r % 2, r % 2 + 2];
        let ep_want = rank_order_sum(&[values(ep_members[0], 6), values(ep_members[1], 6)]);
        assert_eq!(bits(&tp_sum), bits(&rank_order_sum(&[values(tp_members[0], 6), values(tp_members[1], 6)])));
        assert_eq!(bits(&ep_sum), bits(&ep_want), "rank {r}");
        assert_eq!(bits(&again), bits(&ep_want), "rank {r}");
        let parts: Vec<_> = tp_members.iter().map(|&m| (vec![2, 3], values(m, 6))).collect();
        let want = concat(&parts, 1);
        assert_eq!(shape, want.0, "rank {r}");
        assert_eq!(bits(&logits), bits(&want.1), "rank {r}");
        for e in refused {
            assert!(e.contains("all_reduce was given a backend on another device than the communicator's"), "{e}");
        }
    }
}

#[test]
fn traffic_is_counted_exactly_like_the_in_process_communicator() {
    /// The same calls on any backend's communicator: (world, world after a split).
    fn calls<B: Backend>(be: &B, c: &dyn Communicator<B>) -> (Traffic, Traffic) {
        let r = c.rank();
        let up = |d: &[f32], s: &[usize]| be.upload(d, s).unwrap();
        c.all_reduce_sum(be, &up(&[0.0; 6], &[2, 3])).unwrap();
        c.all_reduce_sum(be, &up(&[0.0; 6], &[2, 3])).unwrap();
        c.all_gather(be, &up(&vec![0.0; (r + 1) * 2], &[r + 1, 2]), 0).unwrap();
        c.reduce_scatter_sum(be, &up(&[0.0; 12], &[3, 4]), 0).unwrap();
        // Rank r sends r+1 rows of width 2 to each rank (itself included).
        let rows = 3 * (r + 1);
        c.all_to_all_v(be, &up(&vec![0.0; rows * 2], &[rows, 2]), &[r + 1; 3]).unwrap();
        c.broadcast(be, &up(&[0.0; 5], &[5]), 1).unwrap();
        c.barrier().unwrap();
        let sub = c.split(0).unwrap();
        sub.barrier().unwrap();
        (c.traffic(), sub.traffic())
    }
    let nccl = world(3, |be, c| calls(be, &c));
    let cpu = CpuBackend::new();
    let local: Vec<(Traffic, Traffic)> = thread::scope(|s| {
        let handles: Vec<_> =
            LocalComm::world(3).into_iter().map(|c| s.spawn(|| calls::<CpuBackend>(&cpu, &{ c }))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(nccl, local);
    for (r, (t, sub)) in nccl.into_iter().enumerate() {
        assert_eq!(t.by_kind[&CollectiveKind::AllReduce], (2, 2 * 6 * 4), "rank {r}");
        assert_eq!(t.by_kind[&CollectiveKind::AllGather], (1, (r as u64 + 1) * 2 * 4), "rank {r}");
        assert_eq!(t.by_kind[&CollectiveKind::ReduceScatter], (1, 12 * 4), "rank {r}");
        assert_eq!(t.by_kind[&CollectiveKind::AllToAllV], (1, 2 * (r as u64 + 1) * 2 * 4), "rank {r}");
        assert_eq!(t.by_kind[&CollectiveKind::Broadcast], (1, if r == 1 { 20 } else { 0 }), "rank {r}");
        assert_eq!(t.by_kind[&CollectiveKind::Barrier], (1, 0), "rank {r}");
        assert_eq!(t.by_kind[&CollectiveKind::Split], (1, 0), "rank {r}");
        assert_eq!(t.calls(), 6, "rank {r}");
        assert_eq!(sub.by_kind.into_iter().collect::<Vec<_>>(), vec![(CollectiveKind::Barrier, (1, 0))]);
    }
}

/// Runs one misuse on `n` ranks: every rank must fail promptly (not by a timeout) with a
/// communicator error from its own rank; the messages in rank order.
fn misuse(n: usize, f: impl Fn(&Gpu, &Nccl) -> Result<(), Error> + Sync) -> Vec<String> {
    world(n, |be, c| {
        let start = Instant::now();
        let e = f(be, &c).expect_err("the misuse must fail on every rank");
        assert!(start.elapsed() < PROMPT, "failing took {:?}: {e}", start.elapsed());
        let (rank, size, msg) = comm_err(e);
        assert_eq!((rank, size), (c.rank(), n), "{msg}");
        msg
    })
}

#[test]
fn invalid_arguments_and_disagreeing_shapes_fail_on_every_rank_with_one_message() {
    // Checked by the communicator's shape exchange (all-gather, all-to-all-v): one rank's
    // invalid arguments fail every rank with that rank's message.
    let msgs = misuse(3, |be, c| {
        let x = up(be, &[0.0; 6], &[3, 2]);
        let send: &[usize] = if c.rank() == 0 { &[1, 2] } else { &[1, 1, 1] };
        c.all_to_all_v(be, &x, send).map(drop)
    });
    for m in msgs {
        assert_eq!(m, "rank 0 called all_to_all_v with invalid arguments: 2 send_rows for 3 ranks");
    }
    let msgs = misuse(2, |be, c| {
        let x = up(be, &[0.0; 6], &[3, 2]);
        let send: &[usize] = if c.rank() == 1 { &[2, 2] } else { &[1, 2] };
        c.all_to_all_v(be, &x, send).map(drop)
    });
    for m in msgs {
        assert_eq!(
            m,
            "rank 1 called all_to_all_v with invalid arguments: send_rows [2, 2] do not sum to the 3 rows of [3, 2]"
        );
    }
    let msgs = misuse(2, |be, c| c.all_gather(be, &up(be, &[0.0; 6], &[3, 2]), 2 * c.rank()).map(drop));
    for m in msgs {
        assert_eq!(m, "rank 1 called all_gather with invalid arguments: dim 2 is out of range for shape [3, 2]");
    }
    // Disagreeing shapes and dims.
    let msgs = misuse(2, |be, c| {
        let shape = [[2, 3], [3, 4]][c.rank()];
        c.all_gather(be, &up(be, &vec![0.5; numel(&shape)], &shape), 0).map(drop)
    });
    for m in msgs {
        assert_eq!(
            m,
            "all_gather: the ranks' shapes differ outside dim 0: rank 0 [2, 3] (6 values), rank 1 [3, 4] (12 values)"
        );
    }
    let msgs = misuse(3, |be, c| c.all_gather(be, &up(be, &[0.0; 4], &[2, 2]), c.rank().min(1)).map(drop));
    for m in msgs {
        assert_eq!(m, "all_gather: the ranks disagree on dim: rank 0 0, rank 1 1, rank 2 1");
    }
    let msgs = misuse(2, |be, c| {
        let shape: &[usize] = [&[1, 4][..], &[1, 2, 2]][c.rank()];
        c.all_to_all_v(be, &up(be, &[0.0; 4], shape), &[1, 0]).map(drop)
    });
    for m in msgs {
        assert!(m.starts_with("all_to_all_v: the ranks' rows differ"), "{m}");
        assert!(m.contains("rank 0 [4] (4), rank 1 [2, 2] (4)"), "{m}");
    }
    // Different collectives at the same step.
    let msgs = misuse(2, |be, c| {
        let x = up(be, &[0.0; 4], &[2, 2]);
        if c.rank() == 1 {
            c.all_to_all_v(be, &x, &[1, 1]).map(drop)
        } else {
            c.all_gather(be, &x, 0).map(drop)
        }
    });
    for m in msgs {
        assert_eq!(m, "ranks called different collectives at the same step: rank 0 all_gather, rank 1 all_to_all_v");
    }
    // Stream-ordered collectives check their arguments on the calling rank: every rank that
    // passes invalid ones fails, naming itself, before anything reaches NCCL.
    for (r, m) in
        misuse(2, |be, c| c.reduce_scatter_sum(be, &up(be, &[0.0; 6], &[3, 2]), 0).map(drop)).into_iter().enumerate()
    {
        assert_eq!(
            m,
            format!(
                "rank {r} called reduce_scatter with invalid arguments: dim 0 of shape [3, 2] has size 3, not a \
                 multiple of the 2 ranks"
            )
        );
    }
    for (r, m) in
        misuse(2, |be, c| c.reduce_scatter_sum(be, &up(be, &[0.0; 6], &[3, 2]), 2).map(drop)).into_iter().enumerate()
    {
        assert_eq!(
            m,
            format!("rank {r} called reduce_scatter with invalid arguments: dim 2 is out of range for shape [3, 2]")
        );
    }
    for (r, m) in misuse(3, |be, c| c.broadcast(be, &up(be, &[1.0], &[1]), 3).map(drop)).into_iter().enumerate() {
        assert_eq!(m, format!("rank {r} called broadcast with invalid arguments: root 3 is not a rank of 3"));
    }
    // Disagreement that only NCCL sees (all-reduce is not checked across ranks by dsv4): the
    // library fails every rank with one message naming the counts, and refuses later calls.
    let out = world(2, |be, c| {
        let shape = [[2, 3], [2, 4]][c.rank()];
        let start = Instant::now();
        let first = c.all_reduce_sum(be, &up(be, &vec![0.5; numel(&shape)], &shape)).map(drop);
        let later = c.all_reduce_sum(be, &up(be, &[1.0], &[1])).map(drop);
        (first, later, start.elapsed())
    });
    let msgs: Vec<(String, String)> = out
        .into_iter()
        .enumerate()
        .map(|(r, (first, later, elapsed))| {
            assert!(elapsed < PROMPT, "rank {r} took {elapsed:?}");
            let (rank, size, first) = comm_err(first.expect_err("different counts must fail"));
            assert_eq!((rank, size), (r, 2));
            let (rank, size, later) = comm_err(later.expect_err("a failed communicator must refuse later calls"));
            assert_eq!((rank, size), (r, 2));
            (first, later)
        })
        .collect();
    let (first, later) = &msgs[0];
    assert!(first.starts_with("ncclAllReduce"), "{first}");
    assert!(first.contains("count 6") && first.contains("count 8"), "the counts are named: {first}");
    assert!(later.starts_with("ncclAllReduce refused") && later.contains(first.as_str()), "{later}");
    assert!(msgs.iter().all(|m| m == &msgs[0]), "one message on every rank: {msgs:?}");
}

#[test]
fn a_backend_or_tensor_of_another_device_is_an_error() {
    let out = world(2, |be, c| {
        let other = CudaBackend::new(Arc::new(EmulatedDevice::new()));
        let x = up(be, &values(c.rank(), 4), &[2, 2]);
        // Every collective that takes a backend refuses one on another device, on the calling
        // rank, before anything reaches NCCL: the communicator keeps working.
        let refused = vec![
            c.all_reduce_sum(&other, &x).map(drop),
            c.all_gather(&other, &x, 0).map(drop),
            c.reduce_scatter_sum(&other, &x, 0).map(drop),
            c.all_to_all_v(&other, &x, &[1, 1]).map(drop),
            c.broadcast(&other, &x, 0).map(drop),
        ];
        let works = down(be, &c.all_reduce_sum(be, &x).unwrap()).1;
        // A tensor of another device with the communicator's backend: NCCL refuses the buffer
        // on rank 0, and the others fail in the same call.
        let foreign = if c.rank() == 0 { up(&other, &values(9, 4), &[2, 2]) } else { x.clone() };
        let start = Instant::now();
        let failed = c.all_reduce_sum(be, &foreign).map(drop);
        (refused, works, failed, start.elapsed())
    });
    let want = rank_order_sum(&[values(0, 4), values(1, 4)]);
    let mut failures = Vec::new();
    for (r, (refused, works, failed, elapsed)) in out.into_iter().enumerate() {
        for (e, kind) in
            refused.into_iter().zip(["all_reduce", "all_gather", "reduce_scatter", "all_to_all_v", "broadcast"])
        {
            let (rank, size, msg) = comm_err(e.expect_err("a backend of another device must be refused"));
            assert_eq!((rank, size), (r, 2), "{msg}");
            let want = format!("{kind} was given a backend on another device than the communicator's (");
            assert!(msg.starts_with(&want), "{msg}");
        }
        assert_eq!(bits(&works), bits(&want), "rank {r}");
        assert!(elapsed < PROMPT, "rank {r} took {elapsed:?}");
        let (rank, size, msg) = comm_err(failed.expect_err("a tensor of another device must fail every rank"));
        assert_eq!((rank, size), (r, 2), "{msg}");
        failures.push(msg);
    }
    assert!(failures[0].starts_with("ncclAllReduce: rank 0 called it with invalid arguments"), "{}", failures[0]);
    assert!(failures[0].contains("belongs to emulated device"), "{}", failures[0]);
    assert_eq!(failures[1], failures[0], "one message on every rank");
}

#[test]
fn an_error_in_one_rank_ends_the_run_with_that_ranks_error() {
    let layout = ParallelLayout { world: 3, tp: 3, ep: 1, ..ParallelLayout::SINGLE };
    let fails = || Error::Input("rank 1 fails on purpose".into());
    let devs = devices(3);

    // The others finish.
    let e = run_ranks(devs.clone(), members(&devs, TIMEOUT), layout, |be: &Gpu, ctx: RankContext<Gpu>| {
        let tp = ctx.tp.unwrap();
        tp.all_reduce_sum(be, &up(be, &[1.0], &[1]))?;
        if ctx.layout.rank == 1 {
            return Err(fails());
        }
        Ok(())
    })
    .unwrap_err();
    assert_eq!(e.to_string(), fails().to_string());

    // The others wait for it in a collective: its communicators go with it, so they fail at
    // once (not after the timeout), and the run's error is still its own.
    let start = Instant::now();
    let e = run_ranks(devs.clone(), members(&devs, TIMEOUT), layout, |be: &Gpu, ctx: RankContext<Gpu>| {
        let tp = ctx.tp.unwrap();
        let x = up(be, &[1.0], &[1]);
        tp.all_reduce_sum(be, &x)?;
        if ctx.layout.rank == 1 {
            return Err(fails());
        }
        tp.all_reduce_sum(be, &x)?;
        tp.all_gather(be, &x, 0)?;
        be.synchronize()?;
        Ok(())
    })
    .unwrap_err();
    assert_eq!(e.to_string(), fails().to_string());
    assert!(start.elapsed() < PROMPT, "{:?}", start.elapsed());

    // A panic is the run's error too.
    let e = run_ranks(devs.clone(), members(&devs, TIMEOUT), layout, |_: &Gpu, ctx: RankContext<Gpu>| {
        if ctx.layout.rank == 2 {
            panic!("rank 2 panics on purpose");
        }
        Ok::<_, Error>(())
    })
    .unwrap_err();
    assert_eq!(comm_err(e), (2, 3, "the worker panicked: rank 2 panics on purpose".to_string()));

    // The number of devices and members must match the layout, and member r must be rank r.
    let e = run_ranks(devs[..2].to_vec(), members(&devs[..2], TIMEOUT), layout, |_: &Gpu, _| Ok::<_, Error>(()))
        .unwrap_err();
    assert!(matches!(&e, Error::Config { field, .. } if field == "devices"), "{e}");
    let e = run_ranks(devs.clone(), members(&devs[..2], TIMEOUT), layout, |_: &Gpu, _| Ok::<_, Error>(())).unwrap_err();
    assert!(matches!(&e, Error::Config { field, .. } if field == "devices"), "{e}");
    let mut reversed = members(&devs, TIMEOUT);
    reversed.reverse();
    let e = run_ranks(devs.clone(), reversed, layout, |_: &Gpu, _| Ok::<_, Error>(())).unwrap_err();
    assert_eq!(comm_err(e), (0, 3, "member 0 of the communicator is rank 2 of 3".to_string()));

    // The devices are still fine for a healthy run.
    let out = run_ranks(devs.clone(), members(&devs, TIMEOUT), layout, |be: &Gpu, ctx: RankContext<Gpu>| {
        let x = up(be, &values(ctx.layout.rank, 3), &[3]);
        Ok::<_, Error>(down(be, &ctx.tp.unwrap().all_reduce_sum(be, &x)?).1)
    })
    .unwrap();
    let want = rank_order_sum(&[values(0, 3), values(1, 3), values(2, 3)]);
    for (r, got) in out.iter().enumerate() {
        assert_eq!(bits(got), bits(&want), "rank {r}");
    }
}

#[test]
fn a_rank_that_leaves_fails_the_others_at_once_naming_it() {
    let start = Instant::now();
    let out = world(4, |be, c| {
        if c.rank() == 2 {
            return None; // drops its communicator
        }
        let t = Instant::now();
        let e = c.all_reduce_sum(be, &up(be, &[1.0], &[1])).map(drop).err();
        Some((e, t.elapsed()))
    });
    assert!(start.elapsed() < PROMPT, "{:?}", start.elapsed());
    for (r, got) in out.into_iter().enumerate() {
        let Some((e, elapsed)) = got else {
            assert_eq!(r, 2);
            continue;
        };
        let (rank, size, msg) = comm_err(e.expect("a collective without rank 2 must fail"));
        assert_eq!((rank, size), (r, 4), "{msg}");
        assert!(msg.starts_with("ncclAllReduce") && msg.contains("rank 2 left the communicator"), "{msg}");
        assert!(elapsed < PROMPT, "rank {r} waited {elapsed:?}");
    }
}

#[test]
fn a_silent_peer_fails_the_others_after_the_communicator_timeout() {
    let timeout = Duration::from_millis(500);
    let done = Barrier::new(2);
    let out = world_with_timeout(2, timeout, |be, c| {
        let x = up(be, &[1.0], &[1]);
        let r = if c.rank() == 0 {
            let start = Instant::now();
            let e = c.all_reduce_sum(be, &x).map(drop).err();
            let elapsed = start.elapsed();
            // After the failure, calls are refused at once.
            let later = c.barrier().err();
            (e, Some(elapsed), later)
        } else {
            (None, None, None)
        };
        // Rank 1 keeps its communicator (alive, as far as rank 0 can tell) and calls only once
        // rank 0 gave up: it arrives at the step that failed.
        done.wait();
        if c.rank() == 1 {
            let start = Instant::now();
            let e = c.all_reduce_sum(be, &x).map(drop).err();
            return (e, Some(start.elapsed()), None);
        }
        r
    });
    let mut out = out.into_iter();
    let (e0, elapsed0, later) = out.next().unwrap();
    let (_, _, m0) = comm_err(e0.expect("rank 0 must time out"));
    let elapsed0 = elapsed0.unwrap();
    assert!(m0.starts_with("ncclAllReduce") && m0.contains("timed out"), "{m0}");
    assert!(m0.contains("rank 1 did not arrive"), "{m0}");
    assert!(elapsed0 >= timeout && elapsed0 < timeout + PROMPT, "rank 0 waited {elapsed0:?}: {m0}");
    let (_, _, refused) = comm_err(later.expect("later calls are refused"));
    assert!(refused.contains("refused") && refused.contains(&m0), "{refused}");
    let (e1, elapsed1, _) = out.next().unwrap();
    let (rank, size, m1) = comm_err(e1.expect("the late rank fails in the step that failed"));
    assert_eq!((rank, size), (1, 2));
    assert_eq!(m1, m0);
    assert!(elapsed1.unwrap() < PROMPT, "{elapsed1:?}");
}

/// The suite on real NCCL (libnccl through cudarc) on the GPUs `DSV4_CUDA_DEVICES` lists
/// (`0,1`), or the one `DSV4_CUDA_DEVICE` names: as many ranks as GPUs (NCCL refuses two ranks
/// on one GPU), so on a one-GPU machine worlds of one rank, which still run every call through
/// the library (`ncclCommInitAll`, the collectives, grouped send/recv, `ncclCommSplit`).
/// `ci/gpu-check.sh` runs it; without either variable each test prints why and passes.
mod gpu {
    use super::*;
    use dsv4_backend_cuda::collective::InitByUniqueId;
    use dsv4_backend_cuda::{DriverDevice, NcclComm};
    use std::sync::OnceLock;

    type RealGpu = CudaBackend<Arc<DriverDevice>>;

    /// The GPUs named in the environment, opened once for the whole binary.
    fn gpus() -> Option<&'static [Arc<DriverDevice>]> {
        static GPUS: OnceLock<Option<Vec<Arc<DriverDevice>>>> = OnceLock::new();
        GPUS.get_or_init(|| {
            let list = std::env::var("DSV4_CUDA_DEVICES").or_else(|_| std::env::var("DSV4_CUDA_DEVICE")).ok()?;
            let ordinals: Vec<usize> = list
                .split(',')
                .map(|o| o.trim().parse().unwrap_or_else(|_| panic!("DSV4_CUDA_DEVICES={list:?}: not ordinals")))
                .collect();
            Some(dsv4_backend_cuda::open_devices(&ordinals).unwrap_or_else(|e| panic!("opening {ordinals:?}: {e}")))
        })
        .as_deref()
    }

    /// Real NCCL on `gpus`: one process's blocking communicator (`ncclCommInitAll`), or, with
    /// `by_id`, each rank joining a non-blocking one from a unique id (`ncclCommInitRankConfig`),
    /// as the ranks of a run over several processes do.
    struct RealNccl {
        gpus: &'static [Arc<DriverDevice>],
        by_id: bool,
    }

    impl World<RealGpu> for RealNccl {
        fn run<R: Send>(&self, n: usize, f: impl Fn(&RealGpu, &dyn Communicator<RealGpu>) -> R + Sync) -> Vec<R> {
            // One world at a time over the GPUs, whatever --test-threads: NCCL documents that
            // communicators used concurrently on one device can deadlock.
            static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
            let devs = &self.gpus[..n];
            let refs: Vec<&DriverDevice> = devs.iter().map(|d| &**d).collect();
            let id = self.by_id.then(|| <NcclComm as InitByUniqueId<DriverDevice>>::unique_id().unwrap());
            let members: Vec<Option<NcclComm>> = match &id {
                None => NcclComm::init_all(&refs).unwrap_or_else(|e| panic!("{e}")).into_iter().map(Some).collect(),
                Some(_) => (0..n).map(|_| None).collect(),
            };
            thread::scope(|s| {
                let handles: Vec<_> = devs
                    .iter()
                    .zip(members)
                    .enumerate()
                    .map(|(r, (dev, member))| {
                        let (f, id) = (&f, &id);
                        s.spawn(move || {
                            let member = member.unwrap_or_else(|| {
                                let id = id.as_ref().unwrap();
                                NcclComm::init_rank_within(dev, id, r, n, Duration::from_secs(60))
                                    .unwrap_or_else(|e| panic!("{e}"))
                            });
                            f(&CudaBackend::new(dev.clone()), &NcclCommunicator::new(dev.clone(), member))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            })
        }

        fn max_ranks(&self) -> usize {
            self.gpus.len()
        }
    }

    fn world() -> Option<RealNccl> {
        world_of(false)
    }

    fn world_of(by_id: bool) -> Option<RealNccl> {
        match gpus() {
            Some(gpus) => Some(RealNccl { gpus, by_id }),
            None => {
                println!("skipped: DSV4_CUDA_DEVICES / DSV4_CUDA_DEVICE not set (no GPU run)");
                None
            }
        }
    }

    #[test]
    fn all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere() {
        let Some(w) = world() else { return };
        collectives::all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere(&w);
    }

    #[test]
    fn all_gather_concatenates_along_any_dim_in_rank_order() {
        let Some(w) = world() else { return };
        collectives::all_gather_concatenates_along_any_dim_in_rank_order(&w);
    }

    #[test]
    fn reduce_scatter_gives_rank_r_part_r_of_the_sum() {
        let Some(w) = world() else { return };
        collectives::reduce_scatter_gives_rank_r_part_r_of_the_sum(&w);
    }

    #[test]
    fn all_to_all_v_routes_rows_with_empty_parts() {
        let Some(w) = world() else { return };
        collectives::all_to_all_v_routes_rows_with_empty_parts(&w);
    }

    #[test]
    fn broadcast_from_every_root() {
        let Some(w) = world() else { return };
        collectives::broadcast_from_every_root(&w);
    }

    /// Barriers and a split into one group per rank (`ncclCommSplit`), whose members then
    /// all-reduce alone: their own values back, bit for bit.
    #[test]
    fn splits_and_barriers() {
        let Some(w) = world() else { return };
        let n = w.max_ranks();
        let out = w.run(n, |be, c| {
            c.barrier().unwrap();
            let alone = c.split(c.rank()).unwrap();
            assert_eq!((alone.rank(), alone.size()), (0, 1));
            let x = up(be, &values(c.rank(), 6), &[2, 3]);
            let sum = down(be, &alone.all_reduce_sum(be, &x).unwrap()).1;
            c.barrier().unwrap();
            sum
        });
        for (r, sum) in out.iter().enumerate() {
            assert_eq!(bits(sum), bits(&values(r, 6)), "rank {r}");
        }
    }

    /// The suite and the splits over non-blocking communicators joined by unique id: every
    /// call settled by polling.
    #[test]
    fn joined_by_unique_id_the_suite_and_splits_hold() {
        let Some(w) = world_of(true) else { return };
        collectives::all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere(&w);
        collectives::all_gather_concatenates_along_any_dim_in_rank_order(&w);
        collectives::reduce_scatter_gives_rank_r_part_r_of_the_sum(&w);
        collectives::all_to_all_v_routes_rows_with_empty_parts(&w);
        collectives::broadcast_from_every_root(&w);
        let n = w.max_ranks();
        let out = w.run(n, |be, c| {
            let alone = c.split(c.rank()).unwrap();
            let x = up(be, &values(c.rank(), 6), &[2, 3]);
            down(be, &alone.all_reduce_sum(be, &x).unwrap()).1
        });
        for (r, sum) in out.iter().enumerate() {
            assert_eq!(bits(sum), bits(&values(r, 6)), "rank {r}");
        }
    }

    /// A world one of whose ranks never joins (its process died before): the rank that did
    /// join fails once the timeout has passed, saying so, instead of waiting for ever.
    #[test]
    fn a_rank_that_never_joins_fails_the_others_after_the_timeout() {
        let Some(gpus) = gpus() else {
            println!("skipped: DSV4_CUDA_DEVICES / DSV4_CUDA_DEVICE not set (no GPU run)");
            return;
        };
        let id = <NcclComm as InitByUniqueId<DriverDevice>>::unique_id().unwrap();
        let t = Instant::now();
        let e = NcclComm::init_rank_within(&gpus[0], &id, 0, 2, Duration::from_secs(3)).map(drop).unwrap_err();
        let took = t.elapsed();
        let e = e.to_string();
        assert!(e.contains("did not finish within 3 s") && e.contains("rank 0 of 2"), "{e}");
        assert!(took >= Duration::from_secs(3) && took < Duration::from_secs(20), "took {took:?}");
    }
}
