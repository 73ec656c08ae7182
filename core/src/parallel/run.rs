//! Running every rank of a layout as a thread of this process over [`LocalComm`]: how the CPU
//! backend runs `--devices N`, and how the multi-rank conformance tests run on any backend.

use crate::backend::Backend;
use crate::error::Error;
use crate::parallel::{Communicator, LocalComm, ParallelLayout, RankContext};

/// Runs `f` once per rank of `layout`, each on its own thread with its [`RankContext`] (the TP
/// and EP groups split from one in-process world), and returns the ranks' results in rank
/// order.
///
/// A rank that fails or panics leaves its communicators, so the others fail at their next
/// collective instead of waiting; the error returned is then the failing rank's own (the cause),
/// not the others' "rank r left".
///
/// `E` is the callers' error type (this crate's, or an application's that wraps it).
pub fn run_local<B, T, E, F>(layout: ParallelLayout, f: F) -> std::result::Result<Vec<T>, E>
where
    B: Backend,
    T: Send,
    E: From<Error> + std::fmt::Display + Send,
    F: Fn(RankContext<B>) -> std::result::Result<T, E> + Sync,
{
    let worlds = LocalComm::world(layout.world);
    let results: Vec<std::result::Result<T, E>> = std::thread::scope(|s| {
        let handles: Vec<_> = worlds
            .into_iter()
            .enumerate()
            .map(|(rank, world)| {
                let f = &f;
                std::thread::Builder::new()
                    .name(format!("dsv4-rank-{rank}"))
                    .spawn_scoped(s, move || {
                        let ctx =
                            RankContext::new(layout.rank(rank), &world as &dyn Communicator<B>).map_err(E::from)?;
                        // The world communicator stays alive until this rank is done, so a
                        // finished rank is not mistaken for a dead one by slower peers.
                        let out = f(ctx);
                        drop(world);
                        out
                    })
                    .map_err(|e| {
                        E::from(Error::Comm { rank, size: layout.world, msg: format!("cannot start its thread: {e}") })
                    })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| match h {
                Err(e) => Err(e),
                Ok(h) => h.join().unwrap_or_else(|panic| {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into());
                    Err(E::from(Error::Comm { rank, size: layout.world, msg: format!("the worker panicked: {what}") }))
                }),
            })
            .collect()
    });
    let mut out = Vec::with_capacity(results.len());
    let mut errors = vec![];
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        return Ok(out);
    }
    // The cause: the first error that is not another rank's report of a rank leaving.
    let left = |e: &E| e.to_string().contains(" left the communicator");
    let i = errors.iter().position(|e| !left(e)).unwrap_or(0);
    Err(errors.swap_remove(i))
}
