//! Runs over several processes (nodes) inside one test process: each "node" is a thread with
//! its own `NodeGroup` over real TCP on the loopback, so what crosses the socket is what would
//! cross it between hosts (`tests/ascend_nodes.rs`, `tests/cuda_nodes.rs`).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use dsv4_core::parallel::NodeGroup;

/// How long a node waits for the others to meet.
pub const MEET_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `body(node, group)` for `nnodes` nodes of `local` ranks each on threads, node 0 leading
/// on a free loopback port; each node's result, in node order.
pub fn on_nodes<R: Send>(nnodes: usize, local: usize, body: impl Fn(usize, Arc<NodeGroup>) -> R + Sync) -> Vec<R> {
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
                        Some(l) => NodeGroup::lead(l, nnodes, local, "test run", MEET_TIMEOUT),
                        None => NodeGroup::follow(&addr, nnodes, n, local, "test run", MEET_TIMEOUT),
                    };
                    body(n, Arc::new(group.unwrap()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
