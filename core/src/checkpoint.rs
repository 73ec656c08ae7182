//! Safetensors checkpoints: a single file or shards listed in `model.safetensors.index.json`,
//! memory-mapped or read into memory ([`WeightMemory`]), every header validated before any
//! tensor byte is used.
//!
//! Tensor names are canonicalised to the official DeepSeek spelling (`layers.3.attn.wq_a.weight`)
//! whatever the file used: official names, transformers' module names
//! (`model.layers.3.self_attn.q_a_proj.weight`) or the mix that `save_pretrained` writes. The
//! graph only ever asks for official names.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor, Storage};

/// All tensors of a checkpoint, by canonical name.
pub struct Checkpoint {
    /// Directory it was opened from (None for in-memory checkpoints).
    pub dir: Option<PathBuf>,
    pub files: Vec<PathBuf>,
    tensors: BTreeMap<String, HostTensor>,
    /// Names fetched through [`Checkpoint::get`] / [`Checkpoint::require`] since
    /// [`Checkpoint::record_access`] (None: not recording).
    accessed: Mutex<Option<BTreeSet<String>>>,
}

/// Opens `path` for reading, if it is a regular file (after symlinks): opening a FIFO would
/// block until a writer came, and a directory or device is no safetensors file (mapping one
/// fails with an obscure `No such device`, reading a directory with `Is a directory`).
fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::Checkpoint {
            msg: format!("{} is not a regular file (a directory, device or pipe)", path.display()),
        });
    }
    File::open(path).map_err(|e| Error::io(path, e))
}

/// Memory-maps a file read-only.
#[allow(unsafe_code)]
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = open_regular(path)?;
    // SAFETY: the map is read-only and private to this process. The usual mmap caveat applies
    // (another process truncating the file while we run would fault); checkpoints are treated
    // as immutable inputs, and every header is validated against the mapped length first.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Where a checkpoint's bytes live while the model runs.
///
/// The CPU backend computes on the weights where they lie, so this decides its decode speed:
/// a token streams every active weight byte once, and through 4 KiB pages that is a TLB miss,
/// and a restart of the hardware prefetcher, every 4 KiB. On the 0.75 B benchmark model
/// (`../shared/bench/gen_synthetic.py mini`, 2 threads, AMD EPYC Zen 4, six interleaved pairs
/// of `dsv4 bench` runs) decode took 17-19 ms a token with the weights resident on huge pages
/// (one run of the six: 24) against 20-26 ms memory-mapped, and the 265 MB BF16 head alone
/// 6.8-8.7 ms against 9.5-13.4.
/// Device backends copy the weights to the device, so for them the host bytes only need to be
/// readable once: [`WeightMemory::Mapped`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMemory {
    /// Memory-mapped from the files (read-only, private): loading is instant, the page cache
    /// is shared with other processes, and a checkpoint larger than the memory still runs
    /// (pages are read from disk as they are touched), but every byte is on a 4 KiB page.
    Mapped,
    /// Each file read, whole, into anonymous memory advised for transparent huge pages
    /// (`madvise(MADV_HUGEPAGE)`, Linux; elsewhere, or with THP set to `never`, ordinary pages):
    /// loading reads every byte once, and the process holds the whole checkpoint in memory.
    Resident,
}

impl WeightMemory {
    /// The name `--weight-memory` takes.
    pub fn name(self) -> &'static str {
        match self {
            WeightMemory::Mapped => "mapped",
            WeightMemory::Resident => "resident",
        }
    }
}

/// Bytes read per call while loading a file into memory (the unit of the progress callback).
const READ_CHUNK: usize = 64 << 20;

/// Reads the whole of `path` into anonymous memory advised for transparent huge pages
/// ([`WeightMemory::Resident`]), reporting each chunk to `progress` as bytes read so far
/// (`done` carries the count across the files of a checkpoint). An empty file is mapped
/// instead (an anonymous map cannot be empty; the header check then rejects the file).
fn read_resident(path: &Path, done: &mut u64, progress: &mut dyn FnMut(u64)) -> Result<memmap2::Mmap> {
    let mut file = open_regular(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let len = usize::try_from(len).map_err(|_| Error::Checkpoint {
        msg: format!("{}: {len} bytes do not fit in this machine's address space", path.display()),
    })?;
    if len == 0 {
        return map_file(path);
    }
    let mut map = memmap2::MmapMut::map_anon(len).map_err(|e| Error::io(path, e))?;
    // Before the first write, so that the pages are allocated huge from the start. Best effort:
    // a kernel without THP, or with it set to `never`, refuses or ignores the advice, and the
    // bytes are then on ordinary pages (slower decode, same results).
    #[cfg(target_os = "linux")]
    let _ = map.advise(memmap2::Advice::HugePage);
    for chunk in map.chunks_mut(READ_CHUNK) {
        // A file that shrank since its length was read ends in an `UnexpectedEof` error here.
        file.read_exact(chunk).map_err(|e| Error::io(path, e))?;
        *done += chunk.len() as u64;
        progress(*done);
    }
    map.make_read_only().map_err(|e| Error::io(path, e))
}

/// Largest header accepted (the official shards' headers are a few hundred KB).
pub const MAX_HEADER_BYTES: usize = 100 << 20;

/// One tensor of a safetensors header, validated against the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEntry {
    /// The name as stored in the file (not canonicalised).
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// Absolute byte range of the tensor's data in the file.
    pub range: Range<usize>,
}

/// The header's top-level object, in file order, with duplicates kept (serde_json's own map
/// would silently keep only the last of two equal keys).
struct RawEntries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for RawEntries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawEntries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensor name -> {dtype, shape, data_offsets}")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<RawEntries, A::Error> {
                let mut v = vec![];
                while let Some(e) = m.next_entry::<String, serde_json::Value>()? {
                    v.push(e);
                }
                Ok(RawEntries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// Parses and validates the header of the safetensors file whose complete contents are
/// `bytes`; `file` names it in errors. Checks the header length against the file, every
/// dtype, shape and byte count, that every tensor's data lies inside the data section, and
/// that no two tensors share bytes. Never panics and never reads outside `bytes`, whatever
/// they hold (this is the fuzzing entry point).
pub fn parse_safetensors_header(bytes: &[u8], file: &Path) -> Result<Vec<HeaderEntry>> {
    let file_name = file.file_name().unwrap_or(file.as_os_str()).to_string_lossy().to_string();
    let bad = |msg: String| Error::Safetensors { file: file.to_path_buf(), msg };
    let tensor_err = |name: &str, msg: String| Error::Tensor { name: name.to_string(), file: file_name.clone(), msg };
    let Some(len_bytes) = bytes.first_chunk::<8>() else {
        return Err(bad(format!(
            "file is {} bytes, shorter than the 8-byte header length (truncated or empty)",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    let room = bytes.len() - 8;
    if header_len > room as u64 {
        return Err(bad(format!(
            "header length {header_len} is larger than the rest of the file ({room} bytes): truncated, or not a safetensors file"
        )));
    }
    let header_len = header_len as usize;
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!("header length {header_len} is implausibly large (limit {MAX_HEADER_BYTES})")));
    }
    let header =
        std::str::from_utf8(&bytes[8..8 + header_len]).map_err(|e| bad(format!("header is not valid UTF-8 ({e})")))?;
    let raw: RawEntries =
        serde_json::from_str(header).map_err(|e| bad(format!("header is not a JSON object of tensors: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = bytes.len() - data_start;
    let mut out: Vec<HeaderEntry> = Vec::with_capacity(raw.0.len());
    let mut names = BTreeSet::new();
    for (name, v) in raw.0 {
        if name == "__metadata__" {
            if !v.is_object() {
                return Err(bad("`__metadata__` is not an object".into()));
            }
            continue;
        }
        if !names.insert(name.clone()) {
            return Err(tensor_err(&name, "appears twice in the header".into()));
        }
        let obj = v.as_object().ok_or_else(|| tensor_err(&name, format!("header entry is not an object: {v}")))?;
        let dtype_s = obj
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| tensor_err(&name, "header entry has no `dtype` string".into()))?;
        let dtype =
            DType::from_name(dtype_s).ok_or_else(|| tensor_err(&name, format!("unsupported dtype {dtype_s}")))?;
        let ints = |key: &str| -> Result<Vec<usize>> {
            let arr = obj
                .get(key)
                .and_then(|a| a.as_array())
                .ok_or_else(|| tensor_err(&name, format!("header entry has no `{key}` array")))?;
            arr.iter()
                .map(|x| {
                    x.as_u64().and_then(|u| usize::try_from(u).ok()).ok_or_else(|| {
                        tensor_err(&name, format!("`{key}` holds {x}, which is not a non-negative integer"))
                    })
                })
                .collect()
        };
        let shape = ints("shape")?;
        let offsets = ints("data_offsets")?;
        let [begin, end] = offsets[..] else {
            return Err(tensor_err(&name, format!("`data_offsets` must hold 2 numbers, found {offsets:?}")));
        };
        if begin > end {
            return Err(tensor_err(&name, format!("data_offsets [{begin}, {end}] are reversed")));
        }
        let need = shape.iter().try_fold(dtype.size_bytes(), |a, &d| a.checked_mul(d));
        if need != Some(end - begin) {
            return Err(tensor_err(
                &name,
                match need {
                    Some(n) => format!(
                        "{dtype} {shape:?} needs {n} bytes but data_offsets [{begin}, {end}] span {}",
                        end - begin
                    ),
                    None => format!("shape {shape:?} overflows"),
                },
            ));
        }
        if end > data_len {
            return Err(tensor_err(
                &name,
                format!(
                    "data_offsets [{begin}, {end}] reach past the end of the data section ({data_len} bytes after the \
                     {header_len}-byte header): the file is truncated or the offsets are corrupt"
                ),
            ));
        }
        out.push(HeaderEntry { name, dtype, shape, range: data_start + begin..data_start + end });
    }
    // No two tensors may share bytes (zero-sized tensors own none).
    let mut by_start: Vec<&HeaderEntry> = out.iter().filter(|e| !e.range.is_empty()).collect();
    by_start.sort_by_key(|e| (e.range.start, e.range.end));
    for w in by_start.windows(2) {
        if w[1].range.start < w[0].range.end {
            return Err(tensor_err(
                &w[1].name,
                format!(
                    "data_offsets [{}, {}] overlap tensor `{}` at [{}, {}]",
                    w[1].range.start - data_start,
                    w[1].range.end - data_start,
                    w[0].name,
                    w[0].range.start - data_start,
                    w[0].range.end - data_start
                ),
            ));
        }
    }
    // The format has no holes: the tensors tile the data section exactly (as the safetensors
    // crate requires). Unindexed bytes mean a corrupt or hand-edited file.
    let mut expected = data_start;
    let mut previous = "the start of the data section";
    for e in &by_start {
        if e.range.start != expected {
            return Err(tensor_err(
                &e.name,
                format!(
                    "data_offsets start at {} but `{previous}` ends at {}: the data section has unindexed bytes",
                    e.range.start - data_start,
                    expected - data_start
                ),
            ));
        }
        expected = e.range.end;
        previous = &e.name;
    }
    if expected != data_start + data_len {
        return Err(Error::Safetensors {
            file: file.to_path_buf(),
            msg: format!(
                "{} bytes after the last tensor's data are not described by the header (file padded or corrupt)",
                data_start + data_len - expected
            ),
        });
    }
    Ok(out)
}

impl Checkpoint {
    /// Opens `dir`: the shards `model.safetensors.index.json` lists if it exists, else
    /// `model.safetensors` if it exists (as transformers does: other files beside it, such as
    /// reference outputs, are not part of the model), else every `*.safetensors` file.
    /// The files are memory-mapped ([`WeightMemory::Mapped`]).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, WeightMemory::Mapped, &mut |_, _| {})
    }

    /// [`Checkpoint::open`], with the bytes held as `memory` says. `progress(read, total)` is
    /// called as [`WeightMemory::Resident`] reads the files (bytes read so far, bytes of all the
    /// files); never for [`WeightMemory::Mapped`].
    pub fn open_with(dir: &Path, memory: WeightMemory, progress: &mut dyn FnMut(u64, u64)) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint {
                msg: format!("{} is not a directory (pass the model directory with --model)", dir.display()),
            });
        }
        let index_path = dir.join("model.safetensors.index.json");
        let (files, index) = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::Checkpoint { msg: format!("{}: not valid JSON: {e}", index_path.display()) })?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Checkpoint {
                msg: format!("{}: no `weight_map` object", index_path.display()),
            })?;
            let mut index = BTreeMap::new();
            let mut shards = BTreeSet::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| Error::Checkpoint {
                    msg: format!("{}: shard for `{name}` is not a string", index_path.display()),
                })?;
                if file.contains('/') || file.contains('\\') || file.contains("..") {
                    return Err(Error::Checkpoint {
                        msg: format!("{}: shard name `{file}` must be a plain file name", index_path.display()),
                    });
                }
                shards.insert(file.to_string());
                index.insert(name.clone(), file.to_string());
            }
            let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            for f in &files {
                if !f.is_file() {
                    let what = if f.exists() { "which is not a regular file" } else { "which does not exist" };
                    let shard = f.file_name().unwrap_or_default().to_string_lossy().to_string();
                    let mut tensors = index.iter().filter(|(_, s)| **s == shard).map(|(n, _)| n);
                    let first = tensors.next().cloned().unwrap_or_default();
                    let others = tensors.count();
                    return Err(Error::Checkpoint {
                        msg: format!(
                            "{} maps tensor `{first}`{} to shard {shard}, {what} in {}",
                            index_path.display(),
                            if others > 0 { format!(" (and {others} more)") } else { String::new() },
                            dir.display()
                        ),
                    });
                }
            }
            (files, Some(index))
        } else if dir.join("model.safetensors").is_file() {
            (vec![dir.join("model.safetensors")], None)
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            files.sort();
            if files.is_empty() {
                return Err(Error::Checkpoint { msg: format!("no *.safetensors files in {}", dir.display()) });
            }
            (files, None)
        };

        let mut ckpt = Checkpoint {
            dir: Some(dir.to_path_buf()),
            files: files.clone(),
            tensors: BTreeMap::new(),
            accessed: Mutex::new(None),
        };
        let mut seen_in_files: BTreeMap<String, String> = BTreeMap::new();
        let total = match memory {
            WeightMemory::Mapped => 0,
            WeightMemory::Resident => ckpt.file_bytes()?,
        };
        let mut done = 0;
        for path in &files {
            let map = match memory {
                WeightMemory::Mapped => map_file(path)?,
                WeightMemory::Resident => read_resident(path, &mut done, &mut |d| progress(d, total))?,
            };
            for original in ckpt.add_map(path, map)? {
                seen_in_files.insert(original, path.file_name().unwrap_or_default().to_string_lossy().to_string());
            }
        }
        if let Some(index) = index {
            for (name, file) in &index {
                match seen_in_files.get(name) {
                    Some(f) if f == file => {}
                    Some(f) => {
                        return Err(Error::Checkpoint {
                            msg: format!("index says `{name}` is in {file} but it is in {f}"),
                        })
                    }
                    None => {
                        return Err(Error::Checkpoint {
                            msg: format!("index says `{name}` is in {file} but that shard does not contain it"),
                        })
                    }
                }
            }
        }
        Ok(ckpt)
    }

    /// One safetensors file on its own (reference outputs, single-file models).
    pub fn open_file(path: &Path) -> Result<Self> {
        let mut ckpt = Checkpoint {
            dir: path.parent().map(Path::to_path_buf),
            files: vec![path.to_path_buf()],
            tensors: BTreeMap::new(),
            accessed: Mutex::new(None),
        };
        ckpt.add_file(path)?;
        Ok(ckpt)
    }

    /// Maps one file, validates its header and adds its tensors; returns their stored names.
    fn add_file(&mut self, path: &Path) -> Result<Vec<String>> {
        self.add_map(path, map_file(path)?)
    }

    /// Validates the header of `path`'s bytes `map` and adds its tensors; returns their stored
    /// names.
    fn add_map(&mut self, path: &Path, map: memmap2::Mmap) -> Result<Vec<String>> {
        let mmap = Arc::new(map);
        self.add_storage(path, Storage::Mmap(mmap.clone()), &mmap)
    }

    /// Bytes of the checkpoint's files (0 for an in-memory checkpoint): what
    /// [`WeightMemory::Resident`] holds in memory.
    pub fn file_bytes(&self) -> Result<u64> {
        let mut total = 0;
        for path in &self.files {
            total += std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len();
        }
        Ok(total)
    }

    fn add_storage(&mut self, path: &Path, storage: Storage, bytes: &[u8]) -> Result<Vec<String>> {
        let file_name = path.file_name().unwrap_or(path.as_os_str()).to_string_lossy().to_string();
        let mut names = vec![];
        for e in parse_safetensors_header(bytes, path)? {
            let t = HostTensor::new(
                canonical_name(&e.name),
                file_name.clone(),
                e.dtype,
                e.shape,
                storage.clone(),
                e.range.start,
                e.range.len(),
            )?;
            self.insert(t)?;
            names.push(e.name);
        }
        Ok(names)
    }

    /// A checkpoint made of one safetensors file's contents held in memory; `name` stands for
    /// the file in error messages. Validated exactly like a file on disk.
    pub fn from_file_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        let mut c = Checkpoint { dir: None, files: vec![], tensors: BTreeMap::new(), accessed: Mutex::new(None) };
        let storage = Arc::new(bytes);
        c.add_storage(Path::new(name), Storage::Owned(storage.clone()), &storage)?;
        Ok(c)
    }

    /// A checkpoint held in memory (the built-in model, tests).
    pub fn from_tensors(tensors: Vec<HostTensor>) -> Result<Self> {
        let mut c = Checkpoint { dir: None, files: vec![], tensors: BTreeMap::new(), accessed: Mutex::new(None) };
        for t in tensors {
            c.insert(t)?;
        }
        Ok(c)
    }

    fn insert(&mut self, t: HostTensor) -> Result<()> {
        if let Some(prev) = self.tensors.get(&t.name) {
            return Err(Error::Checkpoint {
                msg: format!(
                    "tensor `{}` appears twice (in {} and {}, possibly under two spellings)",
                    t.name, prev.source, t.source
                ),
            });
        }
        self.tensors.insert(t.name.clone(), t);
        Ok(())
    }

    /// The tensor under its official name. Counts as an access for [`Self::record_access`].
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        let t = self.tensors.get(name);
        if t.is_some() {
            if let Some(set) = self.accessed.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                set.insert(name.to_string());
            }
        }
        t
    }

    /// Starts (or restarts) recording which tensors are fetched through [`Self::get`] and
    /// [`Self::require`]; [`Self::accessed`] returns them. Lets a test check that the list of
    /// expected tensors (`model::loader::expected_tensors`) is exactly what loading reads.
    pub fn record_access(&self) {
        *self.accessed.lock().unwrap_or_else(|e| e.into_inner()) = Some(BTreeSet::new());
    }

    /// The names fetched since [`Self::record_access`] (empty when not recording).
    pub fn accessed(&self) -> BTreeSet<String> {
        self.accessed.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default()
    }

    /// The error for a tensor the config needs but the checkpoint lacks.
    pub fn missing(&self, name: &str, shape: &[usize]) -> Error {
        Error::MissingTensor {
            name: name.to_string(),
            expected: shape.to_vec(),
            hint: match &self.dir {
                Some(d) => format!("searched {} file(s) in {}", self.files.len(), d.display()),
                None => "in-memory checkpoint".into(),
            },
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor under its official name, with its shape checked.
    pub fn require(&self, name: &str, shape: &[usize]) -> Result<&HostTensor> {
        match self.get(name) {
            Some(t) => t.expect_shape(shape),
            None => Err(self.missing(name, shape)),
        }
    }

    pub fn tensors(&self) -> impl Iterator<Item = &HostTensor> {
        self.tensors.values()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// Maps any known spelling of a V4 tensor name to the official one.
pub fn canonical_name(name: &str) -> String {
    let mut n = name.strip_prefix("model.").unwrap_or(name).to_string();
    // Globals.
    for (from, to) in [
        ("embed_tokens.weight", "embed.weight"),
        ("lm_head.weight", "head.weight"),
        ("hc_head.hc_fn", "hc_head_fn"),
        ("hc_head.hc_base", "hc_head_base"),
        ("hc_head.hc_scale", "hc_head_scale"),
    ] {
        if n == from {
            return to.to_string();
        }
    }
    if !n.starts_with("layers.") {
        return n;
    }
    // Per-layer renames, most specific first. Each only fires when the transformers
    // spelling is present, so official and mixed names pass through unchanged.
    const RULES: &[(&str, &str)] = &[
        (".self_attn.", ".attn."),
        (".mlp.", ".ffn."),
        (".input_layernorm.", ".attn_norm."),
        (".post_attention_layernorm.", ".ffn_norm."),
        (".attn_hc.fn", ".hc_attn_fn"),
        (".attn_hc.base", ".hc_attn_base"),
        (".attn_hc.scale", ".hc_attn_scale"),
        (".ffn_hc.fn", ".hc_ffn_fn"),
        (".ffn_hc.base", ".hc_ffn_base"),
        (".ffn_hc.scale", ".hc_ffn_scale"),
        (".attn.sinks", ".attn.attn_sink"),
        (".attn.compressor.indexer.scorer.weights_proj.", ".attn.indexer.weights_proj."),
        (".attn.compressor.indexer.q_b_proj.", ".attn.indexer.wq_b."),
        (".attn.compressor.indexer.", ".attn.indexer.compressor."),
        (".compressor.kv_proj.", ".compressor.wkv."),
        (".compressor.gate_proj.", ".compressor.wgate."),
        (".compressor.kv_norm.", ".compressor.norm."),
        (".compressor.position_bias", ".compressor.ape"),
        // save_pretrained reverses transformers' `.norm.` -> `.kv_norm.` rename everywhere,
        // so the attention's own kv_norm comes back as `attn.norm` (no official tensor has
        // that name; the compressors' `norm` is handled above).
        (".attn.norm.weight", ".attn.kv_norm.weight"),
        (".attn.q_a_proj.", ".attn.wq_a."),
        (".attn.q_a_norm.", ".attn.q_norm."),
        (".attn.q_b_proj.", ".attn.wq_b."),
        (".attn.kv_proj.", ".attn.wkv."),
        (".attn.o_a_proj.", ".attn.wo_a."),
        (".attn.o_b_proj.", ".attn.wo_b."),
        (".ffn.gate.e_score_correction_bias", ".ffn.gate.bias"),
        (".ffn.shared_experts.gate_proj.", ".ffn.shared_experts.w1."),
        (".ffn.shared_experts.up_proj.", ".ffn.shared_experts.w3."),
        (".ffn.shared_experts.down_proj.", ".ffn.shared_experts.w2."),
        (".weight_scale_inv", ".scale"),
    ];
    for (from, to) in RULES {
        if n.contains(from) {
            n = n.replace(from, to);
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::canonical_name as c;
    use super::{Checkpoint, WeightMemory};

    fn fixture(case: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cases").join(case)
    }

    /// Reading a sharded checkpoint into memory gives every tensor the bytes the mapped
    /// checkpoint has, and the progress callback counts every byte of every shard once, in
    /// increasing order, ending at the total.
    #[test]
    fn resident_holds_the_mapped_bytes() {
        let dir = fixture("sharded");
        let mapped = Checkpoint::open(&dir).unwrap();
        let mut seen = vec![];
        let resident = Checkpoint::open_with(&dir, WeightMemory::Resident, &mut |d, t| seen.push((d, t))).unwrap();
        assert_eq!(mapped.len(), resident.len());
        assert!(mapped.files.len() > 1, "the case must have several shards");
        for t in mapped.tensors() {
            let r = resident.get(&t.name).unwrap_or_else(|| panic!("{} missing", t.name));
            assert_eq!((r.dtype, &r.shape, &r.source), (t.dtype, &t.shape, &t.source), "{}", t.name);
            assert!(r.bytes() == t.bytes(), "{}: bytes differ", t.name);
        }
        let total = mapped.file_bytes().unwrap();
        assert_eq!(resident.file_bytes().unwrap(), total);
        assert!(seen.len() >= mapped.files.len(), "{seen:?}");
        assert!(seen.iter().all(|&(_, t)| t == total), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0), "{seen:?}");
        assert_eq!(seen.last().unwrap().0, total);
    }

    /// The error of opening `dir` held as `memory` (`what`: the failure expected).
    fn open_err(dir: &std::path::Path, memory: WeightMemory, what: &str) -> String {
        Checkpoint::open_with(dir, memory, &mut |_, _| {}).err().expect(what).to_string()
    }

    /// A mapped open never reports progress; a resident one of a directory with a bad shard
    /// fails with the error the mapped open gives.
    #[test]
    fn resident_errors_are_the_mapped_ones() {
        let mut calls = 0;
        Checkpoint::open_with(&fixture("sharded"), WeightMemory::Mapped, &mut |_, _| calls += 1).unwrap();
        assert_eq!(calls, 0);
        let dir = std::env::temp_dir().join(format!("dsv4-resident-errors-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}").unwrap();
        std::fs::write(dir.join("empty.safetensors"), b"").unwrap();
        for what in ["a corrupt header", "an empty file"] {
            let mapped = Checkpoint::open(&dir).err().expect(what).to_string();
            assert_eq!(mapped, open_err(&dir, WeightMemory::Resident, what));
            // Then the empty file alone.
            let _ = std::fs::remove_file(dir.join("model.safetensors"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A `*.safetensors` entry that is a directory or a FIFO is refused by name, both ways, and
    /// the FIFO does not block the open (it would, waiting for a writer, if it were opened).
    #[test]
    fn non_regular_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("dsv4-non-regular-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a.safetensors")).unwrap();
        let fifo = dir.join("b.safetensors");
        let made_fifo = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
        for memory in [WeightMemory::Mapped, WeightMemory::Resident] {
            let e = open_err(&dir, memory, "a directory");
            assert!(e.contains("a.safetensors is not a regular file"), "{e}");
        }
        if made_fifo {
            std::fs::remove_dir(dir.join("a.safetensors")).unwrap();
            for memory in [WeightMemory::Mapped, WeightMemory::Resident] {
                let e = open_err(&dir, memory, "a FIFO");
                assert!(e.contains("b.safetensors is not a regular file"), "{e}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn canonical_names() {
        assert_eq!(c("model.embed_tokens.weight"), "embed.weight");
        assert_eq!(c("embed.weight"), "embed.weight");
        assert_eq!(c("lm_head.weight"), "head.weight");
        assert_eq!(c("model.hc_head.hc_fn"), "hc_head_fn");
        assert_eq!(c("model.norm.weight"), "norm.weight");
        assert_eq!(c("model.layers.2.self_attn.q_a_proj.weight"), "layers.2.attn.wq_a.weight");
        assert_eq!(c("model.layers.2.attn.wq_a.weight"), "layers.2.attn.wq_a.weight");
        assert_eq!(c("model.layers.0.attn_hc.fn"), "layers.0.hc_attn_fn");
        assert_eq!(c("model.layers.0.self_attn.sinks"), "layers.0.attn.attn_sink");
        assert_eq!(c("model.layers.1.self_attn.kv_norm.weight"), "layers.1.attn.kv_norm.weight");
        assert_eq!(c("model.layers.1.self_attn.compressor.kv_norm.weight"), "layers.1.attn.compressor.norm.weight");
        assert_eq!(c("model.layers.1.self_attn.compressor.position_bias"), "layers.1.attn.compressor.ape");
        assert_eq!(
            c("model.layers.1.self_attn.compressor.indexer.kv_norm.weight"),
            "layers.1.attn.indexer.compressor.norm.weight"
        );
        assert_eq!(
            c("model.layers.1.self_attn.compressor.indexer.scorer.weights_proj.weight"),
            "layers.1.attn.indexer.weights_proj.weight"
        );
        assert_eq!(
            c("model.layers.1.self_attn.compressor.indexer.q_b_proj.weight"),
            "layers.1.attn.indexer.wq_b.weight"
        );
        assert_eq!(c("model.layers.3.mlp.gate.e_score_correction_bias"), "layers.3.ffn.gate.bias");
        assert_eq!(c("model.layers.3.mlp.shared_experts.up_proj.weight"), "layers.3.ffn.shared_experts.w3.weight");
        assert_eq!(c("model.layers.3.mlp.experts.gate_up_proj"), "layers.3.ffn.experts.gate_up_proj");
        assert_eq!(c("layers.3.ffn.experts.7.w2.weight"), "layers.3.ffn.experts.7.w2.weight");
        assert_eq!(c("mtp.0.enorm.weight"), "mtp.0.enorm.weight");
        // What save_pretrained writes for the attention kv_norm.
        assert_eq!(c("model.layers.1.attn.norm.weight"), "layers.1.attn.kv_norm.weight");
        assert_eq!(c("model.layers.1.attn.compressor.norm.weight"), "layers.1.attn.compressor.norm.weight");
    }
}
