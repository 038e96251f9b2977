use crate::model::unet::UNetConfig;
use crate::peft::export::{check_exports, export, AdapterFormat};
use crate::peft::file::{sidecar_path, AdapterFile, AdapterMeta};
use crate::util::fs::ensure_absent_or_empty;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The difftune adapter file to convert (`adapter.safetensors`, with its `adapter.json`
    /// sidecar beside it).
    #[arg(long)]
    pub adapter: PathBuf,
    /// `kohya`: ComfyUI and A1111 (their LoRA folders; sd-scripts' key layout); `diffusers`:
    /// `pipe.load_lora_weights(OUT)`; `peft`: `PeftModel.from_pretrained(unet, OUT)`. LoRA goes to
    /// all three, DoRA to diffusers and peft.
    #[arg(long, value_parser = format_parser())]
    pub format: AdapterFormat,
    /// `NAME.safetensors` for kohya; a folder (absent or empty) for diffusers and peft. Never
    /// overwritten.
    #[arg(long)]
    pub out: PathBuf,
    /// The base model (folder, hub id or single file). Needed only for an SDXL adapter as kohya:
    /// with it the file gets sd-scripts' LDM layer names (`lora_unet_input_blocks_4_1_...`);
    /// without it, the diffusers names, which A1111, ComfyUI and diffusers read for SDXL too.
    #[arg(long)]
    pub model: Option<String>,
}

/// The format names, listed in `--help`.
fn format_parser() -> impl clap::builder::TypedValueParser<Value = AdapterFormat> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(AdapterFormat::ALL.map(AdapterFormat::name))
        .try_map(|name| name.parse::<AdapterFormat>())
}

pub fn run(args: ExportArgs) -> Result<()> {
    let sidecar = sidecar_path(&args.adapter);
    if !sidecar.is_file() {
        bail!(
            "{} has no difftune sidecar {}: export converts difftune's adapter files (train's adapter.safetensors)",
            args.adapter.display(),
            sidecar.display()
        );
    }
    match args.format.is_file() {
        true if args.out.exists() => bail!(
            "{} already exists: choose another --out (export never overwrites)",
            args.out.display()
        ),
        true => {}
        false => ensure_absent_or_empty(&args.out, "choose another --out")?,
    }
    // The method (from the sidecar's settings) and the format first, then the tensors (whose
    // header is checked as they are read): all before anything is written.
    let meta = AdapterMeta::read(&args.adapter)?;
    check_exports(meta.method()?.as_ref(), &[args.format])?;
    let unet = match &args.model {
        Some(spec) => {
            let files = crate::settings::check_model(spec, None)?;
            Some(UNetConfig::from_file(&files.unet.config)?)
        }
        None => None,
    };
    let adapter = AdapterFile::load(&args.adapter)
        .with_context(|| format!("reading the adapter {}", args.adapter.display()))?;
    export(&adapter, args.format, unet.as_ref(), &args.out)?;
    println!(
        "wrote the `{}` adapter {} as {} to {}",
        adapter.meta.method,
        args.adapter.display(),
        args.format,
        args.out.display()
    );
    Ok(())
}
