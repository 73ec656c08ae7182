//! A CUDA run over several processes (nodes) (issue 14): the processes meet over `NodeGroup`'s
//! TCP rendezvous, node 0's NCCL unique id reaches the others over it, and every rank joins one
//! communicator with its global rank (`ncclCommInitRank`). Here the "nodes" are threads of one
//! test process, each with its own `NodeGroup` (real TCP on the loopback) and its own emulated
//! GPUs, because the emulator's NCCL lives in one process; what crosses the socket is what would
//! cross it between hosts (the id's 128 bytes). Emulator-verified, not run on GPUs.
//!
//! Tolerance 1e-5 relative against one GPU, as in `cuda_parallel.rs` (splitting only reorders
//! f32 sums); every rank, on either node, must hold rank 0's bits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dsv4_backend_cuda::{node_unique_id, run_node_ranks, CudaBackend};
use dsv4_core::parallel::{ParallelLayout, RankContext};
use dsv4_core::{Checkpoint, Model, ModelConfig};
use dsv4_cuda_emu::{EmuComm, EmulatedDevice};
use dsv4_tests::nodes::on_nodes;
use dsv4_tests::{assert_ranks_match_one_device, case_kv_dtype, fixture_cases, prefill_and_decode, read_reference};

const TOLERANCE: f64 = 1e-5;
const DECODE_STEPS: usize = 8;

type Gpu = CudaBackend<Arc<EmulatedDevice>>;

fn gpus(n: usize) -> Vec<Arc<EmulatedDevice>> {
    (0..n).map(|_| Arc::new(EmulatedDevice::new())).collect()
}

#[test]
fn two_nodes_of_two_gpus_equal_one_gpu() {
    // The first fixture and the last (different configs); the full matrix of layouts runs in
    // cuda_parallel.rs within one process.
    let cases = fixture_cases();
    assert!(cases.len() >= 2, "expected the committed fixture cases, found {}", cases.len());
    for case in [&cases[0], &cases[cases.len() - 1]] {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let cfg = ModelConfig::from_dir(case).unwrap();
        let ckpt = Checkpoint::open(case).unwrap();
        let ids = read_reference(case).input_ids;
        let dtype = case_kv_dtype(case);
        let want = {
            let be = CudaBackend::new(EmulatedDevice::new());
            let model = Model::load(&be, cfg.clone(), &ckpt, &mut |_, _, _| {}).unwrap();
            prefill_and_decode(&be, &model, &ids, dtype, Some(DECODE_STEPS))
        };
        // TP 2 inside each node, EP 2 across the nodes: both kinds of group are splits of the
        // world joined from node 0's id (EP groups are ranks world / EP apart: {0, 2}, {1, 3}).
        let layout = ParallelLayout::new(4, 2, 2, &cfg).unwrap();
        let nodes = on_nodes(2, 2, |n, group| {
            assert_eq!(group.base(), 2 * n);
            let out = run_node_ranks::<_, EmuComm, _, _, _>(
                Ok(gpus(2)),
                layout,
                group.clone(),
                &|_, _| {},
                |be: &Gpu, ctx: RankContext<Gpu>| {
                    assert_eq!(ctx.layout.rank / 2, n, "node {n} holds global ranks {}..{}", 2 * n, 2 * n + 2);
                    let model = Model::load_rank(be, cfg.clone(), &ckpt, &mut |_, _, _| {}, ctx)?;
                    Ok::<_, dsv4_core::Error>(prefill_and_decode(be, &model, &ids, dtype, Some(DECODE_STEPS)))
                },
            );
            group.finish();
            out
        });
        let ranks: Vec<Vec<f32>> =
            nodes.into_iter().flat_map(|r| r.unwrap_or_else(|e| panic!("{name}: {e}"))).collect();
        assert_eq!(ranks.len(), 4);
        assert_ranks_match_one_device(&format!("{name} / 2 nodes x 2 GPUs (TP 2, EP 2)"), &ranks, &want, TOLERANCE);
    }
}

/// What crosses the nodes is the id node 0 made: every node gets the same bytes, and the id
/// joins ranks of one communicator only once.
#[test]
fn every_node_gets_node_0s_unique_id() {
    let ids = on_nodes(3, 1, |_, group| {
        let id = node_unique_id::<EmulatedDevice, EmuComm>(&group, Ok(())).unwrap();
        group.finish();
        id
    });
    assert_eq!(ids[0].len(), 128);
    assert!(ids.iter().all(|id| id == &ids[0]), "{ids:?}");
}

#[test]
fn a_node_that_fails_before_joining_stops_every_node_quickly() {
    let cfg = ModelConfig::from_dir(&fixture_cases()[0]).unwrap();
    let layout = ParallelLayout::new(4, 1, 4, &cfg).unwrap();
    let start = Instant::now();
    let errors = on_nodes(2, 2, |n, group| {
        // Node 1's second GPU does not open (as `dsv4_backend_cuda::open_devices` reports it).
        let devices = match n {
            0 => Ok(gpus(2)),
            _ => Err(dsv4_core::Error::backend("cuda", "no CUDA device 77 (2 found)")),
        };
        run_node_ranks::<_, EmuComm, _, _, _>(devices, layout, group, &|_, _| {}, |_, _| Ok::<_, dsv4_core::Error>(()))
            .unwrap_err()
            .to_string()
    });
    println!("node 0: {}\nnode 1: {}", errors[0], errors[1]);
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    assert!(errors[1].contains("77"), "node 1 names its device: {}", errors[1]);
    assert!(
        errors[0].contains("node 1") && errors[0].contains("77"),
        "node 0 hears which node failed and why: {}",
        errors[0]
    );
}

/// `ncclCommInitRank` on the emulator: an id it did not make is refused; ranks that disagree on
/// the size, or a rank joining twice, are refused and fail the rank already waiting on the id
/// (the emulator fails every rank rather than wait; NCCL's would wait for ever).
#[test]
fn joining_with_a_foreign_id_or_disagreeing_sizes_is_refused() {
    use dsv4_backend_cuda::collective::InitByUniqueId;
    let dev = EmulatedDevice::new();
    let e = EmuComm::init_rank(&dev, &[7u8; 128], 0, 2).unwrap_err().to_string();
    assert!(e.contains("ncclCommInitRank: an id that ncclGetUniqueId did not make"), "{e}");
    let other = EmulatedDevice::new();
    // (rank, size) of the second join, and what it and the waiting rank 0 are told.
    let cases = [((1, 3), "the ranks disagree on the size: 2 and 3"), ((0, 2), "rank 0 joined twice")];
    for ((rank, size), want) in cases {
        let id = EmuComm::unique_id().unwrap();
        let (waiting, second) = std::thread::scope(|s| {
            let first = s.spawn(|| EmuComm::init_rank(&dev, &id, 0, 2).map(drop));
            let deadline = Instant::now() + dsv4_tests::nodes::MEET_TIMEOUT;
            while EmuComm::ranks_joined(&id) != Some(1) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let second = EmuComm::init_rank(&other, &id, rank, size).map(drop);
            (first.join().unwrap(), second)
        });
        let second = second.unwrap_err().to_string();
        assert!(second.contains(want), "{second}");
        let waiting = waiting.unwrap_err().to_string();
        assert!(waiting.contains("another rank failed to join") && waiting.contains(want), "{waiting}");
    }
}

/// A rank that fails to join (here: node 1 puts both its ranks on one GPU) is reported to the
/// caller's hook at once, on its own thread (`dsv4` ends the process there: on GPUs the other
/// ranks would wait inside NCCL for ever), and no node hangs on the emulator.
#[test]
fn a_rank_that_fails_to_join_is_reported_at_once() {
    let cfg = ModelConfig::from_dir(&fixture_cases()[0]).unwrap();
    let layout = ParallelLayout::new(4, 1, 4, &cfg).unwrap();
    let failed = std::sync::Mutex::new(Vec::new());
    let start = Instant::now();
    let errors = on_nodes(2, 2, |n, group| {
        let devices = match n {
            0 => gpus(2),
            _ => {
                let one = Arc::new(EmulatedDevice::new());
                vec![one.clone(), one]
            }
        };
        let hook = |rank: usize, e: &dsv4_core::Error| failed.lock().unwrap().push((rank, e.to_string()));
        run_node_ranks::<_, EmuComm, _, _, _>(Ok(devices), layout, group, &hook, |_, _| Ok::<_, dsv4_core::Error>(()))
            .unwrap_err()
            .to_string()
    });
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    let failed = failed.into_inner().unwrap();
    println!("{failed:?}\n{errors:?}");
    // One of node 1's ranks (2 or 3: whichever joined second; the threads race) found the device
    // taken; every other rank failed naming that reason.
    let first: Vec<_> = failed.iter().filter(|(_, e)| !e.contains("another rank failed to join")).collect();
    assert_eq!(first.len(), 1, "one rank failed first: {failed:?}");
    let (rank, e) = first[0];
    assert!([2, 3].contains(rank), "{first:?}");
    assert!(
        e.contains("ranks 2 and 3 are on the same device") || e.contains("ranks 3 and 2 are on the same device"),
        "{first:?}"
    );
    assert!(failed.iter().all(|(_, e)| e.contains("are on the same device")), "{failed:?}");
    assert_eq!(failed.len(), 4, "every rank's join failed: {failed:?}");
    assert!(errors.iter().all(|e| e.contains("same device")), "{errors:?}");
}
