//! `Profiled<B>`: a backend that forwards every [`Backend`] method to `B` and times each op
//! call, for a per-op profile of a run on any backend (`dsv4 bench --profile`).
//!
//! Every method of the trait is forwarded, the fused ops with default bodies included: a fused
//! op left to the trait's default would run the default composition of primitives instead of
//! `B`'s override, and the profile would describe a different computation than the one being
//! measured. [`FORWARDED`] lists the forwarded methods; a test compares it with the
//! trait's methods as written in `backend.rs`.
//!
//! **No double counting.** A forwarded op calls the op of the inner backend `B`; whatever that
//! op calls in turn (a fused op's primitives, a default composition's steps) is called on `B`
//! itself, never on the wrapper, so it is not timed separately: each entry is the time of the
//! outermost calls the graph made, and the entries add up to at most the wall time. The flip
//! side: a fused op that `B` does not override shows up as one entry (say `hc_post`) whose time
//! is that of its whole composition.
//!
//! **Asynchronous backends.** Ascend and CUDA may queue an op and return at once; the time
//! then lands on whichever later call waits (a `download`, `synchronize`). With `sync` set the
//! wrapper calls `B::synchronize` after each timed op, inside the timed span, so each op is
//! charged its own device time. That serialises host and device, so a profiled run is slower
//! than a plain one. The CPU backend computes synchronously: `sync` only adds a no-op call.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::{
    Backend, BinaryOp, CompressorStep, DeviceTensor, ExpertWeights, FakeQuant, ReduceOp, RowFormat, UnaryOp,
};
use crate::config::ScoringFunc;
use crate::error::Result;
use crate::precision::Precision;
use crate::tensor::StoredWeight;

/// What a call is accumulated under: the method name and, for the weight ops, the weight's
/// shape and whether the input had one row (decode) or more (prefill). Kept structured (not a
/// formatted string) so that recording a call does not format anything.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    op: &'static str,
    /// `(weight shape, input rows > 1)` for `linear`, `grouped_linear` and `embedding`.
    weight: Option<(Vec<usize>, bool)>,
}

impl Key {
    fn op(op: &'static str) -> Self {
        Key { op, weight: None }
    }

    fn weight(op: &'static str, shape: &[usize], rows: usize) -> Self {
        Key { op, weight: Some((shape.to_vec(), rows > 1)) }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match &self.weight {
            None => f.write_str(self.op),
            Some((shape, many)) => write!(f, "{} {shape:?} {}", self.op, if *many { "m>1" } else { "m=1" }),
        }
    }
}

/// Rows of a `linear` input `[.., K]`: the product of every axis but the last.
fn linear_rows(shape: &[usize]) -> usize {
    shape[..shape.len().saturating_sub(1)].iter().product()
}

/// Time and number of the calls under one key.
#[derive(Default, Clone, Copy)]
struct Tally {
    total: Duration,
    calls: u64,
}

/// A backend that forwards every [`Backend`] method to `B`, timing each op call (see the module
/// doc). Cheap accessors (`name`, `describe`, `free_memory`, `weight_shape`) are forwarded
/// untimed; everything else, transfers, pool writes and `synchronize` included, is timed.
pub struct Profiled<B: Backend> {
    inner: B,
    sync: bool,
    tallies: Mutex<HashMap<Key, Tally>>,
}

impl<B: Backend> Profiled<B> {
    /// Wraps `inner`. `sync`: call `inner.synchronize()` after each timed op before stopping
    /// the clock (for asynchronous backends; see the module doc).
    pub fn new(inner: B, sync: bool) -> Self {
        Profiled { inner, sync, tallies: Mutex::new(HashMap::new()) }
    }

    /// The wrapped backend (calls on it are not recorded).
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// Whether each timed op is followed by a `synchronize` inside its timed span.
    pub fn syncs(&self) -> bool {
        self.sync
    }

    /// What was recorded since the last `take` (or since `new`), and a fresh start.
    pub fn take(&self) -> Profile {
        let tallies = std::mem::take(&mut *self.lock());
        let mut entries: Vec<ProfileEntry> = tallies
            .into_iter()
            .map(|(key, t)| ProfileEntry { key: key.to_string(), total: t.total, calls: t.calls })
            .collect();
        // Ties (equal durations) by key, so that the order does not depend on the hash map's.
        entries.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.key.cmp(&b.key)));
        Profile { entries }
    }

    /// A poisoned lock only means a panic elsewhere while recording; the tallies stay usable.
    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Tally>> {
        self.tallies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the inner backend, synchronising after it when `sync` (unless `f` is the
    /// synchronisation itself: `wait_included`), and adds the elapsed time to `key`. An error
    /// of the op wins over one of the synchronisation.
    fn timed<T>(&self, key: Key, wait_included: bool, f: impl FnOnce(&B) -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let out = f(&self.inner);
        let synced = if self.sync && !wait_included { self.inner.synchronize() } else { Ok(()) };
        let elapsed = start.elapsed();
        let mut tallies = self.lock();
        let tally = tallies.entry(key).or_default();
        tally.total += elapsed;
        tally.calls += 1;
        drop(tallies);
        let out = out?;
        synced?;
        Ok(out)
    }
}

/// The `Backend` impl for [`Profiled`] and the list of the methods it forwards, from one list
/// of signatures, so that [`FORWARDED`] cannot disagree with what the impl forwards.
/// Each line: `untimed`, `timed` (keyed by the method name), `timed(be => key)` (keyed by the
/// expression `key`, where `be` is the inner backend), or `wait` (timed, no extra synchronize:
/// it is the synchronisation).
macro_rules! profiled_backend {
    ($(
        $(#[$attr:meta])*
        $mode:ident $(($be:ident => $key:expr))?
        fn $name:ident $(<$lt:lifetime>)? (&self $(, $arg:ident : $ty:ty)* $(,)?) -> $ret:ty;
    )*) => {
        impl<B: Backend> Backend for Profiled<B> {
            type Tensor = B::Tensor;
            type Index = B::Index;
            type Weight = B::Weight;
            type Pool = B::Pool;

            $(
                $(#[$attr])*
                fn $name $(<$lt>)? (&self $(, $arg: $ty)*) -> $ret {
                    profiled_backend!(@body $mode self $name ($($arg),*) $(($be => $key))?)
                }
            )*
        }

        /// Every `Backend` method [`Profiled`] forwards, in trait order.
        pub const FORWARDED: &[&str] = &[$(stringify!($name)),*];
    };
    (@body untimed $s:ident $name:ident ($($arg:ident),*)) => {
        $s.inner.$name($($arg),*)
    };
    (@body timed $s:ident $name:ident ($($arg:ident),*)) => {
        $s.timed(Key::op(stringify!($name)), false, |inner| inner.$name($($arg),*))
    };
    (@body wait $s:ident $name:ident ($($arg:ident),*)) => {
        $s.timed(Key::op(stringify!($name)), true, |inner| inner.$name($($arg),*))
    };
    (@body timed $s:ident $name:ident ($($arg:ident),*) ($be:ident => $key:expr)) => {{
        let key = {
            let $be = &$s.inner;
            $key
        };
        $s.timed(key, false, |inner| inner.$name($($arg),*))
    }};
}

profiled_backend! {
    untimed fn name(&self) -> &str;
    untimed fn describe(&self) -> String;
    untimed fn free_memory(&self) -> Option<usize>;
    untimed fn supports_row_format(&self, format: RowFormat) -> bool;

    timed fn upload(&self, data: &[f32], shape: &[usize]) -> Result<Self::Tensor>;
    timed fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    timed fn upload_index(&self, data: &[i32], shape: &[usize]) -> Result<Self::Index>;
    timed fn download_index(&self, t: &Self::Index) -> Result<Vec<i32>>;
    timed fn upload_weight(&self, w: &StoredWeight) -> Result<Self::Weight>;
    untimed fn weight_shape<'w>(&self, w: &'w Self::Weight) -> &'w [usize];
    wait fn synchronize(&self) -> Result<()>;
    timed fn full(&self, shape: &[usize], value: f32) -> Result<Self::Tensor>;

    timed fn alloc_pool(&self, rows: usize, width: usize, format: RowFormat) -> Result<Self::Pool>;
    timed fn pool_write(&self, pool: &mut Self::Pool, slots: &Self::Index, values: &Self::Tensor) -> Result<()>;
    timed fn pool_read(&self, pool: &Self::Pool, slots: &Self::Index) -> Result<Self::Tensor>;

    timed(be => Key::weight("linear", be.weight_shape(w), linear_rows(x.shape())))
    fn linear(&self, x: &Self::Tensor, w: &Self::Weight) -> Result<Self::Tensor>;
    // x `[M, G, K]`: M rows.
    timed(be => Key::weight("grouped_linear", be.weight_shape(w), x.shape().first().copied().unwrap_or(0)))
    fn grouped_linear(&self, x: &Self::Tensor, w: &Self::Weight, groups: usize) -> Result<Self::Tensor>;
    timed(be => Key::weight("embedding", be.weight_shape(table), ids.numel()))
    fn embedding(&self, table: &Self::Weight, ids: &Self::Index) -> Result<Self::Tensor>;
    timed fn matmul(&self, a: &Self::Tensor, b: &Self::Tensor, transpose_b: bool) -> Result<Self::Tensor>;
    timed fn unary(&self, x: &Self::Tensor, op: UnaryOp) -> Result<Self::Tensor>;
    timed fn binary(&self, a: &Self::Tensor, b: &Self::Tensor, op: BinaryOp) -> Result<Self::Tensor>;
    timed fn affine(&self, x: &Self::Tensor, mul: f32, add: f32) -> Result<Self::Tensor>;
    timed fn clamp(&self, x: &Self::Tensor, min: f32, max: f32) -> Result<Self::Tensor>;
    timed fn round_to_bf16(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    // Counted with `round_to_bf16`: the same op, with or without the new tensor.
    timed(_be => Key::op("round_to_bf16"))
    fn round_to_bf16_owned(&self, x: Self::Tensor) -> Result<Self::Tensor>;
    timed fn fake_quant(&self, x: &Self::Tensor, q: FakeQuant) -> Result<Self::Tensor>;
    timed fn hadamard(&self, x: &Self::Tensor) -> Result<Self::Tensor>;
    timed fn reduce(&self, x: &Self::Tensor, axis: usize, op: ReduceOp) -> Result<Self::Tensor>;
    timed fn softmax(&self, x: &Self::Tensor, axis: usize) -> Result<Self::Tensor>;
    timed fn rms_norm(&self, x: &Self::Tensor, weight: Option<&Self::Tensor>, eps: f32) -> Result<Self::Tensor>;
    timed fn rope(&self, x: &Self::Tensor, cos: &Self::Tensor, sin: &Self::Tensor, inverse: bool) -> Result<Self::Tensor>;
    timed fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    timed fn transpose(&self, x: &Self::Tensor, a: usize, b: usize) -> Result<Self::Tensor>;
    timed fn narrow(&self, x: &Self::Tensor, axis: usize, start: usize, len: usize) -> Result<Self::Tensor>;
    timed fn concat(&self, xs: &[&Self::Tensor], axis: usize) -> Result<Self::Tensor>;
    timed fn index_select(&self, x: &Self::Tensor, idx: &Self::Index) -> Result<Self::Tensor>;
    timed fn gather_last(&self, x: &Self::Tensor, idx: &Self::Index) -> Result<Self::Tensor>;
    timed fn index_add(&self, dst: &Self::Tensor, idx: &Self::Index, src: &Self::Tensor) -> Result<Self::Tensor>;
    timed fn topk(&self, x: &Self::Tensor, k: usize) -> Result<(Self::Tensor, Self::Index)>;
    timed fn index_mask(&self, idx: &Self::Index) -> Result<Self::Tensor>;
    timed fn concat_index(&self, xs: &[&Self::Index], axis: usize) -> Result<Self::Index>;
    timed fn offset_index(&self, idx: &Self::Index, offset: i32) -> Result<Self::Index>;

    // Fused ops: forwarded so that B's overrides run (see the module doc).
    // Counted with `rope`: the same op, with or without the copy.
    timed(_be => Key::op("rope"))
    fn rope_owned(&self, x: Self::Tensor, cos: &Self::Tensor, sin: &Self::Tensor, inverse: bool) -> Result<Self::Tensor>;
    // Keyed as `linear`: the same matrices, whichever form the caller asked for (the BF16
    // rounding of the output, where the precision has one, is counted with it).
    timed(be => Key::weight("linear", be.weight_shape(w), linear_rows(x.shape())))
    fn linear_act(&self, x: &Self::Tensor, w: &Self::Weight, act: Precision) -> Result<Self::Tensor>;
    timed(be => Key::weight("grouped_linear", be.weight_shape(w), x.shape().first().copied().unwrap_or(0)))
    fn grouped_linear_act(&self, x: &Self::Tensor, w: &Self::Weight, groups: usize, act: Precision) -> Result<Self::Tensor>;
    #[allow(clippy::too_many_arguments)]
    timed fn hc_pre(
        &self,
        x: &Self::Tensor,
        fn_w: &Self::Weight,
        base: &Self::Tensor,
        scale: &Self::Tensor,
        sinkhorn_iters: usize,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor, Self::Tensor)>;
    timed fn sinkhorn(&self, comb: &Self::Tensor, iters: usize, eps: f32) -> Result<Self::Tensor>;
    timed fn hc_post(
        &self,
        x: &Self::Tensor,
        y: &Self::Tensor,
        post: &Self::Tensor,
        comb: &Self::Tensor,
    ) -> Result<Self::Tensor>;
    timed fn hc_head(
        &self,
        x: &Self::Tensor,
        fn_w: &Self::Weight,
        base: &Self::Tensor,
        scale: &Self::Tensor,
        hc_eps: f32,
        norm_eps: f32,
    ) -> Result<Self::Tensor>;
    timed fn compressor_step(
        &self,
        step: &CompressorStep<'_, Self::Tensor, Self::Index, Self::Weight>,
        carry: &mut Self::Pool,
        act: Precision,
    ) -> Result<Option<Self::Tensor>>;
    timed fn compressor_pool(&self, kv: &Self::Tensor, score: &Self::Tensor) -> Result<Self::Tensor>;
    #[allow(clippy::too_many_arguments)]
    timed fn indexer_select(
        &self,
        q: &Self::Tensor,
        keys: &Self::Pool,
        key_rows: &Self::Index,
        weights: &Self::Tensor,
        valid: &[Range<usize>],
        k: usize,
        offset: i32,
        act: Precision,
    ) -> Result<Self::Index>;
    timed fn sparse_attention(
        &self,
        q: &Self::Tensor,
        kv: &Self::Pool,
        idx: &Self::Index,
        sinks: &Self::Tensor,
        scale: f32,
        act: Precision,
    ) -> Result<Self::Tensor>;
    timed fn swiglu(&self, gate: &Self::Tensor, up: &Self::Tensor, limit: f32) -> Result<Self::Tensor>;
    timed fn expert_ffn(
        &self,
        x: &Self::Tensor,
        e: &ExpertWeights<Self::Weight>,
        limit: f32,
        act: Precision,
    ) -> Result<Self::Tensor>;
    #[allow(clippy::too_many_arguments)]
    timed fn moe_route(
        &self,
        logits: &Self::Tensor,
        scoring: ScoringFunc,
        bias: Option<&Self::Tensor>,
        hash_ids: Option<&Self::Index>,
        k: usize,
        routed_scale: f32,
    ) -> Result<(Self::Index, Self::Tensor)>;
    timed fn moe_experts(
        &self,
        x: &Self::Tensor,
        expert_ids: &[i32],
        weights: &Self::Tensor,
        experts: &[ExpertWeights<Self::Weight>],
        limit: f32,
        act: Precision,
    ) -> Result<Self::Tensor>;
}

/// Time spent under one key: an op name such as `hc_pre`, or for the weight ops the weight's
/// shape and whether the input had one row, e.g. `linear [129280, 1024] m=1` (`m>1`: more).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileEntry {
    pub key: String,
    /// Wall time of all the calls, each measured from the call to its return (to after the
    /// synchronisation with `sync`).
    pub total: Duration,
    pub calls: u64,
}

/// What a [`Profiled`] backend recorded between two [`Profiled::take`] calls: one entry per
/// key, by total time, longest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profile {
    pub entries: Vec<ProfileEntry>,
}

impl Profile {
    /// The time of all entries together.
    pub fn total(&self) -> Duration {
        self.entries.iter().map(|e| e.total).sum()
    }

    /// The entry under `key`, if any call was recorded under it.
    pub fn get(&self, key: &str) -> Option<&ProfileEntry> {
        self.entries.iter().find(|e| e.key == key)
    }

    /// A table of the entries read against `wall`, the wall time of the phase they were
    /// recorded in; see [`Table`] for the columns and options.
    pub fn table(&self, wall: Duration) -> Table<'_> {
        Table { profile: self, wall, top: usize::MAX, per: 1, unit: "" }
    }
}

/// Every entry, read against the entries' own total.
impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        self.table(self.total()).fmt(f)
    }
}

/// A [`Profile`] as a text table, one line per entry: total milliseconds, calls, microseconds
/// per call, percent of the wall time, key; then a line with the time the listed entries
/// cover. With [`Table::per`] the totals, call counts and wall time are divided by a number
/// of steps (e.g. decode tokens).
pub struct Table<'a> {
    profile: &'a Profile,
    wall: Duration,
    top: usize,
    per: usize,
    unit: &'a str,
}

impl<'a> Table<'a> {
    /// Only the `n` longest entries.
    pub fn top(self, n: usize) -> Self {
        Table { top: n, ..self }
    }

    /// Milliseconds and calls per `unit` (e.g. `"token"`): divided by `steps` (at least 1).
    pub fn per(self, steps: usize, unit: &'a str) -> Self {
        Table { per: steps.max(1), unit, ..self }
    }
}

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let per = self.per as f64;
        let suffix = if self.unit.is_empty() { String::new() } else { format!("/{}", self.unit) };
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / per;
        let share = |d: Duration| {
            let wall = self.wall.as_secs_f64();
            if wall > 0.0 {
                100.0 * d.as_secs_f64() / wall
            } else {
                0.0
            }
        };
        let listed = &self.profile.entries[..self.top.min(self.profile.entries.len())];
        writeln!(
            f,
            "{:>12} {:>12} {:>10} {:>7}  op",
            format!("ms{suffix}"),
            format!("calls{suffix}"),
            "µs/call",
            "% wall"
        )?;
        for e in listed {
            let calls = e.calls as f64 / per;
            // Whole call counts print without decimals (a decode token makes the same calls each
            // step, so per token they are usually whole too).
            let calls = if calls.fract() == 0.0 { format!("{calls:.0}") } else { format!("{calls:.2}") };
            let us_per_call = e.total.as_secs_f64() * 1e6 / e.calls.max(1) as f64;
            writeln!(f, "{:>12.3} {calls:>12} {us_per_call:>10.1} {:>6.1}%  {}", ms(e.total), share(e.total), e.key)?;
        }
        let covered: Duration = listed.iter().map(|e| e.total).sum();
        write!(
            f,
            "{} listed ops: {:.3} ms{suffix} of {:.3} ms{suffix} wall ({:.1}%)",
            listed.len(),
            ms(covered),
            ms(self.wall),
            share(covered)
        )?;
        let rest = &self.profile.entries[listed.len()..];
        if !rest.is_empty() {
            let rest_total: Duration = rest.iter().map(|e| e.total).sum();
            write!(f, "; {} more: {:.3} ms{suffix}", rest.len(), ms(rest_total))?;
        }
        writeln!(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names of the `fn`s of `pub trait Backend` as written in `backend.rs`.
    fn trait_methods() -> Vec<String> {
        let src = include_str!("backend.rs");
        let start = src.find("\npub trait Backend").expect("backend.rs declares `pub trait Backend`");
        // The trait's body ends at the first `}` in column 0 after it.
        let body = &src[start..];
        let end = body.find("\n}").expect("the trait's closing brace");
        body[..end]
            .lines()
            .filter_map(|l| {
                let rest = l.trim_start().strip_prefix("fn ")?;
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                Some(name)
            })
            .collect()
    }

    #[test]
    fn every_trait_method_is_forwarded() {
        let methods = trait_methods();
        // A sanity floor: the parse found the trait (primitives and fused ops), not nothing.
        assert!(methods.len() >= 45, "parsed only {methods:?}");
        for m in ["name", "linear", "offset_index", "hc_pre", "moe_experts"] {
            assert!(methods.iter().any(|x| x == m), "{m} missing from the parsed methods {methods:?}");
        }
        let forwarded = FORWARDED;
        let missing: Vec<&String> = methods.iter().filter(|m| !forwarded.contains(&m.as_str())).collect();
        assert!(missing.is_empty(), "Backend methods Profiled does not forward: {missing:?}");
        let extra: Vec<&&str> = forwarded.iter().filter(|f| !methods.iter().any(|m| m == *f)).collect();
        assert!(extra.is_empty(), "forwarded names the parse did not find: {extra:?}");
        assert_eq!(forwarded.len(), methods.len(), "a method is listed twice");
    }

    #[test]
    fn keys_name_the_weight_shape_and_rows() {
        assert_eq!(
            Key::weight("linear", &[129280, 1024], linear_rows(&[1, 1024])).to_string(),
            "linear [129280, 1024] m=1"
        );
        assert_eq!(Key::weight("linear", &[64, 32], linear_rows(&[2, 3, 32])).to_string(), "linear [64, 32] m>1");
        assert_eq!(Key::op("hc_pre").to_string(), "hc_pre");
    }

    #[test]
    fn table_lists_the_top_entries_against_the_wall_time() {
        let ms = Duration::from_millis;
        let p = Profile {
            entries: vec![
                ProfileEntry { key: "linear [8, 4] m=1".into(), total: ms(6), calls: 4 },
                ProfileEntry { key: "hc_pre".into(), total: ms(2), calls: 2 },
                ProfileEntry { key: "reshape".into(), total: ms(1), calls: 8 },
            ],
        };
        let text = p.table(ms(10)).top(2).per(2, "token").to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].contains("ms/token") && lines[0].contains("calls/token"), "{text}");
        // 6 ms over 2 tokens; 4 calls over 2 tokens; 1500 µs per call; 60% of the wall.
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["3.000", "2", "1500.0", "60.0%", "linear", "[8,", "4]", "m=1"]
        );
        assert!(lines[2].ends_with("hc_pre"), "{text}");
        assert_eq!(lines[3], "2 listed ops: 4.000 ms/token of 5.000 ms/token wall (80.0%); 1 more: 0.500 ms/token");
        // Display: everything, against the entries' own total.
        let all = p.to_string();
        assert_eq!(all.lines().count(), 5, "{all}");
        assert!(all.ends_with("3 listed ops: 9.000 ms of 9.000 ms wall (100.0%)\n"), "{all}");
    }
}
