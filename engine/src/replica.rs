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
#[derive(Debug, Clone)]
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

/// A [`Tick`] as bytes, for followers in other processes (`dsv4 serve --nnodes`): the leader's
/// node sends each tick to the other nodes, whose followers replay it. Little-endian words;
/// [`Tick::decode`] rejects anything that is not exactly one encoded tick.
impl Tick {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut w = Wire(vec![]);
        match self {
            Tick::Begin { arrived, cancelled } => {
                w.u64(0);
                w.u64(arrived.len() as u64);
                for (id, r) in arrived {
                    w.u64(*id);
                    w.u32s(&r.prompt);
                    w.u64(r.sampling.temperature.to_bits() as u64);
                    w.u64(r.sampling.top_k as u64);
                    w.u64(r.sampling.top_p.to_bits() as u64);
                    w.u64(r.sampling.seed);
                    w.u64(r.max_tokens as u64);
                    w.u32s(&r.stop_token_ids);
                    w.u64(r.logprobs.map_or(u64::MAX, |n| n as u64));
                }
                w.u64s(cancelled);
            }
            Tick::After { tokens, ended } => {
                w.u64(1);
                w.u64(tokens.len() as u64);
                for (id, t) in tokens {
                    w.u64(*id);
                    w.u64(*t as u64);
                }
                w.u64s(ended);
            }
        }
        w.0
    }

    pub(crate) fn decode(b: &[u8]) -> Result<Tick, String> {
        let mut r = Reader { b, at: 0 };
        let tick = match r.u64()? {
            0 => {
                let n = r.len()?;
                let mut arrived = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let id = r.u64()?;
                    let prompt = r.u32s()?;
                    let sampling = dsv4_core::sampling::SamplingParams {
                        temperature: f32::from_bits(r.u64()? as u32),
                        top_k: r.u64()? as usize,
                        top_p: f32::from_bits(r.u64()? as u32),
                        seed: r.u64()?,
                    };
                    let max_tokens = r.u64()? as usize;
                    let stop_token_ids = r.u32s()?;
                    let logprobs = match r.u64()? {
                        u64::MAX => None,
                        n => Some(n as usize),
                    };
                    arrived.push((id, GenerationRequest { prompt, sampling, max_tokens, stop_token_ids, logprobs }));
                }
                Tick::Begin { arrived, cancelled: r.u64s()? }
            }
            1 => {
                let n = r.len()?;
                let mut tokens = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    let id = r.u64()?;
                    let t = u32::try_from(r.u64()?).map_err(|_| "a token id past u32")?;
                    tokens.push((id, t));
                }
                Tick::After { tokens, ended: r.u64s()? }
            }
            k => return Err(format!("unknown tick kind {k}")),
        };
        if r.at != b.len() {
            return Err(format!("{} bytes after the tick", b.len() - r.at));
        }
        Ok(tick)
    }
}

struct Wire(Vec<u8>);

impl Wire {
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32s(&mut self, v: &[u32]) {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    fn u64s(&mut self, v: &[u64]) {
        self.u64(v.len() as u64);
        for &x in v {
            self.u64(x);
        }
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or("a truncated tick")?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| "a truncated tick")?))
    }
    /// A count, checked against the bytes left (each item is at least 4 bytes).
    fn len(&mut self) -> Result<usize, String> {
        let n = self.u64()?;
        if n > (self.b.len() - self.at) as u64 / 4 {
            return Err(format!("a count of {n} past the tick's end"));
        }
        Ok(n as usize)
    }
    fn u32s(&mut self) -> Result<Vec<u32>, String> {
        let n = self.len()?;
        Ok(self.take(4 * n)?.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
    fn u64s(&mut self) -> Result<Vec<u64>, String> {
        let n = self.len()?;
        (0..n).map(|_| self.u64()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv4_core::sampling::SamplingParams;

    #[test]
    fn ticks_survive_the_wire_and_damage_is_refused() {
        let req = GenerationRequest {
            prompt: vec![1, 2, 70000],
            sampling: SamplingParams { temperature: 0.7, top_k: 40, top_p: 0.95, seed: u64::MAX - 3 },
            max_tokens: 17,
            stop_token_ids: vec![9],
            logprobs: Some(5),
        };
        let plain = GenerationRequest { logprobs: None, stop_token_ids: vec![], ..req.clone() };
        let ticks = [
            Tick::Begin { arrived: vec![(3, req), (4, plain)], cancelled: vec![1, 2] },
            Tick::Begin { arrived: vec![], cancelled: vec![] },
            Tick::After { tokens: vec![(3, 5), (4, u32::MAX)], ended: vec![4] },
        ];
        for t in &ticks {
            let bytes = t.encode();
            let back = Tick::decode(&bytes).unwrap();
            assert_eq!(format!("{back:?}"), format!("{t:?}"));
            assert!(Tick::decode(&bytes[..bytes.len() - 1]).is_err());
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Tick::decode(&longer).is_err());
        }
        // A huge count is refused before anything is allocated for it.
        let mut huge = 0u64.to_le_bytes().to_vec();
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Tick::decode(&huge).unwrap_err().contains("past the tick's end"));
    }
}
