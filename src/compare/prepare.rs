//! The inputs every method shares: the datasets (generated synthetic domains or a folder the run
//! file names) and the base model (the run file's, or the tiny model, optionally pre-trained on
//! the synthetic source domain and merged). Generating data, writing the tiny model and merging
//! are not data-parallel: rank 0 does them while the other ranks wait (see [`Study::on_main`]);
//! pre-training is a data-parallel run.
use super::config::{DataSource, ModelSource};
use super::stage::{domain_name, Stage, PRETRAIN_RUN};
use super::training::RunJob;
use super::Study;
use crate::data::synthetic::{generate_food101_like, Domain};
use crate::model::source::ModelFiles;
use crate::peft::full::Full;
use crate::peft::{MethodSettings, Registered};
use crate::train::config::RunConfig;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::Device;

/// The base model every row starts from.
pub struct BaseModel {
    pub spec: String,
    pub files: ModelFiles,
    /// Its U-Net's fingerprint, for the stage keys.
    pub identity: String,
}

/// A dataset ready to train on or score against.
pub struct PreparedData {
    pub path: PathBuf,
    /// Identifies its content for the stage keys.
    pub key: String,
    /// For the report.
    pub description: String,
}

impl Study<'_> {
    /// The synthetic domain `domain` (generated once), or the dataset folder the run file names.
    pub(super) fn prepare_dataset(&self, domain: Domain) -> Result<PreparedData> {
        if let DataSource::Folder(path) = &self.config.data.source {
            return dataset_folder(path);
        }
        let spec = self.config.data.synthetic.spec(domain);
        let name = domain_name(domain);
        let dir = self.layout.data(domain);
        let key = serde_json::to_value(&spec)?;
        let stage = Stage::Data(domain);
        self.on_main(|| {
            if self
                .layout
                .enter::<Value>(stage, Some(&dir), &key)?
                .is_none()
            {
                remove_dir(&dir)?;
                eprintln!("compare: generating the synthetic {name} domain");
                generate_food101_like(&dir, &spec)?;
                self.layout.finish(stage, &key, &Value::Null)?;
            }
            Ok(())
        })?;
        Ok(PreparedData {
            path: dir,
            key: key.to_string(),
            description: format!("the synthetic {name} domain"),
        })
    }

    /// The model every method starts from: the run file's model, or the tiny model pre-trained
    /// on the synthetic source domain when `[pretrain]` is given. `None` when interrupted.
    pub(super) fn prepare_base_model(
        &self,
        target: &PreparedData,
        source: Option<&PreparedData>,
    ) -> Result<Option<String>> {
        let initial = match &self.config.model.source {
            ModelSource::Tiny => {
                let datasets: Vec<&PreparedData> = std::iter::once(target).chain(source).collect();
                self.on_main(|| self.prepare_tiny_model(&datasets))?
            }
            ModelSource::Pretrained(spec) => spec.clone(),
        };
        let (Some(pretrain), Some(source)) = (&self.config.pretrain, source) else {
            return Ok(Some(initial));
        };
        let initial_files = ModelFiles::resolve(&initial, None)?;
        let config = RunConfig {
            train: pretrain.train.clone(),
            method: MethodSettings::defaults(<Full as Registered>::NAME)?,
        };
        let key = json!({ "base": initial_files.unet_identity()?, "data": source.key, "run": config.to_toml()? });
        if self.group.is_main() {
            eprintln!("compare: pre-training the base model on the source domain");
        }
        let job = RunJob {
            name: PRETRAIN_RUN.to_string(),
            model: initial.clone(),
            data: source.path.clone(),
            config,
            at_steps: Vec::new(),
            key: key.clone(),
        };
        let Some(record) = self.train_run(job)? else {
            return Ok(None);
        };
        let base = self.layout.model("base");
        self.on_main(|| {
            if self
                .layout
                .enter::<Value>(Stage::BaseModel, Some(&base), &key)?
                .is_none()
            {
                merge_into_model(&initial_files, &record.adapter, &base)?;
                self.layout.finish(Stage::BaseModel, &key, &Value::Null)?;
            }
            Ok(())
        })?;
        Ok(Some(base.display().to_string()))
    }

    /// Writes the tiny model (and trains its VAE on `datasets`); returns its folder.
    fn prepare_tiny_model(&self, datasets: &[&PreparedData]) -> Result<String> {
        let model = &self.config.model;
        let dir = self.layout.model("tiny");
        let key = json!({
            "tiny_seed": model.tiny_seed,
            "tiny_vae": model.tiny_vae,
            "tiny_unet": model.tiny_unet,
            "tiny_prediction_type": model.tiny_prediction_type,
            "resolution": self.config.train.resolution,
            "data": datasets.iter().map(|d| &d.key).collect::<Vec<_>>(),
        });
        if self
            .layout
            .enter::<Value>(Stage::TinyModel, Some(&dir), &key)?
            .is_none()
        {
            remove_dir(&dir)?;
            model.write_tiny_model(&dir, self.config.train.resolution)?;
            // Training and sampling both read what the U-Net predicts from here.
            crate::util::fs::set_json_field(
                &dir.join("scheduler").join("scheduler_config.json"),
                "prediction_type",
                model.tiny_prediction_type,
            )?;
            if model.tiny_vae.steps > 0 {
                eprintln!(
                    "compare: training the tiny model's VAE ({} steps)",
                    model.tiny_vae.steps
                );
                let paths: Vec<&Path> = datasets.iter().map(|d| d.path.as_path()).collect();
                let report = super::tiny_vae::train_tiny_vae(
                    &dir,
                    &paths,
                    self.config.train.resolution,
                    &model.tiny_vae,
                    self.device,
                    self.opts.progress,
                )?;
                eprintln!(
                    "compare: tiny VAE reconstruction MSE {:.4} on the training crops, {:.4} on the test images; scaling factor {:.4}",
                    report.training_mse, report.test_mse, report.scaling_factor
                );
            }
            self.layout.finish(Stage::TinyModel, &key, &Value::Null)?;
        }
        Ok(dir.display().to_string())
    }
}

/// A dataset folder named by the run file.
fn dataset_folder(path: &Path) -> Result<PreparedData> {
    if !path.is_dir() {
        bail!("dataset folder {} does not exist: pass --data DIR (Food101 in the ETH layout or as parquet)", path.display());
    }
    let path = path
        .canonicalize()
        .with_context(|| format!("resolving {}", path.display()))?;
    Ok(PreparedData {
        key: path.display().to_string(),
        description: path.display().to_string(),
        path,
    })
}

fn remove_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    Ok(())
}

/// Writes a copy of the model folder of `files` with `adapter` merged into its U-Net.
fn merge_into_model(files: &ModelFiles, adapter: &Path, out: &Path) -> Result<()> {
    let from = Path::new(&files.spec);
    copy_tree(from, out, &|rel: &Path| {
        rel.starts_with("unet") && rel.extension().is_some_and(|e| e == "safetensors")
    })?;
    let (unet_vs, mut unet) = crate::model::pipeline::load_unet(files, Device::Cpu)?;
    let adapter = crate::peft::file::AdapterFile::load(adapter)?;
    crate::peft::merge::merge_adapter(&mut unet, &unet_vs, &adapter, &files.unet_identity()?)?;
    crate::peft::merge::save_unet(
        &unet_vs,
        &out.join("unet").join("diffusion_pytorch_model.safetensors"),
    )
}

/// Copies the files under `from` to `to` (atomically each), except those `skip` names.
fn copy_tree(from: &Path, to: &Path, skip: &dyn Fn(&Path) -> bool) -> Result<()> {
    let mut pending = vec![from.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            let rel = path.strip_prefix(from)?.to_path_buf();
            if path.is_dir() {
                pending.push(path);
            } else if !skip(&rel) {
                let bytes =
                    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                crate::util::fs::write_atomic(&to.join(&rel), &bytes)?;
            }
        }
    }
    Ok(())
}

/// Parameters of the U-Net of `files`, from its weight files' headers.
pub fn count_unet_parameters(files: &ModelFiles) -> Result<u64> {
    let mut total = 0u64;
    for path in &files.unet.weights {
        let mapped = crate::model::weights::MappedSafetensors::open(path)?;
        for (_, view) in mapped.tensors().tensors() {
            total += view.shape().iter().product::<usize>() as u64;
        }
    }
    Ok(total)
}
