//! Tokenizer: HF `tokenizer.json` through the `tokenizers` crate, with a byte-level fallback
//! for models that ship none (the built-in tiny model).
//!
//! * [`Tokenizer::from_model_dir`] / [`Tokenizer::from_file`] read a HF `tokenizer.json` (for
//!   DeepSeek-V4: byte-level BPE, 128,000 base tokens + 1,283 added tokens, ids 0..129,280) and,
//!   when it sits beside it, `tokenizer_config.json` for the EOS token.
//! * [`Tokenizer::byte_fallback`] needs no file: one id per byte plus a few special tokens, see
//!   [`Tokenizer::byte_fallback`] for the id layout. It fits the built-in tiny model's vocab of 512.
//!
//! Both kinds follow the same conventions (spec section E):
//! * `encode` adds no BOS/EOS (`add_bos_token=false`; the chat template writes BOS as text) and
//!   recognises added tokens written in the text, special or not, before pre-tokenisation;
//! * `decode` keeps special tokens as their text, so `decode(encode(s)) == s` for any string;
//! * an id outside the vocabulary is an [`Error::Input`] naming the id, never a panic and never
//!   silently dropped.
//!
//! [`StreamDecoder`] turns a stream of ids into text pieces whose concatenation is exactly
//! `decode(all ids)`: a piece never ends inside a UTF-8 character, even one spread over several
//! byte-level tokens (emoji, CJK).

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;

use tokenizers::DecoderWrapper;

use crate::error::{Error, Result};

/// DeepSeek's BOS / EOS / pad strings (spec E, ids 0 / 1 / 2 in the real vocabulary).
pub const BOS_TOKEN: &str = "<｜begin▁of▁sentence｜>";
pub const EOS_TOKEN: &str = "<｜end▁of▁sentence｜>";
pub const PAD_TOKEN: &str = "<｜▁pad▁｜>";

/// Special tokens of the byte fallback, in id order: BOS, EOS and pad take ids 0, 1, 2; the
/// chat markers of the V4 template follow the 256 byte ids, from [`BYTE_MARKER_BASE`] on.
const BYTE_HEAD_SPECIALS: [&str; 3] = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN];
const BYTE_MARKERS: [&str; 12] = [
    "<｜User｜>",
    "<｜Assistant｜>",
    "<think>",
    "</think>",
    "｜DSML｜",
    "<｜latest_reminder｜>",
    "<｜action｜>",
    "<｜query｜>",
    "<｜authority｜>",
    "<｜domain｜>",
    "<｜title｜>",
    "<｜read_url｜>",
];
/// Byte `b` has id `BYTE_OFFSET + b` in the byte fallback.
const BYTE_OFFSET: u32 = BYTE_HEAD_SPECIALS.len() as u32;
/// First id of the chat markers in the byte fallback (259).
const BYTE_MARKER_BASE: u32 = BYTE_OFFSET + 256;

/// A text tokenizer: HF `tokenizer.json` or the built-in byte fallback. Cheap to clone (shared).
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

enum Inner {
    Hf(Box<HfTokenizer>),
    Bytes(ByteTokenizer),
}

struct HfTokenizer {
    tok: tokenizers::Tokenizer,
    /// Max id + 1 over the model vocabulary and the added tokens.
    vocab_size: usize,
    eos: Vec<u32>,
    /// The bytes of every id, when the decoder is plain `ByteLevel` (DeepSeek's case). With it,
    /// streaming is exact and O(1) per token; without it [`StreamDecoder`] re-decodes a window.
    bytes: Option<TokenBytes>,
}

/// Flattened per-id byte strings: id `i` is `data[offsets[i]..offsets[i + 1]]`, present if
/// `present[i]` (ids inside the range that name no token are holes).
struct TokenBytes {
    data: Vec<u8>,
    offsets: Vec<u32>,
    present: Vec<bool>,
}

impl TokenBytes {
    fn get(&self, id: u32) -> Option<&[u8]> {
        let i = id as usize;
        if i < self.present.len() && self.present[i] {
            Some(&self.data[self.offsets[i] as usize..self.offsets[i + 1] as usize])
        } else {
            None
        }
    }
}

/// Byte-level tokenizer with no file: see [`Tokenizer::byte_fallback`].
struct ByteTokenizer;

impl ByteTokenizer {
    fn special(id: u32) -> Option<&'static str> {
        let i = id as usize;
        if i < BYTE_HEAD_SPECIALS.len() {
            Some(BYTE_HEAD_SPECIALS[i])
        } else if id >= BYTE_MARKER_BASE {
            BYTE_MARKERS.get((id - BYTE_MARKER_BASE) as usize).copied()
        } else {
            None
        }
    }

    fn specials() -> impl Iterator<Item = (u32, &'static str)> {
        let head = BYTE_HEAD_SPECIALS.iter().enumerate().map(|(i, s)| (i as u32, *s));
        let markers = BYTE_MARKERS.iter().enumerate().map(|(i, s)| (BYTE_MARKER_BASE + i as u32, *s));
        head.chain(markers)
    }

    fn vocab_size() -> usize {
        BYTE_MARKER_BASE as usize + BYTE_MARKERS.len()
    }

    fn token_bytes(id: u32) -> Option<Cow<'static, [u8]>> {
        if let Some(s) = Self::special(id) {
            Some(Cow::Borrowed(s.as_bytes()))
        } else if (BYTE_OFFSET..BYTE_MARKER_BASE).contains(&id) {
            Some(Cow::Owned(vec![(id - BYTE_OFFSET) as u8]))
        } else {
            None
        }
    }

    fn encode(text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len());
        let bytes = text.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            // Leftmost-longest match of a special token at i (every special starts with '<' or '｜').
            let rest = &text[i..];
            let special = if rest.starts_with('<') || rest.starts_with('｜') {
                Self::specials().filter(|(_, s)| rest.starts_with(s)).max_by_key(|(_, s)| s.len())
            } else {
                None
            };
            match special {
                Some((id, s)) => {
                    ids.push(id);
                    i += s.len();
                }
                None => {
                    // Emit the whole next character byte by byte, so `i` stays on a char boundary.
                    let ch_len = rest.chars().next().map_or(1, char::len_utf8);
                    ids.extend(bytes[i..i + ch_len].iter().map(|&b| BYTE_OFFSET + b as u32));
                    i += ch_len;
                }
            }
        }
        ids
    }
}

fn unknown_id(id: u32, vocab_size: usize) -> Error {
    Error::Input(format!("unknown token id {id} (vocabulary size {vocab_size})"))
}

/// `path: invalid ...` as an I/O error of kind InvalidData, so that the message names the file.
fn invalid_file(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, msg.to_string()))
}

/// GPT-2's byte-level alphabet (as in `tokenizers`' ByteLevel): the char that stands for each
/// byte. Printable Latin-1 bytes stand for themselves; the others map to U+0100 onwards.
fn byte_level_chars() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            b as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// The bytes that `tokenizers`' ByteLevel decoder produces for one token string: the byte of
/// each char if every char is in the byte-level alphabet, else the token's own UTF-8 (added
/// tokens like `<｜User｜>`).
fn byte_level_token_bytes(token: &str, char_to_byte: &std::collections::HashMap<char, u8>) -> Vec<u8> {
    token.chars().map(|c| char_to_byte.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_else(|| token.into())
}

/// The EOS ids named by `tokenizer_config.json` (`eos_token`: a string or `{"content": ..}`).
fn eos_from_config(config_path: &Path, tok: &tokenizers::Tokenizer) -> Result<Option<Vec<u32>>> {
    let text = match std::fs::read_to_string(config_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(config_path, e)),
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid_file(config_path, format!("invalid JSON: {e}")))?;
    let eos = match config.get("eos_token") {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(s)) => s.as_str(),
        Some(v) => match v.get("content").and_then(|c| c.as_str()) {
            Some(s) => s,
            None => {
                return Err(invalid_file(
                    config_path,
                    format!("`eos_token` is neither a string nor {{\"content\": ..}}: {v}"),
                ))
            }
        },
    };
    match tok.token_to_id(eos) {
        Some(id) => Ok(Some(vec![id])),
        None => Err(invalid_file(config_path, format!("`eos_token` {eos:?} is not in the tokenizer's vocabulary"))),
    }
}

impl Tokenizer {
    /// The tokenizer of a model directory: `dir/tokenizer.json` (plus `dir/tokenizer_config.json`
    /// if present). `Ok(None)` if the directory has no `tokenizer.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Tokenizer>> {
        let path = dir.join("tokenizer.json");
        match std::fs::metadata(&path) {
            Ok(_) => Self::from_file(&path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(path, e)),
        }
    }

    /// Load a HF `tokenizer.json`. EOS ids come from `tokenizer_config.json` in the same
    /// directory if it exists (`eos_token`); otherwise from `<｜end▁of▁sentence｜>` if the
    /// vocabulary has it; otherwise there are none.
    pub fn from_file(path: &Path) -> Result<Tokenizer> {
        let json = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut tok = tokenizers::Tokenizer::from_bytes(&json)
            .map_err(|e| invalid_file(path, format!("invalid tokenizer.json: {e}")))?;
        // Plain token ids, whatever the file says about batching.
        tok.with_truncation(None).map_err(|e| invalid_file(path, format!("invalid tokenizer.json: {e}")))?;
        tok.with_padding(None);
        tok.set_encode_special_tokens(false);

        // `tokenizers` renumbers added tokens whose ids leave a gap after the base vocabulary
        // (it only warns); a model needs the file's ids, so insist on them.
        #[derive(serde::Deserialize)]
        struct AddedToken {
            id: u32,
            content: String,
        }
        #[derive(serde::Deserialize)]
        struct AddedTokens {
            #[serde(default)]
            added_tokens: Vec<AddedToken>,
        }
        let file: AddedTokens =
            serde_json::from_slice(&json).map_err(|e| invalid_file(path, format!("invalid tokenizer.json: {e}")))?;
        for t in &file.added_tokens {
            let got = tok.token_to_id(&t.content);
            if got != Some(t.id) {
                return Err(invalid_file(
                    path,
                    format!("added token {:?} has id {} in the file but {:?} once loaded", t.content, t.id, got),
                ));
            }
        }
        drop(json);

        let vocab = tok.get_vocab(true);
        let vocab_size = vocab.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        drop(vocab);

        let config_path = path.with_file_name("tokenizer_config.json");
        let eos = match eos_from_config(&config_path, &tok)? {
            Some(eos) => eos,
            None => tok.token_to_id(EOS_TOKEN).into_iter().collect(),
        };

        let bytes = match tok.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => {
                let char_to_byte: std::collections::HashMap<char, u8> =
                    byte_level_chars().iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
                let mut table =
                    TokenBytes { data: Vec::new(), offsets: Vec::with_capacity(vocab_size + 1), present: Vec::new() };
                table.offsets.push(0);
                for id in 0..vocab_size as u32 {
                    let token = tok.id_to_token(id);
                    if let Some(token) = &token {
                        table.data.extend(byte_level_token_bytes(token, &char_to_byte));
                    }
                    table.present.push(token.is_some());
                    let end = u32::try_from(table.data.len())
                        .map_err(|_| invalid_file(path, "the vocabulary's tokens add up to over 4 GiB"))?;
                    table.offsets.push(end);
                }
                Some(table)
            }
            _ => None,
        };

        Ok(Tokenizer { inner: Arc::new(Inner::Hf(Box::new(HfTokenizer { tok, vocab_size, eos, bytes }))) })
    }

    /// The tokenizer for models that ship none (the built-in tiny model). Ids:
    /// * 0 `<｜begin▁of▁sentence｜>`, 1 `<｜end▁of▁sentence｜>` (EOS), 2 `<｜▁pad▁｜>`;
    /// * 3..=258: byte `b` is id `3 + b`;
    /// * 259..=270: the V4 chat markers `<｜User｜>`, `<｜Assistant｜>`, `<think>`, `</think>`,
    ///   `｜DSML｜`, `<｜latest_reminder｜>`, `<｜action｜>`, `<｜query｜>`, `<｜authority｜>`,
    ///   `<｜domain｜>`, `<｜title｜>`, `<｜read_url｜>`.
    ///
    /// `vocab_size()` is 271. Special tokens in the text are matched leftmost-longest, as with
    /// HF added tokens; everything else is its UTF-8 bytes, so any string round-trips.
    pub fn byte_fallback() -> Tokenizer {
        Tokenizer { inner: Arc::new(Inner::Bytes(ByteTokenizer)) }
    }

    /// True for [`Tokenizer::byte_fallback`], false for a `tokenizer.json`.
    pub fn is_byte_fallback(&self) -> bool {
        matches!(*self.inner, Inner::Bytes(_))
    }

    /// Token ids of `text`. No BOS/EOS is added; added/special tokens written in the text
    /// (`<｜User｜>`, `<think>`, `<｜begin▁of▁sentence｜>`, ...) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &*self.inner {
            Inner::Hf(h) => {
                let enc = h.tok.encode_fast(text, false).map_err(|e| Error::Input(format!("tokenizer: {e}")))?;
                Ok(enc.get_ids().to_vec())
            }
            Inner::Bytes(_) => Ok(ByteTokenizer::encode(text)),
        }
    }

    /// Text of `ids`, special tokens included as their text. Invalid UTF-8 (a multi-byte
    /// character cut by the end of `ids`) becomes U+FFFD. An id outside the vocabulary is an
    /// error naming it.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &*self.inner {
            Inner::Hf(h) => {
                let mut buf = Vec::new();
                for &id in ids {
                    match &h.bytes {
                        Some(table) => {
                            buf.extend_from_slice(table.get(id).ok_or_else(|| unknown_id(id, h.vocab_size))?)
                        }
                        None => {
                            if h.tok.id_to_token(id).is_none() {
                                return Err(unknown_id(id, h.vocab_size));
                            }
                        }
                    }
                }
                if h.bytes.is_some() {
                    // Identical to tokenizers' ByteLevel decoder (checked by the tests).
                    Ok(String::from_utf8_lossy(&buf).into_owned())
                } else {
                    h.tok.decode(ids, false).map_err(|e| Error::Input(format!("tokenizer: {e}")))
                }
            }
            Inner::Bytes(_) => {
                let mut buf = Vec::with_capacity(ids.len());
                for &id in ids {
                    buf.extend_from_slice(
                        &ByteTokenizer::token_bytes(id).ok_or_else(|| unknown_id(id, self.vocab_size()))?,
                    );
                }
                Ok(String::from_utf8_lossy(&buf).into_owned())
            }
        }
    }

    /// The id of one token, written as in the vocabulary (added tokens as their text, base
    /// byte-level BPE tokens in the byte-level alphabet, e.g. `"Ġthe"`). For the byte fallback:
    /// its special tokens, or a one-byte string (ASCII).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &*self.inner {
            Inner::Hf(h) => h.tok.token_to_id(token),
            Inner::Bytes(_) => ByteTokenizer::specials().find(|(_, s)| *s == token).map(|(id, _)| id).or_else(|| {
                match token.as_bytes() {
                    [b] => Some(BYTE_OFFSET + *b as u32),
                    _ => None,
                }
            }),
        }
    }

    /// Number of ids: max id + 1 over the base vocabulary and the added tokens (129,280 for
    /// DeepSeek-V4, equal to its `config.json` `vocab_size`; 271 for the byte fallback).
    pub fn vocab_size(&self) -> usize {
        match &*self.inner {
            Inner::Hf(h) => h.vocab_size,
            Inner::Bytes(_) => ByteTokenizer::vocab_size(),
        }
    }

    /// Ids that end a generation: `tokenizer_config.json`'s `eos_token` (see [`Tokenizer::from_file`]);
    /// `[1]` for the byte fallback.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        match &*self.inner {
            Inner::Hf(h) => h.eos.clone(),
            Inner::Bytes(_) => vec![1],
        }
    }

    /// The bytes id `id` stands for, when this tokenizer decodes token by token (always except
    /// a HF tokenizer whose decoder is not plain ByteLevel). `Ok(None)`: not byte-decodable.
    fn token_bytes(&self, id: u32) -> Result<Option<Cow<'_, [u8]>>> {
        match &*self.inner {
            Inner::Hf(h) => match &h.bytes {
                Some(table) => {
                    table.get(id).map(|b| Some(Cow::Borrowed(b))).ok_or_else(|| unknown_id(id, h.vocab_size))
                }
                None => match h.tok.id_to_token(id) {
                    Some(_) => Ok(None),
                    None => Err(unknown_id(id, h.vocab_size)),
                },
            },
            Inner::Bytes(_) => {
                ByteTokenizer::token_bytes(id).map(Some).ok_or_else(|| unknown_id(id, self.vocab_size()))
            }
        }
    }

    fn byte_decodable(&self) -> bool {
        match &*self.inner {
            Inner::Hf(h) => h.bytes.is_some(),
            Inner::Bytes(_) => true,
        }
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_byte_fallback() { "bytes" } else { "hf" };
        f.debug_struct("Tokenizer").field("kind", &kind).field("vocab_size", &self.vocab_size()).finish()
    }
}

/// Incremental detokenizer for streaming. `push` returns the text completed by one more id
/// (possibly empty); `finish` flushes the rest. The concatenation of all returned pieces equals
/// `tokenizer.decode(all ids)`, and no piece ends inside a UTF-8 character, whether that
/// character's bytes come from one token or several.
#[derive(Debug)]
pub struct StreamDecoder {
    tok: Tokenizer,
    mode: StreamMode,
}

#[derive(Debug)]
enum StreamMode {
    /// Byte-level: bytes received but not yet returned (an incomplete UTF-8 character).
    Bytes { pending: Vec<u8> },
    /// Any other decoder: re-decode a small window of ids (the `prefix_offset` / `read_offset`
    /// scheme of text-generation-inference), returning text once it does not end in U+FFFD.
    Window { ids: Vec<u32>, prefix_offset: usize, read_offset: usize },
}

impl StreamDecoder {
    pub fn new(tok: &Tokenizer) -> Self {
        let mode = if tok.byte_decodable() {
            StreamMode::Bytes { pending: Vec::new() }
        } else {
            StreamMode::Window { ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
        };
        StreamDecoder { tok: tok.clone(), mode }
    }

    /// Feed one id; returns the newly completed text. An unknown id is an error and leaves the
    /// decoder as it was.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let bytes = self.tok.token_bytes(id)?;
        match &mut self.mode {
            StreamMode::Bytes { pending } => {
                if let Some(b) = bytes {
                    pending.extend_from_slice(&b);
                }
                Ok(drain_utf8(pending, false))
            }
            StreamMode::Window { ids, prefix_offset, read_offset } => {
                ids.push(id);
                let prefix = self.tok.decode(&ids[*prefix_offset..*read_offset])?;
                let text = self.tok.decode(&ids[*prefix_offset..])?;
                if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
                    let new = text[prefix.len()..].to_string();
                    *prefix_offset = *read_offset;
                    *read_offset = ids.len();
                    Ok(new)
                } else {
                    Ok(String::new())
                }
            }
        }
    }

    /// Everything not yet returned (an unfinished character becomes U+FFFD, as in `decode`).
    /// The decoder is then empty and can be reused for a new stream.
    pub fn finish(&mut self) -> Result<String> {
        match &mut self.mode {
            StreamMode::Bytes { pending } => Ok(drain_utf8(pending, true)),
            StreamMode::Window { ids, prefix_offset, read_offset } => {
                let prefix = self.tok.decode(&ids[*prefix_offset..*read_offset])?;
                let text = self.tok.decode(&ids[*prefix_offset..])?;
                let rest = text.strip_prefix(prefix.as_str()).unwrap_or(&text).to_string();
                ids.clear();
                *prefix_offset = 0;
                *read_offset = 0;
                Ok(rest)
            }
        }
    }
}

/// Take the longest decodable prefix of `pending` as text, exactly as `String::from_utf8_lossy`
/// would render it as part of a longer buffer: invalid sequences become U+FFFD at once; an
/// incomplete character at the end waits for more bytes, unless `at_end`.
fn drain_utf8(pending: &mut Vec<u8>, at_end: bool) -> String {
    let mut out = String::new();
    let mut start = 0;
    loop {
        match std::str::from_utf8(&pending[start..]) {
            Ok(s) => {
                out.push_str(s);
                start = pending.len();
                break;
            }
            Err(e) => {
                let valid = start + e.valid_up_to();
                out.push_str(&String::from_utf8_lossy(&pending[start..valid]));
                match e.error_len() {
                    Some(n) => {
                        out.push('\u{FFFD}');
                        start = valid + n;
                    }
                    None if at_end => {
                        out.push('\u{FFFD}');
                        start = pending.len();
                        break;
                    }
                    None => {
                        start = valid;
                        break;
                    }
                }
            }
        }
    }
    pending.drain(..start);
    out
}
