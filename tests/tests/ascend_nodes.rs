//! A run over several processes (nodes) on Ascend's API (issue 14): the processes meet over
//! `NodeGroup`'s TCP rendezvous, node 0's HCCL root info reaches the others over it, and every
//! rank joins one HCCL world with its global rank. Here the "nodes" are threads of one test
//! process, each with its own `NodeGroup` (real TCP on the loopback) and its own emulated
//! devices, because the emulator's HCCL lives in one process; what crosses the socket is what
//! would cross it between hosts. Emulator-verified, not hardware-verified.
//!
//! Tolerance 1e-5 relative against one device, as in `ascend_parallel.rs` (splitting only
//! reorders f32 sums); every rank, on either node, must hold rank 0's bits.

use std::time::{Duration, Instant};

use dsv4_backend_ascend::{run_node_ranks, AscendBackend};
use dsv4_core::parallel::{ParallelLayout, RankContext};
use dsv4_core::{Checkpoint, Model, ModelConfig};
use dsv4_tests::nodes::on_nodes;
use dsv4_tests::{assert_ranks_match_one_device, case_kv_dtype, fixture_cases, prefill_and_decode, read_reference};

const TOLERANCE: f64 = 1e-5;
const DECODE_STEPS: usize = 8;

#[test]
fn two_nodes_of_two_devices_equal_one_device() {
    let _emu = dsv4_tests::emulated_devices(4);
    // The first fixture and the last (different configs); the full matrix of layouts runs in
    // ascend_parallel.rs within one process.
    let cases = fixture_cases();
    assert!(cases.len() >= 2, "expected the committed fixture cases, found {}", cases.len());
    for case in [&cases[0], &cases[cases.len() - 1]] {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let cfg = ModelConfig::from_dir(case).unwrap();
        let ckpt = Checkpoint::open(case).unwrap();
        let ids = read_reference(case).input_ids;
        let dtype = case_kv_dtype(case);
        let want = {
            let be = dsv4_backend_ascend::open(0).unwrap();
            let model = Model::load(&be, cfg.clone(), &ckpt, &mut |_, _, _| {}).unwrap();
            prefill_and_decode(&be, &model, &ids, dtype, Some(DECODE_STEPS))
        };
        // TP 2 inside each node, EP 2 across the nodes: both kinds of group cross the socket's
        // bootstrap (EP groups are ranks world / EP apart: {0, 2} and {1, 3}).
        let layout = ParallelLayout::new(4, 2, 2, &cfg).unwrap();
        let nodes = on_nodes(2, 2, |n, group| {
            assert_eq!(group.base(), 2 * n);
            let devices = [2 * n as i32, 2 * n as i32 + 1];
            let out = run_node_ranks(
                &devices,
                layout,
                group.clone(),
                |be: &AscendBackend, ctx: RankContext<AscendBackend>| {
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
        assert_ranks_match_one_device(&format!("{name} / 2 nodes x 2 devices (TP 2, EP 2)"), &ranks, &want, TOLERANCE);
    }
}

#[test]
fn a_node_whose_device_fails_to_open_stops_every_node_quickly() {
    let _emu = dsv4_tests::emulated_devices(4);
    let cfg = ModelConfig::from_dir(&fixture_cases()[0]).unwrap();
    let layout = ParallelLayout::new(4, 1, 4, &cfg).unwrap();
    let start = Instant::now();
    let errors = on_nodes(2, 2, |n, group| {
        // Node 1's second device does not exist.
        let devices = if n == 0 { [0, 1] } else { [2, 77] };
        run_node_ranks(&devices, layout, group, |_, _| Ok::<_, dsv4_core::Error>(())).unwrap_err().to_string()
    });
    println!("node 0: {}\nnode 1: {}", errors[0], errors[1]);
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    assert!(errors[1].contains("77"), "node 1 names its device: {}", errors[1]);
    assert!(
        errors[0].contains("node 1 failed before joining") && errors[0].contains("77"),
        "node 0 hears which node failed and why: {}",
        errors[0]
    );
}
