//! `--rank-table FILE` / `RANK_TABLE_FILE`: Ascend ranks join with `HcclCommInitClusterInfo`.
//! A table that is malformed or does not describe the run is refused with its message (file,
//! field, server or rank) before any device opens; a table is refused on CPU and
//! as a flag on one device; a good table gives the same logits as the root-info bootstrap; two
//! nodes whose tables differ are refused when they meet. The numerics over nodes joined by a
//! table are checked in `tests/tests/ascend_rank_table.rs` (the emulator's HCCL lives in one
//! process).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn emulator() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    dsv4_ascend_sys::emulator::build(Path::new(env!("CARGO")), &manifest).unwrap_or_else(|e| panic!("{e}"))
}

/// `dsv4 args` on 4 emulated Ascend devices, without a launcher's environment.
fn dsv4(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dsv4"));
    c.args(args);
    for v in ["NNODES", "WORLD_SIZE", "NODE_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT", "RANK_TABLE_FILE"] {
        c.env_remove(v);
    }
    c.env(dsv4_ascend_sys::EMULATOR_VAR, emulator()).env("DSV4_ASCEND_EMU_DEVICES", "4");
    c.env("DSV4_COMM_TIMEOUT_S", "30").env("DSV4_ASCEND_EMU_HCCL_TIMEOUT_S", "30");
    c.envs(env.iter().copied());
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A version 1.0 table of `servers` (server_id, [(device_id, rank_id)]).
fn table(servers: &[(&str, &[(u32, u32)])]) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|(id, devices)| {
            let devices: Vec<String> = devices
                .iter()
                .map(|(d, r)| format!(r#"{{"device_id": "{d}", "device_ip": "192.168.{r}.{d}", "rank_id": "{r}"}}"#))
                .collect();
            format!(r#"{{"server_id": "{id}", "device": [{}]}}"#, devices.join(", "))
        })
        .collect();
    format!(
        r#"{{"status": "completed", "version": "1.0", "server_count": "{}", "server_list": [{}]}}"#,
        servers.len(),
        list.join(", ")
    )
}

fn write(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsv4-cli-rank-table-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn refused(o: Output, wants: &[&str]) {
    let err = stderr(&o);
    assert!(!o.status.success(), "expected a refusal: {err}");
    for w in wants {
        assert!(err.contains(w), "want {w:?} in: {err}");
    }
    assert!(!err.contains("   "), "a message with a run of spaces (a broken line continuation): {err}");
    // Refused before any rank opened its device and loaded.
    assert!(!err.contains("ranks: "), "refused only after the layout was set up: {err}");
}

#[test]
fn a_bad_rank_table_is_refused_with_its_message() {
    let logits = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec!["logits", "--backend", "ascend", "--devices", "0-1", "--ids", "1,2", "--out", "/dev/null"];
        args.extend_from_slice(extra);
        dsv4(&args, env).output().unwrap()
    };
    // Rank 1 listed twice.
    let dup = write("dup.json", &table(&[("a", &[(0, 0), (1, 0)])]));
    refused(
        logits(&["--rank-table", dup.to_str().unwrap()], &[]),
        &[
            &format!("rank table {}: server_list[0].device[1].rank_id", dup.display()),
            "rank 0 is also server_list[0].device[0]'s",
        ],
    );
    // The same from RANK_TABLE_FILE, which the message names with the way out.
    refused(
        logits(&[], &[("RANK_TABLE_FILE", dup.to_str().unwrap())]),
        &["server_list[0].device[1].rank_id", "comes from the environment", "unset RANK_TABLE_FILE"],
    );
    // A launcher's directory (ModelArts sets one), not a table file.
    refused(logits(&[], &[("RANK_TABLE_FILE", "/tmp")]), &["ends in .json", "unset RANK_TABLE_FILE"]);
    // Through ASCEND_RT_VISIBLE_DEVICES the advice gives logical ids, as --devices takes them.
    let visible = write("visible.json", &table(&[("a", &[(2, 0), (3, 1)])]));
    refused(
        logits(&["--rank-table", visible.to_str().unwrap()], &[("ASCEND_RT_VISIBLE_DEVICES", "3,2")]),
        &["give --devices 1,0 (this process's device ids"],
    );
    // A table for other devices than --devices.
    let other = write("other.json", &table(&[("a", &[(2, 0), (3, 1)])]));
    refused(
        logits(&["--rank-table", other.to_str().unwrap()], &[]),
        &["server_list[0].device[].device_id", "give --devices 2,3"],
    );
    // Two servers for a run on one node.
    let two = write("two.json", &table(&[("a", &[(0, 0), (1, 1)]), ("b", &[(0, 2), (1, 3)])]));
    refused(logits(&["--rank-table", two.to_str().unwrap()], &[]), &["lists 2 server(s)", "give --nnodes 2"]);
    // Not ready, and missing.
    let init = write("init.json", &table(&[("a", &[(0, 0), (1, 1)])]).replace("completed", "initializing"));
    // Waited for (a launcher may still be writing it), up to DSV4_COMM_TIMEOUT_S.
    refused(
        logits(&["--rank-table", init.to_str().unwrap()], &[("DSV4_COMM_TIMEOUT_S", "1")]),
        &["waiting until it is completed", "status: still \"initializing\" after 1 s"],
    );
    refused(logits(&["--rank-table", "/nonexistent/hccl.json"], &[]), &["/nonexistent/hccl.json", "cannot read"]);
}

#[test]
fn a_rank_table_is_refused_where_it_cannot_be_used() {
    let good = write("good-refused.json", &table(&[("a", &[(0, 0), (1, 1)])]));
    let good = good.to_str().unwrap();
    let run = |args: &[&str]| dsv4(args, &[]).output().unwrap();
    refused(
        run(&[
            "logits",
            "--backend",
            "cpu",
            "--devices",
            "2",
            "--ids",
            "1",
            "--out",
            "/dev/null",
            "--rank-table",
            good,
        ]),
        &["is for Ascend runs", "on CPU"],
    );
    refused(
        run(&["generate", "--backend", "ascend", "--ids", "1", "--max-new-tokens", "1", "--rank-table", good]),
        &["this run has one device"],
    );
    // serve reads it too (tests/serve.rs serves through one), and checks it before anything loads.
    refused(
        run(&["serve", "--backend", "ascend", "--devices", "2-3", "--kv-cache-memory", "64MiB", "--rank-table", good]),
        &["server_list[0].device[].device_id", "give --devices 0,1"],
    );
    // On one device RANK_TABLE_FILE (a launcher's environment) is not used: the run works.
    let o = dsv4(
        &["generate", "--backend", "ascend", "--ids", "1", "--max-new-tokens", "1"],
        &[("RANK_TABLE_FILE", "/nonexistent/hccl.json")],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A good table: the ranks join with HcclCommInitClusterInfo and compute the root-info run's bits.
#[test]
fn logits_through_a_rank_table_equal_the_root_info_run() {
    let dir = std::env::temp_dir().join(format!("dsv4-cli-rank-table-logits-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = write("good.json", &table(&[("cli-good", &[(0, 0), (1, 1)])]));
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["logits", "--backend", "ascend", "--devices", "0-1", "--tensor-parallel", "2"];
        args.extend_from_slice(&["--ids", "5,17,42", "--out", out.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let o = dsv4(&args, &[("DSV4_ASCEND_EMU_TRACE_INIT", "1")]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        (std::fs::read(out).unwrap(), stderr(&o))
    };
    let (root, err) = run(&dir.join("root.safetensors"), &[]);
    assert!(err.contains("ascend-emu: HcclCommInitRootInfo") && !err.contains("ClusterInfo"), "{err}");
    let (from_table, err) = run(&dir.join("table.safetensors"), &["--rank-table", good.to_str().unwrap()]);
    assert!(err.contains("this node is \"cli-good\""), "{err}");
    // The ranks joined through the table (the emulator says which call made each communicator).
    for rank in 0..2 {
        assert!(err.contains(&format!("ascend-emu: HcclCommInitClusterInfoConfig rank {rank}")), "{err}");
    }
    assert!(!err.contains("ascend-emu: HcclCommInitRootInfo"), "{err}");
    assert_eq!(root, from_table, "the logits differ");
    // In a container the runtime numbers the NPUs from 0 and the table names them by physical
    // id (the emulator's DSV4_ASCEND_EMU_PHYSICAL_IDS plays the container): --devices 0-1 are
    // physical NPUs 6 and 7 here, and the table for 6 and 7 joins them.
    let container = [("DSV4_ASCEND_EMU_PHYSICAL_IDS", "4,5,6,7"), ("ASCEND_RT_VISIBLE_DEVICES", "2,3,0,1")];
    let physical = write("container.json", &table(&[("cli-container", &[(6, 0), (7, 1)])]));
    let out = dir.join("container.safetensors");
    let mut args = vec!["logits", "--backend", "ascend", "--devices", "0-1", "--tensor-parallel", "2"];
    args.extend_from_slice(&["--ids", "5,17,42", "--out", out.to_str().unwrap()]);
    args.extend_from_slice(&["--rank-table", physical.to_str().unwrap()]);
    let o = dsv4(&args, &container).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(root, std::fs::read(&out).unwrap(), "the logits differ in the container");
    // A table for the container's other two NPUs: the advice gives this process's ids.
    let other = write("container-other.json", &table(&[("cli-container", &[(4, 0), (5, 1)])]));
    args.truncate(args.len() - 1);
    args.push(other.to_str().unwrap());
    refused(dsv4(&args, &container).output().unwrap(), &["give --devices 2,3 (this process's device ids"]);
}

/// Two nodes whose tables say different things are refused when they meet (each may read its
/// own copy; the paths may differ).
#[test]
fn nodes_whose_tables_differ_are_refused_when_they_meet() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port().to_string()
    };
    let a = write("node-a.json", &table(&[("n0", &[(0, 0), (1, 1)]), ("n1", &[(2, 2), (3, 3)])]));
    // Node 1's copy names node 0's server differently: its own part still matches its devices.
    let b = write("node-b.json", &table(&[("other", &[(0, 0), (1, 1)]), ("n1", &[(2, 2), (3, 3)])]));
    let spawn = |rank: &str, devices: &str, t: &Path| {
        let args = [
            "logits",
            "--backend",
            "ascend",
            "--devices",
            devices,
            "--nnodes",
            "2",
            "--node-rank",
            rank,
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            &port,
            "--ids",
            "1,2",
            "--out",
            "/dev/null",
            "--rank-table",
            t.to_str().unwrap(),
        ];
        dsv4(&args, &[]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    };
    let c0 = spawn("0", "0-1", &a);
    let c1 = spawn("1", "2-3", &b);
    let (o0, o1) = (c0.wait_with_output().unwrap(), c1.wait_with_output().unwrap());
    assert!(!o0.status.success() && !o1.status.success(), "{}\n{}", stderr(&o0), stderr(&o1));
    let both = format!("{}\n{}", stderr(&o0), stderr(&o1));
    assert!(both.contains("server_list[0]: \"other\""), "the refusal names the difference: {both}");
}
