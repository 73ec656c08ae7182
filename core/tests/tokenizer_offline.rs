//! Tokenizer tests that need no download: the byte fallback, small hand-written `tokenizer.json`
//! files (a byte-level BPE like DeepSeek's, and a word-level one without a ByteLevel decoder),
//! loading and error paths.

use std::path::PathBuf;

use dsv4_core::tokenizer::{StreamDecoder, Tokenizer};
use dsv4_core::Error;

const SAMPLES: &[&str] = &[
    "",
    "Hello, world!",
    "你好，世界！",
    "👨‍👩‍👧‍👦 🇨🇳 👍🏽",
    "a  b\n\n\tc\r\n",
    "<｜begin▁of▁sentence｜>sys<｜User｜>hi<｜Assistant｜><think>hmm</think>ok<｜end▁of▁sentence｜>",
    "<｜User near miss <think <｜/table>｜DSML｜ <<think>>",
    "\u{0}\u{1f}\u{7f}\u{80}\u{ff}\u{10ffff}",
];

fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("tok-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Decode `ids` one push at a time; returns the pieces (finish() last).
fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut sd = StreamDecoder::new(tok);
    let mut pieces: Vec<String> = ids.iter().map(|&id| sd.push(id).unwrap()).collect();
    pieces.push(sd.finish().unwrap());
    pieces
}

#[test]
fn byte_fallback_round_trips_and_fits_tiny_vocab() {
    let tok = Tokenizer::byte_fallback();
    assert!(tok.is_byte_fallback());
    assert_eq!(tok.vocab_size(), 271);
    assert!(tok.vocab_size() <= 512, "must fit the built-in tiny model");
    assert_eq!(tok.eos_token_ids(), [1]);
    for text in SAMPLES {
        let ids = tok.encode(text).unwrap();
        assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
        assert_eq!(tok.decode(&ids).unwrap(), *text);
        assert_eq!(stream(&tok, &ids).concat(), *text);
    }
    // Layout: specials 0..=2, byte b -> 3 + b, chat markers from 259.
    assert_eq!(tok.encode("A").unwrap(), [3 + 65]);
    assert_eq!(tok.encode("é").unwrap(), [3 + 0xC3, 3 + 0xA9]);
    assert_eq!(
        tok.encode("<｜begin▁of▁sentence｜>hi<｜end▁of▁sentence｜><｜▁pad▁｜>").unwrap(),
        [0, 3 + b'h' as u32, 3 + b'i' as u32, 1, 2]
    );
    assert_eq!(tok.encode("<｜User｜><｜Assistant｜><think></think>").unwrap(), [259, 260, 261, 262]);
    assert_eq!(tok.token_to_id("<｜User｜>"), Some(259));
    assert_eq!(tok.token_to_id("<｜read_url｜>"), Some(270));
    assert_eq!(tok.token_to_id("<｜end▁of▁sentence｜>"), Some(1));
    assert_eq!(tok.token_to_id("a"), Some(3 + 97));
    assert_eq!(tok.token_to_id("ab"), None);
    // Near misses stay bytes.
    assert_eq!(tok.encode("<think").unwrap().len(), 6);
}

#[test]
fn byte_fallback_round_trips_random_utf8() {
    let tok = Tokenizer::byte_fallback();
    let mut state = 0x1234_5678_u64;
    for _ in 0..300 {
        let mut s = String::new();
        for _ in 0..(state % 40) {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let c = char::from_u32(((state >> 33) % 0x11_0000) as u32).unwrap_or('｜');
            s.push(c);
            if (state >> 40) & 15 == 0 {
                s.push_str("<think>");
            }
        }
        let ids = tok.encode(&s).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), s);
        assert_eq!(stream(&tok, &ids).concat(), s);
    }
}

#[test]
fn byte_fallback_stream_holds_partial_chars() {
    let tok = Tokenizer::byte_fallback();
    let ids = tok.encode("a🦀中").unwrap();
    let pieces = stream(&tok, &ids);
    assert_eq!(pieces, ["a", "", "", "", "🦀", "", "", "中", ""]);
    // Invalid and truncated sequences render as decode() renders them.
    let raw = [3 + 0xF0, 3 + 0x9F, 3 + b'x' as u32, 3 + 0xFF, 3 + 0xE4, 3 + 0xB8];
    let one_shot = tok.decode(&raw).unwrap();
    assert_eq!(one_shot, "\u{FFFD}x\u{FFFD}\u{FFFD}");
    assert_eq!(stream(&tok, &raw).concat(), one_shot);
}

#[test]
fn byte_fallback_unknown_id_is_error() {
    let tok = Tokenizer::byte_fallback();
    for bad in [271, 511, 512, u32::MAX] {
        let err = tok.decode(&[3 + 65, bad]).unwrap_err();
        assert!(matches!(err, Error::Input(_)), "{err:?}");
        assert!(err.to_string().contains(&bad.to_string()), "{err}");
        let mut sd = StreamDecoder::new(&tok);
        assert!(sd.push(bad).is_err());
        assert_eq!(sd.push(3 + 65).unwrap(), "A");
    }
}

/// GPT-2 byte-level alphabet: the char standing for each byte.
fn byte_level_char(b: u8) -> char {
    let mut n = 0;
    for x in 0..=255u8 {
        let printable = matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            x as char
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
        if x == b {
            return c;
        }
    }
    unreachable!()
}

/// A byte-level BPE in DeepSeek's shape: ids 0..=2 BOS/EOS/pad (special added tokens), the 256
/// byte chars at 3..=258, merges for "he", "ll", "hell", "hello" and "中" (E4 B8 AD), and
/// non-special added tokens `<think>` (265), `</think>` (266).
fn write_byte_level_bpe(dir: &std::path::Path, with_config: bool) -> PathBuf {
    write_byte_level_bpe_with(dir, with_config, 266)
}

/// Same, with `</think>` at id `think_id` (ids after 265 leave a gap).
fn write_byte_level_bpe_with(dir: &std::path::Path, with_config: bool, think_id: u32) -> PathBuf {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"].iter().enumerate()
    {
        vocab.insert(t.to_string(), i.into());
    }
    for b in 0..=255u8 {
        vocab.insert(byte_level_char(b).to_string(), (3 + b as u32).into());
    }
    let zhong: String = "中".bytes().map(byte_level_char).collect();
    let (z01, z2) = (zhong.chars().take(2).collect::<String>(), zhong.chars().nth(2).unwrap().to_string());
    let merges = [
        ("h".to_string(), "e".to_string()),
        ("l".into(), "l".into()),
        ("he".into(), "ll".into()),
        ("hell".into(), "o".into()),
        (zhong.chars().next().unwrap().to_string(), zhong.chars().nth(1).unwrap().to_string()),
        (z01.clone(), z2),
    ];
    for (i, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), (259 + i as u32).into());
    }
    let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
    let added = |id: u32, content: &str, special: bool| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": !special, "special": special})
    };
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            added(0, "<｜begin▁of▁sentence｜>", true), added(1, "<｜end▁of▁sentence｜>", true),
            added(2, "<｜▁pad▁｜>", true), added(265, "<think>", false), added(think_id, "</think>", false)
        ],
        "normalizer": {"type": "Sequence", "normalizers": []},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": false},
            {"type": "Split", "pattern": {"Regex": "\\s+(?!\\S)|\\s+|[^\\s]+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "vocab": vocab, "merges": merges}
    });
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    if with_config {
        let config = serde_json::json!({
            "add_bos_token": false,
            "eos_token": {"__type": "AddedToken", "content": "<｜end▁of▁sentence｜>", "lstrip": false,
                          "normalized": true, "rstrip": false, "single_word": false}
        });
        std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    }
    path
}

#[test]
fn hf_byte_level_bpe_encode_decode_stream() {
    let dir = scratch_dir("bpe");
    write_byte_level_bpe(&dir, true);
    let tok = Tokenizer::from_model_dir(&dir).unwrap().expect("tokenizer.json is there");
    assert!(!tok.is_byte_fallback());
    assert_eq!(tok.vocab_size(), 267);
    assert_eq!(tok.eos_token_ids(), [1]);
    assert_eq!(tok.token_to_id("<think>"), Some(265));
    assert_eq!(tok.token_to_id("hello"), Some(262));

    // BOS is not added; added tokens (special or not) are matched in the raw text.
    let ids = tok.encode("<｜begin▁of▁sentence｜>hello<think>中</think>").unwrap();
    assert_eq!(ids, [0, 262, 265, 264, 266]);
    assert_eq!(tok.decode(&ids).unwrap(), "<｜begin▁of▁sentence｜>hello<think>中</think>");

    for text in SAMPLES {
        let ids = tok.encode(text).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), *text, "round trip");
        assert_eq!(stream(&tok, &ids).concat(), *text, "stream");
    }
    // "🦀" is 4 byte tokens here: nothing comes out before the last one.
    let ids = tok.encode("🦀!").unwrap();
    assert_eq!(ids.len(), 5);
    assert_eq!(stream(&tok, &ids), ["", "", "", "🦀", "!", ""]);

    let err = tok.decode(&[262, 267]).unwrap_err();
    assert!(matches!(err, Error::Input(_)) && err.to_string().contains("267"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hf_without_tokenizer_config_uses_eos_token_string() {
    let dir = scratch_dir("noconfig");
    let path = write_byte_level_bpe(&dir, false);
    let tok = Tokenizer::from_file(&path).unwrap();
    assert_eq!(tok.eos_token_ids(), [1]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hf_word_level_without_byte_level_decoder_streams_by_window() {
    let dir = scratch_dir("wordlevel");
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
                          "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<s>": 0, "hello": 1, "world": 2, "<unk>": 3}, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<s>"}"#).unwrap();
    let tok = Tokenizer::from_model_dir(&dir).unwrap().unwrap();
    assert_eq!(tok.eos_token_ids(), [0]);
    let ids = tok.encode("<s>hello world").unwrap();
    assert_eq!(ids, [0, 1, 2]);
    let one_shot = tok.decode(&ids).unwrap();
    assert_eq!(stream(&tok, &ids).concat(), one_shot);
    assert!(tok.decode(&[1, 4]).unwrap_err().to_string().contains('4'));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loading_errors_name_the_file() {
    let dir = scratch_dir("errors");
    assert!(Tokenizer::from_model_dir(&dir).unwrap().is_none(), "no tokenizer.json -> None");

    let missing = dir.join("nope.json");
    let err = Tokenizer::from_file(&missing).unwrap_err();
    assert!(err.to_string().contains("nope.json"), "{err}");

    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::from_model_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    // An added token whose id `tokenizers` would silently renumber.
    write_byte_level_bpe_with(&dir, false, 400);
    let err = Tokenizer::from_model_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("</think>") && err.to_string().contains("400"), "{err}");

    write_byte_level_bpe(&dir, false);
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "<｜nope｜>"}"#).unwrap();
    let err = Tokenizer::from_model_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("tokenizer_config.json") && err.to_string().contains("<｜nope｜>"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn send_sync<T: Send + Sync + Clone>() {}
    fn send<T: Send>() {}
    send_sync::<Tokenizer>();
    send::<StreamDecoder>();
}
