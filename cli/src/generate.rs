//! `dsv4 generate`, `dsv4 render` and `dsv4 chat`: text in, text out.

use std::io::{BufRead, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use dsv4_core::chat;
use dsv4_core::generate::{Control, GenerateOptions, Generation, Session, StopReason};
use dsv4_core::model::loader::mtp_layers_present;
use dsv4_core::sampling::SamplingParams;
use dsv4_core::speculative::SpecStats;
use dsv4_core::tokenizer::{StreamDecoder, Tokenizer};
use dsv4_core::{builtin, Backend, Checkpoint, Model, ModelConfig};

use crate::chat_turns::ChatTurns;
use crate::kv_args::{self, KvArgs};

/// The tokenizer of `--model`: its tokenizer.json, or bytes for the built-in model.
pub fn tokenizer_for(spec: &str) -> Result<Tokenizer> {
    match optional_tokenizer(spec)? {
        Some(t) => Ok(t),
        None if spec == dsv4_core::builtin::TINY_V4_VOCAB_NAME => bail!(
            "{spec} has V4's 129,280-id vocabulary and no tokenizer (the built-in byte tokenizer covers 271 ids): serve it with V4's tokenizer.json (`serve --tokenizer PATH`), or give and print token ids (`generate --ids 1,2,3 --print-ids`)"
        ),
        None => bail!(
            "{spec} has no tokenizer.json: copy the model's tokenizer.json into the directory (`generate` also takes token ids with --ids, `serve` a --tokenizer PATH)"
        ),
    }
}

/// The tokenizer of `--model` if it has one: the built-in models have bytes, except
/// `builtin:tiny-v4vocab`, whose ids past the byte tokenizer's 271 would be undecodable text.
fn optional_tokenizer(spec: &str) -> Result<Option<Tokenizer>> {
    if spec == dsv4_core::builtin::TINY_V4_VOCAB_NAME {
        return Ok(None);
    }
    if spec.starts_with("builtin:") {
        return Ok(Some(Tokenizer::byte_fallback()));
    }
    let dir = Path::new(spec);
    if !dir.is_dir() {
        bail!("model directory {spec} does not exist (pass a directory with config.json and *.safetensors, or builtin:tiny)");
    }
    Ok(Tokenizer::from_model_dir(dir)?)
}

/// Why a generation ended, in the words the CLI prints. The CLI stops a generation itself only
/// for `--stop` strings.
pub fn stop_words(reason: StopReason) -> &'static str {
    match reason {
        StopReason::Eos => "eos",
        StopReason::MaxTokens => "max tokens",
        StopReason::ContextLength => "context length",
        StopReason::Caller => "stop string",
    }
}

/// Chat-mode knobs shared by generate, render and chat.
#[derive(clap::Args, Clone)]
pub struct ChatArgs {
    /// Thinking mode: the reply starts with reasoning (closed by </think>).
    #[arg(long, conflicts_with = "no_thinking")]
    pub thinking: bool,
    /// Chat mode, no reasoning (the default).
    #[arg(long)]
    pub no_thinking: bool,
    /// Reasoning effort: none, minimal, low, medium, high, xhigh or max, mapped onto the V4
    /// encoder's levels as `dsv4 serve` maps a request's `reasoning_effort` (README, "Reasoning
    /// effort"): any but `none` turns thinking on unless --no-thinking is given.
    #[arg(long)]
    pub reasoning_effort: Option<String>,
}

impl ChatArgs {
    /// Thinking on or off, and the encoder's effort (`high`, `max`), by the server's table
    /// ([`dsv4_server::thinking::resolve`], with chat mode as the default and the preview
    /// encoder). Errors on an effort that is not one of the spellings.
    pub fn resolved(&self) -> Result<(bool, Option<&'static str>)> {
        use dsv4_core::chat::{EncoderRevision, ThinkingMode};
        let effort = self
            .reasoning_effort
            .as_deref()
            .map(|s| dsv4_server::Effort::parse_param(s, "--reasoning-effort"))
            .transpose()
            .map_err(|e| anyhow::anyhow!("--reasoning-effort: {}", e.message))?;
        let switch = match (self.thinking, self.no_thinking) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let (mode, effort) = dsv4_server::thinking::resolve(switch, effort, false, EncoderRevision::Preview);
        Ok((mode == ThinkingMode::Thinking, effort.map(|e| e.as_str())))
    }
}

#[derive(clap::Args, Clone)]
pub struct SamplingArgs {
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    pub max_new_tokens: usize,
    /// Sampling temperature: the logits are divided by it before the softmax. 0 = greedy (the
    /// most likely token every step).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Nucleus sampling: sample only from the most likely tokens whose probabilities add up to
    /// at least P (after --top-k). 1 = off.
    #[arg(long, value_name = "P", default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Sample only from the K most likely tokens. 0 = off.
    #[arg(long, value_name = "K", default_value_t = 0, allow_negative_numbers = true)]
    pub top_k: usize,
    /// Seed of the sampler's random numbers: the same seed, prompt and settings give the same
    /// tokens.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub seed: u64,
    /// Stop when the generated text contains this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Speculative decoding: the checkpoint's MTP block (mtp.0.*) drafts K tokens per step and
    /// the main model verifies them all in one step, keeping the drafts it agrees with plus its
    /// own next token (1 to K+1 tokens per step). The output is unchanged: greedy
    /// (--temperature 0) gives the same tokens as without, and with sampling each token has the
    /// plain sampler's distribution. Needs the checkpoint's MTP weights; one device only. The
    /// summary on stderr adds the acceptance rate and tokens per main-model step. 0 = off.
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub speculative_tokens: usize,
}

impl SamplingArgs {
    /// The sampler's own checks ([`SamplingParams::validate`]), run before anything loads.
    pub fn check(&self) -> Result<()> {
        Ok(self.sampling_params().validate()?)
    }

    fn sampling_params(&self) -> SamplingParams {
        SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed: self.seed }
    }

    fn options<B: Backend>(&self, model: &Model<B>, tok: Option<&Tokenizer>) -> GenerateOptions {
        let mut stop_ids = model.cfg.eos_token_ids.clone();
        stop_ids.extend(tok.map(Tokenizer::eos_token_ids).unwrap_or_default());
        stop_ids.sort_unstable();
        stop_ids.dedup();
        GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: self.sampling_params(),
            stop_token_ids: stop_ids,
            speculative_tokens: self.speculative_tokens,
            ..Default::default()
        }
    }
}

/// Refuses `--speculative-tokens K` (K > 0) before the model is loaded when the checkpoint
/// has no MTP block to draft with. Reads the config and the safetensors headers only; when
/// those cannot be read the load reports why.
pub fn check_speculation(spec: &str, k: usize) -> Result<()> {
    if k == 0 {
        return Ok(());
    }
    let opened = match builtin::by_name(spec) {
        Some(m) => m.ok(),
        None if Path::new(spec).is_dir() => {
            let dir = Path::new(spec);
            ModelConfig::from_dir(dir).ok().zip(Checkpoint::open(dir).ok())
        }
        None => None,
    };
    match opened {
        Some((cfg, ckpt)) => require_mtp(spec, k, &cfg, &ckpt),
        None => Ok(()),
    }
}

/// The error of `--speculative-tokens K` (K > 0) on a checkpoint without an MTP block.
pub fn require_mtp(spec: &str, k: usize, cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<()> {
    if k == 0 || !mtp_layers_present(cfg, ckpt).is_empty() {
        return Ok(());
    }
    let why = if spec.starts_with("builtin:") {
        "of the built-in models only builtin:tiny-mtp has one"
    } else if cfg.num_mtp_layers == 0 {
        "its config.json sets num_nextn_predict_layers = 0"
    } else {
        "it holds no mtp.0.* tensors; transformers drops them when it saves a model"
    };
    bail!(
        "--speculative-tokens {k}: {spec} has no MTP block to draft with ({why}); speculative decoding needs the \
         checkpoint's MTP weights: drop --speculative-tokens"
    )
}

/// `--speculative-tokens` with `--devices`: the split model does not load the MTP block.
pub(crate) fn refuse_split_speculation(k: usize) -> Result<()> {
    if k > 0 {
        bail!(
            "--speculative-tokens runs on one device for now (a model split over --devices does not load the MTP \
             block): drop --devices or --speculative-tokens"
        );
    }
    Ok(())
}

/// The `max_step` the pool is sized for: the prefill chunk, and with speculative decoding the
/// window pages a rollback keeps on top of the longest step (a verify step, or a chat turn's
/// prefill chunk that follows speculative decode steps), as `Sequence::set_rollback_depth` asks.
pub fn pool_step(opts: &GenerateOptions) -> usize {
    pool_max_step(opts.prefill_chunk, opts.speculative_tokens)
}

/// [`pool_step`] for prefill chunks of `chunk` tokens and `k` drafts per step (0: none).
pub fn pool_max_step(chunk: usize, k: usize) -> usize {
    match k {
        0 => chunk,
        k => {
            let depth = dsv4_core::speculative::rollback_depth(k);
            chunk.max(depth) + depth
        }
    }
}

/// The summary line of a speculative generation (stderr).
pub fn speculation_summary(k: usize, s: &SpecStats) -> String {
    format!(
        "speculative: {k} drafts per step (MTP block); {} of {} drafts accepted ({:.1}%), {:.2} tokens per main-model \
         step ({} tokens in {} steps); drafting {:.3} s, verifying {:.3} s",
        s.accepted,
        s.drafted,
        100.0 * s.acceptance_rate(),
        s.tokens_per_step(),
        s.emitted,
        s.verify_steps,
        s.draft_secs,
        s.verify_secs
    )
}

fn render_user_prompt(text: &str, chat_args: &ChatArgs) -> Result<String> {
    let messages = serde_json::json!([{"role": "user", "content": text}]);
    let (thinking, effort) = chat_args.resolved()?;
    Ok(chat::render_openai(&messages, None, thinking, effort)?)
}

/// How generated text reaches stdout.
enum Display {
    /// As generated (`dsv4 generate`).
    Raw,
    /// Through the completion parser: reasoning dimmed, answer plain, tool calls on their own
    /// line (`dsv4 chat`).
    Parsed(chat::StreamParser),
}

impl Display {
    fn show(&mut self, out: &mut (impl Write + ?Sized), piece: &str) -> std::io::Result<()> {
        match self {
            Display::Raw => out.write_all(piece.as_bytes())?,
            Display::Parsed(p) => {
                for ev in p.push(piece) {
                    Self::event(out, ev)?;
                }
            }
        }
        out.flush()
    }

    fn finish(&mut self, out: &mut (impl Write + ?Sized)) -> std::io::Result<()> {
        if let Display::Parsed(p) = self {
            for ev in p.finish() {
                Self::event(out, ev)?;
            }
        }
        out.flush()
    }

    fn event(out: &mut (impl Write + ?Sized), ev: chat::Event) -> std::io::Result<()> {
        match ev {
            chat::Event::Reasoning(t) => write!(out, "\x1b[2m{t}\x1b[0m"),
            chat::Event::Content(t) => write!(out, "{t}"),
            chat::Event::ToolCall(c) => writeln!(out, "\n[tool call] {} {}", c.name, c.arguments),
            chat::Event::Markup(_) => Ok(()),
        }
    }
}

/// Streams a generation to `out`, and the speed line to stderr when `report`; returns it and
/// its text. Without a tokenizer nothing is shown and the text is empty (stop strings need
/// text: callers refuse them first).
#[allow(clippy::too_many_arguments)]
fn stream<B: Backend>(
    be: &B,
    session: &mut Session<B>,
    tok: Option<&Tokenizer>,
    prompt: &[u32],
    opts: &GenerateOptions,
    stops: &[String],
    display: &mut Display,
    out: &mut dyn Write,
    report: bool,
) -> Result<(Generation, String)> {
    let mut decoder = tok.map(StreamDecoder::new);
    let mut text = String::new();
    let eos = opts.stop_token_ids.clone();
    let generation = session.generate(be, prompt, opts, &mut |id| {
        if eos.contains(&id) {
            return Ok(Control::Continue);
        }
        let Some(decoder) = decoder.as_mut() else { return Ok(Control::Continue) };
        let piece = decoder.push(id)?;
        text.push_str(&piece);
        let _ = display.show(out, &piece);
        Ok(if stops.iter().any(|s| text.contains(s.as_str())) { Control::Stop } else { Control::Continue })
    })?;
    if let Some(decoder) = decoder.as_mut() {
        let tail = decoder.finish()?;
        text.push_str(&tail);
        display.show(out, &tail)?;
        display.finish(out)?;
    }
    if report {
        eprintln!(
            "\nprefill: {} tokens, {:.1} tokens/s; decode: {} tokens, {:.1} tokens/s; stopped: {}",
            generation.prefilled,
            generation.prefill_tokens_per_sec(),
            generation.tokens.len(),
            generation.decode_tokens_per_sec(),
            stop_words(generation.stop)
        );
        if let Some(s) = &generation.speculation {
            eprintln!("{}", speculation_summary(opts.speculative_tokens, s));
        }
    }
    Ok((generation, text))
}

#[allow(clippy::too_many_arguments)]
pub fn run_generate<B: Backend>(
    be: &B,
    spec: &str,
    prompt: Option<&str>,
    ids: Option<&[u32]>,
    chat_args: &ChatArgs,
    sampling: &SamplingArgs,
    kv: &KvArgs,
    print_ids: bool,
) -> Result<()> {
    let tok = generate_tokenizer(spec, ids.is_some(), sampling)?;
    check_speculation(spec, sampling.speculative_tokens)?;
    let model = crate::load::load_model(be, spec, kv.precision, kv.weight_memory)?;
    generate_with(be, &model, tok.as_ref(), prompt, ids, chat_args, sampling, kv, print_ids, true)
}

/// `dsv4 generate --devices N`: every rank runs the same generation (same
/// prompt, same seed, and the ranks' logits are the same bits, so the same tokens) and rank 0
/// prints it. With --data-parallel-attention the sequence is rank 0's alone and the other
/// ranks serve their experts in its steps ([`serve_experts_until_idle`]).
#[allow(clippy::too_many_arguments)]
pub fn run_generate_ranks(
    backend: crate::BackendChoice,
    spec: &str,
    prompt: Option<&str>,
    ids: Option<&[u32]>,
    chat_args: &ChatArgs,
    sampling: &SamplingArgs,
    kv: &KvArgs,
    print_ids: bool,
    parallel: &crate::parallel_args::ParallelArgs,
) -> Result<()> {
    refuse_split_speculation(sampling.speculative_tokens)?;
    let tok = generate_tokenizer(spec, ids.is_some(), sampling)?;
    let (cfg, ckpt, layout) = crate::parallel_args::open_split(backend, spec, kv.weight_memory, parallel)?;
    let kv = &crate::parallel_args::fixed_kv_budget(kv, pools_of_one_sequence(&layout), backend, None)?;
    on_ranks!(backend, parallel, layout, |be, ctx| {
        let first = ctx.layout.rank == 0;
        let data_parallel = ctx.layout.layout.data_parallel_attention;
        let model = crate::load::load_opened(be, cfg.clone(), &ckpt, spec, kv.precision, ctx)?;
        if data_parallel && !first {
            return serve_experts_until_idle(be, &model);
        }
        generate_with(be, &model, tok.as_ref(), prompt, ids, chat_args, sampling, kv, print_ids, first)?;
        if data_parallel {
            // Done: one idle step tells the others the group is idle.
            model.idle_step(be)?;
        }
        Ok(())
    })?;
    Ok(())
}

/// The ranks of `layout` that hold a pool in a command that runs one sequence: every rank, or
/// under data-parallel attention rank 0 alone.
fn pools_of_one_sequence(layout: &dsv4_core::parallel::ParallelLayout) -> usize {
    if layout.data_parallel_attention {
        1
    } else {
        layout.world
    }
}

/// A data-parallel rank without a sequence in a command that runs one sequence on rank 0
/// (`generate`, a `chat` turn): serves its experts in every step of its EP group until the
/// group is idle, which rank 0 signals with an idle step of its own when its sequence (or
/// turn) is done ([`Model::idle_step`]).
fn serve_experts_until_idle<B: Backend>(be: &B, model: &Model<B>) -> Result<()> {
    while model.idle_step(be)? {}
    Ok(())
}

/// The tokenizer a generation needs: token ids in, token ids out needs none; text in or out
/// does.
fn generate_tokenizer(spec: &str, ids_given: bool, sampling: &SamplingArgs) -> Result<Option<Tokenizer>> {
    let tok = match ids_given {
        true => optional_tokenizer(spec)?,
        false => Some(tokenizer_for(spec)?),
    };
    if tok.is_none() {
        if !sampling.stop.is_empty() {
            bail!(
                "{spec} has no tokenizer.json, so --stop strings cannot be matched: drop --stop, or copy the model's tokenizer.json into the directory"
            );
        }
        eprintln!(
            "note: {spec} has no tokenizer.json, so only the generated token ids are printed (text output needs the model's tokenizer.json in the directory)"
        );
    }
    Ok(tok)
}

/// One generation on a loaded model, printed to stdout when `show` (else computed silently:
/// the other ranks of a split run).
#[allow(clippy::too_many_arguments)]
fn generate_with<B: Backend>(
    be: &B,
    model: &Model<B>,
    tok: Option<&Tokenizer>,
    prompt: Option<&str>,
    ids: Option<&[u32]>,
    chat_args: &ChatArgs,
    sampling: &SamplingArgs,
    kv: &KvArgs,
    print_ids: bool,
    show: bool,
) -> Result<()> {
    let prompt_ids = match (prompt, ids, tok) {
        (Some(text), None, Some(tok)) => tok.encode(&render_user_prompt(text, chat_args)?)?,
        (None, Some(ids), _) => ids.to_vec(),
        _ => bail!("give exactly one of --prompt and --ids"),
    };
    let opts = sampling.options(model, tok);
    // The pool holds the prompt and every token generated (all but the last are fed back).
    let tokens = (prompt_ids.len() + opts.max_new_tokens).min(model.cfg.max_position_embeddings);
    let config = kv.config_for_run(be, &model.cfg, tokens, pool_step(&opts))?;
    if show {
        eprintln!("{}", kv_args::describe(&model.cfg, &config));
    }
    let mut session = Session::new(be, model, config)?;
    // Only the showing rank takes stdout's lock: the others must not hold it while rank 0 waits.
    let mut out: Box<dyn Write> = if show { Box::new(std::io::stdout().lock()) } else { Box::new(std::io::sink()) };
    let (generation, _) =
        stream(be, &mut session, tok, &prompt_ids, &opts, &sampling.stop, &mut Display::Raw, &mut *out, show)?;
    drop(out);
    if show && (print_ids || tok.is_none()) {
        if tok.is_some() {
            println!();
        }
        println!("{}", generation.tokens.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    }
    Ok(())
}

pub fn run_render(spec: &str, messages: &Path, tools: Option<&Path>, chat_args: &ChatArgs, ids: bool) -> Result<()> {
    let read = |p: &Path| -> Result<serde_json::Value> {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", p.display()))
    };
    let messages = read(messages)?;
    let tools = tools.map(read).transpose()?;
    let (thinking, effort) = chat_args.resolved()?;
    let text = chat::render_openai(&messages, tools.as_ref(), thinking, effort)?;
    if ids {
        let tok = tokenizer_for(spec)?;
        let ids = tok.encode(&text)?;
        println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    } else {
        print!("{text}");
        std::io::stdout().flush()?;
    }
    Ok(())
}

/// Interactive multi-turn chat on stdin/stdout. Reasoning is shown dimmed, answers plain.
pub fn run_chat<B: Backend>(
    be: &B,
    spec: &str,
    chat_args: &ChatArgs,
    sampling: &SamplingArgs,
    kv: &KvArgs,
) -> Result<()> {
    let tok = tokenizer_for(spec)?;
    check_speculation(spec, sampling.speculative_tokens)?;
    let model = crate::load::load_model(be, spec, kv.precision, kv.weight_memory)?;
    let stdin = std::io::stdin();
    chat_loop(be, &model, &tok, chat_args, sampling, kv, &mut || read_turn(&stdin), &mut || Ok(()), true).map(drop)
}

/// `dsv4 chat --devices N` (and over several processes, `--nnodes`): global rank 0 reads the
/// user's lines and hands each to the other ranks ([`crate::chat_turns`]), which run the same
/// conversation (same seed, same logits bits) silently. With --data-parallel-attention the
/// conversation is rank 0's alone: each turn the other ranks serve their experts in its steps
/// ([`serve_experts_until_idle`]).
pub fn run_chat_ranks(
    backend: crate::BackendChoice,
    spec: &str,
    chat_args: &ChatArgs,
    sampling: &SamplingArgs,
    kv: &KvArgs,
    parallel: &crate::parallel_args::ParallelArgs,
) -> Result<()> {
    refuse_split_speculation(sampling.speculative_tokens)?;
    let tok = tokenizer_for(spec)?;
    let (cfg, ckpt, layout) = crate::parallel_args::open_split(backend, spec, kv.weight_memory, parallel)?;
    // Split runs refuse speculation, so a step is at most the default prefill chunk.
    let step = pool_max_step(GenerateOptions::default().prefill_chunk, 0);
    let pools = pools_of_one_sequence(&layout);
    let kv = &crate::parallel_args::fixed_kv_budget(kv, pools, backend, Some((&cfg, step)))?;
    // Made by the first rank to get here: `on_ranks!` joins the other nodes itself and hands
    // the ranks the group, so the process-wide hand-off is built from inside them.
    let turns = std::sync::OnceLock::new();
    on_ranks!(backend, parallel, layout, |be, ctx, nodes| {
        let (local, base) = nodes.map_or((layout.world, 0), |g| (g.local_ranks(), g.base()));
        let turns = turns.get_or_init(|| ChatTurns::new(local, nodes.cloned()));
        // Taken before the model loads: the reader's source closes the others' turns when it
        // ends, a failed load included, so that they never wait for a line.
        let local_rank = ctx.layout.rank - base;
        let data_parallel = ctx.layout.layout.data_parallel_attention;
        let mut source = turns.for_rank(local_rank);
        let model = crate::load::load_opened(be, cfg.clone(), &ckpt, spec, kv.precision, ctx)?;
        let show = source.is_reader();
        if let Some(g) = nodes.filter(|g| g.node_rank() != 0 && local_rank == 0) {
            eprintln!("node {}: following the conversation typed on node 0's terminal", g.node_rank());
        }
        let stdin = std::io::stdin();
        if data_parallel && !show {
            while source.next(|| read_turn(&stdin)).is_some() {
                serve_experts_until_idle(be, &model)?;
            }
            return Ok(());
        }
        // Under data-parallel attention each answered turn ends with an idle step: the others
        // stop serving their experts until the next line.
        let mut end_turn = || -> Result<()> {
            if data_parallel {
                model.idle_step(be)?;
            }
            Ok(())
        };
        let mut next = || source.next(|| read_turn(&stdin));
        chat_loop(be, &model, &tok, chat_args, sampling, kv, &mut next, &mut end_turn, show).map(drop)
    })?;
    Ok(())
}

/// The user's next line, or None at an empty line or the end of input (or a read error).
fn read_turn(stdin: &std::io::Stdin) -> Option<String> {
    next_turn(&mut stdin.lock(), &mut std::io::stderr())
}

/// [`read_turn`] on any input, prompting on `prompt`. A line that is not UTF-8 is refused with a
/// message on `prompt` and the next one read (before, it ended the chat as if it were empty).
fn next_turn(input: &mut impl BufRead, prompt: &mut impl Write) -> Option<String> {
    loop {
        let _ = write!(prompt, "> ");
        let mut bytes = vec![];
        match input.read_until(b'\n', &mut bytes) {
            Ok(n) if n > 0 => {}
            _ => return None,
        }
        match String::from_utf8(bytes) {
            Ok(line) if line.trim().is_empty() => return None,
            Ok(line) => return Some(line.trim_end().to_string()),
            Err(_) => {
                let _ = writeln!(prompt, "error: that line is not valid UTF-8; type it again (an empty line quits)");
            }
        }
    }
}

/// The conversation: each line `next_turn` gives is a user message, answered on stdout when
/// `show` (else computed silently: the other ranks of a split run), then `end_turn` runs.
/// Returns the conversation as OpenAI-style messages (the user's and the parsed replies).
#[allow(clippy::too_many_arguments)]
fn chat_loop<B: Backend>(
    be: &B,
    model: &Model<B>,
    tok: &Tokenizer,
    chat_args: &ChatArgs,
    sampling: &SamplingArgs,
    kv: &KvArgs,
    next_turn: &mut dyn FnMut() -> Option<String>,
    end_turn: &mut dyn FnMut() -> Result<()>,
    show: bool,
) -> Result<Vec<serde_json::Value>> {
    let opts = sampling.options(model, Some(tok));
    let config = kv.config_open_ended(be, &model.cfg, pool_step(&opts))?;
    let mut session = Session::new(be, model, config)?;
    let mut messages: Vec<serde_json::Value> = vec![];
    let (thinking, effort) = chat_args.resolved()?;
    if show {
        eprintln!("{}", kv_args::describe(&model.cfg, &config));
        eprintln!(
            "dsv4 chat ({}): type a message, an empty line or Ctrl-D to quit",
            if thinking { "thinking" } else { "chat mode" }
        );
    }
    while let Some(line) = next_turn() {
        messages.push(serde_json::json!({"role": "user", "content": line}));
        let prompt = chat::render_openai(&serde_json::Value::Array(messages.clone()), None, thinking, effort)?;
        let ids = tok.encode(&prompt)?;
        let mut display = Display::Parsed(chat::StreamParser::for_prompt(&prompt, chat::UnclosedThink::Reasoning));
        let mut out: Box<dyn Write> = if show { Box::new(std::io::stdout().lock()) } else { Box::new(std::io::sink()) };
        let (generation, text) =
            stream(be, &mut session, Some(tok), &ids, &opts, &sampling.stop, &mut display, &mut *out, show)?;
        drop(out);
        if show && generation.prefix_cached > 0 {
            eprintln!("prefix cache: {} tokens reused", generation.prefix_cached);
        }
        let parsed = chat::parse_completion(&text, thinking);
        messages.push(parsed.to_openai_message());
        if show {
            println!();
        }
        end_turn()?;
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use dsv4_backend_cpu::CpuBackend;
    use dsv4_core::kv::{KvConfig, KvDtype};
    use dsv4_core::speculative::Speculator;
    use dsv4_core::Precision;

    use super::*;

    const OFFICIAL_FP8: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/cases/official_fp8");

    /// `--thinking`, `--no-thinking` and `--reasoning-effort` resolve as a server request's
    /// switch and effort do (`dsv4_server::thinking`), with chat mode as the default.
    #[test]
    fn chat_flags_resolve_by_the_servers_table() {
        let resolved = |thinking: bool, no_thinking: bool, effort: Option<&str>| {
            ChatArgs { thinking, no_thinking, reasoning_effort: effort.map(str::to_string) }.resolved()
        };
        for (flags, want) in [
            ((false, false, None), (false, None)),
            ((true, false, None), (true, None)),
            ((false, false, Some("max")), (true, Some("max"))),
            ((false, false, Some("xhigh")), (true, Some("max"))),
            ((false, false, Some("Medium")), (true, Some("high"))),
            ((false, false, Some("low")), (true, Some("high"))),
            ((false, false, Some("none")), (false, None)),
            ((true, false, Some("none")), (true, Some("high"))),
            ((false, true, Some("max")), (false, None)),
        ] {
            assert_eq!(resolved(flags.0, flags.1, flags.2).unwrap(), want, "{flags:?}");
        }
        let e = resolved(false, false, Some("extreme")).unwrap_err().to_string();
        assert!(e.contains("expected one of none, minimal, low, medium, high, xhigh, max"), "{e}");
    }

    #[test]
    fn chat_lines_that_are_not_utf8_are_refused_and_the_chat_goes_on() {
        let mut input: &[u8] = b"h\xff\xfei\nmore  \r\n\nafter the end\n";
        let mut prompt = vec![];
        assert_eq!(next_turn(&mut input, &mut prompt).as_deref(), Some("more"));
        assert_eq!(
            String::from_utf8(prompt).unwrap(),
            "> error: that line is not valid UTF-8; type it again (an empty line quits)\n> "
        );
        assert_eq!(next_turn(&mut input, &mut vec![]), None, "an empty line quits");
        assert_eq!(next_turn(&mut (b"" as &[u8]), &mut vec![]), None, "so does the end of input");
        assert_eq!(next_turn(&mut (b"last, no newline" as &[u8]), &mut vec![]).as_deref(), Some("last, no newline"));
    }

    /// `dsv4 chat`'s flags, as a user gives them.
    #[derive(clap::Parser)]
    struct ChatFlags {
        #[command(flatten)]
        chat: ChatArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        #[command(flatten)]
        kv: KvArgs,
    }

    /// A chat over two processes of two ranks each, the nodes being threads with their own
    /// sockets (`chat_turns`'s hand-off over real TCP): every rank holds the same conversation,
    /// the user's turns as typed on node 0 and the same sampled replies, though only node 0's
    /// first rank read them. (Each rank here holds the whole built-in model, so the ranks share
    /// nothing but the turns: what is checked is that the turns arrive, in order, everywhere.)
    #[test]
    fn a_chat_over_nodes_holds_one_conversation_on_every_rank() {
        use clap::Parser;
        let flags = ChatFlags::parse_from(["chat", "--max-new-tokens", "6", "--temperature", "0.8", "--seed", "7"]);
        let tok = tokenizer_for("builtin:tiny").unwrap();
        let script = ["hello there", "and a second turn: ünïcode"];
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let listener = std::sync::Mutex::new(Some(listener));
        let t = std::time::Duration::from_secs(30);
        let lost = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let conversations: Vec<Vec<(bool, Vec<serde_json::Value>)>> = std::thread::scope(|s| {
            let nodes: Vec<_> = (0..2)
                .map(|n| {
                    let (addr, listener, flags, tok, lost) = (&addr, &listener, &flags, &tok, &lost);
                    s.spawn(move || {
                        let g = match n {
                            0 => dsv4_core::parallel::NodeGroup::lead(
                                listener.lock().unwrap().take().unwrap(),
                                2,
                                2,
                                "c",
                                t,
                            ),
                            _ => dsv4_core::parallel::NodeGroup::follow(addr, 2, n, 2, "c", t),
                        };
                        let g = std::sync::Arc::new(g.unwrap());
                        let lost = lost.clone();
                        g.watch(move |m| lost.lock().unwrap().push(m));
                        g.share(if n == 0 { Ok(Some(vec![0])) } else { Ok(None) }).unwrap();
                        let turns = ChatTurns::new(2, Some(g.clone()));
                        let out: Vec<_> = std::thread::scope(|s| {
                            let ranks: Vec<_> = (0..2)
                                .map(|local| {
                                    let turns = &turns;
                                    s.spawn(move || {
                                        let mut source = turns.for_rank(local);
                                        let be = CpuBackend::new();
                                        let model = crate::load::load_model(
                                            &be,
                                            "builtin:tiny",
                                            Precision::F32,
                                            Default::default(),
                                        )
                                        .unwrap();
                                        let show = source.is_reader();
                                        let mut lines = script.iter().map(|l| l.to_string());
                                        let mut next = || source.next(|| lines.next());
                                        let (chat, sampling, kv) = (&flags.chat, &flags.sampling, &flags.kv);
                                        // Silent on every rank (the reader's reply would go to
                                        // the terminal, past the test harness's capture).
                                        let conversation = chat_loop(
                                            &be,
                                            &model,
                                            tok,
                                            chat,
                                            sampling,
                                            kv,
                                            &mut next,
                                            &mut || Ok(()),
                                            false,
                                        );
                                        (show, conversation.unwrap())
                                    })
                                })
                                .collect();
                            ranks.into_iter().map(|r| r.join().unwrap()).collect()
                        });
                        g.finish();
                        out
                    })
                })
                .collect();
            nodes.into_iter().map(|n| n.join().unwrap()).collect()
        });
        assert!(lost.lock().unwrap().is_empty(), "{:?}", lost.lock().unwrap());
        let (reader, first) = &conversations[0][0];
        assert!(reader);
        let users: Vec<&str> =
            first.iter().filter(|m| m["role"] == "user").map(|m| m["content"].as_str().unwrap()).collect();
        assert_eq!(users, script);
        assert_eq!(first.len(), 4, "{first:?}");
        for (node, ranks) in conversations.iter().enumerate() {
            for (local, (reader, conversation)) in ranks.iter().enumerate() {
                assert_eq!(*reader, node == 0 && local == 0);
                assert_eq!(conversation, first, "node {node}, local rank {local}");
            }
        }
    }

    /// The rollback depth the CLI sizes with is the speculator's; a pool sized with
    /// [`pool_step`] holds a speculative session over two turns (the second continuing the
    /// first past a page), whose greedy tokens are those of a plain generation.
    #[test]
    fn the_pool_holds_speculative_turns() {
        let be = CpuBackend::new();
        let model = crate::load::load_model(&be, OFFICIAL_FP8, Precision::F32, Default::default()).unwrap();
        let cfg = &model.cfg;
        for k in [1, 2, 5] {
            let spec = Speculator::new(&be, &model, k, 8, KvDtype::F32).unwrap();
            assert_eq!(dsv4_core::speculative::rollback_depth(k), spec.main_rollback_depth(), "k = {k}");
        }
        let opts = GenerateOptions {
            max_new_tokens: 24,
            sampling: SamplingParams::greedy(),
            prefill_chunk: 16,
            speculative_tokens: 3,
            ..Default::default()
        };
        assert_eq!(pool_step(&opts), 16 + dsv4_core::speculative::rollback_depth(3));
        let plain_opts = GenerateOptions { speculative_tokens: 0, ..opts.clone() };
        assert_eq!(pool_step(&plain_opts), 16);
        let config = KvConfig::for_sequences(cfg, KvDtype::F32, 1, 220, pool_step(&opts));
        let mut session = Session::new(&be, &model, config).unwrap();
        let mut prompt: Vec<u32> = (0..100u32).map(|i| i * 37 % 128).collect();
        let mut on = |_| Ok(Control::Continue);
        for turn in 0..2 {
            let g = session.generate(&be, &prompt, &opts, &mut on).unwrap();
            let spec = g.speculation.expect("speculative");
            assert_eq!((g.tokens.len(), spec.emitted), (24, 23), "turn {turn}");
            let plain =
                Session::new(&be, &model, config).unwrap().generate(&be, &prompt, &plain_opts, &mut on).unwrap();
            assert_eq!(g.tokens, plain.tokens, "turn {turn}");
            prompt.extend_from_slice(&g.tokens);
            prompt.extend((0..60u32).map(|i| i * 11 % 128));
        }
    }
}
