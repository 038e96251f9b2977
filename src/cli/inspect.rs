use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A folder holding unet_config.json (and optionally vae_config.json, text_encoder_config.json).
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also count what each tuning method trains, with its default settings: `all` or a
    /// comma-separated list (full, adapter, lora, prefix, bitfit).
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Setting overrides (key=value) for the one method named by --methods.
    #[arg(long = "set")]
    pub set: Vec<String>,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let dir = args.config_dir.unwrap_or_else(|| PathBuf::from("."));
    let config = crate::model::unet::UNetConfig::from_file(&dir.join("unet_config.json"))?;
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let mut unet = crate::model::unet::UNet2DConditionModel::new(vs.root(), &config)?;
    let count: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    let methods = method_counts(&args.methods, &args.set, &mut unet, &vs)?;
    if args.json {
        let mut json = serde_json::json!({ "unet": count });
        if !methods.is_empty() {
            let per_method: serde_json::Map<String, serde_json::Value> = methods
                .iter()
                .map(|(name, n)| {
                    let share = 100.0 * *n as f64 / count as f64;
                    (
                        name.clone(),
                        serde_json::json!({ "trainable": n, "share_percent": share }),
                    )
                })
                .collect();
            json["methods"] = per_method.into();
        }
        println!("{json}");
    } else {
        println!("unet {count}");
        if !methods.is_empty() {
            println!("\n{:<10} {:>14} {:>9}", "method", "# params", "share");
            for (name, n) in &methods {
                println!(
                    "{name:<10} {:>14} {:>8.3}%",
                    thousands(*n),
                    100.0 * *n as f64 / count as f64
                );
            }
        }
    }
    Ok(())
}

/// Trainable parameter count of each named method (`all`: every method, in the study's order).
fn method_counts(
    names: &[String],
    set: &[String],
    unet: &mut crate::model::unet::UNet2DConditionModel,
    vs: &tch::nn::VarStore,
) -> Result<Vec<(String, i64)>> {
    use crate::peft::{
        method_from_settings, method_names, parse_set_pairs, trainable_parameter_count,
    };
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
    let settings = toml::Value::Table(parse_set_pairs(set)?);
    names
        .into_iter()
        .map(|name| {
            let method = method_from_settings(&name, &settings)?;
            Ok((name, trainable_parameter_count(method.as_ref(), unet, vs)?))
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
