//! The CLIP text encoder and tokenizer against transformers' CLIPTextModel and CLIPTokenizer
//! (fixtures from tools/make_clip_fixtures.py).
use difftune::model::clip::{ClipTextConfig, ClipTextModel};
use difftune::model::tokenizer::ClipTokenizer;
use difftune::model::visit::VisitModules;
use difftune::model::weights::{read_all, save_tensors};
use difftune::util::tensor::relative_l2;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip")
}

#[derive(Deserialize)]
struct Variant {
    name: String,
    /// Config files written next to the fixture vocab; `None`: the committed SD v1.4-style folder.
    files: Option<BTreeMap<String, serde_json::Value>>,
    prompts: Vec<String>,
    input_ids: Vec<Vec<i64>>,
    decoded: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct TokenizerExpectations {
    variants: Vec<Variant>,
}

fn expectations() -> TokenizerExpectations {
    let text = std::fs::read_to_string(fixtures().join("tokenizer_expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The variant's tokenizer folder: the committed one, or a temp copy of its vocab with the
/// variant's config files.
fn variant_dir(variant: &Variant, tmp: &Path) -> PathBuf {
    let committed = fixtures().join("tokenizer");
    let Some(files) = &variant.files else {
        return committed;
    };
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(committed.join(name), tmp.join(name)).unwrap();
    }
    for (name, content) in files {
        std::fs::write(tmp.join(name), serde_json::to_string(content).unwrap()).unwrap();
    }
    tmp.to_path_buf()
}

#[test]
fn tokenizer_ids_equal_transformers() {
    let expected = expectations();
    assert_eq!(expected.variants.len(), 3);
    let mut compared = 0;
    for variant in &expected.variants {
        let tmp = tempfile::tempdir().unwrap();
        let tokenizer = ClipTokenizer::from_dir(&variant_dir(variant, tmp.path())).unwrap();
        let batch = tokenizer.encode_batch(&variant.prompts).unwrap();
        for ((prompt, want), got) in variant.prompts.iter().zip(&variant.input_ids).zip(&batch) {
            assert_eq!(got, want, "variant {}, prompt {prompt:?}", variant.name);
            assert_eq!(&tokenizer.encode(prompt).unwrap(), want);
            compared += 1;
        }
    }
    println!("{compared} prompts tokenized identically");
}

#[test]
fn tokenizer_decodes_like_transformers() {
    let expected = expectations();
    let sd1 = &expected.variants[0];
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    for (ids, want) in sd1.input_ids.iter().zip(sd1.decoded.as_ref().unwrap()) {
        assert_eq!(&tokenizer.decode(ids).unwrap(), want);
    }
}

#[test]
fn tokenizer_reads_sd_special_tokens_and_length() {
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    assert_eq!(tokenizer.max_length(), 77);
    assert_eq!(tokenizer.vocab_size(), 834);
    assert_eq!((tokenizer.bos_id(), tokenizer.eos_id()), (832, 833));
    assert_eq!(
        tokenizer.pad_id(),
        tokenizer.eos_id(),
        "SD v1.4 pads with <|endoftext|>"
    );
    let ids = tokenizer
        .input_ids(&["a photo", "a long photo of a cat"])
        .unwrap();
    assert_eq!(ids.size(), [2, 77]);
    assert_eq!(ids.kind(), Kind::Int64);
}

#[test]
fn tokenizer_folder_problems_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixtures().join("tokenizer/vocab.json"),
        tmp.path().join("vocab.json"),
    )
    .unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(tmp.path()).err().unwrap());
    assert!(err.contains("merges.txt"), "{err}");

    std::fs::copy(
        fixtures().join("tokenizer/merges.txt"),
        tmp.path().join("merges.txt"),
    )
    .unwrap();
    std::fs::write(
        tmp.path().join("special_tokens_map.json"),
        r#"{"pad_token": "<pad>"}"#,
    )
    .unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(tmp.path()).err().unwrap());
    assert!(err.contains("`<pad>` is not in"), "{err}");

    std::fs::write(
        tmp.path().join("special_tokens_map.json"),
        "{\"pad_token\": ",
    )
    .unwrap();
    let err = format!("{:#}", ClipTokenizer::from_dir(tmp.path()).err().unwrap());
    assert!(err.contains("special_tokens_map.json"), "{err}");
}

fn load_model(case: &str, weights: &Path) -> anyhow::Result<(nn::VarStore, ClipTextModel)> {
    let config = ClipTextConfig::from_file(&fixtures().join(case).join("config.json"))?;
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ClipTextModel::new(vs.root(), &config)?;
    ClipTextModel::load_weights(&vs, &[weights.to_path_buf()])?;
    Ok((vs, model))
}

/// Returns the relative L2 errors of last_hidden_state, the penultimate hidden state and the
/// clip-skip-1 embedding.
fn parity(case: &str) -> [f64; 3] {
    let dir = fixtures().join(case);
    let (_vs, model) = load_model(case, &dir.join("model.safetensors")).unwrap();
    let io = read_all(&dir.join("expected.safetensors")).unwrap();
    let ids = &io["input_ids"];
    let layers = model.layers.len();
    let errors = tch::no_grad(|| {
        [
            relative_l2(&model.forward(ids), &io["last_hidden_state"]),
            relative_l2(
                &model.hidden_states_after(ids, layers - 1).unwrap(),
                &io["penultimate_hidden_state"],
            ),
            relative_l2(
                &model.forward_clip_skip(ids, 1).unwrap(),
                &io["clip_skip_1"],
            ),
        ]
    });
    println!(
        "{case}: relative L2 errors last {:.2e}, penultimate {:.2e}, clip_skip=1 {:.2e}",
        errors[0], errors[1], errors[2]
    );
    errors
}

#[test]
fn quick_gelu_text_model_matches_transformers() {
    assert!(parity("text_quick_gelu").iter().all(|&e| e <= 1e-4));
}

#[test]
fn gelu_text_model_matches_transformers() {
    assert!(parity("text_gelu").iter().all(|&e| e <= 1e-4));
}

#[test]
fn prompts_to_embeddings_end_to_end() {
    let expected = expectations();
    let sd1 = &expected.variants[0];
    // The fixture batch: prompts 0, 8 (CJK), 10 (emoji) and the last (truncated).
    let prompts: Vec<&str> = [0, 8, 10, sd1.prompts.len() - 1]
        .iter()
        .map(|&i| sd1.prompts[i].as_str())
        .collect();
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tokenizer")).unwrap();
    let ids = tokenizer.input_ids(&prompts).unwrap();
    let dir = fixtures().join("text_quick_gelu");
    let io = read_all(&dir.join("expected.safetensors")).unwrap();
    assert!(ids.equal(&io["input_ids"]));
    let (_vs, model) = load_model("text_quick_gelu", &dir.join("model.safetensors")).unwrap();
    let out = tch::no_grad(|| model.forward(&ids));
    assert!(relative_l2(&out, &io["last_hidden_state"]) <= 1e-4);
}

#[test]
fn clip_skip_beyond_the_layers_is_an_error() {
    let dir = fixtures().join("text_gelu");
    let (_vs, model) = load_model("text_gelu", &dir.join("model.safetensors")).unwrap();
    let ids = Tensor::zeros([1, 77], (Kind::Int64, Device::Cpu));
    assert!(model.forward_clip_skip(&ids, 3).is_ok());
    let err = model.forward_clip_skip(&ids, 4).unwrap_err().to_string();
    assert!(err.contains("clip_skip 4"), "{err}");
    let err = model
        .hidden_states_after(&Tensor::zeros([1, 78], (Kind::Int64, Device::Cpu)), 1)
        .unwrap_err();
    assert!(err.to_string().contains("78 tokens"), "{err}");
}

fn save_variant(tmp: &Path, name: &str, edit: impl Fn(&str, &Tensor) -> Option<Tensor>) -> PathBuf {
    let tensors = read_all(&fixtures().join("text_gelu/model.safetensors")).unwrap();
    let edited: Vec<(String, Tensor)> = tensors
        .iter()
        .filter_map(|(k, v)| edit(k, v).map(|v| (k.clone(), v)))
        .collect();
    let path = tmp.join(name);
    save_tensors(&path, &edited, None).unwrap();
    path
}

#[test]
fn missing_misshaped_and_unknown_tensors_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let key = "text_model.encoder.layers.1.mlp.fc1.bias";

    let missing = save_variant(tmp.path(), "missing.safetensors", |k, v| {
        (k != key).then(|| v.shallow_clone())
    });
    let err = format!("{:#}", load_model("text_gelu", &missing).err().unwrap());
    assert!(err.contains(key) && err.contains("missing"), "{err}");

    let misshaped = save_variant(tmp.path(), "shape.safetensors", |k, v| {
        Some(if k == key {
            v.narrow(0, 0, 5)
        } else {
            v.shallow_clone()
        })
    });
    let err = format!("{:#}", load_model("text_gelu", &misshaped).err().unwrap());
    assert!(
        err.contains(key) && err.contains("[5]") && err.contains("[37]"),
        "{err}"
    );

    // The legacy position_ids buffer is tolerated (the fixture has it); anything else unknown is not.
    let mut tensors: Vec<(String, Tensor)> =
        read_all(&fixtures().join("text_gelu/model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    tensors.push((
        "text_projection.weight".into(),
        Tensor::zeros([4, 32], (Kind::Float, Device::Cpu)),
    ));
    let unknown = tmp.path().join("unknown.safetensors");
    save_tensors(&unknown, &tensors, None).unwrap();
    let err = format!("{:#}", load_model("text_gelu", &unknown).err().unwrap());
    assert!(err.contains("`text_projection.weight`"), "{err}");
}

#[test]
fn tuning_methods_see_every_projection() {
    let dir = fixtures().join("text_gelu");
    let (_vs, mut model) = load_model("text_gelu", &dir.join("model.safetensors")).unwrap();
    let mut paths = Vec::new();
    model.visit_modules(&mut |m| paths.push(m.path().to_string()));
    assert_eq!(paths.len(), 6 * 3);
    assert_eq!(paths[0], "text_model.encoder.layers.0.self_attn.q_proj");
    assert_eq!(paths[17], "text_model.encoder.layers.2.mlp.fc2");
}

#[test]
fn unknown_activation_is_a_clear_error() {
    let text = std::fs::read_to_string(fixtures().join("text_gelu/config.json")).unwrap();
    let text = text.replacen("\"gelu\"", "\"gelu_pytorch_tanh\"", 1);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.json");
    std::fs::write(&path, text).unwrap();
    let err = format!("{:#}", ClipTextConfig::from_file(&path).unwrap_err());
    assert!(
        err.contains("unsupported hidden_act `gelu_pytorch_tanh`"),
        "{err}"
    );
}

/// SD v1.4's text encoder (tests/fixtures/clip/sd-v1-4_text_encoder_config.json is
/// CompVis/stable-diffusion-v1-4's text_encoder/config.json, verbatim) has 123,060,480 parameters.
#[test]
fn sd14_text_encoder_has_the_published_parameter_count() {
    let config =
        ClipTextConfig::from_file(&fixtures().join("sd-v1-4_text_encoder_config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ClipTextModel::new(vs.root(), &config).unwrap();
    let count: usize = vs.variables().values().map(|t| t.numel()).sum();
    assert_eq!(count, 123_060_480);
    assert_eq!(model.layers.len(), 12);
    assert!(vs
        .variables()
        .contains_key("text_model.encoder.layers.11.self_attn.out_proj.bias"));
}
