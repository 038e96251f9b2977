use crate::model::clip::{ClipTextConfig, ClipTextModel};
use crate::model::source::ModelFiles;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{load_vae_weights, AutoencoderKL, VaeConfig};
use crate::model::weights::{load_into, LoadOptions};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;
use tch::{nn, Device};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A folder of configs: unet_config.json, and optionally vae_config.json,
    /// text_encoder_config.json and (SDXL) text_encoder_2_config.json (models are built with
    /// random weights; nothing is downloaded).
    #[arg(long, conflicts_with = "model")]
    pub config_dir: Option<PathBuf>,
    /// A diffusers model folder or hub id: its models are built and their weights loaded and checked.
    #[arg(long)]
    pub model: Option<String>,
    /// Weight-file variant of --model, e.g. `fp16`.
    #[arg(long, requires = "model")]
    pub variant: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also count what each tuning method trains, with its default settings: `all` or a
    /// comma-separated list of registered methods (full, lora, loha, oft, svdiff, ...).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Setting overrides (key=value) for the one method named by --methods.
    #[arg(long = "set")]
    pub set: Vec<String>,
}

/// Where each model's config (and, for a real model, weights) come from.
struct Sources {
    unet: (PathBuf, Vec<PathBuf>),
    vae: Option<(PathBuf, Vec<PathBuf>)>,
    text_encoder: Option<(PathBuf, Vec<PathBuf>)>,
    /// SDXL's second text encoder (CLIPTextModelWithProjection).
    text_encoder_2: Option<(PathBuf, Vec<PathBuf>)>,
}

impl Sources {
    fn from_args(args: &InspectArgs) -> Result<Self> {
        if let Some(spec) = &args.model {
            let files = ModelFiles::resolve(spec, args.variant.as_deref())?;
            return Ok(Self {
                unet: (files.unet.config, files.unet.weights),
                vae: Some((files.vae.config, files.vae.weights)),
                text_encoder: Some((files.text_encoder.config, files.text_encoder.weights)),
                text_encoder_2: files
                    .text_encoder_2
                    .map(|second| (second.encoder.config, second.encoder.weights)),
            });
        }
        let dir = args
            .config_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("."));
        let optional = |name: &str| {
            let p = dir.join(name);
            p.is_file().then_some((p, Vec::new()))
        };
        Ok(Self {
            unet: (dir.join("unet_config.json"), Vec::new()),
            vae: optional("vae_config.json"),
            text_encoder: optional("text_encoder_config.json"),
            text_encoder_2: optional("text_encoder_2_config.json"),
        })
    }
}

fn count(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

pub fn run(args: InspectArgs) -> Result<()> {
    let sources = Sources::from_args(&args)?;
    let mut counts: Vec<(&str, i64)> = Vec::new();

    let unet_config = UNetConfig::from_file(&sources.unet.0)?;
    let unet_vs = nn::VarStore::new(Device::Cpu);
    let mut unet = UNet2DConditionModel::new(unet_vs.root(), &unet_config)?;
    if !sources.unet.1.is_empty() {
        load_into(&unet_vs, &sources.unet.1, &LoadOptions::default())?;
    }
    let unet_count = count(&unet_vs);
    counts.push(("unet", unet_count));

    if let Some((config, weights)) = &sources.vae {
        let vs = nn::VarStore::new(Device::Cpu);
        AutoencoderKL::new(vs.root(), &VaeConfig::from_file(config)?)?;
        if !weights.is_empty() {
            load_vae_weights(&vs, weights)?;
        }
        counts.push(("vae", count(&vs)));
    }
    for (name, source, projection) in [
        ("text_encoder", &sources.text_encoder, false),
        ("text_encoder_2", &sources.text_encoder_2, true),
    ] {
        let Some((config, weights)) = source else {
            continue;
        };
        let config = ClipTextConfig::from_file(config)?;
        let vs = nn::VarStore::new(Device::Cpu);
        if projection {
            ClipTextModel::new_with_projection(vs.root(), &config)?;
        } else {
            ClipTextModel::new(vs.root(), &config)?;
        }
        if !weights.is_empty() {
            ClipTextModel::load_weights(&vs, weights)?;
        }
        counts.push((name, count(&vs)));
    }

    let methods = method_counts(&args.methods, &args.set, &mut unet, &unet_vs)?;
    let share = |n: i64| 100.0 * n as f64 / unet_count as f64;
    if args.json {
        let mut json: serde_json::Map<String, serde_json::Value> = counts
            .iter()
            .map(|(name, n)| (name.to_string(), (*n).into()))
            .collect();
        if !methods.is_empty() {
            let per_method: serde_json::Map<String, serde_json::Value> = methods
                .iter()
                .map(|(name, n)| {
                    let entry = serde_json::json!({ "trainable": n, "share_percent": share(*n) });
                    (name.clone(), entry)
                })
                .collect();
            json.insert("methods".into(), per_method.into());
        }
        println!("{}", serde_json::Value::Object(json));
    } else {
        println!("{:<14} {:>14}", "model", "# params");
        for (name, n) in &counts {
            println!("{name:<14} {:>14}", thousands(*n));
        }
        if !methods.is_empty() {
            println!("\n{:<14} {:>14} {:>9}", "method", "# params", "share");
            for (name, n) in &methods {
                println!("{name:<14} {:>14} {:>8.3}%", thousands(*n), share(*n));
            }
        }
    }
    Ok(())
}

/// Trainable parameter count of each named method (`all`: every method, in the study's order).
fn method_counts(
    names: &[String],
    set: &[String],
    unet: &mut UNet2DConditionModel,
    vs: &nn::VarStore,
) -> Result<Vec<(String, i64)>> {
    use crate::peft::{method_names, trainable_parameter_count, MethodSettings};
    use crate::settings::parse_set_pairs;
    let names: Vec<String> = if names.iter().any(|n| n == "all") {
        method_names().map(str::to_string).collect()
    } else {
        names.to_vec()
    };
    if !set.is_empty() && names.len() != 1 {
        bail!(
            "--set needs exactly one method in --methods (got {})",
            names.len()
        );
    }
    let settings = parse_set_pairs(set)?;
    names
        .into_iter()
        .map(|name| {
            let method = MethodSettings::new(&name, settings.clone())?;
            Ok((name, trainable_parameter_count(method.method(), unet, vs)?))
        })
        .collect()
}

/// `1234567` -> `1,234,567`
fn thousands(n: i64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
