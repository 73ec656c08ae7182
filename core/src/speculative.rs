//! Speculative decoding with the checkpoint's own MTP block (spec §D.5): the block drafts k
//! tokens, the main model verifies all of them in one step, and the longest prefix the
//! sampler agrees with is kept (plus the main model's own next token), so every step emits
//! between 1 and k + 1 tokens. Lossless: greedy output is the plain greedy output, and with
//! sampling each token has the plain sampler's distribution ([`Sampler::accept_draft`]).
//!
//! State, per sequence:
//! * the main model's paged state; a verify step is rolled back when a draft is rejected:
//!   the carry is restored from a [`CarrySnapshot`] taken before the step and the block tables
//!   go back to its start ([`KvCache::rollback`]), and the accepted tokens are fed again with
//!   the next step's drafts (they cost rows of the next step, not a step of their own);
//! * the MTP block's own sliding-window state ([`MtpState`]), holding rows computed from the
//!   main model's residual streams only: draft rows past the first (which feed the block its
//!   own output) are rolled back as soon as the drafts are made;
//! * the main residual rows the MTP block has not consumed yet (their next token is unknown).
//!
//! Row i of the MTP block takes the main residual at position i and the token at i + 1, and
//! predicts the token at i + 2. So after the main model has seen tokens `..L` the block, fed
//! up to position L − 2, drafts token L; the verify step feeds token L − 1 and the drafts.

use std::time::Instant;

use crate::backend::{Backend, DeviceTensor};
use crate::error::{Error, Result};
use crate::kv::{CarrySnapshot, KvCache, KvDtype, Sequence};
use crate::model::batch::Batch;
use crate::model::mtp::MtpState;
use crate::model::{Logits, Model};
use crate::sampling::{argmax, Sampler};

/// Most drafts per step [`Speculator::new`] accepts: DeepSeek's deployments and the peers use
/// 1 to 3; beyond a few, a draft chain of random-looking tokens only costs.
pub const MAX_SPECULATIVE_TOKENS: usize = 16;

/// Counters of a speculative generation.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct SpecStats {
    /// Main-model steps that verified drafts (each emits 1 to k + 1 tokens).
    pub verify_steps: usize,
    /// Rows those steps fed (pending tokens, re-fed accepted tokens and drafts).
    pub verify_rows: usize,
    pub drafted: usize,
    pub accepted: usize,
    /// Tokens emitted by verify steps.
    pub emitted: usize,
    /// Seconds in MTP forwards (catching up and drafting) and in verify steps.
    pub draft_secs: f64,
    pub verify_secs: f64,
}

impl SpecStats {
    /// The counts added since `before` (an earlier copy of the same counters).
    pub fn since(&self, before: &SpecStats) -> SpecStats {
        SpecStats {
            verify_steps: self.verify_steps - before.verify_steps,
            verify_rows: self.verify_rows - before.verify_rows,
            drafted: self.drafted - before.drafted,
            accepted: self.accepted - before.accepted,
            emitted: self.emitted - before.emitted,
            draft_secs: self.draft_secs - before.draft_secs,
            verify_secs: self.verify_secs - before.verify_secs,
        }
    }

    /// Accepted drafts per drafted token.
    pub fn acceptance_rate(&self) -> f64 {
        self.accepted as f64 / self.drafted.max(1) as f64
    }

    /// Tokens emitted per verify step (the speed-up over plain decoding at equal step cost).
    pub fn tokens_per_step(&self) -> f64 {
        self.emitted as f64 / self.verify_steps.max(1) as f64
    }
}

/// Rows a verify step with `k` drafts may take back from the main sequence (the newest
/// token and the drafts; [`Speculator::drafts_for`]): what [`Sequence::set_rollback_depth`]
/// is given, and what a pool's `max_step` needs on top of the longest step.
pub fn rollback_depth(k: usize) -> usize {
    k + 1
}

/// What one verify step decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Tokens to emit, in order: the accepted drafts, then the main model's own token.
    pub tokens: Vec<u32>,
    /// How many of them were drafts.
    pub accepted: usize,
}

/// The drafting side of one sequence: the MTP block's state and the main residual rows it
/// has not consumed.
pub struct Speculator<B: Backend> {
    k: usize,
    mtp: MtpState<B>,
    /// Main residual rows `[r, n, D]` for positions `mtp.pos()..mtp.pos() + r`.
    pending: Option<B::Tensor>,
    /// The tokens the MTP rows and the pending rows were computed from (positions
    /// `..mtp.pos() + pending rows`).
    basis: Vec<u32>,
    pub stats: SpecStats,
}

impl<B: Backend> Speculator<B> {
    /// A speculator drafting `k ≥ 1` tokens per step, for steps (prefill chunks) of up to
    /// `max_step` rows. Errors when the checkpoint has no MTP block.
    pub fn new(be: &B, model: &Model<B>, k: usize, max_step: usize, dtype: KvDtype) -> Result<Self> {
        if model.mtp.is_none() {
            return Err(Error::Input(
                "speculative decoding drafts with the checkpoint's MTP block (mtp.0.*), and this checkpoint has none; \
                 drop --speculative-tokens"
                    .into(),
            ));
        }
        if k == 0 || k > MAX_SPECULATIVE_TOKENS {
            return Err(Error::Input(format!(
                "--speculative-tokens must be between 1 and {MAX_SPECULATIVE_TOKENS} (got {k})"
            )));
        }
        // A catch-up after a prefill chunk feeds the chunk's rows plus those held back; a chain
        // of drafts adds k − 1 rows that are rolled back.
        let mut mtp = MtpState::new(be, &model.cfg, dtype, max_step + 2 * k + 2)?;
        mtp.seq.set_rollback_depth(k);
        Ok(Speculator { k, mtp, pending: None, basis: vec![], stats: SpecStats::default() })
    }

    /// Drafts per step.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The longest main-model step (a prefill chunk) whose rows it can take at once.
    pub fn max_step(&self) -> usize {
        self.mtp.max_step() - 2 * self.k - 2
    }

    /// Rows a verify step of the main model may take back: the whole step, the newest token
    /// and k drafts ([`drafts_for`](Self::drafts_for) drafts only from the newest token).
    pub fn main_rollback_depth(&self) -> usize {
        rollback_depth(self.k)
    }

    /// Drafts the next step of a main sequence `seq` with `tokens` tokens verifies: k, at most
    /// `cap` (the token budget and the context left), and none while tokens that a rollback
    /// took back are still to be fed again. (A rollback keeps every accepted token unless a
    /// compression window ends after the last of them within the step,
    /// [`KvCache::rollback_point`]; the next step then feeds them again, without drafts, so
    /// such tokens never pile up and a rollback takes back at most k + 1 rows.)
    pub fn drafts_for(&self, seq: &Sequence, tokens: usize, cap: usize) -> usize {
        if seq.pos() + 1 == tokens {
            self.k.min(cap)
        } else {
            0
        }
    }

    /// Whether a generation of `prompt` can continue from this state, with the main sequence
    /// at `main_pos`: the state has the rows of every position the main sequence has fed (no
    /// plain step moved it on since), and the prompt extends the tokens they came from.
    pub fn continues(&self, prompt: &[u32], main_pos: usize) -> bool {
        self.basis.len() >= main_pos && prompt.len() > self.basis.len() && prompt.starts_with(&self.basis)
    }

    /// Whether the state can draft for a sequence of `tokens` tokens whose main state has fed
    /// all but the newest: it holds (as rows or pending residual rows) every position before
    /// the newest token. Not after a restart until the main model has fed the sequence again.
    pub fn ready(&self, tokens: usize) -> bool {
        self.mtp.pos() + self.held() + 1 == tokens
    }

    fn held(&self) -> usize {
        self.pending.as_ref().map_or(0, |h| h.shape()[0])
    }

    /// Sets the basis to `tokens[..n]`, where `tokens` extends the basis (the caller's
    /// token list only ever grows).
    fn set_basis(&mut self, tokens: &[u32], n: usize) {
        let keep = self.basis.len().min(n);
        debug_assert_eq!(self.basis[..keep], tokens[..keep]);
        self.basis.truncate(keep);
        self.basis.extend_from_slice(&tokens[keep..n]);
    }

    /// Forgets everything (the main sequence started over).
    pub fn reset(&mut self) {
        self.restart_at(0, &[]);
    }

    /// Forgets everything; the main sequence continues a cached prefix, `tokens[..pos]`,
    /// whose residual streams the MTP block never sees: its rows start at `pos`.
    pub fn restart_at(&mut self, pos: usize, tokens: &[u32]) {
        self.mtp.restart_at(pos);
        self.pending = None;
        self.basis.clear();
        self.basis.extend_from_slice(&tokens[..pos]);
    }

    /// Takes main residual rows `h` `[r, n, D]` of positions `start..start + r` (`start` must
    /// continue the rows held; rows it has already are skipped), and feeds the MTP block every
    /// held row whose next token is in `tokens` (all tokens known so far). Returns, when it fed
    /// any, the last fed row's logits (host, `[vocab]`) and output streams (`[1, n, D]`): the
    /// input of [`draft`](Self::draft). Errors as [`Model::mtp_forward`] does.
    pub fn push(
        &mut self,
        be: &B,
        model: &Model<B>,
        h: Option<(&B::Tensor, usize)>,
        tokens: &[u32],
    ) -> Result<Option<(Vec<f32>, B::Tensor)>> {
        let t0 = Instant::now();
        if let Some((h, start)) = h {
            // Rows the state already has (a main sequence rolled back and fed them again) are
            // the same rows: skip them.
            let (expected, rows) = (self.mtp.pos() + self.held(), h.shape()[0]);
            if start > expected {
                return Err(Error::Input(format!(
                    "main residual rows from position {start} do not continue the MTP block's rows (up to {expected})"
                )));
            }
            let skip = expected - start;
            if skip < rows {
                let h = if skip > 0 { be.narrow(h, 0, skip, rows - skip)? } else { h.clone() };
                self.pending = Some(match self.pending.take() {
                    Some(p) => be.concat(&[&p, &h], 0)?,
                    None => h,
                });
            }
        }
        let Some(p) = self.pending.take() else { return Ok(None) };
        let (start, held) = (self.mtp.pos(), p.shape()[0]);
        let feed = held.min(tokens.len().saturating_sub(start + 1));
        if feed < held {
            self.pending = Some(be.narrow(&p, 0, feed, held - feed)?);
        }
        if feed == 0 {
            return Ok(None);
        }
        let h = if feed < held { be.narrow(&p, 0, 0, feed)? } else { p };
        self.set_basis(tokens, start + held);
        let next = &tokens[start + 1..start + 1 + feed];
        let (logits, x) = model.mtp_forward(be, &h, next, start, &mut self.mtp, Logits::LastPerSequence)?;
        let last = be.narrow(&x, 0, feed - 1, 1)?;
        let logits = be.download(&logits)?;
        self.stats.draft_secs += t0.elapsed().as_secs_f64();
        Ok(Some((logits, last)))
    }

    /// Up to `k` greedy drafts of the tokens after `tokens`: the first from the MTP row of
    /// position `tokens.len() − 2` (fed by [`push`](Self::push), whose result `first` is), the
    /// rest by feeding the block its own output streams. The block's state is rolled back to
    /// where it was before the extra rows.
    pub fn draft(&mut self, be: &B, model: &Model<B>, first: (Vec<f32>, B::Tensor), k: usize) -> Result<Vec<u32>> {
        if k == 0 {
            return Ok(vec![]);
        }
        let t0 = Instant::now();
        let (logits, mut x) = first;
        let mut drafts = vec![argmax(&logits)];
        let snap = self.mtp.cache.snapshot_carry(be, &self.mtp.seq)?;
        while drafts.len() < k {
            let pos = self.mtp.pos();
            let last = *drafts.last().expect("one draft");
            let (logits, out) = model.mtp_forward(be, &x, &[last], pos, &mut self.mtp, Logits::All)?;
            drafts.push(argmax(&be.download(&logits)?));
            x = out;
        }
        let start = snap.pos();
        self.mtp.cache.rollback(be, &mut self.mtp.seq, snap, start)?;
        self.stats.drafted += drafts.len();
        self.stats.draft_secs += t0.elapsed().as_secs_f64();
        Ok(drafts)
    }

    /// One verify step of the main model: feeds `tokens[seq.pos()..]` (the pending tokens; the
    /// last is the newest) and `drafts`, and accepts or replaces each draft with `sampler`.
    /// Rolls the main state back when a draft is rejected and keeps the residual rows of the
    /// accepted positions for the MTP block. `tokens` is not changed: the caller appends
    /// [`Verdict::tokens`].
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &mut self,
        be: &B,
        model: &Model<B>,
        cache: &mut KvCache<B>,
        seq: &mut Sequence,
        tokens: &[u32],
        drafts: &[u32],
        sampler: &mut Sampler,
    ) -> Result<Verdict> {
        let t0 = Instant::now();
        let p = seq.pos();
        if p >= tokens.len() {
            return Err(Error::Input(format!("verify step: the state has fed {p} of {} tokens", tokens.len())));
        }
        let mut feed = tokens[p..].to_vec();
        feed.extend_from_slice(drafts);
        let snap = cache.snapshot_carry(be, seq)?;
        let batch = Batch::new(&[(&feed, p)])?;
        let rows: Vec<usize> = (tokens.len() - 1 - p..feed.len()).collect();
        let (logits, h) = model.step_rows(be, &batch, cache, &mut [seq], &rows)?;
        let logits = be.download(&logits)?;
        let verdict = self.judge(be, cache, seq, tokens, drafts, &logits, &h, snap, sampler)?;
        self.stats.verify_secs += t0.elapsed().as_secs_f64();
        Ok(verdict)
    }

    /// The decisions of a verify step that has run (in a batch of other sequences' rows,
    /// perhaps): `seq` was at `snap`'s position and fed `tokens[snap.pos()..]` then `drafts`;
    /// `logits` `[drafts.len() + 1, vocab]` are those of the rows of the newest token and the
    /// drafts, `h` `[fed, n, D]` the step's residual rows of this sequence. Accepts or replaces
    /// each draft, rolls `seq` back past the first rejected one, and keeps the residual rows of
    /// the accepted positions for the MTP block.
    #[allow(clippy::too_many_arguments)]
    pub fn judge(
        &mut self,
        be: &B,
        cache: &mut KvCache<B>,
        seq: &mut Sequence,
        tokens: &[u32],
        drafts: &[u32],
        logits: &[f32],
        h: &B::Tensor,
        snap: CarrySnapshot<B>,
        sampler: &mut Sampler,
    ) -> Result<Verdict> {
        let (p, l) = (snap.pos(), tokens.len());
        if p >= l || self.mtp.pos() + 1 != l || seq.pos() != l + drafts.len() {
            return Err(Error::Input(format!(
                "verify step out of order: main state from {p} to {}, MTP at {}, {l} tokens and {} drafts",
                seq.pos(),
                self.mtp.pos(),
                drafts.len()
            )));
        }
        if !drafts.is_empty() && p + 1 != l {
            return Err(Error::Input(format!(
                "drafts are verified from the newest token only (the state is at {p} of {l} tokens; see drafts_for)"
            )));
        }
        let vocab = logits.len() / (drafts.len() + 1);
        let row = |j: usize| &logits[j * vocab..(j + 1) * vocab];
        let (mut out, mut accepted) = (vec![], 0);
        for (j, &d) in drafts.iter().enumerate() {
            let (ok, t) = sampler.accept_draft(row(j), d);
            out.push(t);
            if !ok {
                break;
            }
            accepted += 1;
        }
        if accepted == drafts.len() {
            out.push(sampler.sample(row(drafts.len())));
        }
        // Residual rows of positions l − 1 .. l − 1 + accepted were fed accepted tokens.
        self.pending = Some(be.narrow(h, 0, l - 1 - p, accepted + 1)?);
        if accepted < drafts.len() {
            // Back to the last accepted token's position when the carry there is exact, else
            // to an earlier point; the accepted tokens past it are fed again next step.
            let q = cache.rollback_point(seq, &snap, l + accepted);
            cache.rollback(be, seq, snap, q)?;
        }
        self.set_basis(tokens, l);
        self.basis.extend_from_slice(&drafts[..accepted]);
        self.stats.verify_steps += 1;
        self.stats.verify_rows += l - p + drafts.len();
        self.stats.accepted += accepted;
        self.stats.emitted += out.len();
        Ok(Verdict { tokens: out, accepted })
    }
}
