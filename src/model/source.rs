//! Finding a Stable Diffusion model's files: a local diffusers folder (`model_index.json`, `unet/`,
//! `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`) or a Hugging Face hub id resolved through
//! the hf-hub cache (`HF_HOME`; `HF_HUB_OFFLINE=1` uses the cache only), `owner/name@revision`
//! for a branch, tag or commit other than `main`, or a single-file checkpoint (see
//! [`super::single_file`]), read through its converted folder.
use super::files::{ComponentFiles, TextEncoderFiles};
// What a source resolves to lives in `files`, below both this module and `single_file` (which
// this module calls to convert single files, and which writes models from their files).
pub use super::files::{fingerprint, ModelFiles};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where a component's files come from.
trait FileSource {
    fn get(&self, file: &str) -> Result<Option<PathBuf>>;
    fn describe(&self) -> String;
}

struct LocalFolder(PathBuf);

impl FileSource for LocalFolder {
    fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        let p = self.0.join(file);
        Ok(p.is_file().then_some(p))
    }
    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

struct Hub {
    id: String,
    revision: String,
    /// The repo and its file listing when online; `None` in offline mode (cache only).
    api: Option<(hf_hub::api::sync::ApiRepo, Vec<String>)>,
    cache: hf_hub::CacheRepo,
    /// `snapshots/<revision>` when the revision is a commit hash with no ref of that name:
    /// hf-hub's cache looks revisions up through `refs/` only.
    commit_snapshot: Option<PathBuf>,
}

impl FileSource for Hub {
    fn get(&self, file: &str) -> Result<Option<PathBuf>> {
        if let Some(p) = self.cache.get(file) {
            return Ok(Some(p));
        }
        if let Some(p) = self.commit_snapshot.as_ref().map(|dir| dir.join(file)) {
            if p.is_file() {
                return Ok(Some(p));
            }
        }
        let Some((api, listing)) = &self.api else {
            return Ok(None);
        };
        if !listing.iter().any(|f| f == file) {
            return Ok(None);
        }
        let path = api
            .get(file)
            .with_context(|| format!("downloading {file} from the hub repo {}", self.id))?;
        Ok(Some(path))
    }
    fn describe(&self) -> String {
        format!("hub repo {}@{}", self.id, self.revision)
    }
}

/// `owner/name` or `owner/name@revision` (a branch, tag or commit; default `main`).
fn parse_hub_id(spec: &str) -> (String, String) {
    match spec.split_once('@') {
        Some((id, revision)) if !revision.is_empty() => (id.to_string(), revision.to_string()),
        _ => (spec.trim_end_matches('@').to_string(), "main".to_string()),
    }
}

impl Hub {
    /// The repo through hf-hub: its cache (`HF_HOME`), and the hub API unless `offline`.
    fn open(spec: &str, offline: bool) -> Result<Self> {
        let (id, revision) = parse_hub_id(spec);
        let repo =
            hf_hub::Repo::with_revision(id.clone(), hf_hub::RepoType::Model, revision.clone());
        let cache = hf_hub::Cache::from_env();
        let repo_dir = cache.path().join(repo.folder_name());
        let cache_repo = cache.repo(repo.clone());
        let commit_snapshot = Some(repo_dir.join("snapshots").join(&revision))
            .filter(|dir| dir.is_dir() && !repo_dir.join("refs").join(&revision).exists());
        let api = if offline {
            let cached = cache_repo.get("model_index.json").is_some()
                || commit_snapshot.is_some()
                || repo_dir.join("refs").join(&revision).is_file();
            if !cached {
                bail!(
                    "hub repo {id}@{revision} is not in the Hugging Face cache {} and HF_HUB_OFFLINE=1 forbids downloading it: download it first with `huggingface-cli download {id} --revision {revision}` (or unset HF_HUB_OFFLINE)",
                    cache.path().display()
                );
            }
            None
        } else {
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .build()
                .context("setting up the Hugging Face hub client")?;
            let api_repo = api.repo(repo);
            let info = api_repo.info().with_context(|| {
                format!("listing the hub repo {id}@{revision} (set HF_HUB_OFFLINE=1 to use the cache only)")
            })?;
            Some((
                api_repo,
                info.siblings.into_iter().map(|s| s.rfilename).collect(),
            ))
        };
        Ok(Self {
            id,
            revision,
            api,
            cache: cache_repo,
            commit_snapshot,
        })
    }
}

impl ModelFiles {
    /// Resolves `spec` (a folder, or a hub id like `CompVis/stable-diffusion-v1-4`, optionally
    /// `@revision`: a branch, tag or commit). `variant`
    /// selects e.g. the `fp16` weight files (`diffusion_pytorch_model.fp16.safetensors`).
    pub fn resolve(spec: &str, variant: Option<&str>) -> Result<Self> {
        if let Some(single) = super::single_file::SingleFileSpec::parse(spec)? {
            if let Some(v) = variant {
                bail!("--variant {v} applies to diffusers folders; `{spec}` is a single file");
            }
            let folder = single.cached_folder()?;
            return Self::from_source(spec, &LocalFolder(folder), None);
        }
        let path = Path::new(spec);
        if path.is_dir() {
            if !path.join("unet").is_dir() {
                bail!(
                    "{} is not a diffusers Stable Diffusion folder: it has no unet/ (expected model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
                    path.display()
                );
            }
            return Self::from_source(spec, &LocalFolder(path.to_path_buf()), variant);
        }
        if path.exists() || !spec.contains('/') || spec.starts_with('.') || spec.starts_with('/') {
            bail!("model `{spec}` is neither a diffusers model folder nor a hub id (owner/name)");
        }
        let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
        Self::from_source(spec, &Hub::open(spec, offline)?, variant)
    }

    fn from_source(spec: &str, src: &dyn FileSource, variant: Option<&str>) -> Result<Self> {
        let need = |file: &str| -> Result<PathBuf> {
            src.get(file)?
                .with_context(|| format!("{} has no {file}", src.describe()))
        };
        let component = |dir: &str, stem: &str| -> Result<ComponentFiles> {
            Ok(ComponentFiles {
                config: need(&format!("{dir}/config.json"))?,
                weights: weight_files(src, dir, stem, variant)?,
            })
        };
        let tokenizer = |dir: &str| -> Result<PathBuf> {
            let vocab = need(&format!("{dir}/vocab.json"))?;
            need(&format!("{dir}/merges.txt"))?;
            Ok(vocab.parent().expect("file has a parent").to_path_buf())
        };
        // SDXL's second text encoder; `family` checks that it is there exactly for SDXL.
        let text_encoder_2 = match src.get("text_encoder_2/config.json")? {
            Some(_) => Some(TextEncoderFiles {
                encoder: component("text_encoder_2", "model")?,
                tokenizer_dir: tokenizer("tokenizer_2")?,
            }),
            None => None,
        };
        let files = Self {
            spec: spec.to_string(),
            unet: component("unet", "diffusion_pytorch_model")?,
            vae: component("vae", "diffusion_pytorch_model")?,
            text_encoder: component("text_encoder", "model")?,
            tokenizer_dir: tokenizer("tokenizer")?,
            text_encoder_2,
            scheduler_config: need("scheduler/scheduler_config.json")?,
            model_index: src.get("model_index.json")?,
        };
        files.family()?;
        Ok(files)
    }
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// `stem[.variant].safetensors`, or the shards listed by `stem[.variant].safetensors.index.json`.
fn weight_files(
    src: &dyn FileSource,
    dir: &str,
    stem: &str,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let name = match variant {
        Some(v) => format!("{stem}.{v}.safetensors"),
        None => format!("{stem}.safetensors"),
    };
    if let Some(p) = src.get(&format!("{dir}/{name}"))? {
        return Ok(vec![p]);
    }
    if let Some(index) = src.get(&format!("{dir}/{name}.index.json"))? {
        let parsed: ShardIndex = crate::util::fs::read_json(&index)?;
        let shards: std::collections::BTreeSet<String> = parsed.weight_map.into_values().collect();
        return shards
            .iter()
            .map(|s| {
                src.get(&format!("{dir}/{s}"))?
                    .with_context(|| format!("{} has no {dir}/{s}", src.describe()))
            })
            .collect();
    }
    let bin = src.get(&format!("{dir}/{stem}.bin"))?.is_some()
        || src.get(&format!("{dir}/pytorch_model.bin"))?.is_some();
    if bin {
        bail!("{} has only PyTorch .bin weights in {dir}/; difftune reads .safetensors (convert with diffusers' save_pretrained(safe_serialization=True))", src.describe());
    }
    bail!(
        "{} has no {dir}/{name}{}",
        src.describe(),
        if variant.is_some() {
            " (try without --variant)"
        } else {
            ""
        }
    )
}
