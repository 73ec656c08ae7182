//! Running every rank of a layout as a thread of this process: [`run_threads`] supervises the
//! threads (a failing or panicking rank ends the run with its own error), [`run_local`] runs
//! them over [`LocalComm`], which is how the CPU backend runs `--devices N` and how the
//! multi-rank conformance tests run on any backend. A device backend with its own collective
//! library (HCCL) builds its communicators inside [`run_threads`]' workers.

use crate::backend::Backend;
use crate::error::Error;
use crate::parallel::{Communicator, LocalComm, ParallelLayout, RankContext};

/// Runs `f(rank)` for every rank `0..world`, each on its own thread, and returns the results
/// in rank order.
///
/// A rank that fails or panics drops its communicators, so the others fail at their next
/// collective instead of waiting; the error returned is then the failing rank's own (the
/// cause), not the others' "rank r left the communicator". `E` is the caller's error type
/// (this crate's, or an application's that wraps it).
pub fn run_threads<T, E, F>(world: usize, f: F) -> std::result::Result<Vec<T>, E>
where
    T: Send,
    E: From<Error> + std::fmt::Display + Send,
    F: Fn(usize) -> std::result::Result<T, E> + Sync,
{
    let results: Vec<std::result::Result<T, E>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let f = &f;
                std::thread::Builder::new().name(format!("dsv4-rank-{rank}")).spawn_scoped(s, move || f(rank)).map_err(
                    |e| E::from(Error::Comm { rank, size: world, msg: format!("cannot start its thread: {e}") }),
                )
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| match h {
                Err(e) => Err(e),
                Ok(h) => h.join().unwrap_or_else(|panic| {
                    let what = panic_message(panic.as_ref());
                    Err(E::from(Error::Comm { rank, size: world, msg: format!("the worker panicked: {what}") }))
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

/// [`run_threads`] over an in-process [`LocalComm`] world: `f` gets each rank's
/// [`RankContext`] (its TP and EP groups split from the world).
pub fn run_local<B, T, E, F>(layout: ParallelLayout, f: F) -> std::result::Result<Vec<T>, E>
where
    B: Backend,
    T: Send,
    E: From<Error> + std::fmt::Display + Send,
    F: Fn(RankContext<B>) -> std::result::Result<T, E> + Sync,
{
    let worlds: Vec<std::sync::Mutex<Option<LocalComm>>> =
        LocalComm::world(layout.world).into_iter().map(|c| std::sync::Mutex::new(Some(c))).collect();
    run_threads(layout.world, |rank| {
        let world = worlds[rank].lock().expect("taken once").take().expect("one thread per rank");
        let ctx = RankContext::new(layout.rank(rank), &world as &dyn Communicator<B>).map_err(E::from)?;
        // The world communicator stays alive until this rank is done, so a finished rank is
        // not mistaken for a dead one by slower peers.
        let out = f(ctx);
        drop(world);
        out
    })
}

/// A panic's payload as text: its message when it is a string (as `panic!` makes it), else
/// "a panic".
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic".into(),
    }
}
