//! Helpers shared by the integration tests: locating and reading the reference fixtures that
//! `tests/fixtures/generate.py` produced with transformers (float64).

pub mod backend_suite;
pub mod collectives;
pub mod fp8_cases;
pub mod fused_attention;
pub mod fused_compressor;
pub mod nodes;
pub mod primitives_only;
pub mod raw_acl;
pub mod recording;

use std::path::{Path, PathBuf};

use dsv4_core::generate::Session;
use dsv4_core::kv::{KvConfig, KvDtype};
use dsv4_core::model::{Logits, Trace};
use dsv4_core::tensor::DType;
use dsv4_core::{Backend, Batch, Checkpoint, Model, ModelConfig, Precision};

/// Builds the AscendCL emulator (`tests/ascend-emu`; a no-op when fresh) and points
/// `DSV4_ASCEND_EMULATOR` at it, unless the variable is already set. Call it before anything in
/// the process loads the Ascend runtime.
pub fn use_ascend_emulator() {
    static SETUP: std::sync::Once = std::sync::Once::new();
    SETUP.call_once(|| {
        if std::env::var_os(dsv4_ascend_sys::EMULATOR_VAR).is_none() {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
            let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO")));
            let lib = dsv4_ascend_sys::emulator::build(&cargo, &manifest).unwrap_or_else(|e| panic!("{e}"));
            std::env::set_var(dsv4_ascend_sys::EMULATOR_VAR, lib);
        }
    });
}

/// The CUDA backend on the GPU that `DSV4_CUDA_DEVICE` names (an ordinal), for the tests that
/// run on a real GPU (`ci/gpu-check.sh` sets it). None, after printing why, when the variable is
/// unset; a panic when it is set and the device does not open (a GPU run must not pass silently).
pub fn cuda_gpu() -> Option<dsv4_backend_cuda::CudaBackend<dsv4_backend_cuda::DriverDevice>> {
    let Ok(ordinal) = std::env::var("DSV4_CUDA_DEVICE") else {
        println!("skipped: DSV4_CUDA_DEVICE is not set (no GPU run; ci/gpu-check.sh sets it on a GPU machine)");
        return None;
    };
    let ordinal: usize =
        ordinal.parse().unwrap_or_else(|_| panic!("DSV4_CUDA_DEVICE={ordinal:?} is not a device ordinal"));
    Some(dsv4_backend_cuda::open(ordinal).unwrap_or_else(|e| panic!("DSV4_CUDA_DEVICE={ordinal}: {e}")))
}

/// `tests/fixtures/cases`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("cases")
}

/// `tests/fixtures/wide/<name>`: a case at V4's real widths (e.g. `compressor_dims`, hidden
/// 1024), too large for the loops over every case, which read `cases/` only.
pub fn wide_case(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("wide").join(name);
    assert!(dir.join("config.json").is_file(), "no fixture at {}", dir.display());
    dir
}

/// Every fixture case directory, sorted by name.
pub fn fixture_cases() -> Vec<PathBuf> {
    fixture_cases_with_kv(KvDtype::F32)
}

/// The f32-precision cases whose references were computed with the decoding state stored as
/// `dtype` (`meta.json` `kv_dtype`, f32 when absent): `kv_fp8` simulates the official fp8 KV rows.
pub fn fixture_cases_with_kv(dtype: KvDtype) -> Vec<PathBuf> {
    cases_where(|p| case_kv_dtype(p) == dtype && case_precision(p) == Precision::F32)
}

/// The cases whose references simulate the official quantisation (`meta.json` `precision`:
/// `official-f32`; they also store the KV as fp8): `official_qsim*`.
pub fn official_cases() -> Vec<PathBuf> {
    cases_where(|p| case_precision(p) == Precision::OfficialF32)
}

fn cases_where(keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("tests/fixtures/cases exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("reference.safetensors").exists())
        .filter(|p| keep(p))
        .collect();
    v.sort();
    v
}

/// A case's `meta.json` (null when the case has none); a malformed one panics, so that a broken
/// file cannot quietly turn a case into a plain f32 one.
fn meta(case: &Path) -> serde_json::Value {
    match std::fs::read_to_string(case.join("meta.json")) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: meta.json: {e}", case.display())),
        Err(_) => serde_json::Value::Null,
    }
}

/// The KV dtype a case's reference simulates.
pub fn case_kv_dtype(case: &Path) -> KvDtype {
    match meta(case).get("kv_dtype").and_then(|v| v.as_str()) {
        None => KvDtype::F32,
        Some(s) => s.parse().unwrap_or_else(|e| panic!("{}: meta.json kv_dtype: {e}", case.display())),
    }
}

/// The precision a case's reference computes (`meta.json` `precision`, f32 when absent).
pub fn case_precision(case: &Path) -> Precision {
    match meta(case).get("precision").and_then(|v| v.as_str()) {
        None => Precision::F32,
        Some(s) => s.parse().unwrap_or_else(|e| panic!("{}: meta.json precision: {e}", case.display())),
    }
}

/// Loads a fixture case's checkpoint onto `be`.
pub fn load_model<B: Backend>(be: &B, case: &Path) -> Model<B> {
    let cfg = ModelConfig::from_dir(case).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
    let ckpt = Checkpoint::open(case).unwrap_or_else(|e| panic!("{}: {e}", case.display()));
    Model::load(be, cfg, &ckpt, &mut |_, _, _| {}).unwrap_or_else(|e| panic!("{}: {e}", case.display()))
}

/// A case's reference outputs.
pub struct Reference {
    pub input_ids: Vec<u32>,
    /// `[n, vocab]`, row-major.
    pub logits: Vec<f32>,
    pub vocab: usize,
    /// Residual streams after each layer, `[n, hc, D]` flattened.
    pub layer_out: Vec<Vec<f32>>,
}

pub fn read_reference(case: &Path) -> Reference {
    let r = Checkpoint::open_file(&case.join("reference.safetensors")).expect("reference.safetensors");
    let ids = r.get("input_ids").expect("input_ids");
    assert_eq!(ids.dtype, DType::I64);
    let logits = r.get("logits").expect("logits");
    let mut layer_out = vec![];
    while let Some(t) = r.get(&format!("layer_out.{}", layer_out.len())) {
        layer_out.push(t.to_f32_vec().unwrap());
    }
    Reference {
        input_ids: ids.to_i64_vec().unwrap().into_iter().map(|v| v as u32).collect(),
        vocab: logits.shape[1],
        logits: logits.to_f32_vec().unwrap(),
        layer_out,
    }
}

/// [`max_rel_err`] of every traced layer output against the reference's `layer_out`.
pub fn layer_errors<B: Backend>(be: &B, trace: &Trace<B>, reference: &Reference) -> Vec<f64> {
    trace
        .layers
        .iter()
        .zip(&reference.layer_out)
        .map(|(got, want)| max_rel_err(&be.download(got).unwrap(), want))
        .collect()
}

/// max |a - b| / max |b|: the error measure of the conformance suite.
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(0f64, |m, &v| m.max((v as f64).abs())).max(1e-30);
    let diff = got.iter().zip(want).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale
}

/// Checks a split run's outputs (`ranks`, in rank order) against one device's (`want`): rank
/// 0's within `tolerance` ([`max_rel_err`]), printed under `what`, and every other rank the
/// same bits as rank 0 (activations are replicated, so the ranks must agree exactly).
pub fn assert_ranks_match_one_device(what: &str, ranks: &[Vec<f32>], want: &[f32], tolerance: f64) {
    let err = max_rel_err(&ranks[0], want);
    println!("{what}: prefill + decode max rel err {err:.2e} against one device");
    assert!(err <= tolerance, "{what}: {err:.3e}");
    for (r, got) in ranks.iter().enumerate().skip(1) {
        assert!(got == &ranks[0], "{what}: rank {r}'s logits differ from rank 0's");
    }
}

/// A pool for `seqs` sequences of up to `tokens` tokens fed in steps of up to `max_step`.
pub fn kv_config(cfg: &ModelConfig, dtype: KvDtype, seqs: usize, tokens: usize, max_step: usize) -> KvConfig {
    KvConfig::for_sequences(cfg, dtype, seqs, tokens, max_step)
}

/// A [`Session`] whose pool holds one sequence of up to 4096 tokens.
pub fn session<'m, B: Backend>(be: &B, model: &'m Model<B>) -> Session<'m, B> {
    Session::new(be, model, kv_config(&model.cfg, KvDtype::F32, 1, 4096, 512)).unwrap()
}

/// Runs `ids` through `model` in steps of the given sizes from a fresh state in an f32 pool;
/// returns every token's logits.
pub fn run_in_steps<B: Backend>(be: &B, model: &Model<B>, ids: &[u32], steps: &[usize]) -> Vec<f32> {
    let max_step = steps.iter().copied().max().unwrap_or(1);
    let config = kv_config(&model.cfg, KvDtype::F32, 1, ids.len(), max_step);
    run_in_steps_with(be, model, ids, steps, config)
}

/// [`run_in_steps`] on a pool configured by `config`.
pub fn run_in_steps_with<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    steps: &[usize],
    config: KvConfig,
) -> Vec<f32> {
    let mut cache = model.new_cache(be, config).unwrap();
    let mut seq = cache.new_sequence();
    let mut out = vec![];
    let mut pos = 0;
    for &n in steps {
        let batch = Batch::new(&[(&ids[pos..pos + n], pos)]).unwrap();
        let logits = model.step(be, &batch, &mut cache, &mut [&mut seq], Logits::All).unwrap();
        out.extend(be.download(&logits).unwrap());
        pos += n;
    }
    assert_eq!(pos, ids.len());
    out
}

/// `n` split into steps of `size` (the last one shorter).
pub fn chunks(n: usize, size: usize) -> Vec<usize> {
    let mut v = vec![size; n / size];
    if !n.is_multiple_of(size) {
        v.push(n % size);
    }
    v
}

/// For every fixture: token-by-token decoding, prefill-then-decode and chunked prefill all give
/// the reference's full-forward logits at every position (within `tolerance`, relative).
pub fn check_decode_schedules<B: Backend>(be: &B, tolerance: f64) {
    for case in fixture_cases() {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let model = load_model(be, &case);
        let r = read_reference(&case);
        let n = r.input_ids.len();
        for (label, steps) in decode_schedules(n) {
            let got = run_in_steps(be, &model, &r.input_ids, &steps);
            let err = max_rel_err(&got, &r.logits);
            println!("{} {name} / {label}: max rel err {err:.2e}", be.name());
            assert!(err <= tolerance, "{name} / {label}: {err:.3e}");
        }
    }
}

/// The step schedules the decode checks feed an `n`-token prompt in (`n` ≥ 17): token by token,
/// a 17-token prefill then decode, and chunks of 5 and of 7 (chunks crossing blocks and windows).
pub fn decode_schedules(n: usize) -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("token by token", vec![1; n]),
        ("prefill 17 then decode", std::iter::once(17).chain(std::iter::repeat_n(1, n - 17)).collect()),
        ("chunks of 5", chunks(n, 5)),
        ("chunks of 7", chunks(n, 7)),
    ]
}

/// A fixture case's checkpoint loaded on `be`, its prompt prefilled: max |Δlogit| / max |logit|
/// against its reference ([`max_rel_err`]).
pub fn prefill_error<B: Backend>(be: &B, case: &Path) -> f64 {
    let model = load_model(be, case);
    let r = read_reference(case);
    let logits = be.download(&model.forward(be, &Batch::prefill(&[&r.input_ids]).unwrap()).unwrap()).unwrap();
    max_rel_err(&logits, &r.logits)
}

/// Prefill logits of every fixture on `be` against the reference (max |Δ| / max |logit| ≤
/// `tolerance`), with the per-layer errors printed to locate a failure.
pub fn check_every_fixture<B: Backend>(be: &B, tolerance: f64) {
    let cases = fixture_cases();
    assert!(cases.len() >= 5, "expected the committed fixture cases, found {}", cases.len());
    let mut failures = vec![];
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        let model = load_model(be, case);
        let reference = read_reference(case);
        let batch = Batch::prefill(&[&reference.input_ids]).unwrap();
        let mut trace = Trace::default();
        let logits = model.forward_traced(be, &batch, Some(&mut trace)).unwrap();
        let logits = be.download(&logits).unwrap();
        let err = max_rel_err(&logits, &reference.logits);
        let per_layer: Vec<String> = layer_errors(be, &trace, &reference).iter().map(|e| format!("{e:.1e}")).collect();
        println!(
            "{} {name}: n={} max rel err {err:.2e}; per layer {per_layer:?}",
            be.describe(),
            reference.input_ids.len()
        );
        if err > tolerance {
            failures.push(format!("{name}: {err:.3e} (layers {per_layer:?})"));
        }
    }
    assert!(failures.is_empty(), "cases above {tolerance:.0e}: {failures:#?}");
}

/// Logits of `ids` through `model` twice, concatenated: a whole-prompt prefill with the state in
/// `dtype`, then a prefill of 17 tokens followed by one-token decode steps (`decode_steps` of
/// them, or to the end of `ids`). What the multi-rank suites compare with one device.
pub fn prefill_and_decode<B: Backend>(
    be: &B,
    model: &Model<B>,
    ids: &[u32],
    dtype: KvDtype,
    decode_steps: Option<usize>,
) -> Vec<f32> {
    let batch = Batch::prefill(&[ids]).unwrap();
    let mut out = be.download(&model.forward_with(be, &batch, dtype, None).unwrap()).unwrap();
    let first = 17.min(ids.len());
    let ids = &ids[..decode_steps.map_or(ids.len(), |n| (first + n).min(ids.len()))];
    let steps = std::iter::once(first).chain(std::iter::repeat_n(1, ids.len() - first));
    let mut cache = model.new_cache(be, kv_config(&model.cfg, dtype, 1, ids.len(), first)).unwrap();
    let mut seq = cache.new_sequence();
    let mut pos = 0;
    for n in steps {
        let b = Batch::new(&[(&ids[pos..pos + n], pos)]).unwrap();
        let logits = model.step(be, &b, &mut cache, &mut [&mut seq], Logits::All).unwrap();
        out.extend(be.download(&logits).unwrap());
        pos += n;
    }
    out
}

/// Prompts of different lengths for a data-parallel attention run, cut from a fixture's `ids`:
/// the whole of it, its first two thirds, and its second half reversed.
pub fn data_parallel_prompts(ids: &[u32]) -> Vec<Vec<u32>> {
    let n = ids.len();
    vec![ids.to_vec(), ids[..2 * n / 3].to_vec(), ids[n / 2..].iter().rev().copied().collect()]
}

/// A fixture case opened for a data-parallel attention run: its name, config, checkpoint,
/// row format, and [`data_parallel_prompts`] cut from its reference ids (the first
/// `max_tokens` of them, when given).
pub struct DataParallelCase {
    pub name: String,
    pub cfg: ModelConfig,
    pub ckpt: Checkpoint,
    pub dtype: KvDtype,
    pub prompts: Vec<Vec<u32>>,
}

impl DataParallelCase {
    pub fn open(case: &Path, max_tokens: Option<usize>) -> Self {
        let ids = read_reference(case).input_ids;
        let ids = &ids[..max_tokens.map_or(ids.len(), |n| n.min(ids.len()))];
        DataParallelCase {
            name: case.file_name().unwrap().to_string_lossy().to_string(),
            cfg: ModelConfig::from_dir(case).unwrap(),
            ckpt: Checkpoint::open(case).unwrap(),
            dtype: case_kv_dtype(case),
            prompts: data_parallel_prompts(ids),
        }
    }
}

/// The steps a data-parallel attention run feeds a prompt of `len` tokens in: `first` tokens,
/// then one a step. What [`data_parallel_logits`] does per sequence, and the single-device
/// reference replays with [`run_in_steps_with`].
pub fn data_parallel_steps(len: usize, first: usize) -> Vec<usize> {
    let first = first.min(len);
    std::iter::once(first).chain(std::iter::repeat_n(1, len - first)).collect()
}

/// One rank of a data-parallel attention run ([`dsv4_core::parallel::ParallelLayout::data_parallel_attention`]):
/// sequence `i` of `prompts` is served by rank `i % world`; every step, each rank feeds each
/// of its unfinished sequences its next part ([`data_parallel_steps`]) in one batch, or takes
/// part with [`Model::idle_step`] once its sequences are done (every rank runs the same number
/// of steps, the longest sequence's). Returns (sequence index, every token's logits) for the
/// sequences this rank served.
pub fn data_parallel_logits<B: Backend>(
    be: &B,
    model: &Model<B>,
    prompts: &[Vec<u32>],
    first: usize,
    dtype: KvDtype,
) -> Vec<(usize, Vec<f32>)> {
    let (world, me) = (model.rank.layout.layout.world, model.rank.layout.dp_rank());
    let mine: Vec<usize> = (0..prompts.len()).filter(|i| i % world == me).collect();
    let steps = prompts.iter().map(|p| data_parallel_steps(p.len(), first).len()).max().unwrap_or(0);
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(1);
    let config = kv_config(&model.cfg, dtype, mine.len().max(1), longest, first * mine.len().max(1));
    let mut cache = model.new_cache(be, config).unwrap();
    let mut seqs: Vec<_> = mine.iter().map(|_| cache.new_sequence()).collect();
    let mut out: Vec<Vec<f32>> = vec![vec![]; mine.len()];
    let vocab = model.cfg.vocab_size;
    for step in 0..steps {
        let mut parts = vec![];
        let mut stepping = vec![];
        for (j, &i) in mine.iter().enumerate() {
            let (p, pos) = (&prompts[i], seqs[j].pos());
            if let Some(&n) = data_parallel_steps(p.len(), first).get(step) {
                parts.push((&p[pos..pos + n], pos));
                stepping.push(j);
            }
        }
        if parts.is_empty() {
            model.idle_step(be).unwrap();
            continue;
        }
        let batch = Batch::new(&parts).unwrap();
        let mut refs: Vec<_> =
            seqs.iter_mut().enumerate().filter(|(j, _)| stepping.contains(j)).map(|(_, s)| s).collect();
        let logits = be.download(&model.step(be, &batch, &mut cache, &mut refs, Logits::All).unwrap()).unwrap();
        for (k, &j) in stepping.iter().enumerate() {
            let rows = batch.seqs[k].clone();
            out[j].extend_from_slice(&logits[rows.start * vocab..rows.end * vocab]);
        }
    }
    mine.into_iter().zip(out).collect()
}

/// The single-device logits [`data_parallel_logits`] is compared with: each prompt alone,
/// fed in the same steps.
pub fn data_parallel_reference<B: Backend>(
    be: &B,
    model: &Model<B>,
    prompts: &[Vec<u32>],
    first: usize,
    dtype: KvDtype,
) -> Vec<Vec<f32>> {
    let reference = |p: &Vec<u32>| {
        let config = kv_config(&model.cfg, dtype, 1, p.len(), first);
        run_in_steps_with(be, model, p, &data_parallel_steps(p.len(), first), config)
    };
    prompts.iter().map(reference).collect()
}

/// Checks the ranks' [`data_parallel_logits`] against [`data_parallel_reference`]'s `want`:
/// every sequence served exactly once, within `tolerance` ([`max_rel_err`]), the worst printed
/// under `what`.
pub fn assert_data_parallel_matches(what: &str, ranks: Vec<Vec<(usize, Vec<f32>)>>, want: &[Vec<f32>], tolerance: f64) {
    let mut served = vec![0; want.len()];
    let mut worst = 0.0f64;
    for (i, got) in ranks.into_iter().flatten() {
        worst = worst.max(max_rel_err(&got, &want[i]));
        served[i] += 1;
    }
    println!("{what}: max rel err {worst:.2e} against one device");
    assert!(served.iter().all(|&n| n == 1), "{what}: sequences served {served:?} times");
    assert!(worst <= tolerance, "{what}: {worst:.3e}");
}

/// The emulator is process-wide (devices, HCCL rendezvous, environment): multi-device tests of
/// one binary take turns through this lock, on an emulator with `devices` devices (unless
/// `DSV4_ASCEND_EMU_DEVICES` is already set).
pub fn emulated_devices(devices: usize) -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if std::env::var_os("DSV4_ASCEND_EMU_DEVICES").is_none() {
        std::env::set_var("DSV4_ASCEND_EMU_DEVICES", devices.to_string());
    }
    use_ascend_emulator();
    guard
}
