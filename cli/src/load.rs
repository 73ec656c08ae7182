//! Finding a model (directory or built-in) and loading it onto a backend with a progress bar.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dsv4_core::{builtin, Backend, Checkpoint, Model, ModelConfig, Precision};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The config and checkpoint named by `--model`.
pub fn open(spec: &str) -> Result<(ModelConfig, Checkpoint)> {
    if let Some(model) = builtin::by_name(spec) {
        return Ok(model?);
    }
    if let Some(other) = spec.strip_prefix("builtin:") {
        anyhow::bail!("unknown built-in model `{other}` (available: {})", builtin::NAMES.join(", "));
    }
    let dir = Path::new(spec);
    let cfg = config_from_dir(dir)?;
    let ckpt = Checkpoint::open(dir).with_context(|| format!("opening the checkpoint in {}", dir.display()))?;
    Ok((cfg, ckpt))
}

/// `dir`'s config.json; a warning on stderr names the weight-shape fields it lacks (their
/// defaults only fit V4-Flash, so a load error usually follows).
pub fn config_from_dir(dir: &Path) -> Result<ModelConfig> {
    let cfg = ModelConfig::from_dir(dir)?;
    if let Some(note) = cfg.assumed_defaults_note() {
        eprintln!("warning: {note} (in {})", dir.join("config.json").display());
    }
    Ok(cfg)
}

/// Loads onto `be`, to run in `precision`; a progress bar appears on stderr once loading has
/// taken more than a second.
pub fn load_model<B: Backend>(be: &B, spec: &str, precision: Precision) -> Result<Model<B>> {
    let (cfg, ckpt) = open(spec)?;
    let bar = ProgressBar::with_draw_target(Some(ckpt.len() as u64), ProgressDrawTarget::hidden());
    bar.set_style(
        ProgressStyle::with_template("loading {bar:40} {pos}/{len} tensors, {msg} [{elapsed_precise}]")
            .expect("valid template"),
    );
    let start = Instant::now();
    let mut shown = false;
    let model = Model::load(be, cfg, &ckpt, &mut |done, _total, bytes| {
        if !shown && start.elapsed() > Duration::from_secs(1) {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            shown = true;
        }
        bar.set_position(done as u64);
        bar.set_message(format!("{:.1} MB", bytes as f64 / 1e6));
    })
    .with_context(|| format!("loading model `{spec}`"))?;
    bar.finish_and_clear();
    let mut model = model;
    model.precision = precision;
    static SAID: std::sync::Once = std::sync::Once::new();
    if precision != Precision::F32 {
        SAID.call_once(|| {
            eprintln!("precision: {precision} activations (rounding points and accuracy budget: docs/precision.md)")
        });
    }
    Ok(model)
}
