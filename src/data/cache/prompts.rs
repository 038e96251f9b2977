//! The prompts of a cache: every caption variant a sample can train on (see
//! [`crate::data::captions`]), each distinct one encoded once by the text encoder, the encoding
//! shared out among the ranks of a multi-rank build.
use super::super::captions::CaptionOptions;
use super::super::Dataset;
use super::manifest::Manifest;
use crate::dist::ProcessGroup;
use crate::model::prompt::{PromptEmbeddings, PromptEncoder};
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
) -> Result<PromptEmbeddings> {
    let chunks = group.shard_range(prompts.len().div_ceil(PROMPT_CHUNK));
    let (start, end) = (chunks.start * PROMPT_CHUNK, chunks.end * PROMPT_CHUNK);
    let mine = &prompts[start.min(prompts.len())..end.min(prompts.len())];
    if !group.is_distributed() {
        return encode_prompts(model, mine, device);
    }
    // A rank without a chunk still hands over rows of the right shape: none of one prompt's.
    let embeddings = match mine.is_empty() {
        true => {
            let one = encode_prompts(model, &prompts[..1], device)?;
            PromptEmbeddings {
                context: one.context.narrow(0, 0, 0),
                pooled: one.pooled.map(|p| p.narrow(0, 0, 0)),
            }
        }
        false => encode_prompts(model, mine, device)?,
    };
    let gather = |rows: &Tensor| -> Result<Tensor> {
        let all = group
            .all_gather_rows(&rows.to_device(device))
            .context("gathering the prompt embeddings")?;
        Ok(all.to_device(Device::Cpu))
    };
    Ok(PromptEmbeddings {
        context: gather(&embeddings.context)?,
        pooled: embeddings.pooled.as_ref().map(gather).transpose()?,
    })
}

/// The embeddings of `prompts` as the model's pipeline encodes them (SD: the text encoder's last
/// hidden state; SDXL: both encoders' penultimate states and the pooled projection), f32 on the
/// CPU. The empty prompt of caption dropout is encoded like any other, as diffusers' SDXL
/// training script (`proportion_empty_prompts`) and sd-scripts encode a dropped caption:
/// `force_zeros_for_empty_prompt` is the sampling pipeline's choice for the unconditional half
/// of guidance, not a training one.
fn encode_prompts(
    model: &ModelFiles,
    prompts: &[String],
    device: Device,
) -> Result<PromptEmbeddings> {
    let encoder = PromptEncoder::load(model, device, Kind::Float)?;
    let (mut contexts, mut pooled) = (Vec::new(), Vec::new());
    let cpu = |t: Tensor| t.to_device(Device::Cpu).to_kind(Kind::Float);
    for chunk in prompts.chunks(PROMPT_CHUNK) {
        let embeddings = encoder.encode(chunk)?;
        contexts.push(cpu(embeddings.context));
        pooled.extend(embeddings.pooled.map(cpu));
    }
    Ok(PromptEmbeddings {
        context: Tensor::cat(&contexts, 0),
        pooled: (!pooled.is_empty()).then(|| Tensor::cat(&pooled, 0)),
    })
}
