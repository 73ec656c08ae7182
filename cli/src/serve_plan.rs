//! `dsv4 serve --devices N` at start-up: the memory plan of `dsv4 plan`
//! ([`dsv4_core::parallel::plan`]) computed from what the server runs with (the checkpoint's
//! tensors in the backend's forms, the layout, the KV row format, each rank's memory), and the
//! pool every rank holds sized from it ([`serving_pool`]): one computation for the summary on
//! stderr, the refusal and the pool. A layout that does not fit is refused here, before any rank
//! loads its weights, naming the shortfall and what to change.

use std::fmt::Write;

use anyhow::{bail, Result};
use dsv4_core::kv::{human_bytes, KvDtype};
use dsv4_core::parallel::plan::{
    fewest_devices, fullest_rank_bytes, plan, plural, serving_pool, Plan, PlanError, PlanInput, PlanTensor, PoolAsk,
    ServingAsk, ServingError, ServingPool, DEFAULT_UTILISATION,
};
use dsv4_core::parallel::ParallelLayout;
use dsv4_core::ModelConfig;

/// The memory one rank plans with.
#[derive(Debug, Clone, PartialEq)]
pub struct RankMemory {
    /// Bytes of one rank's memory (None: the backend does not say; the plan then assumes the
    /// weights and the asked pool fit).
    pub bytes: Option<usize>,
    /// The share of it the plan uses.
    pub utilisation: f64,
    /// Where the figure comes from, for the summary.
    pub source: String,
    /// The ranks share one memory (the CPU backend): more devices do not add memory.
    pub shared: bool,
    /// The weights stay memory-mapped and are not counted ([`RankMemory::with_mapped_weights`]).
    pub mapped: bool,
}

impl RankMemory {
    /// CPU ranks: the memory available to the process (`free`), shared by the `world` ranks,
    /// all of it (no runtime reserve: without `--kv-cache-memory` the pool takes at most half
    /// of what the weights leave).
    pub fn cpu(free: Option<usize>, world: usize) -> Self {
        RankMemory {
            bytes: free.map(|f| f / world.max(1)),
            utilisation: 1.0,
            source: match free {
                Some(f) if world > 1 => format!("the {} available to this process / {world} ranks", human_bytes(f)),
                Some(f) => format!("the {} available to this process", human_bytes(f)),
                None => "unknown (the CPU backend does not report it)".into(),
            },
            shared: true,
            mapped: false,
        }
    }

    /// CPU ranks whose weights stay memory-mapped (`--weight-memory mapped`, or `auto` on a
    /// checkpoint over 3/4 of the memory): the page cache holding them is reclaimed as needed,
    /// so the fullest rank's `weights` bytes are added back to each rank's memory and only the
    /// pool is planned in what is available.
    pub fn with_mapped_weights(self, weights: usize) -> Self {
        RankMemory {
            bytes: self.bytes.map(|b| b + weights),
            source: format!("{}, the weights memory-mapped (page cache, not counted)", self.source),
            mapped: true,
            ..self
        }
    }

    /// Ascend ranks: the first device's free memory, of which the plan uses
    /// [`DEFAULT_UTILISATION`] (the rest for activations, workspaces and the runtime).
    pub fn device(free: Option<usize>, device: usize) -> Self {
        RankMemory {
            bytes: free,
            utilisation: DEFAULT_UTILISATION,
            source: match free {
                Some(f) => format!("device {device}'s free {} × {DEFAULT_UTILISATION}", human_bytes(f)),
                None => format!("unknown (device {device} does not report its free memory)"),
            },
            shared: false,
            mapped: false,
        }
    }
}

/// What the server was asked, besides the pool size.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub cfg: &'a ModelConfig,
    pub tensors: &'a [PlanTensor],
    pub layout: ParallelLayout,
    pub kv_dtype: KvDtype,
    /// Whether the backend keeps fp8 KV rows (the CPU and CUDA backends, Ascend's on the 950).
    pub fp8_rows: bool,
    /// The collectives' library (what it holds per rank comes off the usable memory).
    pub comm: dsv4_core::parallel::plan::CollectiveLibrary,
    pub max_step: usize,
    pub ask: ServingAsk,
}

/// The plan and the pool of a server that fits.
#[derive(Debug, Clone)]
pub struct ServePlan {
    pub plan: Plan,
    pub pool: ServingPool,
}

/// Why it does not fit.
#[derive(Debug, Clone)]
enum Refusal {
    Plan(PlanError),
    /// The error, and what the plan leaves each rank after its weights.
    Serving(ServingError, usize),
}

fn input<'a>(r: &Request<'a>, memory: &RankMemory, kv_dtype: KvDtype) -> PlanInput<'a> {
    let device_memory = memory.bytes.unwrap_or_else(|| {
        // Unknown memory: exactly the fullest rank's weights and the pool asked for.
        let weights = fullest_rank_bytes(r.cfg, r.tensors, r.layout);
        let seqs = r.ask.max_seqs.max(1);
        let pool = match r.ask.pool {
            PoolAsk::Bytes(b) => b,
            _ => dsv4_core::parallel::plan::pool_bytes_for(r.cfg, kv_dtype, (seqs, seqs, r.ask.max_len), r.max_step),
        };
        // `Need` takes at most half of what is left; the communicators' buffers come first.
        let pool = if matches!(r.ask.pool, PoolAsk::Need) { 2 * pool } else { pool };
        weights + pool + r.comm.buffers(r.layout).total()
    });
    let utilisation = if memory.bytes.is_some() { memory.utilisation } else { 1.0 };
    PlanInput {
        cfg: r.cfg,
        tensors: r.tensors,
        layout: r.layout,
        kv_dtype,
        device_memory,
        utilisation,
        max_step: r.max_step,
        comm: r.comm,
    }
}

fn attempt(r: &Request, memory: &RankMemory, kv_dtype: KvDtype) -> std::result::Result<ServePlan, Refusal> {
    let p = plan(&input(r, memory, kv_dtype)).map_err(Refusal::Plan)?;
    let pool = serving_pool(r.cfg, &p, &r.ask).map_err(|e| Refusal::Serving(e, p.pool))?;
    Ok(ServePlan { plan: p, pool })
}

/// The plan and pool of `r` on ranks of `memory`, or an error naming the shortfall and what to
/// change (each suggestion checked against the plan where it is cheap to).
pub fn plan_serving(r: &Request, memory: &RankMemory) -> Result<ServePlan> {
    let e = match attempt(r, memory, r.kv_dtype) {
        Ok(p) => return Ok(p),
        Err(e) => e,
    };
    let what = match &e {
        Refusal::Plan(e) => e.to_string(),
        Refusal::Serving(e, _) => e.to_string(),
    };
    let mut fixes: Vec<String> = vec![];
    let seqs = r.ask.max_seqs.max(1);
    let weights_short = matches!(e, Refusal::Plan(PlanError::WeightsDoNotFit { .. }));
    if !weights_short {
        // Fewer sequences: the most that fit as asked otherwise, or at least their windows.
        // Found by bisection (each try is a whole plan: a count tried one by one from a
        // `--max-num-seqs 1000000` took seconds on `builtin:tiny`, minutes on a real
        // checkpoint's tensors); `lo` always fits (or is 0), `hi` does not.
        let fits = |s: usize| {
            let ask = ServingAsk { max_seqs: s, ..r.ask };
            attempt(&Request { ask, ..*r }, memory, r.kv_dtype).is_ok()
        };
        let (mut lo, mut hi) = (0, seqs);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        // The one figure for the sequences a message states: the error itself does not count
        // them ([`ServingError::SequencesDoNotFit`]'s `most`, those whose windows fit, can be
        // more than fit at the asked --max-model-len).
        let fewer = (lo > 0).then_some(lo);
        match (fewer, &e) {
            (Some(s), _) => {
                let at = if r.ask.len_asked { format!(" at --max-model-len {}", r.ask.max_len) } else { String::new() };
                fixes.push(format!("fewer --max-num-seqs (at most {s} {}{at})", if s == 1 { "fits" } else { "fit" }))
            }
            (None, Refusal::Serving(ServingError::SequencesDoNotFit { most, .. }, _)) if *most > 0 => {
                // No count fits at the asked --max-model-len: say how long the sequences of
                // the most whose windows fit can be, or the next refusal would be that.
                let ask = ServingAsk { max_seqs: *most, len_asked: false, ..r.ask };
                match attempt(&Request { ask, ..*r }, memory, r.kv_dtype) {
                    Ok(p) if r.ask.len_asked => fixes.push(format!(
                        "fewer --max-num-seqs and a smaller --max-model-len (at most {} of at most {})",
                        plural(*most, "sequence"),
                        plural(p.pool.longest, "token")
                    )),
                    _ => fixes.push(format!(
                        "fewer --max-num-seqs (the windows of at most {} fit)",
                        plural(*most, "sequence")
                    )),
                }
            }
            _ => {}
        }
        match e {
            Refusal::Serving(ServingError::ContextDoesNotFit { longest, .. }, _) if longest > 0 => {
                fixes.push(format!("a smaller --max-model-len (at most {longest} with {})", plural(seqs, "sequence")));
            }
            Refusal::Serving(ServingError::PoolDoesNotFit { left, .. }, _) => {
                fixes.push(format!("a smaller --kv-cache-memory (at most {} per rank)", human_bytes(left)));
            }
            _ => {}
        }
        if let Refusal::Serving(
            ServingError::SequencesDoNotFit { pool, need, .. } | ServingError::ContextDoesNotFit { pool, need, .. },
            left,
        ) = e
        {
            // Only when a pool of what the weights leave would hold what was asked.
            if pool < left && need <= left {
                fixes.push(format!(
                    "a larger --kv-cache-memory (up to {} per rank: what the weights leave)",
                    human_bytes(left)
                ));
            }
        }
        if r.fp8_rows && r.kv_dtype != KvDtype::Fp8 && attempt(r, memory, KvDtype::Fp8).is_ok() {
            fixes.push("--kv-dtype fp8 (it fits with fp8 rows)".into());
        }
    }
    if memory.shared {
        if weights_short {
            // Resident weights (`--weight-memory resident`) past the memory: mapped, they are
            // not counted (checked: the pool must still fit).
            let most = fullest_rank_bytes(r.cfg, r.tensors, r.layout);
            if !memory.mapped && attempt(r, &memory.clone().with_mapped_weights(most), r.kv_dtype).is_ok() {
                fixes.push("--weight-memory mapped (the weights then stay in the page cache, not counted)".into());
            }
            fixes.push(match r.layout.world {
                1 => "more free memory".into(),
                _ => "more free memory: the CPU ranks share this machine's memory, so more devices do not help".into(),
            });
        }
    } else {
        match &e {
            Refusal::Plan(PlanError::WeightsDoNotFit { .. }) => {
                match fewest_devices(&input(r, memory, r.kv_dtype), 1024) {
                    Some(l) => fixes
                        .push(format!("more devices ({} of this size fit, with TP {} and EP {})", l.world, l.tp, l.ep)),
                    None => fixes
                        .push(format!("devices with more memory (no number of these fits with TP {})", r.layout.tp)),
                }
            }
            // A pool of a size given in bytes stays that size on more devices: they help alone
            // only when it is the pool that does not fit beside the weights, and with a larger
            // size when even all that the weights leave here would not hold what was asked.
            Refusal::Serving(
                ServingError::SequencesDoNotFit { need, .. } | ServingError::ContextDoesNotFit { need, .. },
                left,
            ) if matches!(r.ask.pool, PoolAsk::Bytes(_)) => {
                if *need > *left {
                    fixes.push(
                        "more devices and a larger --kv-cache-memory (each device then holds fewer experts, leaving \
                         more of its memory for the pool)"
                            .into(),
                    );
                }
            }
            _ => fixes.push(
                "more devices (each then holds fewer experts, leaving more of its memory for the KV pool)".into(),
            ),
        }
        if weights_short && r.layout.tp < r.cfg.o_groups {
            fixes.push("a larger --tensor-parallel".into());
        }
    }
    let advice = match fixes.len() {
        0 => String::new(),
        1 => format!(" Use {}.", fixes[0]),
        n => format!(" Use {}, or {}.", fixes[..n - 1].join(", "), fixes[n - 1]),
    };
    let l = r.layout;
    let ranks =
        if l.world == 1 { "one device".to_string() } else { format!("{} ranks (TP {}, EP {})", l.world, l.tp, l.ep) };
    bail!("the memory plan of {ranks} does not fit: {what}.{advice}")
}

/// The start-up summary: each rank's weights and pool, and the sequences × context they hold.
pub fn summary(r: &Request, memory: &RankMemory, s: &ServePlan) -> String {
    let (cfg, p) = (r.cfg, &s.plan);
    let mut o = String::new();
    let l = p.layout;
    let _ = writeln!(
        o,
        "memory plan (as `dsv4 plan`): {} rank{}, TP {}, EP {}; per rank {} usable ({})",
        l.world,
        if l.world == 1 { "" } else { "s" },
        l.tp,
        l.ep,
        human_bytes(p.available + p.comm.total()),
        memory.source
    );
    if let Some(line) = crate::plan::comm_line(r.comm, l) {
        let _ = writeln!(o, "  {line}");
    }
    for (ranks, w) in crate::plan::classes(&p.ranks) {
        let _ = writeln!(
            o,
            "  rank{} {}: weights {}, KV pool {} (of {} left after the weights{})",
            if ranks.len() == 1 { "" } else { "s" },
            crate::plan::rank_list(&ranks),
            human_bytes(w.loaded_bytes()),
            human_bytes(s.pool.bytes),
            human_bytes(p.pool_of(w.rank.rank)),
            if p.comm.total() > 0 { " and the communicator buffers" } else { "" },
        );
    }
    let seqs = r.ask.max_seqs.max(1);
    let kv = &s.pool.kv;
    let each = match kv.token_capacity(cfg) {
        Some(_) => (kv.compressed_blocks / seqs * kv.block_tokens).min(cfg.max_position_embeddings),
        None => cfg.max_position_embeddings,
    };
    let served = match r.ask.len_asked {
        true => format!("{} (--max-model-len)", r.ask.max_len),
        false => format!("{} (the model's context, capped by the pool)", s.pool.longest.min(r.ask.max_len)),
    };
    let _ = writeln!(
        o,
        "  the pool ({} rows) holds {} (--max-num-seqs) × {}, or one of {}; longest sequence served: {served}",
        kv.dtype,
        plural(seqs, "sequence"),
        plural(each, "token"),
        s.pool.longest
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv4_core::parallel::plan::{official_tensors, WeightTarget};

    fn tiny() -> ModelConfig {
        dsv4_core::builtin::tiny().unwrap().0
    }

    fn request<'a>(cfg: &'a ModelConfig, tensors: &'a [PlanTensor], ask: ServingAsk) -> Request<'a> {
        Request {
            cfg,
            tensors,
            layout: ParallelLayout::new(2, 1, 2, cfg).unwrap(),
            kv_dtype: KvDtype::F32,
            fp8_rows: true,
            comm: dsv4_core::parallel::plan::CollectiveLibrary::InProcess,
            max_step: 16,
            ask,
        }
    }

    const ASK: ServingAsk = ServingAsk { max_seqs: 4, max_len: 256, len_asked: true, pool: PoolAsk::Bytes(1 << 20) };

    #[test]
    fn summary_of_two_cpu_ranks() {
        let cfg = tiny();
        let tensors = official_tensors(&cfg, WeightTarget::Host);
        let r = request(&cfg, &tensors, ASK);
        let memory = RankMemory::cpu(Some(64 << 20), 2);
        let s = plan_serving(&r, &memory).unwrap();
        assert_eq!(s.pool.bytes, s.pool.kv.total_bytes(&cfg));
        assert!(s.pool.bytes <= 1 << 20 && s.pool.longest >= 256);
        insta::assert_snapshot!("serve_plan_tiny_2_cpu_ranks", summary(&r, &memory, &s));
    }

    /// Memory-mapped CPU weights do not take from the memory: a checkpoint larger than the
    /// memory is refused resident and served mapped.
    #[test]
    fn mapped_cpu_weights_are_not_counted_against_the_memory() {
        let cfg = tiny();
        let tensors = official_tensors(&cfg, WeightTarget::Host);
        let r = request(&cfg, &tensors, ASK);
        let weights = fullest_rank_bytes(&cfg, &tensors, r.layout);
        let r = request(&cfg, &tensors, ServingAsk { max_seqs: 1, pool: PoolAsk::Bytes(weights / 2), ..ASK });
        // 1 KiB less than the weights per rank: they cannot be read into memory.
        let cpu = RankMemory::cpu(Some(2 * (weights - 1024)), 2);
        let e = format!("{:#}", plan_serving(&r, &cpu).unwrap_err());
        assert!(e.contains("more devices do not help") && e.contains("Use --weight-memory mapped"), "{e}");
        let mapped = cpu.with_mapped_weights(weights);
        assert!(mapped.source.contains("memory-mapped"), "{}", mapped.source);
        let s = plan_serving(&r, &mapped).unwrap();
        assert!(s.pool.bytes <= weights / 2 && s.pool.bytes > 0);
    }

    /// Each refusal names the shortfall and the changes that fit, checked against the plan.
    #[test]
    fn refusals_name_the_shortfall_and_what_fits() {
        let cfg = tiny();
        let tensors = official_tensors(&cfg, WeightTarget::Host);
        let cpu = RankMemory::cpu(Some(64 << 20), 2);
        // A pool past what the weights leave.
        let r = request(&cfg, &tensors, ServingAsk { pool: PoolAsk::Bytes(40 << 20), ..ASK });
        let e = format!("{:#}", plan_serving(&r, &cpu).unwrap_err());
        assert!(
            e.contains("--kv-cache-memory asks 40.00 MiB per rank") && e.contains("a smaller --kv-cache-memory"),
            "{e}"
        );
        // 4 sequences of 64K tokens in 1 MiB: a smaller --max-model-len, or fp8 rows.
        let r = request(&cfg, &tensors, ServingAsk { max_len: 65536, ..ASK });
        let e = format!("{:#}", plan_serving(&r, &cpu).unwrap_err());
        assert!(e.contains("--max-model-len asks 65536") && e.contains("a smaller --max-model-len (at most "), "{e}");
        // Far too many (found by bisection: one count at a time took seconds here), and no
        // --kv-cache-memory is suggested when what the weights leave would not do either.
        let r = request(&cfg, &tensors, ServingAsk { max_seqs: 10_000_000, len_asked: false, ..ASK });
        let e = format!("{:#}", plan_serving(&r, &cpu).unwrap_err());
        assert!(e.contains("fewer --max-num-seqs (at most ") && !e.contains("a larger --kv-cache-memory"), "{e}");
        let most: usize = e.split("at most ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        for (seqs, fits) in [(most, true), (most + 1, false)] {
            let r = request(&cfg, &tensors, ServingAsk { max_seqs: seqs, len_asked: false, ..ASK });
            assert_eq!(plan_serving(&r, &cpu).is_ok(), fits, "{seqs}");
        }
        // Too many running sequences for their windows: at most N fit.
        let r = request(&cfg, &tensors, ServingAsk { max_seqs: 64, len_asked: false, ..ASK });
        let e = format!("{:#}", plan_serving(&r, &cpu).unwrap_err());
        assert!(e.contains("cannot hold the sliding windows of 64 running sequences"), "{e}");
        let most: usize = e.split("at most ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        let fits = request(&cfg, &tensors, ServingAsk { max_seqs: most, len_asked: false, ..ASK });
        assert!(plan_serving(&fits, &cpu).is_ok());
        let over = request(&cfg, &tensors, ServingAsk { max_seqs: most + 1, len_asked: false, ..ASK });
        assert!(plan_serving(&over, &cpu).is_err());
        // Weights past the memory: on the CPU, more devices do not help; on devices they do.
        let r = request(&cfg, &tensors, ASK);
        let e = format!("{:#}", plan_serving(&r, &RankMemory::cpu(Some(256 << 10), 2)).unwrap_err());
        assert!(e.contains("of weights") && e.contains("more devices do not help"), "{e}");
        let e = format!("{:#}", plan_serving(&r, &RankMemory::device(Some(256 << 10), 0)).unwrap_err());
        assert!(e.contains("of weights") && e.contains("devices with more memory (no number"), "{e}");
    }

    /// On devices, more devices leave more of each one's memory for a pool sized from it, but a
    /// pool given in bytes stays that size: its refusals for sequences or context do not
    /// suggest them, a pool too big for what the weights leave does.
    #[test]
    fn more_devices_are_suggested_only_where_they_help() {
        let cfg = tiny();
        let tensors = official_tensors(&cfg, WeightTarget::Host);
        let device = RankMemory::device(Some(64 << 20), 0);
        let fixed = request(&cfg, &tensors, ServingAsk { max_len: 65536, ..ASK });
        let e = format!("{:#}", plan_serving(&fixed, &device).unwrap_err());
        assert!(e.contains("--max-model-len asks 65536") && !e.contains("more devices"), "{e}");
        // Past all that the weights leave here: more devices only with a larger pool.
        let past = request(&cfg, &tensors, ServingAsk { max_len: 1 << 30, len_asked: true, ..ASK });
        let e = format!("{:#}", plan_serving(&past, &device).unwrap_err());
        assert!(e.contains("more devices and a larger --kv-cache-memory"), "{e}");
        let too_big = request(&cfg, &tensors, ServingAsk { pool: PoolAsk::Bytes(1 << 30), ..ASK });
        let e = format!("{:#}", plan_serving(&too_big, &device).unwrap_err());
        assert!(e.contains("a smaller --kv-cache-memory") && e.contains("more devices (each then"), "{e}");
        let sized = request(&cfg, &tensors, ServingAsk { max_len: 1 << 40, pool: PoolAsk::Need, ..ASK });
        let e = format!("{:#}", plan_serving(&sized, &device).unwrap_err());
        assert!(e.contains("more devices (each then"), "{e}");
    }

    /// Every refusal states one figure for how many sequences fit, the one checked against the
    /// plan: with a --max-model-len the windows of more may fit than sequences of that length
    /// (here those of 2, but only 1 sequence of 3000 tokens), and the message says only the
    /// latter.
    #[test]
    fn a_refusal_states_one_figure_for_the_sequences_that_fit() {
        let cfg = tiny();
        let tensors = official_tensors(&cfg, WeightTarget::Host);
        let cpu = RankMemory::cpu(Some(64 << 20), 2);
        let ask = ServingAsk { max_seqs: 64, max_len: 3000, len_asked: true, pool: PoolAsk::Bytes(1 << 20) };
        // Steps of 512 tokens (serve's --prefill-chunk): window blocks for 576 tokens a sequence.
        let request = |cfg, tensors, ask| Request { max_step: 512, ..request(cfg, tensors, ask) };
        let r = request(&cfg, &tensors, ask);
        let e = format!("{:#}", plan_serving(&r, &cpu).unwrap_err());
        insta::assert_snapshot!("serve_plan_refusal_one_figure", e);
        // Not also the error's own count of the windows that fit ("only those of 2").
        assert!(e.matches("at most ").count() == 1 && !e.contains("only "), "{e}");
        assert!(e.contains("fewer --max-num-seqs (at most 1 fits at --max-model-len 3000)"), "{e}");
        for (seqs, fits) in [(1, true), (2, false)] {
            let r = request(&cfg, &tensors, ServingAsk { max_seqs: seqs, ..ask });
            assert_eq!(plan_serving(&r, &cpu).is_ok(), fits, "{seqs}");
        }
        // The windows of 2 do fit: the error's own count (which the message leaves out).
        let mut shape = r;
        shape.ask = ServingAsk { max_seqs: 2, len_asked: false, ..ask };
        assert!(plan_serving(&shape, &cpu).is_ok());
        // Without --max-model-len the same pool: the most whose windows fit, stated once.
        let r = request(&cfg, &tensors, ServingAsk { len_asked: false, ..ask });
        let e = format!("{:#}", plan_serving(&r, &cpu).unwrap_err());
        assert!(e.contains("(at most 2 fit)") && e.matches("at most ").count() == 1 && !e.contains("only "), "{e}");
        // Not even one sequence of the asked length: fewer sequences alone would only be
        // refused again (for the length), so the advice gives both figures, and they fit.
        let r = request(&cfg, &tensors, ServingAsk { max_len: 100_000, ..ask });
        let e = format!("{:#}", plan_serving(&r, &cpu).unwrap_err());
        assert!(
            e.contains(
                "fewer --max-num-seqs and a smaller --max-model-len (at most 2 sequences of at most 576 tokens)"
            ) && !e.contains("only "),
            "{e}"
        );
        for (seqs, len, fits) in [(2, 576, true), (2, 577, false), (3, 64, false)] {
            let r = request(&cfg, &tensors, ServingAsk { max_seqs: seqs, max_len: len, ..ask });
            assert_eq!(plan_serving(&r, &cpu).is_ok(), fits, "{seqs} × {len}");
        }
    }

    /// Counts of one are singular in the refusals and the summary.
    #[test]
    fn one_is_singular() {
        let cfg = tiny();
        let tensors = official_tensors(&cfg, WeightTarget::Host);
        let cpu = RankMemory::cpu(Some(64 << 20), 2);
        let one = ServingAsk { max_seqs: 1, max_len: 100_000, len_asked: true, pool: PoolAsk::Bytes(1 << 20) };
        let e = format!("{:#}", plan_serving(&request(&cfg, &tensors, one), &cpu).unwrap_err());
        insta::assert_snapshot!("serve_plan_refusal_one_sequence", e);
        assert!(e.contains("with 1 running sequence a KV pool") && e.contains(" with 1 sequence)"), "{e}");
        assert!(!e.contains("1 sequences") && !e.contains("1 running sequences"), "{e}");
        let r = request(&cfg, &tensors, ServingAsk { max_len: 256, ..one });
        let s = plan_serving(&r, &cpu).unwrap();
        let text = summary(&r, &cpu, &s);
        assert!(text.contains("holds 1 sequence (--max-num-seqs) × "), "{text}");
        let e = format!(
            "{:#}",
            plan_serving(&request(&cfg, &tensors, ServingAsk { pool: PoolAsk::Bytes(100 << 10), ..one }), &cpu)
                .unwrap_err()
        );
        assert!(e.contains("the sliding windows of 1 running sequence plus") && e.contains("not even one"), "{e}");
    }

    /// Without `--kv-cache-memory` the pool is what the sequences need, at most half of what the
    /// weights leave; a fraction is a share of what they leave.
    #[test]
    fn pool_sizes_follow_the_plan() {
        let cfg = tiny();
        let tensors = official_tensors(&cfg, WeightTarget::Host);
        let cpu = RankMemory::cpu(Some(64 << 20), 2);
        let need = ServingAsk { max_seqs: 2, max_len: 300, len_asked: true, pool: PoolAsk::Need };
        let s = plan_serving(&request(&cfg, &tensors, need), &cpu).unwrap();
        assert!(s.pool.longest >= 300 && s.pool.bytes <= s.plan.pool / 2, "{s:?}");
        let all =
            ServingAsk { max_seqs: 64, max_len: cfg.max_position_embeddings, len_asked: false, pool: PoolAsk::Need };
        let s = plan_serving(&request(&cfg, &tensors, all), &cpu).unwrap();
        assert!(s.pool.bytes <= s.plan.pool / 2 && s.pool.bytes + s.pool.kv.block_bytes(&cfg).window > s.plan.pool / 2);
        let half = ServingAsk { pool: PoolAsk::Share(0.5), ..all };
        let s = plan_serving(&request(&cfg, &tensors, half), &cpu).unwrap();
        assert!(s.pool.bytes <= s.plan.pool / 2);
        // Unknown memory: the asked pool, as before.
        let unknown = RankMemory::cpu(None, 2);
        let s = plan_serving(&request(&cfg, &tensors, ASK), &unknown).unwrap();
        assert_eq!(s.pool.kv, dsv4_core::kv::KvConfig::for_budget(&cfg, KvDtype::F32, 1 << 20, 4, 16).unwrap());
    }
}
