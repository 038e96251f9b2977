//! The CLIP BPE vocabulary of SD v1.x/v2.x, shipped with difftune so that a single-file checkpoint
//! (which holds no tokenizer) works offline. `assets/clip/` holds the first 48,894 merges of
//! OpenAI's `bpe_simple_vocab_16e6.txt` (as open_clip ships it), the ones CLIP uses; the vocabulary
//! follows from them as CLIP builds it: the 256 byte symbols, their end-of-word forms, one token per
//! merge, then `<|startoftext|>` and `<|endoftext|>` (49,408 tokens).
use crate::util::fs::{write_atomic_str, write_json};
use anyhow::{ensure, Context, Result};
use serde_json::json;
use std::io::Read;
use std::path::Path;

const MERGES_GZ: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.merges.txt.gz");
const MERGES: usize = 48_894;
pub const VOCAB_SIZE: usize = 49_408;

/// The special-token settings of an SD tokenizer folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// SD v1.x pads with `<|endoftext|>`.
    EndOfText,
    /// SD v2.x (OpenCLIP) pads with `!` (id 0).
    Exclamation,
}

fn merges() -> Result<Vec<String>> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(MERGES_GZ)
        .read_to_string(&mut text)
        .context("decompressing the built-in CLIP merges")?;
    let merges: Vec<String> = text.lines().skip(1).map(str::to_string).collect();
    ensure!(
        merges.len() == MERGES,
        "the built-in CLIP merges are damaged"
    );
    Ok(merges)
}

/// Writes `vocab.json`, `merges.txt`, `special_tokens_map.json` and `tokenizer_config.json` as
/// the SD v1.x (or v2.x) hub folders hold them.
pub fn write_tokenizer_folder(dir: &Path, padding: Padding) -> Result<()> {
    let merges = merges()?;
    let symbols = super::tiny::byte_symbols();
    let mut tokens: Vec<String> = symbols.iter().map(char::to_string).collect();
    tokens.extend(symbols.iter().map(|s| format!("{s}</w>")));
    tokens.extend(merges.iter().map(|m| m.replacen(' ', "", 1)));
    tokens.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    ensure!(
        tokens.len() == VOCAB_SIZE,
        "CLIP vocabulary has {} tokens",
        tokens.len()
    );
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, t)| (t, json!(id)))
        .collect();
    write_json(&dir.join("vocab.json"), &vocab)?;
    let merges_text: String = std::iter::once("#version: 0.2\n".to_string())
        .chain(merges.iter().map(|m| format!("{m}\n")))
        .collect();
    write_atomic_str(&dir.join("merges.txt"), &merges_text)?;
    let token = |content: &str| json!({"content": content, "lstrip": false, "normalized": true, "rstrip": false, "single_word": false});
    let pad = match padding {
        Padding::EndOfText => "<|endoftext|>",
        Padding::Exclamation => "!",
    };
    let specials = json!({
        "bos_token": token("<|startoftext|>"),
        "eos_token": token("<|endoftext|>"),
        "pad_token": pad,
        "unk_token": token("<|endoftext|>"),
    });
    write_json(&dir.join("special_tokens_map.json"), &specials)?;
    let mut config = specials;
    config["model_max_length"] = json!(77);
    config["do_lower_case"] = json!(true);
    config["tokenizer_class"] = json!("CLIPTokenizer");
    write_json(&dir.join("tokenizer_config.json"), &config)
}
