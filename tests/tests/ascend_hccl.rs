//! The HCCL communicator (`dsv4_backend_ascend::HcclCommunicator`) and its launcher
//! (`run_ranks`) on the emulator's HCCL, with one emulated device per rank: every collective on
//! 1–4 ranks against a host reference (all-reduce with the same bits on every rank), subgroups
//! working concurrently, the TP / EP groups of a 2 × 2 layout, traffic counted exactly like the
//! in-process communicator, errors (the failing rank's own error ends the run; invalid arguments
//! and disagreeing shapes fail on every rank; HCCL's own failures name the status), and the
//! actionable error when no HCCL library exists. Emulator-verified, not hardware-verified.

use std::sync::{Barrier, Mutex, MutexGuard};

use dsv4_tests::collectives::{self, bits, comm_err, concat, down, numel, rank_order_sum, up, values, World};
use std::thread;
use std::time::{Duration, Instant};

use dsv4_ascend_sys::hccl::HcclRootInfo;
use dsv4_backend_ascend::{run_ranks, AscendBackend, HcclCommunicator};
use dsv4_backend_cpu::CpuBackend;
use dsv4_core::backend::Backend;
use dsv4_core::parallel::{CollectiveKind, Communicator, LocalComm, ParallelLayout, Traffic};
use dsv4_core::Error;

const DEVICES: usize = 4;
const CHILD_VAR: &str = "DSV4_TEST_HCCL_CHILD";
const HCCL_TIMEOUT_VAR: &str = "DSV4_ASCEND_EMU_HCCL_TIMEOUT_S";

/// The tests of this binary take turns on an emulator with one device per rank.
fn emulator() -> MutexGuard<'static, ()> {
    dsv4_tests::emulated_devices(DEVICES)
}

/// `n` ranks of one world communicator, each on its own thread and device (0..n), made with
/// the public root-info API; `f(backend, communicator)` per rank, results in rank order.
fn world<R: Send>(n: usize, f: impl Fn(&AscendBackend, HcclCommunicator) -> R + Sync) -> Vec<R> {
    let root: Mutex<Option<HcclRootInfo>> = Mutex::new(None);
    let opened = Barrier::new(n);
    thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let (root, opened, f) = (&root, &opened, &f);
                s.spawn(move || {
                    let be = dsv4_backend_ascend::open(r).unwrap();
                    if r == 0 {
                        *root.lock().unwrap() = Some(HcclCommunicator::root_info(&be, n).unwrap());
                    }
                    opened.wait();
                    let info = root.lock().unwrap().expect("rank 0 made the root info");
                    let c = HcclCommunicator::init_rank(&be, &info, r, n).unwrap();
                    assert_eq!(
                        (Communicator::<AscendBackend>::rank(&c), Communicator::<AscendBackend>::size(&c)),
                        (r, n)
                    );
                    f(&be, c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The shared suite's world: [`world`]'s emulated devices and HCCL, one test at a time.
struct EmulatedHccl;

impl World<AscendBackend> for EmulatedHccl {
    fn run<R: Send>(
        &self,
        n: usize,
        f: impl Fn(&AscendBackend, &dyn Communicator<AscendBackend>) -> R + Sync,
    ) -> Vec<R> {
        let _emu = emulator();
        world(n, |be, c| f(be, &c))
    }
}

#[test]
fn all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere() {
    collectives::all_reduce_is_the_rank_order_sum_with_the_same_bits_everywhere(&EmulatedHccl);
}

#[test]
fn all_gather_concatenates_along_any_dim_in_rank_order() {
    collectives::all_gather_concatenates_along_any_dim_in_rank_order(&EmulatedHccl);
}

#[test]
fn reduce_scatter_gives_rank_r_part_r_of_the_sum() {
    collectives::reduce_scatter_gives_rank_r_part_r_of_the_sum(&EmulatedHccl);
}

#[test]
fn all_to_all_v_routes_rows_with_empty_parts() {
    collectives::all_to_all_v_routes_rows_with_empty_parts(&EmulatedHccl);
}

#[test]
fn broadcast_from_every_root() {
    collectives::broadcast_from_every_root(&EmulatedHccl);
}

#[test]
fn barriers_and_splits_subgroups_run_collectives_concurrently() {
    let _emu = emulator();
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
        // A split of the subgroup (made from the global communicator): one group per rank.
        let single = sub.split(sub.rank()).unwrap();
        let alone = down(be, &single.all_reduce_sum(be, &x).unwrap()).1;
        // The world still works after the splits.
        let total = down(be, &c.all_reduce_sum(be, &x).unwrap()).1;
        (colour, sub.rank(), sub.size(), (single.rank(), single.size()), sums, gathered, alone, total)
    });
    let all: Vec<Vec<f32>> = (0..4).map(|r| values(r, 4)).collect();
    for (r, (colour, sub_rank, sub_size, single, sums, gathered, alone, total)) in out.into_iter().enumerate() {
        assert_eq!((colour, sub_rank, sub_size, single), (r % 2, r / 2, 2, (0, 1)));
        let members = [colour, colour + 2];
        let want = rank_order_sum(&[values(members[0], 4), values(members[1], 4)]);
        for s in &sums {
            assert_eq!(bits(s), bits(&want), "rank {r}");
        }
        assert_eq!(gathered, [values(members[0], 4), values(members[1], 4)].concat());
        assert_eq!(alone, values(r, 4));
        assert_eq!(bits(&total), bits(&rank_order_sum(&all)));
    }
}

#[test]
fn run_ranks_gives_every_rank_its_tp_and_ep_groups() {
    let _emu = emulator();
    // 2 × 2 mesh: TP groups {0,1},{2,3}; EP groups {0,2},{1,3}.
    let layout = ParallelLayout { world: 4, tp: 2, ep: 2, ..ParallelLayout::SINGLE };
    let out = run_ranks(&[0, 1, 2, 3], layout, |be, ctx| {
        let (tp, ep) = (ctx.tp.clone().unwrap(), ctx.ep.clone().unwrap());
        let x = up(be, &values(ctx.layout.rank, 6), &[2, 3]);
        let tp_sum = down(be, &tp.all_reduce_sum(be, &x)?).1;
        let ep_sum = down(be, &ep.all_reduce_sum(be, &x)?).1;
        let logits = down(be, &tp.all_gather(be, &x, 1)?);
        Ok::<_, Error>((be.describe(), (tp.rank(), tp.size()), (ep.rank(), ep.size()), tp_sum, ep_sum, logits))
    })
    .unwrap();
    for (r, (describe, tp, ep, tp_sum, ep_sum, (shape, logits))) in out.into_iter().enumerate() {
        assert!(describe.contains(&format!("device {r}")), "{describe}");
        assert_eq!((tp, ep), ((r % 2, 2), (r / 2, 2)));
        let tp_members = [r / 2 * 2, r / 2 * 2 + 1];
        let ep_members = [r % 2, r % 2 + 2];
        assert_eq!(bits(&tp_sum), bits(&rank_order_sum(&[values(tp_members[0], 6), values(tp_members[1], 6)])));
        assert_eq!(bits(&ep_sum), bits(&rank_order_sum(&[values(ep_members[0], 6), values(ep_members[1], 6)])));
        let parts: Vec<_> = tp_members.iter().map(|&m| (vec![2, 3], values(m, 6))).collect();
        assert_eq!((shape, logits), concat(&parts, 1));
    }
}

#[test]
fn traffic_is_counted_exactly_like_the_in_process_communicator() {
    let _emu = emulator();
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
    let hccl = world(3, |be, c| calls(be, &c));
    let cpu = CpuBackend::new();
    let local: Vec<(Traffic, Traffic)> = thread::scope(|s| {
        let handles: Vec<_> =
            LocalComm::world(3).into_iter().map(|c| s.spawn(|| calls::<CpuBackend>(&cpu, &{ c }))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(hccl, local);
    for (r, (t, sub)) in hccl.into_iter().enumerate() {
        assert_eq!(t.by_kind[&CollectiveKind::AllToAllV], (1, 2 * (r as u64 + 1) * 2 * 4), "rank {r}");
        assert_eq!(t.by_kind[&CollectiveKind::Broadcast], (1, if r == 1 { 20 } else { 0 }), "rank {r}");
        assert_eq!(t.calls(), 6, "rank {r}");
        assert_eq!(sub.by_kind.into_iter().collect::<Vec<_>>(), vec![(CollectiveKind::Barrier, (1, 0))]);
    }
}

#[test]
fn invalid_arguments_and_disagreeing_shapes_fail_on_every_rank_with_one_message() {
    let _emu = emulator();
    let expect_all = |out: Vec<Result<(), Error>>, n: usize| -> Vec<String> {
        out.into_iter()
            .enumerate()
            .map(|(r, e)| {
                let (rank, size, msg) = comm_err(e.expect_err("the misuse must fail on every rank"));
                assert_eq!((rank, size), (r, n));
                msg
            })
            .collect()
    };
    let msgs = expect_all(
        world(3, |be, c| {
            let x = up(be, &[0.0; 6], &[3, 2]);
            let send: &[usize] = if c.rank() == 0 { &[1, 2] } else { &[1, 1, 1] };
            c.all_to_all_v(be, &x, send).map(drop)
        }),
        3,
    );
    for m in msgs {
        assert_eq!(m, "rank 0 called all_to_all_v with invalid arguments: 2 send_rows for 3 ranks");
    }
    let msgs = expect_all(world(2, |be, c| c.all_gather(be, &up(be, &[0.0; 6], &[3, 2]), 2 * c.rank()).map(drop)), 2);
    for m in msgs {
        assert_eq!(m, "rank 1 called all_gather with invalid arguments: dim 2 is out of range for shape [3, 2]");
    }
    let msgs = expect_all(
        world(2, |be, c| {
            let shape = [[2, 3], [3, 4]][c.rank()];
            c.all_gather(be, &up(be, &vec![0.5; numel(&shape)], &shape), 0).map(drop)
        }),
        2,
    );
    for m in msgs {
        assert_eq!(
            m,
            "all_gather: the ranks' shapes differ outside dim 0: rank 0 [2, 3] (6 values), rank 1 [3, 4] (12 values)"
        );
    }
    let msgs = expect_all(
        world(2, |be, c| {
            let x = up(be, &[0.0; 4], &[2, 2]);
            if c.rank() == 1 {
                c.split(0).map(drop)
            } else {
                c.all_gather(be, &x, 0).map(drop)
            }
        }),
        2,
    );
    for m in msgs {
        assert_eq!(m, "ranks called different collectives at the same step: rank 0 all_gather, rank 1 split");
    }
}

#[test]
fn hccl_failures_are_communicator_errors_naming_the_status() {
    let _emu = emulator();
    // All-reduce is not checked by dsv4 across ranks: HCCL (the emulator) finds the counts
    // disagree and fails every rank.
    let out = world(2, |be, c| {
        let shape = [[2, 3], [2, 4]][c.rank()];
        let first = c.all_reduce_sum(be, &up(be, &vec![0.5; numel(&shape)], &shape)).map(drop);
        let later = c.all_reduce_sum(be, &up(be, &[1.0], &[1])).map(drop);
        (first, later)
    });
    for (r, (first, later)) in out.into_iter().enumerate() {
        let (rank, size, msg) = comm_err(first.unwrap_err());
        assert_eq!((rank, size), (r, 2));
        assert!(msg.starts_with("HcclAllReduce failed with HCCL_E_PARA (1)"), "{msg}");
        assert!(msg.contains('6') && msg.contains('8'), "the counts are named: {msg}");
        let (_, _, msg) = comm_err(later.unwrap_err());
        assert!(msg.starts_with("HcclAllReduce failed with HCCL_E_PARA (1)"), "{msg}");
    }
}

#[test]
fn an_error_in_one_rank_ends_the_run_with_that_ranks_error() {
    let _emu = emulator();
    let layout = ParallelLayout { world: 3, tp: 3, ep: 1, ..ParallelLayout::SINGLE };
    let fails = || Error::Input("rank 1 fails on purpose".into());
    // The others finish.
    let e = run_ranks(&[0, 1, 2], layout, |be, ctx| {
        let tp = ctx.tp.unwrap();
        tp.all_reduce_sum(be, &up(be, &[1.0], &[1]))?;
        if ctx.layout.rank == 1 {
            return Err(fails());
        }
        Ok(())
    })
    .unwrap_err();
    assert_eq!(e.to_string(), fails().to_string());

    // The others wait for it in a collective until HCCL gives up (after DSV4_COMM_TIMEOUT_S,
    // the communicators' hcclExecTimeOut): still its error.
    let saved = std::env::var_os(HCCL_TIMEOUT_VAR);
    let saved_comm = std::env::var_os(dsv4_core::parallel::local::TIMEOUT_ENV);
    std::env::set_var(HCCL_TIMEOUT_VAR, "1");
    std::env::set_var(dsv4_core::parallel::local::TIMEOUT_ENV, "1");
    let start = Instant::now();
    let e = run_ranks(&[0, 1, 2], layout, |be, ctx| {
        let tp = ctx.tp.unwrap();
        let x = up(be, &[1.0], &[1]);
        tp.all_reduce_sum(be, &x)?;
        if ctx.layout.rank == 1 {
            return Err(fails());
        }
        tp.all_reduce_sum(be, &x)?;
        be.synchronize()?;
        Ok(())
    })
    .unwrap_err();
    match saved {
        Some(v) => std::env::set_var(HCCL_TIMEOUT_VAR, v),
        None => std::env::remove_var(HCCL_TIMEOUT_VAR),
    }
    match saved_comm {
        Some(v) => std::env::set_var(dsv4_core::parallel::local::TIMEOUT_ENV, v),
        None => std::env::remove_var(dsv4_core::parallel::local::TIMEOUT_ENV),
    }
    assert_eq!(e.to_string(), fails().to_string());
    assert!(start.elapsed() < Duration::from_secs(60), "{:?}", start.elapsed());

    // A rank whose device does not exist: the others never join the communicator.
    let start = Instant::now();
    let e = run_ranks(&[0, 1, 77], layout, |_, _| Ok::<_, Error>(())).unwrap_err().to_string();
    assert!(e.contains("device 77 does not exist"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(60), "{:?}", start.elapsed());

    // A panic is the run's error too.
    let e = run_ranks(&[0, 1, 2], layout, |_, ctx| {
        if ctx.layout.rank == 2 {
            panic!("rank 2 panics on purpose");
        }
        Ok::<_, Error>(())
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("rank 2 panics on purpose"), "{e}");

    // The number of devices must match the layout.
    let e = run_ranks(&[0, 1], layout, |_, _| Ok::<_, Error>(())).unwrap_err();
    assert!(matches!(&e, Error::Config { field, .. } if field == "devices"), "{e}");
}

#[test]
fn without_hccl_making_a_communicator_is_an_actionable_error() {
    if std::env::var_os(CHILD_VAR).is_some() {
        // The child: no emulator, no CANN.
        let layout = ParallelLayout { world: 2, tp: 2, ep: 1, ..ParallelLayout::SINGLE };
        let e = run_ranks(&[0, 1], layout, |_, _| Ok::<_, Error>(())).unwrap_err().to_string();
        for want in ["libhccl.so", "HCCL_SO_PATH", "ASCEND_TOOLKIT_HOME", "DSV4_ASCEND_EMULATOR"] {
            assert!(e.contains(want), "{want} in {e}");
        }
        return;
    }
    // A machine with CANN installed has the library: nothing to check there.
    if dsv4_ascend_sys::hccl::Hccl::load_toolkit().is_ok() || dsv4_ascend_sys::load_runtime().is_ok() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args([
        "--exact",
        "without_hccl_making_a_communicator_is_an_actionable_error",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD_VAR, "1")
    .env_remove(dsv4_ascend_sys::EMULATOR_VAR)
    .env_remove(dsv4_ascend_sys::hccl::SO_PATH_VAR);
    for var in dsv4_ascend_sys::TOOLKIT_VARS {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "the child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn a_dead_peer_fails_the_others_after_the_communicator_timeout() {
    const TEST: &str = "a_dead_peer_fails_the_others_after_the_communicator_timeout";
    if std::env::var_os(CHILD_VAR).is_some() {
        // The child: DSV4_COMM_TIMEOUT_S=1, the emulator's own HCCL timeout 60 s. Only the
        // communicator config (`hcclExecTimeOut`) can make rank 0 give up within seconds.
        let _emu = emulator();
        let done = Barrier::new(2);
        let out = world(2, |be, c| {
            let r = if Communicator::<AscendBackend>::rank(&c) == 0 {
                let start = Instant::now();
                let e = c.all_reduce_sum(be, &up(be, &[1.0], &[1])).map(|_| ()).unwrap_err();
                Some((start.elapsed(), e.to_string()))
            } else {
                // Rank 1 never calls the collective but keeps its communicator until rank 0
                // gave up (a dead rank, as far as rank 0 can tell).
                None
            };
            done.wait();
            r
        });
        let (elapsed, e) = out[0].clone().expect("rank 0");
        assert!(e.contains("HCCL_E_TIMEOUT") && e.contains("hcclExecTimeOut"), "{e}");
        assert!(elapsed < Duration::from_secs(20), "rank 0 waited {elapsed:?}: {e}");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, "1")
        .env(dsv4_core::parallel::local::TIMEOUT_ENV, "1")
        .env(HCCL_TIMEOUT_VAR, "60")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "{}", String::from_utf8_lossy(&out.stdout));
}
