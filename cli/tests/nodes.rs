//! `--nnodes` / `--node-rank` / `--master-addr` / `--master-port` (and NNODES, WORLD_SIZE,
//! NODE_RANK, RANK, MASTER_ADDR, MASTER_PORT): a run over several `dsv4` processes, as a user
//! starts one per node. The numerics over nodes are checked in `tests/tests/ascend_nodes.rs`
//! (the emulator's HCCL lives in one process, so two emulated processes cannot share a
//! communicator); here: the processes meet, refuse runs that disagree or cannot work, and a
//! process that dies ends the others with a clear error instead of a hang.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn emulator() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
    dsv4_ascend_sys::emulator::build(std::path::Path::new(env!("CARGO")), &manifest).unwrap_or_else(|e| panic!("{e}"))
}

fn dsv4(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_dsv4"));
    c.args(args);
    for v in ["NNODES", "WORLD_SIZE", "NODE_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"] {
        c.env_remove(v);
    }
    // A failure these tests do not expect ends in seconds, not after the default 600 s.
    c.env("DSV4_COMM_TIMEOUT_S", "30");
    c.envs(env.iter().copied());
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port().to_string()
}

/// Starts node 0 and node 1 of a two-node Ascend run (devices 0-1 and 2-3 of 4 emulated ones),
/// each with its own command line (`[subcommand, args...]`), waits for both (they must end within `limit`),
/// and returns their outputs.
fn two_nodes(args0: &[&str], args1: &[&str], limit: Duration) -> (Output, Output) {
    let emu = emulator();
    let port = free_port();
    let spawn = |rank: &str, cmd: &[&str]| {
        let devices = if rank == "0" { "0-1" } else { "2-3" };
        let mut args = vec![cmd[0], "--backend", "ascend", "--devices", devices, "--nnodes", "2", "--node-rank", rank];
        args.extend_from_slice(&["--master-addr", "127.0.0.1", "--master-port", &port]);
        args.extend_from_slice(&cmd[1..]);
        dsv4(&args, &[])
            .env(dsv4_ascend_sys::EMULATOR_VAR, &emu)
            .env("DSV4_ASCEND_EMU_DEVICES", "4")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let start = Instant::now();
    let c0 = spawn("0", args0);
    let c1 = spawn("1", args1);
    let (o0, o1) = (c0.wait_with_output().unwrap(), c1.wait_with_output().unwrap());
    assert!(start.elapsed() < limit, "the nodes took {:?}:\n{}\n{}", start.elapsed(), stderr(&o0), stderr(&o1));
    (o0, o1)
}

#[test]
fn nodes_started_with_different_arguments_are_refused_on_both() {
    let (o0, o1) = two_nodes(
        &["logits", "--ids", "1,2,3", "--out", "/dev/null"],
        &["logits", "--ids", "1,2,4", "--out", "/dev/null"],
        Duration::from_secs(60),
    );
    for o in [&o0, &o1] {
        assert!(!o.status.success());
        assert!(
            stderr(o).contains("started with different arguments (it has `1,2,4` where node 0 has `1,2,3`)"),
            "{}",
            stderr(o)
        );
    }
}

/// Node 1 fails after the nodes have met (here: its emulator does not know node 0's root info,
/// which another process's emulator wrote; on hardware, a device or network fault), and its
/// process exits: node 0, waiting in HCCL's initialisation for node 1's ranks, must stop with an
/// error naming node 1 and its cause in a bounded time (not HCCL's timeout).
#[test]
fn a_node_that_dies_stops_the_others_with_its_name() {
    let logits = ["logits", "--ids", "1,2,3", "--out", "/dev/null"];
    let bench = ["bench", "--contexts", "16", "--decode-steps", "1"];
    // A chat over nodes no longer refuses --nnodes: it meets, and fails here as the others do
    // (node 1 before any rank reads or follows a turn; the hand-off itself is checked in
    // `cli/src/chat_turns.rs` and `generate.rs`'s tests, with threads as nodes).
    let chat = ["chat", "--max-new-tokens", "4", "--kv-cache-memory", "64MiB"];
    for args in [&logits[..], &bench[..], &chat[..]] {
        node_dies(args);
    }
}

fn node_dies(args: &[&str]) {
    let (o0, o1) = two_nodes(args, args, Duration::from_secs(60));
    assert!(!o1.status.success(), "{}", stderr(&o1));
    assert!(!o0.status.success(), "{}", stderr(&o0));
    println!("node 0:\n{}\nnode 1:\n{}", stderr(&o0), stderr(&o1));
    // Node 1 tells node 0 why before it exits (an abort), so node 0 names the cause.
    let e0 = stderr(&o0);
    assert!(e0.contains("node 1 stopped the run: ") && e0.contains("HcclCommInitRootInfo"), "{e0}");
}

/// `dsv4 serve` over two processes: node 0 binds the HTTP port and leads, node 1 follows; they
/// meet (the planned pool is part of what they agree on), and when node 1 fails after the
/// meeting (its emulator cannot join node 0's HCCL world, as above) node 0 stops naming it.
#[test]
fn a_serving_node_that_dies_stops_node_0() {
    let serve = ["serve", "--port", "0", "--max-model-len", "256", "--max-num-seqs", "4", "--kv-cache-memory", "64MiB"];
    let (o0, o1) = two_nodes(&serve, &serve, Duration::from_secs(60));
    let (e0, e1) = (stderr(&o0), stderr(&o1));
    assert!(!o1.status.success() && e1.contains("node 1 of 2: meeting the other nodes"), "{e1}");
    assert!(!o0.status.success() && (e0.contains("lost node 1") || e0.contains("node 1 stopped the run")), "{e0}");
    // Node 1 never serves HTTP.
    assert!(!String::from_utf8_lossy(&o1.stdout).contains("http://"), "{}", String::from_utf8_lossy(&o1.stdout));
}

#[test]
fn runs_that_cannot_span_nodes_are_refused_with_the_reason() {
    /// Arguments, environment, what stderr must say.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 6] = [
        (
            &["logits", "--backend", "cpu", "--ids", "1", "--out", "/dev/null", "--nnodes", "2", "--node-rank", "1"],
            &[],
            "the CPU backend's ranks are threads of one process",
        ),
        // The standard environment of launchers (torchrun's) is read too.
        (
            &["logits", "--backend", "cpu", "--ids", "1", "--out", "/dev/null"],
            &[("MASTER_ADDR", "127.0.0.1"), ("WORLD_SIZE", "2"), ("RANK", "1")],
            "--nnodes 2",
        ),
        (
            &["logits", "--ids", "1", "--out", "/dev/null"],
            &[("MASTER_ADDR", "127.0.0.1"), ("NNODES", "two")],
            "NNODES=\"two\" is not a number",
        ),
        (&["logits", "--ids", "1", "--out", "/dev/null", "--nnodes", "2", "--node-rank", "2"], &[], "node rank 2"),
        // Half a pair would make every process node 0.
        (
            &["logits", "--ids", "1", "--out", "/dev/null"],
            &[("MASTER_ADDR", "127.0.0.1"), ("NNODES", "2")],
            "one of NNODES / NODE_RANK but not the other",
        ),
        (
            &["chat", "--backend", "cpu", "--devices", "2", "--nnodes", "2", "--node-rank", "1"],
            &[],
            "the CPU backend's ranks are threads of one process",
        ),
    ];
    let emu = emulator();
    for (args, env, want) in cases {
        let o = dsv4(args, env).env(dsv4_ascend_sys::EMULATOR_VAR, &emu).output().unwrap();
        assert!(!o.status.success() && stderr(&o).contains(want), "{args:?} {env:?}: {}", stderr(&o));
    }
    // Without MASTER_ADDR (no launcher), a stray WORLD_SIZE does not make a run multi-process.
    let o = dsv4(&["logits", "--backend", "cpu", "--ids", "1,2", "--out", "/dev/null"], &[("WORLD_SIZE", "8")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}
