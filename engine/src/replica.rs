//! One engine over several ranks (`--devices N`): every rank runs its own engine on its own
//! thread, with its part of the model and its own copy of the decoding state, and they step
//! together because the model's collectives join them at every layer. The engine of rank 0
//! (the leader) serves the handle: it alone sees requests arrive, clients leave and tokens get
//! sampled. Everything else an engine decides (admission, batching, preemption, block
//! allocation) follows deterministically from those inputs, so the leader sends them to the
//! other ranks' engines (the followers) each iteration, and the followers replay them:
//!
//! - before the step, [`Tick::Begin`]: the requests that arrived and those whose client left;
//! - after the model step, [`Tick::After`]: the token each finishing row sampled, and the
//!   requests that ended.
//!
//! A follower never samples, so the ranks cannot drift apart even where sampling is random.
//! A rank whose engine stops (a failed or panicked step) drops its communicators, the others'
//! next collective fails, and the whole engine stops with that error: the server then answers
//! every request with it, never hangs.

use std::sync::mpsc;

use crate::request::GenerationRequest;

/// What the leader tells the followers, in this order each iteration.
pub(crate) enum Tick {
    Begin {
        /// Requests that arrived, in the order the leader queued them.
        arrived: Vec<(u64, GenerationRequest)>,
        /// Requests whose client left (dropped before this iteration's step).
        cancelled: Vec<u64>,
    },
    After {
        /// (request, token) of every row that sampled a token this step.
        tokens: Vec<(u64, u32)>,
        /// Requests that ended with this step (finished, or their client left).
        ended: Vec<u64>,
    },
}

/// An engine's part in a group of ranks.
pub(crate) enum Mirror {
    /// One device, or rank 0 of several: decides, and tells the followers (none on one device).
    Lead(Vec<mpsc::Sender<Tick>>),
    /// Any other rank: replays what the leader decided.
    Follow(mpsc::Receiver<Tick>),
}

impl Mirror {
    /// Sends `tick` to every follower; false if one of them has stopped.
    pub(crate) fn tell(&self, tick: impl Fn() -> Tick) -> bool {
        match self {
            Mirror::Lead(followers) => followers.iter().all(|f| f.send(tick()).is_ok()),
            Mirror::Follow(_) => true,
        }
    }

    pub(crate) fn is_replicated(&self) -> bool {
        !matches!(self, Mirror::Lead(f) if f.is_empty())
    }
}
