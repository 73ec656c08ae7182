//! Every bad input gives an error, never a panic, and the message names what is wrong: the
//! file, the tensor, the config field, the token. Each case starts from a copy of a real
//! fixture (`mixed_f32`: one file, transformers naming; `sharded`: an index and three shards)
//! in a scratch directory and damages one thing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dsv4_backend_cpu::CpuBackend;
use dsv4_core::kv::KvDtype;
use dsv4_core::{Batch, Checkpoint, Model, ModelConfig};
use dsv4_tests::fixtures_dir;
use serde_json::{json, Value};

// ------------------------------------------------------------------------------- helpers

/// A scratch directory under the system temp dir, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("dsv4-bad-inputs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A copy of fixture `case` (its model files, not the reference outputs).
    fn copy_of(case: &str, name: &str) -> Scratch {
        let s = Scratch::new(name);
        for e in std::fs::read_dir(fixtures_dir().join(case)).unwrap() {
            let p = e.unwrap().path();
            let file = p.file_name().unwrap().to_str().unwrap().to_string();
            if file != "reference.safetensors" && file != "meta.json" {
                std::fs::copy(&p, s.0.join(&file)).unwrap();
            }
        }
        s
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A safetensors file taken apart: its header (without `__metadata__`) and data section.
struct Raw {
    header: BTreeMap<String, Value>,
    data: Vec<u8>,
}

impl Raw {
    fn read(path: &Path) -> Raw {
        let b = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let mut header: BTreeMap<String, Value> = serde_json::from_slice(&b[8..8 + n]).unwrap();
        header.remove("__metadata__");
        Raw { header, data: b[8 + n..].to_vec() }
    }

    /// Writes the header as JSON (with its length prefix) followed by the data.
    fn write(&self, path: &Path) {
        write_file(path, serde_json::to_string(&self.header).unwrap().as_bytes(), &self.data);
    }

    fn offsets(&self, name: &str) -> (usize, usize) {
        let o = &self.header[name]["data_offsets"];
        (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize)
    }

    fn set_offsets(&mut self, name: &str, begin: usize, end: usize) {
        self.header.get_mut(name).unwrap()["data_offsets"] = json!([begin, end]);
    }

    /// The tensor whose data ends last.
    fn last(&self) -> String {
        self.header.keys().max_by_key(|n| self.offsets(n).1).unwrap().clone()
    }
}

/// `len(header)` as u64 LE, the header bytes, the data.
fn write_file(path: &Path, header: &[u8], data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

/// Rewrites a safetensors file with the `safetensors` crate, with `edit` applied to its
/// (name, dtype, shape, bytes) list.
fn reserialize(path: &Path, edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn open_err(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn config_err(dir: &Path) -> String {
    match ModelConfig::from_dir(dir) {
        Ok(c) => panic!("{} parsed: {c:?}", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn json_err(text: &str) -> String {
    match ModelConfig::from_json_str(text) {
        Ok(c) => panic!("parsed: {c:?}"),
        Err(e) => e.to_string(),
    }
}

fn load(dir: &Path) -> dsv4_core::Result<Model<CpuBackend>> {
    let cfg = ModelConfig::from_dir(dir)?;
    let ckpt = Checkpoint::open(dir)?;
    Model::load(&CpuBackend::new(), cfg, &ckpt, &mut |_, _, _| {})
}

fn load_err(dir: &Path) -> String {
    match load(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[track_caller]
fn assert_names(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "error does not name `{p}`: {err}");
    }
}

/// The fixture's config.json as a JSON object, edited, as text.
fn edited_config(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let text = std::fs::read_to_string(fixtures_dir().join("mixed_f32").join("config.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    edit(v.as_object_mut().unwrap());
    serde_json::to_string_pretty(&v).unwrap()
}

const FILE: &str = "model.safetensors";

// -------------------------------------------------------------- sanity: the copies are good

#[test]
fn unmodified_copies_load() {
    for case in ["mixed_f32", "sharded"] {
        let s = Scratch::copy_of(case, &format!("pristine-{case}"));
        if let Err(e) = load(&s.0) {
            panic!("{case}: {e}");
        }
        // And a copy rewritten by the helpers, unchanged, still loads (the helpers are faithful).
        if case == "mixed_f32" {
            Raw::read(&s.path(FILE)).write(&s.path(FILE));
            reserialize(&s.path(FILE), |_| {});
            if let Err(e) = load(&s.0) {
                panic!("{case} rewritten: {e}");
            }
        }
    }
}

// -------------------------------------------------------------------- safetensors framing

#[test]
fn file_truncated_in_the_data_section() {
    let s = Scratch::copy_of("mixed_f32", "truncated-data");
    let last = Raw::read(&s.path(FILE)).last();
    let b = std::fs::read(s.path(FILE)).unwrap();
    std::fs::write(s.path(FILE), &b[..b.len() - 100]).unwrap();
    let e = open_err(&s.0);
    assert_names(&e, &[FILE, &last, "truncated"]);
}

#[test]
fn file_truncated_inside_the_header() {
    let s = Scratch::copy_of("mixed_f32", "truncated-header");
    let b = std::fs::read(s.path(FILE)).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    std::fs::write(s.path(FILE), &b[..8 + n / 2]).unwrap();
    let e = open_err(&s.0);
    assert_names(&e, &[FILE, "header length", "truncated"]);
    // Shorter than the length field itself.
    std::fs::write(s.path(FILE), &b[..5]).unwrap();
    assert_names(&open_err(&s.0), &[FILE, "5 bytes", "8-byte header length"]);
    std::fs::write(s.path(FILE), []).unwrap();
    assert_names(&open_err(&s.0), &[FILE, "0 bytes"]);
}

#[test]
fn header_length_larger_than_the_file() {
    let s = Scratch::copy_of("mixed_f32", "header-too-long");
    let mut b = std::fs::read(s.path(FILE)).unwrap();
    let len = b.len() as u64;
    b[..8].copy_from_slice(&len.to_le_bytes());
    std::fs::write(s.path(FILE), &b).unwrap();
    assert_names(&open_err(&s.0), &[FILE, &format!("header length {len}"), "larger than the rest of the file"]);
    // Absurdly large (would overflow a naive 8 + n).
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(s.path(FILE), &b).unwrap();
    assert_names(&open_err(&s.0), &[FILE, "header length"]);
}

#[test]
fn header_that_is_not_json() {
    let s = Scratch::copy_of("mixed_f32", "not-json");
    let data = Raw::read(&s.path(FILE)).data;
    for (header, what) in [
        (&b"{\"a\": {\"dtype\": \"F32\", "[..], "JSON"),
        (&b"this is not json at all"[..], "JSON"),
        (&b"[1, 2, 3]"[..], "JSON object"),
        (&b"{\"x\": 3}"[..], "not an object"),
        (&[0xff, 0xfe, b'{', b'}'][..], "UTF-8"),
    ] {
        write_file(&s.path(FILE), header, &data);
        assert_names(&open_err(&s.0), &[FILE, what]);
    }
}

#[test]
fn offsets_that_overlap() {
    let s = Scratch::copy_of("mixed_f32", "overlap");
    let mut raw = Raw::read(&s.path(FILE));
    // Two tensors of the same size: the second is pointed at the first one's bytes.
    let (a, b) = ("model.layers.0.ffn.experts.0.w1.weight", "model.layers.0.ffn.experts.0.w3.weight");
    let (begin, end) = raw.offsets(a);
    assert_eq!(raw.offsets(b).1 - raw.offsets(b).0, end - begin);
    raw.set_offsets(b, begin, end);
    raw.write(&s.path(FILE));
    assert_names(&open_err(&s.0), &[FILE, a, b, "overlap"]);
    // A partial overlap (shifted by 4 bytes into the neighbour).
    let mut raw = Raw::read(&fixtures_dir().join("mixed_f32").join(FILE));
    let (begin, end) = raw.offsets(a);
    raw.set_offsets(a, begin + 4, end + 4);
    raw.write(&s.path(FILE));
    assert_names(&open_err(&s.0), &[FILE, a, "overlap"]);
}

#[test]
fn offsets_outside_the_data() {
    let s = Scratch::copy_of("mixed_f32", "outside");
    let mut raw = Raw::read(&s.path(FILE));
    let last = raw.last();
    let (begin, end) = raw.offsets(&last);
    let n = raw.data.len();
    raw.set_offsets(&last, n, n + (end - begin));
    raw.write(&s.path(FILE));
    assert_names(&open_err(&s.0), &[FILE, &last, "past the end of the data section"]);
    // Reversed offsets.
    let mut raw = Raw::read(&fixtures_dir().join("mixed_f32").join(FILE));
    raw.set_offsets(&last, end, begin);
    raw.write(&s.path(FILE));
    assert_names(&open_err(&s.0), &[FILE, &last, "reversed"]);
    // A span that does not match dtype × shape.
    let mut raw = Raw::read(&fixtures_dir().join("mixed_f32").join(FILE));
    raw.set_offsets(&last, begin, end - 4);
    raw.write(&s.path(FILE));
    assert_names(&open_err(&s.0), &[FILE, &last, &format!("needs {} bytes", end - begin)]);
    // Offsets that are not integers.
    let mut raw = Raw::read(&fixtures_dir().join("mixed_f32").join(FILE));
    raw.header.get_mut(&last).unwrap()["data_offsets"] = json!([-4, 12]);
    raw.write(&s.path(FILE));
    assert_names(&open_err(&s.0), &[FILE, &last, "data_offsets"]);
}

/// Inserts `gap` zero bytes after `name`'s data (or at the very end with `None`), shifting the
/// offsets of everything after it: every tensor stays intact and in bounds.
fn with_hole(s: &Scratch, after: Option<&str>, gap: usize) {
    let mut raw = Raw::read(&s.path(FILE));
    let at = after.map_or(raw.data.len(), |n| raw.offsets(n).1);
    raw.data.splice(at..at, std::iter::repeat_n(0u8, gap));
    for n in raw.header.keys().cloned().collect::<Vec<_>>() {
        let (b, e) = raw.offsets(&n);
        if b >= at {
            raw.set_offsets(&n, b + gap, e + gap);
        }
    }
    raw.write(&s.path(FILE));
}

#[test]
fn offsets_that_leave_a_gap() {
    let s = Scratch::copy_of("mixed_f32", "gap");
    with_hole(&s, Some("model.layers.0.attn.wq_a.weight"), 64);
    let e = open_err(&s.0);
    assert_names(&e, &[FILE, "model.layers.0.attn.wq_a.weight"]);
}

#[test]
fn bytes_after_the_last_tensor() {
    let s = Scratch::copy_of("mixed_f32", "trailing");
    with_hole(&s, None, 64);
    assert_names(&open_err(&s.0), &[FILE]);
}

#[test]
fn unsupported_dtype() {
    let s = Scratch::copy_of("mixed_f32", "dtype");
    let mut raw = Raw::read(&s.path(FILE));
    let name = "model.layers.0.attn_norm.weight";
    for dtype in ["F8_E5M2", "C64", "f32", ""] {
        raw.header.get_mut(name).unwrap()["dtype"] = json!(dtype);
        raw.write(&s.path(FILE));
        assert_names(&open_err(&s.0), &[FILE, name, &format!("unsupported dtype {dtype}")]);
    }
    raw.header.get_mut(name).unwrap()["dtype"] = json!(32);
    raw.write(&s.path(FILE));
    assert_names(&open_err(&s.0), &[FILE, name, "dtype"]);
}

// --------------------------------------------------------------------- tensors vs. config

#[test]
fn tensor_missing() {
    let s = Scratch::copy_of("mixed_f32", "missing");
    reserialize(&s.path(FILE), |t| t.retain(|(n, ..)| n != "model.layers.2.attn.wo_b.weight"));
    Checkpoint::open(&s.0).expect("a checkpoint without one tensor still opens");
    // Named under its official spelling, with the shape the config expects and where it looked.
    assert_names(&load_err(&s.0), &["layers.2.attn.wo_b.weight", "missing", "[64, 32]", "1 file(s)"]);
    // A small parameter (read as f32) and an integer table.
    for (gone, official) in [
        ("model.layers.1.attn.compressor.ape", "layers.1.attn.compressor.ape"),
        ("model.layers.0.ffn.gate.tid2eid", "layers.0.ffn.gate.tid2eid"),
        ("model.norm.weight", "norm.weight"),
    ] {
        let s = Scratch::copy_of("mixed_f32", &format!("missing-{official}"));
        reserialize(&s.path(FILE), |t| t.retain(|(n, ..)| n != gone));
        assert_names(&load_err(&s.0), &[official, "missing"]);
    }
}

#[test]
fn tensor_with_the_wrong_shape() {
    let s = Scratch::copy_of("mixed_f32", "shape");
    let mut raw = Raw::read(&s.path(FILE));
    // Same bytes, transposed shape: only the shape check can catch it.
    raw.header.get_mut("model.layers.0.attn.wq_a.weight").unwrap()["shape"] = json!([64, 32]);
    raw.write(&s.path(FILE));
    assert_names(&load_err(&s.0), &["layers.0.attn.wq_a.weight", FILE, "[64, 32]", "expected [32, 64]"]);
    // A parameter read as f32 (norm weight).
    let mut raw = Raw::read(&fixtures_dir().join("mixed_f32").join(FILE));
    raw.header.get_mut("model.layers.0.attn.q_norm.weight").unwrap()["shape"] = json!([2, 16]);
    raw.write(&s.path(FILE));
    assert_names(&load_err(&s.0), &["layers.0.attn.q_norm.weight", FILE, "[2, 16]", "expected [32]"]);
    // In a shard: the error names the shard.
    let s = Scratch::copy_of("sharded", "shape-sharded");
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("model.safetensors.index.json")).unwrap()).unwrap();
    let shard = index["weight_map"]["model.layers.1.attn.wo_a.weight"].as_str().unwrap().to_string();
    let mut raw = Raw::read(&s.path(&shard));
    let entry = raw.header.get_mut("model.layers.1.attn.wo_a.weight").unwrap();
    let shape: Vec<u64> = entry["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    entry["shape"] = json!([shape[0] * shape[1]]);
    raw.write(&s.path(&shard));
    let e = load_err(&s.0);
    assert_names(&e, &["layers.1.attn.wo_a.weight", &shard, &format!("expected [{}, {}]", shape[0], shape[1])]);
}

#[test]
fn hash_table_with_an_expert_id_out_of_range() {
    // n_routed_experts is 8: ids must lie in 0..8.
    for (value, label) in [(8i64, "8"), (-1, "-1"), (1 << 40, "1099511627776")] {
        let s = Scratch::copy_of("mixed_f32", &format!("tid2eid{label}"));
        let mut raw = Raw::read(&s.path(FILE));
        let (begin, _) = raw.offsets("model.layers.1.ffn.gate.tid2eid");
        raw.data[begin + 5 * 8..begin + 6 * 8].copy_from_slice(&value.to_le_bytes());
        raw.write(&s.path(FILE));
        let e = load_err(&s.0);
        assert_names(&e, &["layers.1.ffn.gate.tid2eid", FILE, "entry 5", label, "0..8"]);
    }
}

#[test]
fn tensor_values_or_dtypes_the_loader_cannot_use() {
    // (stored name, official name, new dtype of the same element size, expected words)
    let cases: [(&str, &str, &str, &[&str]); 4] = [
        ("model.layers.0.attn.q_norm.weight", "layers.0.attn.q_norm.weight", "I32", &["floating-point", "I32"]),
        ("model.layers.0.attn.wq_a.weight", "layers.0.attn.wq_a.weight", "I32", &["I32", "cannot hold a weight"]),
        ("model.layers.0.ffn.gate.tid2eid", "layers.0.ffn.gate.tid2eid", "F64", &["integer", "F64"]),
        ("model.embed_tokens.weight", "embed.weight", "F64", &["F64"]),
    ];
    for (stored, official, dtype, words) in cases {
        let s = Scratch::copy_of("mixed_f32", &format!("dtype-{official}"));
        let mut raw = Raw::read(&s.path(FILE));
        raw.header.get_mut(stored).unwrap()["dtype"] = json!(dtype);
        if dtype == "F64" && stored.ends_with(".weight") {
            // Twice the bytes per element: halve the shape's last dim to keep the span.
            let e = raw.header.get_mut(stored).unwrap();
            let last = e["shape"][1].as_u64().unwrap();
            e["shape"][1] = json!(last / 2);
        }
        raw.write(&s.path(FILE));
        let e = load_err(&s.0);
        assert_names(&e, &[official, FILE]);
        assert_names(&e, words);
    }
    // A non-finite value in a parameter read as f32.
    let s = Scratch::copy_of("mixed_f32", "nan-param");
    let mut raw = Raw::read(&s.path(FILE));
    let (begin, _) = raw.offsets("model.layers.2.ffn_norm.weight");
    raw.data[begin + 12..begin + 16].copy_from_slice(&f32::NAN.to_le_bytes());
    raw.write(&s.path(FILE));
    assert_names(&load_err(&s.0), &["layers.2.ffn_norm.weight", FILE, "element 3", "not finite"]);
}

// --------------------------------------------------------------------------- shards & index

const INDEX: &str = "model.safetensors.index.json";

fn edit_index(s: &Scratch, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(s.path(INDEX)).unwrap()).unwrap();
    edit(v["weight_map"].as_object_mut().unwrap());
    std::fs::write(s.path(INDEX), serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn shard_of(s: &Scratch, tensor: &str) -> String {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(s.path(INDEX)).unwrap()).unwrap();
    v["weight_map"][tensor].as_str().unwrap().to_string()
}

#[test]
fn index_names_a_shard_that_does_not_exist() {
    let s = Scratch::copy_of("sharded", "no-shard");
    edit_index(&s, |m| {
        m.insert("head.weight".into(), json!("model-00009-of-00003.safetensors"));
    });
    assert_names(&open_err(&s.0), &[INDEX, "head.weight", "model-00009-of-00003.safetensors", "does not exist"]);
    // A shard deleted from disk: the error names it and a tensor it should hold.
    let s = Scratch::copy_of("sharded", "deleted-shard");
    let shard = shard_of(&s, "model.layers.0.attn.wq_a.weight");
    std::fs::remove_file(s.path(&shard)).unwrap();
    assert_names(&open_err(&s.0), &[INDEX, &shard, "does not exist", "more"]);
    // Shard names that leave the directory are refused.
    let s = Scratch::copy_of("sharded", "escaping-shard");
    edit_index(&s, |m| {
        m.insert("head.weight".into(), json!("../model-00001-of-00003.safetensors"));
    });
    assert_names(&open_err(&s.0), &[INDEX, "plain file name"]);
}

#[test]
fn index_maps_a_tensor_to_the_wrong_shard() {
    let s = Scratch::copy_of("sharded", "wrong-shard");
    let tensor = "model.layers.0.attn.wq_a.weight";
    let right = shard_of(&s, tensor);
    let wrong = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]
        .into_iter()
        .find(|s| *s != right)
        .unwrap();
    edit_index(&s, |m| {
        m.insert(tensor.into(), json!(wrong));
    });
    assert_names(&open_err(&s.0), &[tensor, wrong, &right]);
    // A tensor that no shard holds.
    let s = Scratch::copy_of("sharded", "phantom-tensor");
    edit_index(&s, |m| {
        m.insert("model.layers.9.attn.wq_a.weight".into(), json!("model-00001-of-00003.safetensors"));
    });
    assert_names(
        &open_err(&s.0),
        &["model.layers.9.attn.wq_a.weight", "model-00001-of-00003.safetensors", "does not contain"],
    );
}

#[test]
fn index_that_is_not_valid() {
    let s = Scratch::copy_of("sharded", "bad-index");
    std::fs::write(s.path(INDEX), "{\"weight_map\": {").unwrap();
    assert_names(&open_err(&s.0), &[INDEX, "JSON"]);
    std::fs::write(s.path(INDEX), "{\"metadata\": {}}").unwrap();
    assert_names(&open_err(&s.0), &[INDEX, "weight_map"]);
    std::fs::write(s.path(INDEX), "{\"weight_map\": {\"head.weight\": 3}}").unwrap();
    assert_names(&open_err(&s.0), &[INDEX, "head.weight", "not a string"]);
}

#[test]
fn duplicate_tensor_under_two_spellings() {
    // One file: the official-spelled q_a projection also stored under transformers' name.
    let s = Scratch::copy_of("mixed_f32", "duplicate");
    reserialize(&s.path(FILE), |t| {
        let copy = t.iter().find(|(n, ..)| n == "model.layers.0.attn.wq_a.weight").unwrap().clone();
        t.push(("model.layers.0.self_attn.q_a_proj.weight".into(), copy.1, copy.2, copy.3));
    });
    assert_names(&open_err(&s.0), &["layers.0.attn.wq_a.weight", "twice", FILE]);
    // The same name twice in one header (serde_json would silently keep the last one).
    let raw = Raw::read(&fixtures_dir().join("mixed_f32").join(FILE));
    let (name, (b, e)) = ("model.norm.weight", raw.offsets("model.norm.weight"));
    let entry = format!("{{\"dtype\":\"F32\",\"shape\":[64],\"data_offsets\":[{b},{e}]}}");
    let text = serde_json::to_string(&raw.header).unwrap();
    let text = format!("{{\"{name}\":{entry},{}", &text[1..]);
    write_file(&s.path(FILE), text.as_bytes(), &raw.data);
    assert_names(&open_err(&s.0), &[name, "twice", FILE]);
    // Across shards: a tensor of shard A stored again, under another spelling, in shard B.
    let s = Scratch::copy_of("sharded", "duplicate-sharded");
    let a = shard_of(&s, "model.layers.0.attn.wq_a.weight");
    let b =
        ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
            .into_iter()
            .find(|x| *x != a)
            .unwrap();
    let data = {
        let bytes = std::fs::read(s.path(&a)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let v = st.tensor("model.layers.0.attn.wq_a.weight").unwrap();
        (v.dtype(), v.shape().to_vec(), v.data().to_vec())
    };
    reserialize(&s.path(b), |t| t.push(("model.layers.0.self_attn.q_a_proj.weight".into(), data.0, data.1, data.2)));
    edit_index(&s, |m| {
        m.insert("model.layers.0.self_attn.q_a_proj.weight".into(), json!(b));
    });
    assert_names(&open_err(&s.0), &["layers.0.attn.wq_a.weight", "twice", &a, b]);
}

#[test]
fn directory_without_a_checkpoint() {
    let s = Scratch::new("empty");
    assert_names(&open_err(&s.0), &["no *.safetensors files", &s.0.display().to_string()]);
    let missing = s.path("does-not-exist");
    assert_names(&open_err(&missing), &["does-not-exist", "not a directory"]);
    assert_names(&config_err(&missing), &["does-not-exist", "does not exist"]);
    // A directory with weights but no config.json.
    let s = Scratch::copy_of("mixed_f32", "no-config");
    std::fs::remove_file(s.path("config.json")).unwrap();
    assert_names(&config_err(&s.0), &["config.json"]);
}

// ------------------------------------------------------------------------------- config

#[test]
fn config_that_is_not_json() {
    let s = Scratch::copy_of("mixed_f32", "config-not-json");
    std::fs::write(s.path("config.json"), "{ \"hidden_size\": 64,").unwrap();
    assert_names(&config_err(&s.0), &["config.json", "JSON"]);
    std::fs::write(s.path("config.json"), "[64]").unwrap();
    assert_names(&config_err(&s.0), &["config.json", "object"]);
    assert_names(&json_err(""), &["JSON"]);
}

#[test]
fn config_without_hidden_size_falls_back_to_the_default_and_loading_names_the_mismatch() {
    // transformers' DeepseekV4Config default (4096) applies, as in transformers, so the config
    // parses; loading then fails on the first tensor whose shape involves it.
    let s = Scratch::copy_of("mixed_f32", "no-hidden-size");
    std::fs::write(s.path("config.json"), edited_config(|c| drop(c.remove("hidden_size")))).unwrap();
    assert_eq!(ModelConfig::from_dir(&s.0).unwrap().hidden_size, 4096);
    assert_names(&load_err(&s.0), &["embed.weight", FILE, "[256, 64]", "expected [256, 4096]"]);
}

#[test]
fn config_field_errors_name_the_field() {
    let cases: Vec<(String, &[&str])> = vec![
        (
            edited_config(|c| {
                c["layer_types"].as_array_mut().unwrap().pop();
            }),
            &["layer_types", "3 entries", "num_hidden_layers is 4"],
        ),
        (
            edited_config(|c| {
                c["layer_types"].as_array_mut().unwrap().push(json!("sliding_attention"));
            }),
            &["layer_types", "5 entries"],
        ),
        (
            edited_config(|c| c["layer_types"][2] = json!("full_attention")),
            &["layer_types", "entry 2", "full_attention"],
        ),
        (edited_config(|c| c["layer_types"] = json!("sliding_attention")), &["layer_types", "list"]),
        (edited_config(|c| c["o_groups"] = json!(3)), &["o_groups", "4 heads", "3 groups"]),
        (edited_config(|c| c["hidden_size"] = json!("64")), &["hidden_size", "integer"]),
        (edited_config(|c| c["hidden_size"] = json!(-64)), &["hidden_size"]),
        (edited_config(|c| c["hidden_size"] = json!(0)), &["hidden_size", "positive"]),
        (edited_config(|c| c["mlp_layer_types"][1] = json!("dense")), &["mlp_layer_types", "entry 1", "dense"]),
        (
            edited_config(|c| {
                c["mlp_layer_types"].as_array_mut().unwrap().pop();
            }),
            &["mlp_layer_types", "3 entries"],
        ),
        (edited_config(|c| c["model_type"] = json!("llama")), &["model_type", "llama"]),
        (edited_config(|c| c["num_experts_per_tok"] = json!(9)), &["num_experts_per_tok", "n_routed_experts 8"]),
        (edited_config(|c| c["qk_rope_head_dim"] = json!(7)), &["qk_rope_head_dim", "even"]),
        (edited_config(|c| c["scoring_func"] = json!("tanh")), &["scoring_func", "tanh"]),
        (edited_config(|c| c["rms_norm_eps"] = json!("tiny")), &["rms_norm_eps"]),
        (
            edited_config(|c| c["rope_parameters"]["compress"]["rope_type"] = json!("longrope")),
            &["rope_parameters.compress.rope_type", "longrope"],
        ),
        (
            edited_config(|c| c["compress_rates"]["compressed_sparse_attention"] = json!(0)),
            &["compress_rates", "ratio 0"],
        ),
    ];
    let s = Scratch::new("config-fields");
    for (text, parts) in cases {
        assert_names(&json_err(&text), parts);
        // Through from_dir the message also says which file.
        std::fs::write(s.path("config.json"), &text).unwrap();
        let e = config_err(&s.0);
        assert_names(&e, parts);
        assert_names(&e, &["config.json"]);
    }
}

// -------------------------------------------------------------------------------- inputs

#[test]
fn token_ids_outside_the_vocabulary() {
    let dir = fixtures_dir().join("mixed_f32");
    let model = load(&dir).unwrap();
    let be = CpuBackend::new();
    for bad in [256u32, 1000, u32::MAX] {
        let batch = Batch::prefill(&[&[1, 2, bad]]).unwrap();
        match model.forward(&be, &batch) {
            Ok(_) => panic!("token {bad} accepted"),
            Err(e) => assert_names(&e.to_string(), &[&format!("token id {bad}"), "256"]),
        }
    }
    // The same through a decode step.
    let mut cache = model.new_cache(&be, dsv4_tests::kv_config(&model.cfg, KvDtype::F32, 2, 1100, 1100)).unwrap();
    let mut seq = cache.new_sequence();
    let batch = Batch::new(&[(&[300], 0)]).unwrap();
    match model.step(&be, &batch, &mut cache, &mut [&mut seq], dsv4_core::model::Logits::LastPerSequence) {
        Ok(_) => panic!("token 300 accepted"),
        Err(e) => assert_names(&e.to_string(), &["token id 300"]),
    }
    // Past the context length (max_position_embeddings is 1024).
    let long = vec![1u32; 1030];
    let batch = Batch::new(&[(&long, 0)]).unwrap();
    match model.step(&be, &batch, &mut cache, &mut [&mut seq], dsv4_core::model::Logits::LastPerSequence) {
        Ok(_) => panic!("position 1029 accepted"),
        Err(e) => assert_names(&e.to_string(), &["position 1029", "1024"]),
    }
    // A state that does not match the batch.
    let batch = Batch::new(&[(&[1, 2], 3)]).unwrap();
    match model.step(&be, &batch, &mut cache, &mut [&mut seq], dsv4_core::model::Logits::All) {
        Ok(_) => panic!("a batch at position 3 ran on a fresh state"),
        Err(e) => assert_names(&e.to_string(), &["sequence 0", "position 3", "0 tokens"]),
    }
    let batch = Batch::prefill(&[&[1], &[2]]).unwrap();
    match model.step(&be, &batch, &mut cache, &mut [&mut seq], dsv4_core::model::Logits::All) {
        Ok(_) => panic!("2 sequences ran with 1 state"),
        Err(e) => assert_names(&e.to_string(), &["2 sequences", "1 states"]),
    }
    // None of the refusals touched the sequence: it still runs.
    model
        .step(&be, &Batch::new(&[(&[1, 2], 0)]).unwrap(), &mut cache, &mut [&mut seq], dsv4_core::model::Logits::All)
        .unwrap();
    // The largest valid id is fine.
    model.forward(&be, &Batch::prefill(&[&[255]]).unwrap()).unwrap();
}

#[test]
fn empty_sequences() {
    let e = Batch::prefill(&[&[]]).unwrap_err().to_string();
    assert_names(&e, &["sequence 0", "no tokens"]);
    let e = Batch::prefill(&[]).unwrap_err().to_string();
    assert_names(&e, &["no sequences"]);
    let e = Batch::new(&[(&[1, 2], 0), (&[], 5)]).unwrap_err().to_string();
    assert_names(&e, &["sequence 1", "no tokens"]);
}
