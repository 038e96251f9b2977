//! Validation images during training: fixed prompts and seeds sampled with the U-Net being trained,
//! through the same generation loop as `difftune sample`, saved as PNGs under
//! `OUT/validation/step-NNNNNNNN/`. Validation reseeds torch's generator for its noise; training
//! reseeds before every forward pass, so validation never changes the training trajectory.
use super::config::TrainConfig;
use crate::model::source::ModelFiles;
use crate::model::unet::UNet2DConditionModel;
use crate::sample::{generate, per_image_latents, GenerateOptions, SdModels};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use tch::nn;

pub const VALIDATION_DIR: &str = "validation";

/// The U-Net being trained, alone or inside the sampling pipeline when validation is on.
pub enum TrainedUnet {
    Bare(Box<UNet2DConditionModel>),
    InPipeline(Box<SdModels>),
}

impl TrainedUnet {
    /// Puts `unet` into a pipeline with `files`' VAE, text encoder and tokenizer.
    pub fn in_pipeline(
        files: &ModelFiles,
        unet_vars: nn::VarStore,
        unet: UNet2DConditionModel,
    ) -> Result<Self> {
        Ok(Self::InPipeline(Box::new(SdModels::around(
            files, unet_vars, unet,
        )?)))
    }

    pub fn unet(&self) -> &UNet2DConditionModel {
        match self {
            TrainedUnet::Bare(unet) => unet,
            TrainedUnet::InPipeline(models) => &models.unet,
        }
    }
}

/// What to generate.
pub struct Validation {
    scheduler: SchedulerConfig,
    pub prompts: Vec<String>,
    seed: u64,
    resolution: usize,
    options: GenerateOptions,
    scheduler_kind: SchedulerKind,
}

impl Validation {
    /// `default_prompts` stand in when the config names none (the data's first captions).
    pub fn new(
        files: &ModelFiles,
        train: &TrainConfig,
        default_prompts: &[String],
    ) -> Result<Self> {
        let prompts: Vec<String> = if train.validation_prompts.is_empty() {
            default_prompts
                .iter()
                .take(train.validation_images)
                .cloned()
                .collect()
        } else {
            train.validation_prompts.clone()
        };
        ensure!(
            !prompts.is_empty(),
            "validation is on but there are no prompts to sample"
        );
        let scheduler = crate::model::pipeline::load_scheduler_config(files)?;
        // Fail now on a config the scheduler refuses rather than at the first validation.
        train.validation_scheduler.build(&scheduler)?;
        Ok(Self {
            scheduler,
            options: GenerateOptions {
                steps: train.validation_steps,
                guidance_scale: train.validation_guidance,
                negative_prompt: None,
                batch_size: prompts.len(),
            },
            prompts,
            seed: train.validation_seed,
            resolution: train.resolution as usize,
            scheduler_kind: train.validation_scheduler,
        })
    }

    /// Generates the validation images with the pipeline's (trained) U-Net and writes them to
    /// `out/validation/step-NNNNNNNN/NN.png`; returns that folder.
    pub fn run(
        &self,
        models: &SdModels,
        autocast: bool,
        out: &Path,
        step: usize,
    ) -> Result<PathBuf> {
        let latents = per_image_latents(
            self.seed,
            self.prompts.len(),
            self.resolution,
            self.resolution,
            models.geometry(),
            models.device(),
        )?;
        let mut scheduler = self.scheduler_kind.build(&self.scheduler)?;
        let mut generate = || {
            generate(
                models,
                scheduler.as_mut(),
                &self.prompts,
                &latents,
                &self.options,
                &mut || {},
            )
        };
        let images = if autocast {
            super::precision::bf16_autocast(models.device(), generate)
        } else {
            generate()
        }
        .with_context(|| format!("generating validation images at step {step}"))?;
        let dir = out.join(VALIDATION_DIR).join(format!("step-{step:08}"));
        for (i, prompt) in self.prompts.iter().enumerate() {
            let text = [
                ("prompt", prompt.clone()),
                ("seed", (self.seed + i as u64).to_string()),
                ("step", step.to_string()),
                ("scheduler", self.scheduler_kind.to_string()),
            ];
            crate::sample::png::write_png(
                &dir.join(format!("{i:02}.png")),
                &images.get(i as i64),
                &text,
            )?;
        }
        Ok(dir)
    }
}
