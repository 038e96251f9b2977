//! Single-file (LDM layout) checkpoints in and out, the restricted torch-pickle reader and the
//! shipped CLIP vocabulary. Fixtures: tools/make_single_file_fixtures.py.
#[path = "common/manifest.rs"]
mod common;

use common::{fixture_manifest, manifest};
use difftune::model::clip_vocab::{write_tokenizer_folder, Padding};
use difftune::model::pipeline::{load_text_encoder, load_unet, load_vae};
use difftune::model::source::ModelFiles;
use difftune::model::tokenizer::ClipTokenizer;
use difftune::model::{ldm, torch_file, weights};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

const FIXTURES: &str = "tests/fixtures/single_file";
const MODEL: &str = "tests/fixtures/pipeline/model";

/// One cache folder for every test of this binary (the cache location is process-wide).
fn cache() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var("DIFFTUNE_CACHE", dir.path());
        dir
    })
    .path()
}

fn difftune(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args(args)
        .env("DIFFTUNE_CACHE", cache())
        .output()
        .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// `difftune convert` of the tiny folder into `dir/NAME`, at `precision`.
fn convert(dir: &Path, name: &str, precision: &str) -> PathBuf {
    let out = dir.join(name);
    let o = difftune(&[
        "convert",
        "--model",
        MODEL,
        "--out",
        out.to_str().unwrap(),
        "--precision",
        precision,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn convert_writes_the_file_diffusers_reads_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for (precision, which) in [("keep", "fp32"), ("fp16", "fp16")] {
        let file = convert(dir.path(), &format!("{which}.safetensors"), precision);
        let fixture = Path::new(FIXTURES).join("tiny_ldm_manifest.json");
        assert_eq!(
            manifest(&file),
            fixture_manifest(&fixture, which),
            "{which}"
        );
    }
}

/// Outputs of the U-Net, VAE decoder and text encoder of `spec` and of the folder.
fn component_errors(spec: &str) -> [f64; 3] {
    cache();
    let (a, b) = (
        ModelFiles::resolve(MODEL, None).unwrap(),
        ModelFiles::resolve(spec, None).unwrap(),
    );
    tch::manual_seed(0);
    let latents = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let context = Tensor::randn([1, 77, 32], (Kind::Float, Device::Cpu));
    let ids = Tensor::from_slice(&[0i64, 5, 9, 300, 301, 2]).view([1, 6]);
    let unet = |f: &ModelFiles| {
        load_unet(f, Device::Cpu)
            .unwrap()
            .1
            .forward(&latents, &Tensor::from(10.0), &context)
    };
    let vae = |f: &ModelFiles| load_vae(f, Device::Cpu).unwrap().decode(&latents);
    let text = |f: &ModelFiles| load_text_encoder(f, Device::Cpu).unwrap().forward(&ids);
    tch::no_grad(|| {
        [
            max_abs(&unet(&a), &unet(&b)),
            max_abs(&vae(&a), &vae(&b)),
            max_abs(&text(&a), &text(&b)),
        ]
    })
}

#[test]
fn a_single_file_loads_as_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let fp32 = convert(dir.path(), "tiny.safetensors", "keep");
    let errors = component_errors(&format!("{}#config={MODEL}", fp32.display()));
    eprintln!("fp32 single file vs folder (unet, vae, text): {errors:?}");
    assert!(errors.iter().all(|&e| e <= 1e-6), "{errors:?}");
    let fp16 = convert(dir.path(), "tiny16.safetensors", "fp16");
    let errors = component_errors(&format!("{}#config={MODEL}", fp16.display()));
    eprintln!("fp16 single file vs folder (unet, vae, text): {errors:?}");
    assert!(errors.iter().all(|&e| e <= 1e-2), "{errors:?}");
}

/// Writes `file`'s tensors, edited by `edit`, to `dir/name`.
fn variant(
    file: &Path,
    dir: &Path,
    name: &str,
    edit: impl FnOnce(&mut BTreeMap<String, Tensor>),
) -> String {
    let mut tensors = weights::read_all(file).unwrap();
    edit(&mut tensors);
    let out = dir.join(name);
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    weights::save_tensors(&out, &list, None).unwrap();
    format!("{}#config={MODEL}", out.display())
}

fn unet_tensor(spec: &str, name: &str) -> Tensor {
    let files = ModelFiles::resolve(spec, None).unwrap();
    let (vs, _) = load_unet(&files, Device::Cpu).unwrap();
    vs.variables()[name].shallow_clone()
}

#[test]
fn ema_weights_and_older_clip_names() {
    cache();
    let dir = tempfile::tempdir().unwrap();
    let file = convert(dir.path(), "tiny.safetensors", "keep");
    let spec = variant(&file, dir.path(), "ema.safetensors", |t| {
        let unet: Vec<(String, Tensor)> = t
            .iter()
            .filter(|(k, _)| k.starts_with(ldm::UNET_PREFIX))
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        for (k, v) in unet {
            // EMA copies are named like the U-Net's tensors without dots.
            let ema = format!("model_ema.{}", k["model.".len()..].replace('.', ""));
            t.insert(ema, &v * 2.0);
        }
        t.insert("model_ema.num_updates".into(), Tensor::from(5i64));
        // The older CLIP layout, without `text_model.`.
        let clip: Vec<String> = t
            .keys()
            .filter(|k| k.starts_with(ldm::CLIP_PREFIX))
            .cloned()
            .collect();
        for k in clip {
            let v = t.remove(&k).unwrap();
            t.insert(k.replace("transformer.text_model.", "transformer."), v);
        }
    });
    let name = "conv_in.weight";
    let plain = unet_tensor(&spec, name);
    let ema = unet_tensor(&format!("{spec},ema"), name);
    assert_eq!(max_abs(&(plain * 2.0), &ema), 0.0);
    let errors = component_errors(&spec);
    assert!(errors.iter().all(|&e| e == 0.0), "{errors:?}");
}

fn load_error(spec: &str) -> String {
    cache();
    format!("{:#}", ModelFiles::resolve(spec, None).unwrap_err())
}

#[test]
fn bad_single_files_say_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let file = convert(dir.path(), "tiny.safetensors", "keep");
    let conv_in = format!("{}input_blocks.0.0.weight", ldm::UNET_PREFIX);
    let spec = variant(&file, dir.path(), "inpaint.safetensors", |t| {
        t.insert(
            conv_in.clone(),
            Tensor::zeros([32, 9, 3, 3], (Kind::Float, Device::Cpu)),
        );
    });
    let e = load_error(&spec);
    assert!(
        e.contains("inpainting") && e.contains("[32, 9, 3, 3]"),
        "{e}"
    );
    let spec = variant(&file, dir.path(), "sdxl.safetensors", |t| {
        t.insert(
            "conditioner.embedders.0.x".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        );
    });
    assert!(load_error(&spec).contains("SDXL"));
    let spec = variant(&file, dir.path(), "missing.safetensors", |t| {
        t.remove(&format!("{}out.2.bias", ldm::UNET_PREFIX));
    });
    let e = format!(
        "{:#}",
        load_unet(&ModelFiles::resolve(&spec, None).unwrap(), Device::Cpu).unwrap_err()
    );
    assert!(e.contains("missing") && e.contains("conv_out.bias"), "{e}");
    let spec = variant(&file, dir.path(), "shape.safetensors", |t| {
        t.insert(
            format!("{}out.2.bias", ldm::UNET_PREFIX),
            Tensor::zeros([5], (Kind::Float, Device::Cpu)),
        );
    });
    let e = format!(
        "{:#}",
        load_unet(&ModelFiles::resolve(&spec, None).unwrap(), Device::Cpu).unwrap_err()
    );
    assert!(
        e.contains("conv_out.bias") && e.contains("[5]") && e.contains("[4]"),
        "{e}"
    );
    // Without configs, the tiny model's 32-wide cross-attention is neither SD v1.x nor v2.x.
    let e = load_error(file.to_str().unwrap());
    assert!(
        e.contains("not SD v1.x") && e.contains("has shape [8, 32]"),
        "{e}"
    );
    let e = load_error(&format!("{}#bogus", file.display()));
    assert!(e.contains("unknown single-file option `bogus`"), "{e}");
}

#[test]
fn torch_files_are_read_without_running_them() {
    let expected =
        weights::read_all(Path::new(&format!("{FIXTURES}/torch_expected.safetensors"))).unwrap();
    for name in ["torch_zip.ckpt", "torch_legacy.ckpt"] {
        let path = PathBuf::from(format!("{FIXTURES}/{name}"));
        let got = torch_file::read_state_dict(&path).unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (k, v) in &expected {
            assert_eq!(got[k].kind(), v.kind(), "{name} {k}");
            assert_eq!(got[k].size(), v.size(), "{name} {k}");
            assert!(got[k].equal(v), "{name} {k}");
        }
        let value = torch_file::load(&path).unwrap();
        assert!(matches!(
            value.get("global_step"),
            Some(torch_file::Value::Int(110000))
        ));
    }
    let marker = Path::new("difftune-pickle-was-executed");
    let _ = std::fs::remove_file(marker);
    let e = format!(
        "{:#}",
        torch_file::read_state_dict(Path::new(&format!("{FIXTURES}/malicious.ckpt"))).unwrap_err()
    );
    assert!(e.contains("posix.system") && e.contains("refusing"), "{e}");
    assert!(!marker.exists());
}

#[test]
fn the_shipped_vocabulary_tokenizes_as_transformers() {
    let dir = tempfile::tempdir().unwrap();
    write_tokenizer_folder(dir.path(), Padding::EndOfText).unwrap();
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49408);
    let text = std::fs::read_to_string(format!("{FIXTURES}/clip_vocab_ids.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (prompt, ids) in json["ids"].as_object().unwrap() {
        let expected: Vec<i64> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_i64().unwrap())
            .collect();
        assert_eq!(tokenizer.encode(prompt).unwrap(), expected, "{prompt:?}");
    }
}

#[test]
fn open_clip_names_round_trip() {
    let t = |n: i64| Tensor::arange(n, (Kind::Float, Device::Cpu));
    let mut ours = BTreeMap::new();
    for p in ["q", "k", "v"] {
        ours.insert(
            format!("text_model.encoder.layers.0.self_attn.{p}_proj.weight"),
            t(4).view([2, 2]) + 1.0,
        );
        ours.insert(
            format!("text_model.encoder.layers.0.self_attn.{p}_proj.bias"),
            t(2),
        );
    }
    for n in [
        "layer_norm1",
        "layer_norm2",
        "self_attn.out_proj",
        "mlp.fc1",
        "mlp.fc2",
    ] {
        ours.insert(format!("text_model.encoder.layers.0.{n}.weight"), t(2));
    }
    ours.insert("text_model.final_layer_norm.bias".into(), t(2));
    ours.insert("text_model.embeddings.token_embedding.weight".into(), t(2));
    ours.insert(
        "text_model.embeddings.position_embedding.weight".into(),
        t(2),
    );
    let open_clip = ldm::diffusers_to_open_clip(&ours).unwrap();
    assert_eq!(
        open_clip["transformer.resblocks.0.attn.in_proj_weight"].size(),
        [6, 2]
    );
    let back = ldm::open_clip_to_diffusers(open_clip, 1).unwrap();
    assert_eq!(
        back.keys().collect::<Vec<_>>(),
        ours.keys().collect::<Vec<_>>()
    );
    for (k, v) in &ours {
        assert!(back[k].equal(v), "{k}");
    }
}

#[test]
fn merge_writes_a_single_file_that_computes_what_the_adapter_computes() {
    use difftune::peft::{file::save_adapter, freeze, InitSeed, MethodSettings};
    cache();
    let dir = tempfile::tempdir().unwrap();
    let files = ModelFiles::resolve(MODEL, None).unwrap();
    tch::manual_seed(0);
    let latents = Tensor::randn([1, 4, 8, 8], (Kind::Float, Device::Cpu));
    let context = Tensor::randn([1, 77, 32], (Kind::Float, Device::Cpu));
    let forward = |unet: &difftune::model::unet::UNet2DConditionModel| {
        tch::no_grad(|| unet.forward(&latents, &Tensor::from(10.0), &context))
    };

    // A LoRA moved off its initial value, as training would, saved as an adapter file.
    let (vs, mut unet) = load_unet(&files, Device::Cpu).unwrap();
    freeze(&vs);
    let lora = MethodSettings::parse("lora", "alpha = 8").unwrap().build();
    let params = tch::nn::VarStore::new(Device::Cpu);
    let trained = lora
        .apply(&mut unet, &vs, params.root(), &InitSeed::new(0, "test"))
        .unwrap();
    tch::no_grad(|| {
        for (_, t) in &trained {
            let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.05));
        }
    });
    let expected = forward(&unet);
    let adapter = dir.path().join("lora.safetensors");
    save_adapter(
        &adapter,
        lora.as_ref(),
        &trained,
        &files.unet_identity().unwrap(),
    )
    .unwrap();

    let merged = dir.path().join("merged.safetensors");
    let o = difftune(&[
        "merge",
        "--model",
        MODEL,
        "--adapter",
        adapter.to_str().unwrap(),
        "--format",
        "single-file",
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let spec = format!("{}#config={MODEL}", merged.display());
    let (_, merged_unet) =
        load_unet(&ModelFiles::resolve(&spec, None).unwrap(), Device::Cpu).unwrap();
    let err = difftune::util::tensor::relative_l2(&forward(&merged_unet), &expected);
    eprintln!("merged single file vs adapter: relative L2 error {err:.2e}");
    assert!(err <= 1e-5, "{err:.2e}");
    // The VAE and text encoder are the base's, untouched.
    let [_, vae, text] = component_errors(&spec);
    assert_eq!((vae, text), (0.0, 0.0));
}
