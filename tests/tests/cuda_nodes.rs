//! A CUDA run over several processes (nodes) (issue 14): the processes meet over `NodeGroup`'s
//! TCP rendezvous, node 0's NCCL unique id reaches the others over it, and every rank joins one
//! communicator with its global rank (`ncclCommInitRank`). Here the "nodes" are threads of one
//! test process, each with its own `NodeGroup` (real TCP on the loopback) and its own emulated
//! GPUs, because the emulator's NCCL lives in one process; what crosses the socket is what would
//! cross it between hosts (the id's 128 bytes). Emulator-verified, not run on GPUs.
//!
//! Tolerance 1e-5 relative against one GPU, as in `cuda_parallel.rs` (splitting only reorders
//! f32 sums); every rank, on either node, must hold rank 0's bits.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dsv4_backend_cuda::{node_unique_id, run_node_ranks, CudaBackend};
use dsv4_core::parallel::{NodeGroup, ParallelLayout, RankContext};
use dsv4_core::{Checkpoint, Model, ModelConfig};
use dsv4_cuda_emu::{EmuComm, EmulatedDevice};
use dsv4_tests::{assert_ranks_match_one_device, case_kv_dtype, fixture_cases, prefill_and_decode, read_reference};

const TOLERANCE: f64 = 1e-5;
const DECODE_STEPS: usize = 8;
const T: Duration = Duration::from_secs(60);

type Gpu = CudaBackend<Arc<EmulatedDevice>>;

/// Runs `body(node, group)` for `nnodes` nodes of `local` ranks each on threads, node 0 leading
/// on a loopback port; each node's result.
fn on_nodes<R: Send>(nnodes: usize, local: usize, body: impl Fn(usize, Arc<NodeGroup>) -> R + Sync) -> Vec<R> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut listener = Some(listener);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..nnodes)
            .map(|n| {
                let l = if n == 0 { listener.take() } else { None };
                let (addr, body) = (addr.clone(), &body);
                s.spawn(move || {
                    let group = match l {
                        Some(l) => NodeGroup::lead(l, nnodes, local, "test run", T),
                        None => NodeGroup::follow(&addr, nnodes, n, local, "test run", T),
                    };
                    body(n, Arc::new(group.unwrap()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

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
        run_node_ranks::<_, EmuComm, _, _, _>(devices, layout, group, |_, _| Ok::<_, dsv4_core::Error>(()))
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

/// `ncclCommInitRank` on the emulator: an id it did not make, ranks that disagree on the size
/// and a rank joined twice are refused, not waited on.
#[test]
fn joining_with_a_foreign_id_or_disagreeing_sizes_is_refused() {
    use dsv4_backend_cuda::collective::InitByUniqueId;
    let dev = EmulatedDevice::new();
    let e = EmuComm::init_rank(&dev, &[7u8; 128], 0, 2).unwrap_err().to_string();
    assert!(e.contains("ncclCommInitRank: an id that ncclGetUniqueId did not make"), "{e}");
    let id = EmuComm::unique_id().unwrap();
    let other = EmulatedDevice::new();
    std::thread::scope(|s| {
        // Rank 0 of 2 waits for rank 1; rank 1 says the world has 3 ranks, then joins properly.
        let first = s.spawn(|| EmuComm::init_rank(&dev, &id, 0, 2).map(|c| c.timeout()));
        let deadline = Instant::now() + T;
        while EmuComm::ranks_joined(&id) != Some(1) {
            assert!(Instant::now() < deadline, "rank 0 never joined");
            std::thread::sleep(Duration::from_millis(5));
        }
        let e = EmuComm::init_rank(&other, &id, 1, 3).unwrap_err().to_string();
        assert!(e.contains("the ranks disagree on the size: 2 and 3"), "{e}");
        let e = EmuComm::init_rank(&other, &id, 0, 2).unwrap_err().to_string();
        assert!(e.contains("rank 0 joined twice"), "{e}");
        let second = EmuComm::init_rank(&other, &id, 1, 2).unwrap();
        assert!(first.join().unwrap().is_ok());
        drop(second);
    });
}
