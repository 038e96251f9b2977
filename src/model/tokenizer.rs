//! CLIP's byte-level BPE tokenizer, built from an SD `tokenizer/` folder (vocab.json + merges.txt,
//! and tokenizer_config.json / special_tokens_map.json when present). It reproduces transformers'
//! CLIPTokenizer as diffusers' SD pipeline calls it: bos + BPE tokens + eos, truncated and padded to
//! `model_max_length`.
use crate::util::fs::read_json;
use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::Tensor;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::{Lowercase, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PaddingDirection, PaddingParams, PaddingStrategy, SplitDelimiterBehavior,
    Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";
/// CLIP's context length, used when the folder does not set `model_max_length`.
pub const DEFAULT_MAX_LENGTH: usize = 77;
/// transformers writes a huge sentinel (`VERY_LARGE_INTEGER`) as `model_max_length` when none is
/// set; anything above this bound means "unset".
const MAX_SENSIBLE_LENGTH: u64 = 1 << 20;
const END_OF_WORD: &str = "</w>";
/// The pre-tokenizer pattern of OpenAI's CLIP (as transformers writes it): special tokens,
/// English contractions, letter runs, single digits, runs of other non-space characters.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A special token as transformers' json files write it: a bare string, or an `AddedToken` object.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SpecialToken {
    Content(String),
    Added {
        content: String,
        #[serde(default)]
        normalized: bool,
        #[serde(default)]
        lstrip: bool,
        #[serde(default)]
        rstrip: bool,
        #[serde(default)]
        single_word: bool,
    },
}

impl SpecialToken {
    fn content(&self) -> &str {
        match self {
            SpecialToken::Content(c) | SpecialToken::Added { content: c, .. } => c,
        }
    }

    /// As transformers registers it: a bare string is matched verbatim (not normalized).
    fn added_token(&self) -> AddedToken {
        match self {
            SpecialToken::Content(c) => AddedToken::from(c.as_str(), true).normalized(false),
            SpecialToken::Added {
                content,
                normalized,
                lstrip,
                rstrip,
                single_word,
            } => AddedToken::from(content.as_str(), true)
                .normalized(*normalized)
                .lstrip(*lstrip)
                .rstrip(*rstrip)
                .single_word(*single_word),
        }
    }
}

/// The fields of `tokenizer_config.json` and `special_tokens_map.json` that change the ids.
#[derive(Debug, Default, Deserialize)]
struct SpecialTokensConfig {
    bos_token: Option<SpecialToken>,
    eos_token: Option<SpecialToken>,
    unk_token: Option<SpecialToken>,
    pad_token: Option<SpecialToken>,
    model_max_length: Option<serde_json::Value>,
}

impl SpecialTokensConfig {
    /// Reads `path`, or the empty config if the file does not exist.
    fn read_optional(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Ok(Self::default());
        }
        read_json(path)
    }

    /// `special_tokens_map.json` takes precedence over `tokenizer_config.json`, as in transformers.
    fn overridden_by(self, other: Self) -> Self {
        Self {
            bos_token: other.bos_token.or(self.bos_token),
            eos_token: other.eos_token.or(self.eos_token),
            unk_token: other.unk_token.or(self.unk_token),
            pad_token: other.pad_token.or(self.pad_token),
            model_max_length: other.model_max_length.or(self.model_max_length),
        }
    }

    fn max_length(&self) -> usize {
        match self
            .model_max_length
            .as_ref()
            .and_then(serde_json::Value::as_u64)
        {
            Some(n) if (1..=MAX_SENSIBLE_LENGTH).contains(&n) => n as usize,
            _ => DEFAULT_MAX_LENGTH,
        }
    }
}

/// Converts the `tokenizers` crate's boxed errors, which anyhow cannot wrap directly.
fn tk<T>(result: tokenizers::Result<T>, what: impl FnOnce() -> String) -> Result<T> {
    result.map_err(|e| anyhow!("{}: {e}", what()))
}

/// Tokenizes prompts into the fixed-length id rows the CLIP text encoder takes.
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    max_length: usize,
    bos_id: i64,
    eos_id: i64,
    pad_id: i64,
}

impl ClipTokenizer {
    /// Loads an SD `tokenizer/` folder: `vocab.json` and `merges.txt` are required; pad token,
    /// special tokens and `model_max_length` come from `tokenizer_config.json` /
    /// `special_tokens_map.json` when present (defaults: pad with eos, length 77).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for file in [&vocab, &merges] {
            if !file.is_file() {
                bail!(
                    "CLIP tokenizer folder {}: missing {}",
                    dir.display(),
                    file.display()
                );
            }
        }
        let config = SpecialTokensConfig::read_optional(&dir.join("tokenizer_config.json"))?
            .overridden_by(SpecialTokensConfig::read_optional(
                &dir.join("special_tokens_map.json"),
            )?);
        let specials = Specials::from_config(&config);
        let mut tokenizer = clip_bpe(&vocab, &merges, specials.unk.content())?;
        let id_of = |token: &SpecialToken| -> Result<u32> {
            tokenizer.token_to_id(token.content()).with_context(|| {
                format!(
                    "special token `{}` is not in {}",
                    token.content(),
                    vocab.display()
                )
            })
        };
        let (bos_id, eos_id, pad_id) = (
            id_of(&specials.bos)?,
            id_of(&specials.eos)?,
            id_of(&specials.pad)?,
        );
        id_of(&specials.unk)?; // BPE emits it for symbols outside the vocab.
        specials.register(&mut tokenizer, bos_id, eos_id);
        let max_length = config.max_length();
        fix_length(&mut tokenizer, max_length, specials.pad.content(), pad_id)?;
        Ok(Self {
            tokenizer,
            max_length,
            bos_id: bos_id.into(),
            eos_id: eos_id.into(),
            pad_id: pad_id.into(),
        })
    }

    /// The ids of `text`: bos, its BPE tokens (truncated so that eos still fits), eos, then padding
    /// up to `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let encoding = tk(self.tokenizer.encode(text, true), || {
            format!("tokenizing {text:?}")
        })?;
        Ok(encoding.get_ids().iter().map(|&id| id.into()).collect())
    }

    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<i64>>> {
        texts.iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// `[batch, max_length]` int64 ids on the CPU, ready for the text encoder.
    pub fn input_ids<S: AsRef<str>>(&self, texts: &[S]) -> Result<Tensor> {
        let rows = self.encode_batch(texts)?;
        let flat: Vec<i64> = rows.concat();
        Ok(Tensor::from_slice(&flat).view([texts.len() as i64, self.max_length as i64]))
    }

    /// The text of `ids` without special tokens, words separated by single spaces (as transformers'
    /// `decode(..., skip_special_tokens=True)`); for logs, e.g. showing what truncation kept.
    pub fn decode(&self, ids: &[i64]) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .map(|&id| u32::try_from(id).with_context(|| format!("token id {id} is out of range")))
            .collect::<Result<_>>()?;
        let text = tk(self.tokenizer.decode(&ids, true), || "decoding ids".into())?;
        Ok(text.replace(END_OF_WORD, " ").trim().to_string())
    }

    /// Tokens in the vocabulary, special tokens included (the text encoder's `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn bos_id(&self) -> i64 {
        self.bos_id
    }

    pub fn eos_id(&self) -> i64 {
        self.eos_id
    }

    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }
}

/// The four special tokens, from a tokenizer folder's config or CLIP's defaults.
struct Specials {
    bos: SpecialToken,
    eos: SpecialToken,
    unk: SpecialToken,
    pad: SpecialToken,
}

impl Specials {
    fn from_config(config: &SpecialTokensConfig) -> Self {
        let or = |token: &Option<SpecialToken>, default: &str| {
            token
                .clone()
                .unwrap_or_else(|| SpecialToken::Content(default.to_string()))
        };
        Self {
            bos: or(&config.bos_token, DEFAULT_BOS),
            eos: or(&config.eos_token, DEFAULT_EOS),
            unk: or(&config.unk_token, DEFAULT_EOS),
            pad: or(&config.pad_token, DEFAULT_EOS),
        }
    }

    /// Every special token is matched in raw text before BPE. transformers registers bos, eos,
    /// unk, pad in that order, and a later declaration of the same text replaces an earlier one
    /// (SD v1's pad "<|endoftext|>" as a bare string makes eos match only verbatim). The post
    /// processor wraps every encoding in bos ... eos.
    fn register(&self, tokenizer: &mut Tokenizer, bos_id: u32, eos_id: u32) {
        let mut specials: Vec<&SpecialToken> = Vec::new();
        for token in [&self.bos, &self.eos, &self.unk, &self.pad] {
            match specials.iter().position(|t| t.content() == token.content()) {
                Some(i) => specials[i] = token,
                None => specials.push(token),
            }
        }
        let added: Vec<AddedToken> = specials.iter().map(|t| t.added_token()).collect();
        tokenizer.add_special_tokens(&added);
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new(
                (self.eos.content().to_string(), eos_id),
                (self.bos.content().to_string(), bos_id),
            )
            .trim_offsets(false)
            .add_prefix_space(false),
        ));
    }
}

/// CLIP's BPE with its normalizer (NFC, whitespace runs to one space, lowercase), pre-tokenizer
/// (CLIP's split pattern, then byte-level) and decoder.
fn clip_bpe(vocab: &Path, merges: &Path, unk: &str) -> Result<Tokenizer> {
    let bpe = tk(
        BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .end_of_word_suffix(END_OF_WORD.to_string())
            .unk_token(unk.to_string())
            .fuse_unk(false)
            .build(),
        || {
            format!(
                "loading CLIP BPE from {} and {}",
                vocab.display(),
                merges.display()
            )
        },
    )?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        tk(
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " "),
            || "whitespace rule".into(),
        )?
        .into(),
        Lowercase.into(),
    ])));
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        tk(
            Split::new(
                SplitPattern::Regex(CLIP_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            ),
            || "CLIP pre-tokenizer pattern".into(),
        )?
        .into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

/// Every encoding truncated and padded to exactly `max_length` ids.
fn fix_length(tokenizer: &mut Tokenizer, max_length: usize, pad: &str, pad_id: u32) -> Result<()> {
    tk(
        tokenizer.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        })),
        || "truncation".into(),
    )?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(max_length),
        direction: PaddingDirection::Right,
        pad_to_multiple_of: None,
        pad_id,
        pad_type_id: 0,
        pad_token: pad.to_string(),
    }));
    Ok(())
}
