use crate::model::single_file::{write_single_file, Precision, SingleFileSpec};
use crate::model::source::ModelFiles;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The model: a diffusers folder or hub id (to write a single file), or a single-file
    /// checkpoint `FILE.safetensors|.ckpt[#ema,epsilon,v_prediction,config=DIR]` (to write a folder).
    #[arg(long)]
    pub model: String,
    /// `NAME.safetensors`: one LDM-layout file (A1111/ComfyUI); anything else: a diffusers folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Precision of a written single file's tensors.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Keep)]
    pub precision: PrecisionArg,
}

/// `--precision` of single files written by `convert` and `merge`.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum PrecisionArg {
    /// Each tensor as stored in the source.
    Keep,
    Fp32,
    Fp16,
    Bf16,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Self {
        match p {
            PrecisionArg::Keep => Precision::Keep,
            PrecisionArg::Fp32 => Precision::F32,
            PrecisionArg::Fp16 => Precision::F16,
            PrecisionArg::Bf16 => Precision::BF16,
        }
    }
}

pub fn run(args: ConvertArgs) -> Result<()> {
    if args.out.extension().is_some_and(|e| e == "safetensors") {
        let files = ModelFiles::resolve(&args.model, None)?;
        write_single_file(&files, None, &args.out, args.precision.into())?;
        println!("wrote the single-file checkpoint {}", args.out.display());
        return Ok(());
    }
    let Some(single) = SingleFileSpec::parse(&args.model)? else {
        bail!(
            "`{}` is not a single file; to write one, give --out a .safetensors name",
            args.model
        );
    };
    if !matches!(args.precision, PrecisionArg::Keep) {
        bail!("--precision applies to single files; a diffusers folder keeps the stored precision");
    }
    crate::util::fs::ensure_absent_or_empty(&args.out, "choose another --out")?;
    single.convert_to_folder(&args.out)?;
    println!("wrote the diffusers folder {}", args.out.display());
    Ok(())
}
