//! The in-process communicator (`dsv4_core::parallel::LocalComm`) on the CPU backend: every
//! collective on 1–4 ranks against a host reference, subgroups, and the strict failure rules
//! (misuse, a rank that leaves or panics, timeouts, poisoning), plus traffic counts.

use std::sync::Arc;

use dsv4_tests::collectives::{self, bits, comm_err, down, numel, rank_order_sum, up, values, World};
use std::thread;
use std::time::{Duration, Instant};

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::parallel::{CollectiveKind, Communicator, LocalComm, Traffic};
use dsv4_core::Error;

/// Runs `f(comm, backend)` for every rank of `world` on its own thread; results in rank order.
fn on_ranks<R: Send>(world: Vec<LocalComm>, f: impl Fn(LocalComm, &CpuBackend) -> R + Sync) -> Vec<R> {
    let be = CpuBackend::new();
    thread::scope(|s| {
        let handles: Vec<_> = world.into_iter().map(|c| s.spawn(|| f(c, &be))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The shared suite's world: a new in-process world of CPU ranks.
struct InProcess;

impl World<CpuBackend> for InProcess {
    fn run<R: Send>(&self, n: usize, f: impl Fn(&CpuBackend, &dyn Communicator<CpuBackend>) -> R + Sync) -> Vec<R> {
        on_ranks(LocalComm::world(n), |c, be| f(be, &c))
    }
}

#[test]
fn all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere() {
    collectives::all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere(&InProcess);
}

#[test]
fn all_gather_concatenates_along_any_dim_in_rank_order() {
    collectives::all_gather_concatenates_along_any_dim_in_rank_order(&InProcess);
}

#[test]
fn reduce_scatter_gives_rank_r_part_r_of_the_sum() {
    collectives::reduce_scatter_gives_rank_r_part_r_of_the_sum(&InProcess);
}

#[test]
fn all_to_all_v_routes_rows_with_empty_parts() {
    collectives::all_to_all_v_routes_rows_with_empty_parts(&InProcess);
}

#[test]
fn broadcast_from_every_root() {
    collectives::broadcast_from_every_root(&InProcess);
}

#[test]
fn split_subgroups_run_collectives_concurrently() {
    let out = on_ranks(LocalComm::world(4), |c, be| {
        let colour = c.rank() % 2;
        // The trait's split (boxed), as the engine uses it.
        let sub: Box<dyn Communicator<CpuBackend>> = Communicator::<CpuBackend>::split(&c, colour).unwrap();
        let x = up(be, &values(c.rank(), 4), &[4]);
        let mut sums = Vec::new();
        for _ in 0..20 {
            sums.push(down(be, &sub.all_reduce_sum(be, &x).unwrap()).1);
        }
        let gathered = down(be, &sub.all_gather(be, &x, 0).unwrap()).1;
        (colour, sub.rank(), sub.size(), sums, gathered)
    });
    for (r, (colour, sub_rank, sub_size, sums, gathered)) in out.into_iter().enumerate() {
        assert_eq!((colour, sub_rank, sub_size), (r % 2, r / 2, 2));
        let members = [colour, colour + 2];
        let want = rank_order_sum(&[values(members[0], 4), values(members[1], 4)]);
        for s in &sums {
            assert_eq!(bits(s), bits(&want));
        }
        assert_eq!(gathered, [values(members[0], 4), values(members[1], 4)].concat());
    }
}

#[test]
fn a_shared_rank_works_through_an_arc() {
    let world: Vec<Arc<LocalComm>> = LocalComm::world(2).into_iter().map(Arc::new).collect();
    let handles: Vec<_> = world
        .iter()
        .map(|c| {
            let c = Arc::clone(c);
            thread::spawn(move || {
                let be = CpuBackend::new();
                let x = up(&be, &[c.rank() as f32 + 1.0], &[1]);
                down(&be, &c.all_reduce_sum(&be, &x).unwrap()).1
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), vec![3.0]);
    }
}

/// Runs one misuse on `n` ranks; every rank must fail with a communicator error, each from
/// its own rank.
fn misuse(n: usize, f: impl Fn(&LocalComm, &CpuBackend) -> Result<(), Error> + Sync) -> Vec<String> {
    let out = on_ranks(LocalComm::world_with_timeout(n, Duration::from_secs(20)), |c, be| {
        let t = Instant::now();
        let e = f(&c, be).expect_err("the misuse must fail on every rank");
        assert!(t.elapsed() < Duration::from_secs(2), "failing took {:?}", t.elapsed());
        let (rank, size, msg) = comm_err(e);
        assert_eq!((rank, size), (c.rank(), n));
        msg
    });
    out
}

#[test]
fn different_collectives_fail_on_every_rank_naming_what_each_called() {
    let msgs = misuse(3, |c, be| {
        let x = up(be, &[1.0, 2.0], &[2]);
        match c.rank() {
            1 => c.all_gather(be, &x, 0).map(drop),
            _ => c.all_reduce_sum(be, &x).map(drop),
        }
    });
    for m in msgs {
        assert_eq!(
            m,
            "ranks called different collectives at the same step: rank 0 all_reduce, rank 1 all_gather, rank 2 all_reduce"
        );
    }
}

#[test]
fn mismatched_shapes_fail_on_every_rank_naming_the_numbers() {
    let msgs = misuse(2, |c, be| {
        let shape = [[2, 3], [2, 4]][c.rank()];
        c.all_reduce_sum(be, &up(be, &vec![0.5; numel(&shape)], &shape)).map(drop)
    });
    for m in msgs {
        assert_eq!(m, "all_reduce: the ranks' shapes differ: rank 0 [2, 3] (6 values), rank 1 [2, 4] (8 values)");
    }
    let msgs = misuse(2, |c, be| {
        let shape = [[2, 3], [3, 4]][c.rank()];
        c.all_gather(be, &up(be, &vec![0.5; numel(&shape)], &shape), 0).map(drop)
    });
    for m in msgs {
        assert_eq!(
            m,
            "all_gather: the ranks' shapes differ outside dim 0: rank 0 [2, 3] (6 values), rank 1 [3, 4] (12 values)"
        );
    }
    let msgs = misuse(3, |c, be| c.all_gather(be, &up(be, &[0.0; 4], &[2, 2]), c.rank().min(1)).map(drop));
    for m in msgs {
        assert_eq!(m, "all_gather: the ranks disagree on dim: rank 0 0, rank 1 1, rank 2 1");
    }
    let msgs = misuse(2, |c, be| {
        let shape: &[usize] = [&[1, 4][..], &[1, 2, 2]][c.rank()];
        c.all_to_all_v(be, &up(be, &[0.0; 4], shape), &[1, 0]).map(drop)
    });
    for m in msgs {
        assert!(m.starts_with("all_to_all_v: the ranks' rows differ"), "{m}");
        assert!(m.contains("rank 0 [4] (4), rank 1 [2, 2] (4)"), "{m}");
    }
}

#[test]
fn mismatched_or_bad_roots_fail_on_every_rank() {
    let msgs = misuse(3, |c, be| c.broadcast(be, &up(be, &[1.0], &[1]), c.rank() % 2).map(drop));
    for m in msgs {
        assert_eq!(m, "broadcast: the ranks disagree on the root: rank 0 0, rank 1 1, rank 2 0");
    }
    let msgs = misuse(3, |c, be| {
        let root = if c.rank() == 1 { 5 } else { 0 };
        c.broadcast(be, &up(be, &[1.0], &[1]), root).map(drop)
    });
    for m in msgs {
        assert_eq!(m, "rank 1 called broadcast with invalid arguments: root 5 is not a rank of 3");
    }
}

#[test]
fn bad_arguments_fail_on_every_rank() {
    let msgs = misuse(3, |c, be| {
        let x = up(be, &[0.0; 6], &[3, 2]);
        let send: &[usize] = if c.rank() == 0 { &[1, 2] } else { &[1, 1, 1] };
        c.all_to_all_v(be, &x, send).map(drop)
    });
    for m in msgs {
        assert_eq!(m, "rank 0 called all_to_all_v with invalid arguments: 2 send_rows for 3 ranks");
    }
    let msgs = misuse(2, |c, be| {
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
    let msgs = misuse(2, |c, be| c.all_gather(be, &up(be, &[0.0; 6], &[3, 2]), 2 * c.rank()).map(drop));
    for m in msgs {
        assert_eq!(m, "rank 1 called all_gather with invalid arguments: dim 2 is out of range for shape [3, 2]");
    }
    let msgs = misuse(2, |c, be| c.reduce_scatter_sum(be, &up(be, &[0.0; 6], &[3, 2]), 0).map(drop));
    for m in msgs {
        // Both ranks find it; whichever poisons first is the reason every rank reports.
        assert!(m.ends_with("called reduce_scatter with invalid arguments: dim 0 of shape [3, 2] has size 3, not a multiple of the 2 ranks"), "{m}");
    }
}

#[test]
fn the_rank_with_bad_arguments_is_refused_afterwards() {
    let out = on_ranks(LocalComm::world(2), |c, be| {
        let x = up(be, &[1.0], &[1]);
        let first = comm_err(c.all_gather(be, &x, c.rank()).unwrap_err()).2;
        let later = comm_err(c.all_reduce_sum(be, &x).unwrap_err()).2;
        (first, later)
    });
    let reason = "rank 1 called all_gather with invalid arguments: dim 1 is out of range for shape [1]";
    for (first, later) in out {
        assert_eq!(first, reason);
        assert_eq!(later, format!("all_reduce refused: the communicator failed earlier: {reason}"));
    }
}

#[test]
fn a_rank_that_returns_without_calling_fails_the_others_naming_it() {
    let start = Instant::now();
    let out = on_ranks(LocalComm::world(4), |c, be| {
        if c.rank() == 2 {
            return None; // drops its LocalComm
        }
        let t = Instant::now();
        let e = c.all_reduce_sum(be, &up(be, &[1.0], &[1])).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        Some(comm_err(e).2)
    });
    assert!(start.elapsed() < Duration::from_secs(2));
    for m in out.into_iter().flatten() {
        assert_eq!(m, "rank 2 left the communicator (its worker stopped) during all_reduce");
    }
}

#[test]
fn a_rank_that_waits_while_its_peer_leaves_gets_the_during_message() {
    let out = on_ranks(LocalComm::world(2), |c, be| {
        if c.rank() == 1 {
            thread::sleep(Duration::from_millis(300));
            return None;
        }
        Some(comm_err(c.all_reduce_sum(be, &up(be, &[1.0], &[1])).unwrap_err()).2)
    });
    assert_eq!(out[0].as_deref(), Some("rank 1 left the communicator (its worker stopped) during all_reduce"));
}

#[test]
fn a_rank_that_panics_fails_the_others() {
    let handles: Vec<_> = LocalComm::world(3)
        .into_iter()
        .map(|c| {
            thread::spawn(move || {
                let be = CpuBackend::new();
                let x = up(&be, &[1.0, 2.0], &[2]);
                c.all_reduce_sum(&be, &x).unwrap();
                if c.rank() == 1 {
                    panic!("worker 1 fails on purpose");
                }
                let t = Instant::now();
                let e = c.all_reduce_sum(&be, &x).unwrap_err();
                assert!(t.elapsed() < Duration::from_secs(2));
                comm_err(e).2
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
    assert!(results[1].is_err(), "rank 1 panicked");
    for r in [0, 2] {
        let m = results[r].as_ref().unwrap();
        assert_eq!(m, "rank 1 left the communicator (its worker stopped) during all_reduce");
    }
}

#[test]
fn a_rank_that_never_calls_times_the_others_out() {
    let out = on_ranks(LocalComm::world_with_timeout(3, Duration::from_millis(200)), |c, be| {
        let x = up(be, &[1.0], &[1]);
        if c.rank() == 0 {
            // Alive but late: its call comes after the others gave up.
            thread::sleep(Duration::from_millis(700));
        }
        let t = Instant::now();
        let m = comm_err(c.all_gather(be, &x, 0).unwrap_err()).2;
        assert!(t.elapsed() < Duration::from_secs(2));
        m
    });
    // The late rank arrives at the step that failed, so it gets the same message.
    for m in &out {
        assert_eq!(m, "all_gather timed out after 200ms: rank 0 did not call it (ranks 1 and 2 did)");
    }
}

#[test]
fn a_failure_poisons_every_later_collective() {
    let out = on_ranks(LocalComm::world(2), |c, be| {
        let x = up(be, &[1.0, 2.0], &[2]);
        assert_eq!(down(be, &c.all_reduce_sum(be, &x).unwrap()).1, vec![2.0, 4.0]);
        let first = comm_err(c.broadcast(be, &x, c.rank()).unwrap_err()).2;
        // Well-formed calls now fail at once with the original reason.
        let t = Instant::now();
        let later = [
            comm_err(c.all_reduce_sum(be, &x).unwrap_err()).2,
            comm_err(c.barrier().unwrap_err()).2,
            comm_err(c.split(0).unwrap_err()).2,
        ];
        assert!(t.elapsed() < Duration::from_millis(100));
        (first, later)
    });
    for (first, later) in out {
        assert_eq!(first, "broadcast: the ranks disagree on the root: rank 0 0, rank 1 1");
        for (m, kind) in later.iter().zip(["all_reduce", "barrier", "split"]) {
            assert_eq!(m, &format!("{kind} refused: the communicator failed earlier: {first}"));
        }
    }
}

#[test]
fn traffic_counts_calls_and_payload_bytes_per_rank() {
    let out = on_ranks(LocalComm::world(3), |c, be| {
        let r = c.rank();
        c.all_reduce_sum(be, &up(be, &[0.0; 6], &[2, 3])).unwrap();
        c.all_reduce_sum(be, &up(be, &[0.0; 6], &[2, 3])).unwrap();
        c.all_gather(be, &up(be, &vec![0.0; (r + 1) * 2], &[r + 1, 2]), 0).unwrap();
        c.reduce_scatter_sum(be, &up(be, &[0.0; 12], &[3, 4]), 0).unwrap();
        // Rank r sends r+1 rows of width 2 to each rank (itself included).
        let rows = 3 * (r + 1);
        c.all_to_all_v(be, &up(be, &vec![0.0; rows * 2], &[rows, 2]), &[r + 1; 3]).unwrap();
        c.broadcast(be, &up(be, &[0.0; 5], &[5]), 1).unwrap();
        c.barrier().unwrap();
        let sub = c.split(0).unwrap();
        sub.barrier().unwrap();
        (c.traffic(), sub.traffic())
    });
    for (r, (t, sub)) in out.into_iter().enumerate() {
        let mut want = Traffic::default();
        for (kind, calls, bytes) in [
            (CollectiveKind::AllReduce, 2, 2 * 6 * 4),
            (CollectiveKind::AllGather, 1, (r + 1) * 2 * 4),
            (CollectiveKind::ReduceScatter, 1, 12 * 4),
            (CollectiveKind::AllToAllV, 1, 2 * (r + 1) * 2 * 4),
            (CollectiveKind::Broadcast, 1, if r == 1 { 20 } else { 0 }),
            (CollectiveKind::Barrier, 1, 0),
            (CollectiveKind::Split, 1, 0),
        ] {
            want.by_kind.insert(kind, (calls, bytes as u64));
        }
        assert_eq!(t, want, "rank {r}");
        assert_eq!(t.calls(), 6, "rank {r}");
        assert_eq!(sub.by_kind.into_iter().collect::<Vec<_>>(), vec![(CollectiveKind::Barrier, (1, 0))]);
    }
}
