//! SDXL against diffusers' StableDiffusionXLPipeline on the tiny random model of
//! tests/fixtures/sdxl (built by tools/make_sdxl_fixtures.py): both tokenizers, both text
//! encoders, the U-Net with its added conditions, sampled images, and single files in and out.
#[path = "common/manifest.rs"]
mod common;

use common::{fixture_manifest, manifest};
use difftune::model::conditioning::{AddedConditions, TextConditioning};
use difftune::model::family::ModelFamily;
use difftune::model::pipeline::load_unet;
use difftune::model::prompt::PromptEncoder;
use difftune::model::single_file::{write_single_file, Precision, SingleFileSpec};
use difftune::model::source::ModelFiles;
use difftune::model::tokenizer::ClipTokenizer;
use difftune::model::weights::{read_all, save_tensors};
use difftune::peft::export::{export, AdapterFormat};
use difftune::peft::formats::read_adapter;
use difftune::peft::freeze;
use difftune::sample::{generate, GenerateOptions, SdModels};
use difftune::schedulers::{self, SchedulerConfig};
use difftune::util::tensor::relative_l2;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdxl")
}

fn expected() -> BTreeMap<String, Tensor> {
    read_all(&fixtures().join("expected.safetensors")).unwrap()
}

fn model() -> ModelFiles {
    ModelFiles::resolve(fixtures().join("model").to_str().unwrap(), None).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

const TOKEN_PROMPTS: usize = 5;

fn token_prompts() -> Vec<String> {
    let mut prompts = vec![
        "a photo of an astronaut riding a horse".to_string(),
        "a cute corgi dog, oil painting".to_string(),
        String::new(),
        "blurry, low quality".to_string(),
    ];
    prompts.push("a ".repeat(90));
    assert_eq!(prompts.len(), TOKEN_PROMPTS);
    prompts
}

#[test]
fn the_family_is_read_from_the_configs() {
    let files = model();
    assert_eq!(files.family().unwrap(), ModelFamily::Sdxl);
    assert!(files.text_encoder_2.is_some());
    let sd1 = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pipeline/model");
    let sd1 = ModelFiles::resolve(sd1.to_str().unwrap(), None).unwrap();
    assert_eq!(sd1.family().unwrap(), ModelFamily::Sd1);
    assert!(sd1.text_encoder_2.is_none());
}

#[test]
fn both_tokenizers_match_transformers() {
    let files = model();
    let e = expected();
    let second = files.text_encoder_2.as_ref().unwrap();
    for (key, dir) in [
        ("tokens.1", &files.tokenizer_dir),
        ("tokens.2", &second.tokenizer_dir),
    ] {
        let tokenizer = ClipTokenizer::from_dir(dir).unwrap();
        let ids = tokenizer.input_ids(&token_prompts()).unwrap();
        assert!(ids.equal(&e[key]), "{key}");
    }
    // tokenizer_2 pads with `!` (id 0) where tokenizer pads with <|endoftext|>.
    assert_eq!(e["tokens.2"].get(2).int64_value(&[2]), 0);
    assert_ne!(e["tokens.1"].get(2).int64_value(&[2]), 0);
}

#[test]
fn both_text_encoders_match_transformers() {
    let files = model();
    let encoders = PromptEncoder::load(&files, Device::Cpu, Kind::Float).unwrap();
    let (first, second) = (&encoders.first, encoders.second.as_ref().unwrap());
    let e = &expected();
    let check = |name: &str, got: &Tensor| {
        let err = relative_l2(got, &e[name]);
        println!("{name}: relative L2 error {err:.2e}");
        assert!(err <= 1e-6, "{name}: {err:.2e}");
    };
    tch::no_grad(|| {
        let (hidden, pooled) = first.model.hidden_and_pooled(&e["tokens.1"], 1).unwrap();
        check("te1.penultimate", &hidden);
        check("te1.pooled", &pooled);
        let (hidden, text_embeds) = second.model.hidden_and_pooled(&e["tokens.2"], 2).unwrap();
        check("te2.penultimate", &hidden);
        check("te2.text_embeds", &text_embeds);
        check("te2.last", &second.model.forward(&e["tokens.2"]));
    });
}

#[test]
fn the_unet_with_added_conditions_matches_diffusers() {
    let (_vs, unet) = load_unet(&model(), Device::Cpu).unwrap();
    let e = &expected();
    let conditioning = TextConditioning {
        context: e["unet.context"].shallow_clone(),
        added: Some(AddedConditions {
            text_embeds: e["unet.text_embeds"].shallow_clone(),
            time_ids: e["unet.time_ids"].shallow_clone(),
        }),
    };
    let out = tch::no_grad(|| unet.forward(&e["unet.sample"], &e["unet.timesteps"], &conditioning));
    let err = relative_l2(&out, &e["unet.output"]);
    println!("unet: relative L2 error {err:.2e}");
    assert!(err <= 1e-5, "{err:.2e}");
    // transformer_layers_per_block [1, 1, 2]: two attentions per down level, three per up level,
    // one in the mid block.
    let blocks = 2 + 2 * 2 + 2 + 3 * 2 + 3;
    assert_eq!(unet.config.transformer_block_widths().len(), blocks);
}

/// Image-space tolerance (pixels in [0, 1]).
const TOLERANCE: f64 = 1e-4;

#[test]
fn sampled_images_match_the_diffusers_pipeline() {
    let files = model();
    let mut models = SdModels::load(&files, Device::Cpu).unwrap();
    assert!(models.force_zeros_for_empty_prompt);
    assert_eq!(models.default_size(), 64);
    let config = SchedulerConfig::load(&files.scheduler_config).unwrap();
    let prompts = token_prompts();
    let e = &expected();
    // (case, scheduler, steps, guidance, prompts, negative prompt, force zeros)
    let cases = [
        ("euler_cfg", "euler", 4, 5.0, 0..2, None, true),
        (
            "ddim_cfg_negative",
            "ddim",
            3,
            7.5,
            0..2,
            Some("blurry, low quality"),
            true,
        ),
        ("dpmpp_no_cfg", "dpmsolver++", 4, 1.0, 0..1, None, true),
        ("dpmpp_cfg_empty", "dpmsolver++", 4, 6.0, 1..2, None, false),
    ];
    for (case, scheduler, steps, guidance, range, negative, force_zeros) in cases {
        models.force_zeros_for_empty_prompt = force_zeros;
        let mut scheduler = schedulers::from_name(scheduler, &config).unwrap();
        let opts = GenerateOptions {
            steps,
            guidance_scale: guidance,
            negative_prompt: negative.map(str::to_string),
            batch_size: 2,
        };
        let images = generate(
            &models,
            scheduler.as_mut(),
            &prompts[range],
            &e[&format!("{case}.latents")],
            &opts,
            &mut || {},
        )
        .unwrap();
        let err = max_abs_diff(&images, &e[&format!("{case}.images")]);
        println!("{case}: max abs error {err:.2e}");
        assert!(err <= TOLERANCE, "{case}: max abs error {err}");
    }
}

/// `files` written as one LDM-layout file in `dir`.
fn single_file(files: &ModelFiles, dir: &Path) -> PathBuf {
    let path = dir.join("tiny_sdxl.safetensors");
    write_single_file(files, None, &path, Precision::Keep).unwrap();
    path
}

/// Every tensor of every weight file of a component folder.
fn component(dir: &Path) -> BTreeMap<String, Tensor> {
    let mut all = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            all.extend(read_all(&path).unwrap());
        }
    }
    all
}

#[test]
fn single_files_convert_both_ways() {
    let files = model();
    let dir = tempfile::tempdir().unwrap();
    let file = single_file(&files, dir.path());
    // The file diffusers' from_single_file reads as the folder, tensor for tensor.
    let fixture = fixtures().join("single_file_manifest.json");
    assert_eq!(manifest(&file), fixture_manifest(&fixture, "fp32"));

    let spec = format!(
        "{}#config={}",
        file.display(),
        fixtures().join("model").display()
    );
    let back = dir.path().join("back");
    SingleFileSpec::parse(&spec)
        .unwrap()
        .unwrap()
        .convert_to_folder(&back)
        .unwrap();
    for name in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        let (a, b) = (
            component(&fixtures().join("model").join(name)),
            component(&back.join(name)),
        );
        // transformers 5 saves CLIPTextModel without the `text_model.` prefix the hub's SD
        // folders (and difftune's conversions) carry; both load.
        let unprefixed = |names: BTreeMap<String, Tensor>| -> BTreeMap<String, Tensor> {
            names
                .into_iter()
                .map(|(k, t)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), t))
                .collect()
        };
        let (a, b) = (unprefixed(a), unprefixed(b));
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, t) in &a {
            assert!(t.equal(&b[k]), "{name}: {k}");
        }
    }
    let back = ModelFiles::resolve(back.to_str().unwrap(), None).unwrap();
    assert_eq!(back.family().unwrap(), ModelFamily::Sdxl);
    let models = SdModels::load(&back, Device::Cpu).unwrap();
    assert!(models.force_zeros_for_empty_prompt);
}

/// The error of converting `file` edited by `edit` (with the fixture's configs when
/// `configs`).
fn conversion_error(
    file: &Path,
    configs: bool,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = read_all(file).unwrap();
    edit(&mut tensors);
    let edited = dir.path().join("edited.safetensors");
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    save_tensors(&edited, &list, None).unwrap();
    let mut spec = edited.display().to_string();
    if configs {
        spec = format!("{spec}#config={}", fixtures().join("model").display());
    }
    let spec = SingleFileSpec::parse(&spec).unwrap().unwrap();
    format!(
        "{:#}",
        spec.convert_to_folder(&dir.path().join("out")).unwrap_err()
    )
}

#[test]
fn odd_sdxl_single_files_say_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let file = single_file(&model(), dir.path());
    // Without configs: the tiny model's 80-wide cross-attention is not SDXL base's.
    let e = conversion_error(&file, false, |_| {});
    assert!(
        e.contains("not SDXL (2048-wide") && e.contains("[16, 80]"),
        "{e}"
    );
    // The refiner has one OpenCLIP encoder, as embedder 0.
    let e = conversion_error(&file, true, |t| {
        let names: Vec<String> = t
            .keys()
            .filter(|k| k.starts_with("conditioner."))
            .cloned()
            .collect();
        for k in names {
            let v = t.remove(&k).unwrap();
            if let Some(rest) = k.strip_prefix("conditioner.embedders.1.model.") {
                t.insert(format!("conditioner.embedders.0.model.{rest}"), v);
            }
        }
    });
    assert!(e.contains("SDXL refiner"), "{e}");
    let e = conversion_error(&file, true, |t| {
        t.remove("conditioner.embedders.1.model.text_projection");
    });
    assert!(
        e.contains("has no `conditioner.embedders.1.model.text_projection`"),
        "{e}"
    );
}

fn lora_fixture(name: &str) -> PathBuf {
    fixtures().join("lora").join(name)
}

/// The U-Net's output on the fixture inputs with the adapter file at `adapter`, relative to
/// peft's.
fn adapted_error(adapter: &Path) -> f64 {
    let (vs, mut unet) = load_unet(&model(), Device::Cpu).unwrap();
    freeze(&vs);
    let file = read_adapter(adapter, &vs).unwrap();
    let _tuned = file
        .attach(&mut unet, &vs, "imported adapters record no base")
        .unwrap();
    let e = &expected();
    let conditioning = TextConditioning {
        context: e["unet.context"].shallow_clone(),
        added: Some(AddedConditions {
            text_embeds: e["unet.text_embeds"].shallow_clone(),
            time_ids: e["unet.time_ids"].shallow_clone(),
        }),
    };
    let out = tch::no_grad(|| unet.forward(&e["unet.sample"], &e["unet.timesteps"], &conditioning));
    let reference = read_all(&lora_fixture("output.safetensors")).unwrap();
    relative_l2(&out, &reference["output"])
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (a, b) = (read_all(a).unwrap(), read_all(b).unwrap());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in &a {
        assert!(t.equal(&b[k]), "{k}");
    }
}

#[test]
fn lora_files_in_every_layout_match_peft_and_diffusers() {
    // peft's own file, and the kohya and diffusers files diffusers' load_lora_weights reads with
    // every key, giving peft's output.
    for adapter in [
        lora_fixture("peft"),
        lora_fixture("kohya.safetensors"),
        lora_fixture("diffusers/pytorch_lora_weights.safetensors"),
    ] {
        let err = adapted_error(&adapter);
        println!("{}: relative L2 error {err:.2e}", adapter.display());
        assert!(err <= 1e-5, "{}: {err:.2e}", adapter.display());
    }
    // difftune writes those files: kohya's with SDXL's LDM names.
    let (vs, unet) = load_unet(&model(), Device::Cpu).unwrap();
    let adapter = read_adapter(&lora_fixture("peft"), &vs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kohya = dir.path().join("kohya.safetensors");
    export(&adapter, AdapterFormat::Kohya, Some(&unet.config), &kohya).unwrap();
    assert_same_tensors(&kohya, &lora_fixture("kohya.safetensors"));
    let diffusers = dir.path().join("diffusers");
    export(
        &adapter,
        AdapterFormat::Diffusers,
        Some(&unet.config),
        &diffusers,
    )
    .unwrap();
    assert_same_tensors(
        &diffusers.join("pytorch_lora_weights.safetensors"),
        &lora_fixture("diffusers/pytorch_lora_weights.safetensors"),
    );
    let peft = dir.path().join("peft");
    export(&adapter, AdapterFormat::Peft, Some(&unet.config), &peft).unwrap();
    assert_same_tensors(
        &peft.join("adapter_model.safetensors"),
        &lora_fixture("peft/adapter_model.safetensors"),
    );
    assert!(adapted_error(&peft) <= 1e-5);
}

#[test]
fn kohya_files_with_diffusers_names_or_text_encoders() {
    // The diffusers-derived kohya names ComfyUI and A1111 also map, for the same layers.
    let diffusers = read_all(&lora_fixture("diffusers/pytorch_lora_weights.safetensors")).unwrap();
    let mut renamed = Vec::new();
    for (key, t) in &diffusers {
        let key = key.strip_prefix("unet.").unwrap();
        let (path, part) = key.rsplit_once(".lora_").unwrap();
        let stem = format!("lora_unet_{}", path.replace('.', "_"));
        let part = if part.starts_with('A') {
            "lora_down"
        } else {
            "lora_up"
        };
        renamed.push((format!("{stem}.{part}.weight"), t.shallow_clone()));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("comfy.safetensors");
    // Without alphas kohya's scale is 1: the diffusers file has alpha / rank folded into B.
    save_tensors(&file, &renamed, None).unwrap();
    let err = adapted_error(&file);
    assert!(err <= 1e-5, "{err:.2e}");

    renamed.push((
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".into(),
        Tensor::zeros([4, 48], (Kind::Float, Device::Cpu)),
    ));
    save_tensors(&file, &renamed, None).unwrap();
    let (vs, _unet) = load_unet(&model(), Device::Cpu).unwrap();
    let e = format!("{:#}", read_adapter(&file, &vs).unwrap_err());
    assert!(
        e.contains("the second text encoder") && e.contains("adapts only the U-Net"),
        "{e}"
    );
}

#[test]
fn half_precision_keeps_the_forced_vae_in_f32() {
    let files = model();
    let e = &expected();
    let prompts = token_prompts();
    let config = SchedulerConfig::load(&files.scheduler_config).unwrap();
    // (weights, VAE, tolerance against diffusers' f32 images)
    for (kind, vae_kind, tolerance) in [
        (Kind::Half, Kind::Float, 2e-2),
        (Kind::BFloat16, Kind::BFloat16, 0.1),
    ] {
        let mut models = SdModels::load_in(&files, Device::Cpu, kind).unwrap();
        assert_eq!(models.unet_kind(), kind);
        assert_eq!(
            models.vae.decoder.conv_in.weight.kind(),
            vae_kind,
            "{kind:?}"
        );
        let mut scheduler = schedulers::from_name("euler", &config).unwrap();
        let opts = GenerateOptions {
            steps: 4,
            guidance_scale: 5.0,
            negative_prompt: None,
            batch_size: 2,
        };
        let images = generate(
            &models,
            scheduler.as_mut(),
            &prompts[0..2],
            &e["euler_cfg.latents"],
            &opts,
            &mut || {},
        )
        .unwrap();
        let err = max_abs_diff(&images, &e["euler_cfg.images"]);
        println!("{kind:?}: max abs error {err:.2e} against diffusers in f32");
        assert!(err <= tolerance, "{kind:?}: {err}");
        // An adapter's parameters compute in the U-Net's precision: peft's output within the
        // precision's error. (The random LoRA drives activations to 3e4 in f32: sampling with it
        // overflows fp16, as it would in diffusers.)
        models
            .apply_adapter(&lora_fixture("kohya.safetensors"), &files)
            .unwrap();
        let conditioning = TextConditioning {
            context: e["unet.context"].to_kind(kind),
            added: Some(AddedConditions {
                text_embeds: e["unet.text_embeds"].to_kind(kind),
                time_ids: e["unet.time_ids"].shallow_clone(),
            }),
        };
        let sample = e["unet.sample"].to_kind(kind);
        let out = tch::no_grad(|| {
            models
                .unet
                .forward(&sample, &e["unet.timesteps"], &conditioning)
        });
        let reference = read_all(&lora_fixture("output.safetensors")).unwrap();
        let err = relative_l2(&out, &reference["output"]);
        println!("{kind:?}: adapted U-Net within {err:.2e} of peft's f32 output");
        assert!(err <= tolerance, "{kind:?}: {err}");
    }
}
