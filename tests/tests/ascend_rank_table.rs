//! HCCL rank-table files (`HcclCommInitClusterInfo`) on the emulator: a world joined from a
//! table runs collectives like a root-info world; each misuse the emulator checks (an
//! unreadable or malformed table, a rank not in it, a thread on another device than the table
//! gives the rank, ranks reading tables that disagree, a rank that never joins) fails with
//! HCCL's code and a message; `HcclBootstrap::from_rank_table` refuses a table that does not
//! describe the run before any device opens; and two "nodes" (threads with their own
//! `NodeGroup` over loopback TCP, as `ascend_nodes.rs`) of two emulated devices each join through
//! a rank table (each node its own copy of the file) and a fixture's prefill + decode equals one
//! device within `ascend_nodes.rs`'s tolerance (1e-5 relative). Emulator-verified, not
//! hardware-verified.

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::MutexGuard;
use std::thread;

use dsv4_backend_ascend::{run_bootstrapped, AscendBackend, HcclBootstrap, HcclCommunicator};
use dsv4_core::parallel::{Communicator, ParallelLayout, RankContext};
use dsv4_core::{Checkpoint, Model, ModelConfig};
use dsv4_tests::collectives::{bits, down, rank_order_sum, up, values};
use dsv4_tests::nodes::on_nodes;
use dsv4_tests::{assert_ranks_match_one_device, case_kv_dtype, fixture_cases, prefill_and_decode, read_reference};

const DEVICES: usize = 4;
const HCCL_TIMEOUT_VAR: &str = "DSV4_ASCEND_EMU_HCCL_TIMEOUT_S";
const TOLERANCE: f64 = 1e-5;
const DECODE_STEPS: usize = 8;

/// The tests of this binary take turns on the emulator (its rendezvous timeout is read from
/// the environment).
fn emulator() -> MutexGuard<'static, ()> {
    dsv4_tests::emulated_devices(DEVICES)
}

/// Sets the emulator's rendezvous timeout for one test.
struct Timeout;

impl Timeout {
    fn secs(s: &str) -> Timeout {
        std::env::set_var(HCCL_TIMEOUT_VAR, s);
        Timeout
    }
}

impl Drop for Timeout {
    fn drop(&mut self) {
        std::env::remove_var(HCCL_TIMEOUT_VAR);
    }
}

/// A version 1.0 table: `servers` of (server_id, [(device_id, rank_id)]), device IPs made up.
fn table_json(servers: &[(&str, &[(u32, u32)])]) -> String {
    let list: Vec<serde_json::Value> = servers
        .iter()
        .map(|(id, devices)| {
            let devices: Vec<_> = devices
                .iter()
                .map(|(d, r)| {
                    serde_json::json!({"device_id": d.to_string(), "device_ip": format!("192.168.{r}.{d}"),
                                       "rank_id": r.to_string()})
                })
                .collect();
            serde_json::json!({"server_id": id, "device": devices})
        })
        .collect();
    serde_json::json!({"status": "completed", "version": "1.0", "server_count": servers.len().to_string(),
                       "server_list": list})
    .to_string()
}

/// Writes `text` to a file of this test process named `name`.
fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsv4-rank-table-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn c_path(p: &std::path::Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

/// Rank `rank` on device `device` joins from `table`, on its own thread; each rank's result
/// (the communicator's all-reduce of `values(rank)`, or the error text).
fn join_each(joins: &[(i32, &std::path::Path, usize)], size: usize) -> Vec<Result<Vec<f32>, String>> {
    thread::scope(|s| {
        let handles: Vec<_> = joins
            .iter()
            .map(|&(device, table, rank)| {
                s.spawn(move || {
                    let be = dsv4_backend_ascend::open(device as usize).unwrap();
                    let c = HcclCommunicator::init_rank_from_table(&be, &c_path(table), rank, size)
                        .map_err(|e| e.to_string())?;
                    assert_eq!(
                        (Communicator::<AscendBackend>::rank(&c), Communicator::<AscendBackend>::size(&c)),
                        (rank, size)
                    );
                    let x = up(&be, &values(rank, 4), &[4]);
                    Ok(down(&be, &c.all_reduce_sum(&be, &x).map_err(|e| e.to_string())?).1)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn assert_all_failed(out: &[Result<Vec<f32>, String>], wants: &[&str]) {
    for (r, o) in out.iter().enumerate() {
        let e = o.as_ref().expect_err("every rank fails");
        for w in wants {
            assert!(e.contains(w), "rank {r}: want {w:?} in: {e}");
        }
    }
}

#[test]
fn a_world_joined_from_a_rank_table_runs_collectives() {
    let _emu = emulator();
    let _t = Timeout::secs("30");
    let t = write("ok.json", &table_json(&[("rt-ok", &[(0, 0), (1, 1), (2, 2)])]));
    // Ranks listed out of device order: rank 1 on device 2, rank 2 on device 1.
    let swapped = write("swapped.json", &table_json(&[("rt-swapped", &[(0, 0), (2, 1), (1, 2)])]));
    let want = rank_order_sum(&[values(0, 4), values(1, 4), values(2, 4)]);
    for out in [
        join_each(&[(0, &t, 0), (1, &t, 1), (2, &t, 2)], 3),
        join_each(&[(0, &swapped, 0), (2, &swapped, 1), (1, &swapped, 2)], 3),
        // The same world again, once the first is gone: its name is free.
        join_each(&[(2, &t, 2), (0, &t, 0), (1, &t, 1)], 3),
    ] {
        for (r, o) in out.into_iter().enumerate() {
            assert_eq!(bits(&o.unwrap_or_else(|e| panic!("rank {r}: {e}"))), bits(&want), "rank {r}");
        }
    }
}

#[test]
fn an_unreadable_or_malformed_table_fails_the_caller_with_hccls_code() {
    let _emu = emulator();
    let _t = Timeout::secs("5");
    let missing = std::env::temp_dir().join("dsv4-no-such-rank-table.json");
    let out = join_each(&[(0, &missing, 0)], 1);
    assert_all_failed(&out, &["HcclCommInitClusterInfo", "HCCL_E_OPEN_FILE_FAILURE", "dsv4-no-such-rank-table.json"]);

    let good: serde_json::Value = serde_json::from_str(&table_json(&[("rt-bad", &[(0, 0), (1, 1)])])).unwrap();
    let cases: Vec<(serde_json::Value, &[&str])> = vec![
        (serde_json::json!("not an object"), &["status"]),
        (
            {
                let mut v = good.clone();
                v["status"] = "initializing".into();
                v
            },
            &["status", "initializing"],
        ),
        (
            {
                let mut v = good.clone();
                v["server_count"] = "2".into();
                v
            },
            &["server_count"],
        ),
        (
            {
                let mut v = good.clone();
                v["server_list"][0]["device"][1]["rank_id"] = "0".into();
                v
            },
            &["server_list[0].device[1].rank_id", "rank 0 appears twice"],
        ),
        (
            {
                let mut v = good.clone();
                v["server_list"][0]["device"][1]["device_id"] = "0".into();
                v
            },
            &["server_list[0].device[1].device_id", "device 0 appears twice"],
        ),
        (
            {
                let mut v = good.clone();
                v["server_list"][0]["device"][1]["rank_id"] = "5".into();
                v
            },
            &["rank_id", "rank 1 is missing"],
        ),
        // HCCL reads numbers only as JSON strings.
        (
            {
                let mut v = good.clone();
                v["server_list"][0]["device"][0]["rank_id"] = 0.into();
                v
            },
            &["server_list[0].device[0].rank_id", "not a number"],
        ),
        // A 1.2 table gives every device's super_device_id.
        (
            {
                let mut v = good.clone();
                v["version"] = "1.2".into();
                v
            },
            &["server_list[0].device[0].super_device_id"],
        ),
    ];
    for (i, (v, wants)) in cases.into_iter().enumerate() {
        let p = write(&format!("bad{i}.json"), &v.to_string());
        let out = join_each(&[(0, &p, 0)], 2);
        let mut all = vec!["HCCL_E_PARA"];
        all.extend_from_slice(wants);
        assert_all_failed(&out, &all);
    }
    // HCCL takes only a path ending in .json.
    let p = write("table.txt", &good.to_string());
    assert_all_failed(&join_each(&[(0, &p, 0)], 2), &["HCCL_E_PARA", "does not end in .json"]);
}

#[test]
fn a_rank_not_in_the_table_fails_every_rank() {
    let _emu = emulator();
    let _t = Timeout::secs("20");
    let t = write("two.json", &table_json(&[("rt-not-in", &[(0, 0), (1, 1)])]));
    let out = join_each(&[(0, &t, 0), (1, &t, 5)], 2);
    assert_all_failed(&out, &["HCCL_E_PARA", "rank 5 is not in the rank table", "two.json"]);
}

#[test]
fn a_thread_on_another_device_than_the_tables_fails_every_rank() {
    let _emu = emulator();
    let _t = Timeout::secs("20");
    let t = write("devices.json", &table_json(&[("rt-device", &[(0, 0), (1, 1)])]));
    // Rank 1 runs on device 2; the table puts it on device 1.
    let out = join_each(&[(0, &t, 0), (2, &t, 1)], 2);
    assert_all_failed(&out, &["HCCL_E_PARA", "rank 1 runs on device 2", "device_id 1"]);
}

#[test]
fn ranks_reading_tables_that_disagree_fail_every_rank() {
    let _emu = emulator();
    let _t = Timeout::secs("20");
    let a = write("agree-a.json", &table_json(&[("rt-disagree", &[(0, 0), (1, 1)])]));
    let mut v: serde_json::Value = serde_json::from_str(&table_json(&[("rt-disagree", &[(0, 0), (1, 1)])])).unwrap();
    v["server_list"][0]["device"][1]["device_ip"] = "10.9.9.9".into();
    let b = write("agree-b.json", &v.to_string());
    let out = join_each(&[(0, &a, 0), (1, &b, 1)], 2);
    assert_all_failed(&out, &["HCCL_E_PARA", "disagrees", "10.9.9.9"]);
}

#[test]
fn a_rank_that_never_joins_times_out() {
    let _emu = emulator();
    let _t = Timeout::secs("2");
    let t = write("alone.json", &table_json(&[("rt-alone", &[(0, 0), (1, 1)])]));
    let start = std::time::Instant::now();
    let out = join_each(&[(0, &t, 0)], 2);
    assert_all_failed(&out, &["HCCL_E_TIMEOUT", "ranks [1] never joined"]);
    assert!(start.elapsed() < std::time::Duration::from_secs(30), "{:?}", start.elapsed());
}

/// The bootstrap checks the table against the run before any device opens.
#[test]
fn a_table_that_does_not_describe_the_run_is_refused_before_devices_open() {
    let _emu = emulator();
    let t = write("mismatch.json", &table_json(&[("rt-mismatch", &[(0, 0), (1, 1)])]));
    let e = HcclBootstrap::from_rank_table(&t, &[0, 2], None).err().expect("refused").to_string();
    assert!(e.contains("mismatch.json") && e.contains("server_list[0].device[].device_id"), "{e}");
    assert!(e.contains("give --devices 0,1"), "{e}");
    let e = HcclBootstrap::from_rank_table(&t, &[0, 1, 2], None).err().expect("refused").to_string();
    assert!(e.contains("lists 2 device(s)"), "{e}");
    let e = HcclBootstrap::from_rank_table(&t.with_file_name("missing.json"), &[0, 1], None).err().expect("refused");
    assert!(e.to_string().contains("cannot read"), "{e}");
}

/// Two nodes of two devices each join one world from a rank table (each node its own copy of
/// the file, formatted differently) and run a fixture like one device.
#[test]
fn two_nodes_of_two_devices_joined_by_a_rank_table_equal_one_device() {
    let _emu = emulator();
    let _t = Timeout::secs("60");
    let text = table_json(&[("rt-node-0", &[(0, 0), (1, 1)]), ("rt-node-1", &[(2, 2), (3, 3)])]);
    let pretty = serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&text).unwrap()).unwrap();
    let tables = [write("node0.json", &text), write("node1.json", &pretty)];
    let case = &fixture_cases()[0];
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
    // TP 2 inside each node, EP 2 across the nodes, as ascend_nodes.rs.
    let layout = ParallelLayout::new(4, 2, 2, &cfg).unwrap();
    let nodes = on_nodes(2, 2, |n, group| {
        let devices = [2 * n as i32, 2 * n as i32 + 1];
        let out = HcclBootstrap::from_rank_table(&tables[n], &devices, Some(group.clone())).and_then(|boot| {
            run_bootstrapped(&boot, layout, |be: &AscendBackend, ctx: RankContext<AscendBackend>| {
                assert_eq!(ctx.layout.rank / 2, n);
                let model = Model::load_rank(be, cfg.clone(), &ckpt, &mut |_, _, _| {}, ctx)?;
                Ok::<_, dsv4_core::Error>(prefill_and_decode(be, &model, &ids, dtype, Some(DECODE_STEPS)))
            })
        });
        group.finish();
        out
    });
    let ranks: Vec<Vec<f32>> = nodes.into_iter().flat_map(|r| r.unwrap_or_else(|e| panic!("{name}: {e}"))).collect();
    assert_eq!(ranks.len(), 4);
    assert_ranks_match_one_device(&format!("{name} / rank table, 2 nodes x 2 devices"), &ranks, &want, TOLERANCE);
}
