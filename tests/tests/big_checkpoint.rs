//! Memory on a multi-GB official-format checkpoint (issue #4 §2): peak RSS while loading, and
//! with every loaded weight paged in, against the resident weight bytes.
//!
//! Both tests are `#[ignore]`d (they write and read ~3.4 GB). Run them as two processes, so
//! the measured one does nothing but load:
//!
//! ```sh
//! cargo test --release -p dsv4-tests --test big_checkpoint -- --ignored --exact write_big_checkpoint
//! cargo test --release -p dsv4-tests --test big_checkpoint -- --ignored --exact --nocapture load_peak_rss
//! ```
//!
//! The directory is `$DSV4_BIG_DIR` (default `/tmp/dsv4-big-checkpoint`). The checkpoint has
//! the Flash layout scaled down (hidden 2048, 6 layers + 1 MTP layer, 128 experts of width
//! 1024, vocab 32768): FP8 e4m3 attention and shared-expert matrices with E8M0 128×128 block
//! scales, FP4 routed experts with E8M0 scales per 32 inputs, BF16 embedding/head/router/
//! compressors, F32 mHC and sinks, I64 `tid2eid`, in ~400 MB shards with an index; values are
//! random, scales valid.

mod common;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::model::loader::{expected_mtp_tensors, expected_tensors, TensorRole};
use dsv4_core::quant::scale_name;
use dsv4_core::tensor::DType;
use dsv4_core::{Backend, Batch, Checkpoint, Model, ModelConfig};

fn big_dir() -> PathBuf {
    std::env::var_os("DSV4_BIG_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp/dsv4-big-checkpoint"))
}

fn config() -> serde_json::Value {
    let flash = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/deepseek-v4-flash/config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(flash).unwrap()).unwrap();
    let o = c.as_object_mut().unwrap();
    o.remove("_comment");
    for (k, v) in [
        ("vocab_size", serde_json::json!(32768)),
        ("hidden_size", 2048.into()),
        ("num_hidden_layers", 6.into()),
        ("num_attention_heads", 16.into()),
        ("o_groups", 4.into()),
        ("n_routed_experts", 128.into()),
        ("moe_intermediate_size", 1024.into()),
        ("num_hash_layers", 1.into()),
        ("compress_ratios", serde_json::json!([0, 4, 128, 4, 128, 4, 0])),
    ] {
        o.insert(k.into(), v);
    }
    c
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }

    fn small(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05
    }
}

/// What to write for one tensor.
#[derive(Clone, Copy)]
enum Fill {
    /// FP8 codes, NaN codes avoided.
    Fp8,
    /// Packed FP4 codes (every byte is valid).
    Fp4,
    /// E8M0 scales around 2^-6.
    E8m0,
    Bf16 {
        mean: f32,
    },
    F32 {
        mean: f32,
    },
    /// I64 entries in 0..upper.
    Ids {
        upper: u64,
    },
}

struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    fill: Fill,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_bytes()
    }
}

/// The Flash storage plan for every tensor the loader reads (main model and MTP layer 0).
fn plan(cfg: &ModelConfig) -> Vec<Entry> {
    let empty = Checkpoint::from_tensors(vec![]).unwrap();
    let mut list = expected_tensors(cfg, &empty);
    list.extend(expected_mtp_tensors(cfg, &empty, 0));
    let mut out = vec![];
    for e in list {
        let n = &e.name;
        match e.role {
            TensorRole::Weight => {
                let (rows, cols) = (e.shape[0], e.shape[1]);
                let routed = n.contains(".ffn.experts.");
                let fp8 = !routed
                    && [".wq_a.", ".wq_b.", ".attn.wkv.", ".wo_a.", ".wo_b.", ".shared_experts.", "_proj.weight"]
                        .iter()
                        .any(|s| n.contains(s))
                    && !n.contains("weights_proj");
                let scale = scale_name(n).unwrap_or_default();
                if routed {
                    out.push(Entry { name: n.clone(), dtype: DType::I8, shape: vec![rows, cols / 2], fill: Fill::Fp4 });
                    let shape = vec![rows, cols.div_ceil(32)];
                    out.push(Entry { name: scale, dtype: DType::F8E8M0, shape, fill: Fill::E8m0 });
                } else if fp8 {
                    out.push(Entry { name: n.clone(), dtype: DType::F8E4M3, shape: e.shape.clone(), fill: Fill::Fp8 });
                    let shape = vec![rows.div_ceil(128), cols.div_ceil(128)];
                    out.push(Entry { name: scale, dtype: DType::F8E8M0, shape, fill: Fill::E8m0 });
                } else if n.contains("hc_") {
                    out.push(Entry {
                        name: n.clone(),
                        dtype: DType::F32,
                        shape: e.shape,
                        fill: Fill::F32 { mean: 0.0 },
                    });
                } else {
                    out.push(Entry {
                        name: n.clone(),
                        dtype: DType::BF16,
                        shape: e.shape,
                        fill: Fill::Bf16 { mean: 0.0 },
                    });
                }
            }
            TensorRole::Param => {
                let mean = if n.contains("norm") || n.ends_with("_scale") { 1.0 } else { 0.0 };
                let (dtype, fill) = if n.contains("norm") {
                    (DType::BF16, Fill::Bf16 { mean })
                } else {
                    (DType::F32, Fill::F32 { mean })
                };
                out.push(Entry { name: n.clone(), dtype, shape: e.shape, fill });
            }
            TensorRole::Ints => out.push(Entry {
                name: n.clone(),
                dtype: DType::I64,
                shape: e.shape,
                fill: Fill::Ids { upper: cfg.n_routed_experts as u64 },
            }),
            TensorRole::FusedExperts => unreachable!("the plan stores experts one by one"),
        }
    }
    out
}

fn write_data(w: &mut impl Write, e: &Entry, rng: &mut Rng) {
    let mut buf = vec![0u8; e.bytes()];
    match e.fill {
        Fill::Fp8 => {
            rng.fill(&mut buf);
            for b in &mut buf {
                if *b & 0x7F == 0x7F {
                    *b ^= 1;
                }
            }
        }
        Fill::Fp4 => rng.fill(&mut buf),
        Fill::E8m0 => buf.iter_mut().for_each(|b| *b = 119 + (rng.next() % 4) as u8),
        Fill::Bf16 { mean } => {
            for c in buf.chunks_exact_mut(2) {
                c.copy_from_slice(&(((mean + rng.small()).to_bits() >> 16) as u16).to_le_bytes());
            }
        }
        Fill::F32 { mean } => {
            for c in buf.chunks_exact_mut(4) {
                c.copy_from_slice(&(mean + rng.small()).to_le_bytes());
            }
        }
        Fill::Ids { upper } => {
            for c in buf.chunks_exact_mut(8) {
                c.copy_from_slice(&((rng.next() % upper) as i64).to_le_bytes());
            }
        }
    }
    w.write_all(&buf).unwrap();
}

/// Streams one shard to disk (header first, then each tensor generated and written in turn).
fn write_shard(path: &Path, entries: &[&Entry], rng: &mut Rng) {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for e in entries {
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.dtype.name(), "shape": e.shape, "data_offsets": [off, off + e.bytes()]}),
        );
        off += e.bytes();
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut w = BufWriter::with_capacity(1 << 22, std::fs::File::create(path).unwrap());
    w.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    w.write_all(&h).unwrap();
    for e in entries {
        write_data(&mut w, e, rng);
    }
    w.flush().unwrap();
}

#[test]
#[ignore = "writes a ~3.4 GB checkpoint; see the module docs"]
fn write_big_checkpoint() {
    let dir = big_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = config();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let entries = plan(&cfg);
    // ~400 MB shards in load order (a weight and its scale stay together); MTP in the last.
    const SHARD: usize = 400 << 20;
    let mut shards: Vec<Vec<&Entry>> = vec![vec![]];
    let mut size = 0;
    let mut in_mtp = false;
    for e in &entries {
        let mtp = e.name.starts_with("mtp.");
        let is_scale = e.name.ends_with(".scale");
        if !is_scale && ((size > SHARD) || (mtp && !in_mtp)) {
            shards.push(vec![]);
            size = 0;
        }
        in_mtp = mtp;
        size += e.bytes();
        shards.last_mut().unwrap().push(e);
    }
    let total: usize = entries.iter().map(|e| e.bytes()).sum();
    let start = Instant::now();
    let mut rng = Rng(0xB16);
    let mut map = serde_json::Map::new();
    for (i, s) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        write_shard(&dir.join(&file), s, &mut rng);
        for e in s {
            map.insert(e.name.clone(), file.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
    println!(
        "wrote {} tensors, {:.2} GB in {} shards to {} in {:.1} s",
        entries.len(),
        total as f64 / 1e9,
        shards.len(),
        dir.display(),
        start.elapsed().as_secs_f64()
    );
}

/// A field of /proc/self/status, in bytes.
fn status_bytes(field: &str) -> usize {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap() * 1024
}

#[test]
#[ignore = "reads the checkpoint written by write_big_checkpoint; see the module docs"]
fn load_peak_rss() {
    let dir = big_dir();
    let gb = |b: usize| b as f64 / 1e9;
    let before = status_bytes("VmHWM:");
    let start = Instant::now();
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir).unwrap();
    let opened = start.elapsed().as_secs_f64();
    ckpt.record_access();
    let be = CpuBackend::new();
    let mut resident = 0u64;
    let model = Model::load(&be, cfg, &ckpt, &mut |_, _, bytes| resident = bytes).unwrap();
    let load_s = start.elapsed().as_secs_f64();
    let file_bytes: usize = ckpt.tensors().map(|t| t.size_bytes()).sum();
    let loaded: usize = ckpt.accessed().iter().map(|n| ckpt.get(n).unwrap().size_bytes()).sum();
    assert_eq!(loaded as u64, resident, "the loader's byte count is the loaded tensors' bytes");
    let hwm_load = status_bytes("VmHWM:");
    let rss_load = status_bytes("VmRSS:");

    // Page in every loaded weight (what a long decode does): the weights are the mapped file
    // pages themselves, so this adds them once and nothing else.
    let touch = Instant::now();
    let mut sum = 0u64;
    for n in ckpt.accessed() {
        for c in ckpt.get(&n).unwrap().bytes().chunks(4096) {
            sum = sum.wrapping_add(c[0] as u64);
        }
    }
    std::hint::black_box(sum);
    let touch_s = touch.elapsed().as_secs_f64();
    let hwm_all = status_bytes("VmHWM:");
    let rss_all = status_bytes("VmRSS:");

    let fwd = Instant::now();
    let logits = model.forward(&be, &Batch::prefill(&[&[1, 5, 17, 42]]).unwrap()).unwrap();
    let out = be.download(&logits).unwrap();
    let fwd_s = fwd.elapsed().as_secs_f64();
    assert!(out.iter().all(|v| v.is_finite()));
    let hwm_fwd = status_bytes("VmHWM:");

    println!("checkpoint: {} ({} tensors, {:.3} GB in the files)", dir.display(), ckpt.len(), gb(file_bytes));
    println!("resident weights (loaded tensors, stored form, scales included): {:.3} GB", gb(loaded));
    println!("open (headers): {opened:.2} s; open + load: {load_s:.2} s");
    println!(
        "after load:         VmHWM {:.3} GB, VmRSS {:.3} GB (process before: {:.3} GB)",
        gb(hwm_load),
        gb(rss_load),
        gb(before)
    );
    println!("all weights paged in ({touch_s:.2} s): VmHWM {:.3} GB, VmRSS {:.3} GB", gb(hwm_all), gb(rss_all));
    println!("after a 4-token prefill ({fwd_s:.2} s): VmHWM {:.3} GB", gb(hwm_fwd));
    println!(
        "peak / resident weights: {:.3} at load, {:.3} with every weight paged in, {:.3} after the prefill",
        hwm_load as f64 / loaded as f64,
        hwm_all as f64 / loaded as f64,
        hwm_fwd as f64 / loaded as f64
    );
    assert!(hwm_load as f64 <= 1.10 * loaded as f64, "load peak {hwm_load} vs weights {loaded}");
    assert!(hwm_all as f64 <= 1.10 * loaded as f64, "peak with all weights {hwm_all} vs weights {loaded}");
}
