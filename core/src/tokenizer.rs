//! Tokenizer: HF `tokenizer.json` through the `tokenizers` crate, with a byte-level fallback
//! for models that ship none (the built-in tiny model).
