//! The prompts of a cache: every caption variant a sample can train on (see
//! [`crate::data::captions`]), each distinct one encoded once by the text encoder, the encoding
//! shared out among the ranks of a multi-rank build.
use super::super::captions::CaptionOptions;
use super::super::Dataset;
use super::manifest::Manifest;
use crate::dist::ProcessGroup;
use crate::model::source::ModelFiles;
use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use tch::{Device, Kind, Tensor};

/// The distinct prompts of a dataset and the variants of each listed sample.
pub(super) struct CaptionTable {
    /// The captions as written first (in listing order, so validation's first prompts are real
    /// captions), then the shuffled variants, then the empty prompt of dropout.
    pub prompts: Vec<String>,
    /// Per listed sample, the indices of its variants.
    pub variants: Vec<Vec<usize>>,
    pub dropped: Option<usize>,
}

impl CaptionTable {
    pub fn new(dataset: &Dataset, options: &CaptionOptions) -> Self {
        let texts: Vec<Vec<String>> = dataset
            .samples
            .iter()
            .map(|s| options.variants(&s.caption, &s.id))
            .collect();
        let mut prompts: Vec<String> = Vec::new();
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        let mut intern = |text: &str| -> usize {
            if let Some(&i) = index.get(text) {
                return i;
            }
            prompts.push(text.to_string());
            index.insert(text.to_string(), prompts.len() - 1);
            prompts.len() - 1
        };
        let written: Vec<usize> = texts.iter().map(|t| intern(&t[0])).collect();
        let variants = texts
            .iter()
            .zip(written)
            .map(|(t, first)| {
                let rest = t[1..].iter().map(|text| intern(text));
                std::iter::once(first).chain(rest).collect()
            })
            .collect();
        let dropped = (options.dropout > 0.0).then(|| intern(""));
        Self {
            prompts,
            variants,
            dropped,
        }
    }

    /// Sets every cached sample's variants and repeats from the current listing (a reused
    /// shard may have been written with other caption settings).
    pub fn assign(&self, manifest: &mut Manifest, dataset: &Dataset) {
        let listing: HashMap<&str, usize> = dataset
            .samples
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        for sample in manifest.shards.iter_mut().flat_map(|s| &mut s.samples) {
            if let Some(&i) = listing.get(sample.id.as_str()) {
                sample.prompts = self.variants[i].clone();
                sample.repeats = dataset.samples[i].repeats;
            }
        }
    }
}

/// Prompts per text-encoder forward.
const PROMPT_CHUNK: usize = 64;

/// Every rank encodes its share of the whole 64-prompt chunks; the embeddings of all prompts
/// are gathered in order (on `device`, the group's) and returned on the CPU.
pub(super) fn encode_prompt_share(
    model: &ModelFiles,
    prompts: &[String],
    device: Device,
    group: &ProcessGroup,
) -> Result<Tensor> {
    let chunks = group.shard_range(prompts.len().div_ceil(PROMPT_CHUNK));
    let (start, end) = (chunks.start * PROMPT_CHUNK, chunks.end * PROMPT_CHUNK);
    let mine = &prompts[start.min(prompts.len())..end.min(prompts.len())];
    if !group.is_distributed() {
        return encode_prompts(model, mine, device);
    }
    // A rank without a chunk still hands over rows of the right shape: none of one prompt's.
    let embeddings = match mine.is_empty() {
        true => encode_prompts(model, &prompts[..1], device)?.narrow(0, 0, 0),
        false => encode_prompts(model, mine, device)?,
    };
    let all = group
        .all_gather_rows(&embeddings.to_device(device))
        .context("gathering the prompt embeddings")?;
    Ok(all.to_device(Device::Cpu))
}

/// `[prompts, seq, dim]` text-encoder hidden states of `prompts`, on the CPU.
fn encode_prompts(model: &ModelFiles, prompts: &[String], device: Device) -> Result<Tensor> {
    let tokenizer = crate::model::tokenizer::ClipTokenizer::from_dir(&model.tokenizer_dir)?;
    let encoder = crate::model::pipeline::load_text_encoder(model, device)?;
    let mut out = Vec::new();
    for chunk in prompts.chunks(PROMPT_CHUNK) {
        let ids = tokenizer.input_ids(chunk)?.to_device(device);
        out.push(
            tch::no_grad(|| encoder.forward(&ids))
                .to_device(Device::Cpu)
                .to_kind(Kind::Float),
        );
    }
    Ok(Tensor::cat(&out, 0))
}
