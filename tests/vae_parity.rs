//! AutoencoderKL against diffusers 0.42.1: a tiny random-weight VAE built by
//! tools/make_vae_fixtures.py must encode and decode as diffusers does (relative L2 error
//! <= 1e-4, f32 on CPU). `sd-v1-4_config.json` is SD v1.4's `vae/config.json`, copied verbatim.
use anyhow::Result;
use difftune::model::vae::{legacy_attention_key, load_vae_weights, AutoencoderKL, VaeConfig};
use difftune::model::weights::{read_all, read_metadata, save_tensors};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use tch::{nn, Device, Tensor};

const TOLERANCE: f64 = 1e-4;

/// Building a model draws its initial weights from torch's global RNG, so tests that build models
/// and the test that replays diffusers' seeded sampling must not interleave.
static GLOBAL_RNG: Mutex<()> = Mutex::new(());

fn lock_rng() -> MutexGuard<'static, ()> {
    GLOBAL_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/vae")
        .join(name)
}

fn build(config: &VaeConfig) -> Result<(nn::VarStore, AutoencoderKL)> {
    let _rng = lock_rng();
    let vs = nn::VarStore::new(Device::Cpu);
    let vae = AutoencoderKL::new(vs.root(), config)?;
    Ok((vs, vae))
}

fn load_fixture_vae(weights: &Path) -> Result<AutoencoderKL> {
    let (vs, vae) = build(&VaeConfig::from_file(&fixture("config.json"))?)?;
    load_vae_weights(&vs, &[weights.to_path_buf()])?;
    Ok(vae)
}

fn io_tensor(name: &str) -> Tensor {
    let mut io = read_all(&fixture("io.safetensors")).expect("reading io fixture");
    io.remove(name)
        .unwrap_or_else(|| panic!("`{name}` missing from io.safetensors"))
}

fn rel_l2(actual: &Tensor, expected: &Tensor) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shape mismatch");
    let diff = (actual - expected).norm().double_value(&[]);
    diff / expected.norm().double_value(&[])
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) {
    let err = rel_l2(actual, expected);
    println!("{what}: relative L2 error {err:.3e}");
    assert!(
        err <= TOLERANCE,
        "{what}: relative L2 error {err:.3e} > {TOLERANCE:e}"
    );
}

#[test]
fn encode_matches_diffusers() -> Result<()> {
    let vae = load_fixture_vae(&fixture("weights.safetensors"))?;
    let images = io_tensor("images");
    let posterior = tch::no_grad(|| vae.encode(&images));
    assert_close("encode mean", &posterior.mean, &io_tensor("mean"));
    assert_close("encode logvar", &posterior.logvar, &io_tensor("logvar"));
    assert!(posterior.mode().equal(&posterior.mean));
    let scaled = tch::no_grad(|| vae.encode_scaled_mean(&images));
    assert_close(
        "encode_scaled_mean",
        &scaled,
        &(io_tensor("mean") * 0.18215),
    );
    Ok(())
}

#[test]
fn sample_replays_diffusers_with_the_same_seed() -> Result<()> {
    let vae = load_fixture_vae(&fixture("weights.safetensors"))?;
    let posterior = tch::no_grad(|| vae.encode(&io_tensor("images")));
    let seed = read_seed()?;
    let sample = {
        let _rng = lock_rng();
        tch::manual_seed(seed);
        posterior.sample()
    };
    assert_close("posterior sample", &sample, &io_tensor("sample"));
    Ok(())
}

fn read_seed() -> Result<i64> {
    let meta = read_metadata(&fixture("io.safetensors"))?;
    Ok(meta
        .get("sample_seed")
        .expect("io.safetensors names its sample_seed")
        .parse()?)
}

#[test]
fn decode_matches_diffusers() -> Result<()> {
    let vae = load_fixture_vae(&fixture("weights.safetensors"))?;
    let latents = io_tensor("latents");
    let expected = io_tensor("decoded");
    assert_close("decode", &tch::no_grad(|| vae.decode(&latents)), &expected);
    let scaled = tch::no_grad(|| vae.decode_scaled(&(&latents * 0.18215)));
    assert_close("decode_scaled", &scaled, &expected);
    Ok(())
}

#[test]
fn legacy_attention_names_load() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let legacy: Vec<(String, Tensor)> = read_all(&fixture("weights.safetensors"))?
        .into_iter()
        .map(|(name, t)| {
            let old = name
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (old, t)
        })
        .collect();
    assert!(legacy
        .iter()
        .any(|(n, _)| n == "encoder.mid_block.attentions.0.proj_attn.weight"));
    assert_eq!(
        legacy_attention_key("decoder.mid_block.attentions.0.key.bias"),
        "decoder.mid_block.attentions.0.to_k.bias"
    );
    let path = dir.path().join("legacy.safetensors");
    save_tensors(&path, &legacy, None)?;
    let vae = load_fixture_vae(&path)?;
    let decoded = tch::no_grad(|| vae.decode(&io_tensor("latents")));
    assert_close("decode (legacy names)", &decoded, &io_tensor("decoded"));
    Ok(())
}

#[test]
fn sd_v1_4_has_the_published_parameter_count() -> Result<()> {
    let config = VaeConfig::from_file(&fixture("sd-v1-4_config.json"))?;
    let (vs, vae) = build(&config)?;
    let params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    assert_eq!(params, 83_653_863);
    assert_eq!(vae.config.scaling_factor, 0.18215);
    assert_eq!(vae.decoder.up_blocks.len(), 4);
    assert!(vae.decoder.up_blocks.iter().all(|b| b.resnets.len() == 3));
    Ok(())
}

#[test]
fn truncated_weights_name_the_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let bytes = std::fs::read(fixture("weights.safetensors"))?;
    let path = dir.path().join("truncated.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() / 2])?;
    let err = load_fixture_vae(&path).expect_err("a truncated file must not load");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name the file: {msg}"
    );
    Ok(())
}

#[test]
fn wrong_shape_names_the_key_and_both_shapes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut tensors = read_all(&fixture("weights.safetensors"))?;
    let key = "decoder.conv_in.weight";
    tensors.insert(
        key.to_string(),
        Tensor::zeros([32, 4, 1, 1], (tch::Kind::Float, Device::Cpu)),
    );
    let path = dir.path().join("wrong_shape.safetensors");
    save_tensors(&path, &tensors.into_iter().collect::<Vec<_>>(), None)?;
    let err = load_fixture_vae(&path).expect_err("a wrong-shaped tensor must not load");
    let msg = format!("{err:#}");
    for part in [
        key,
        "[32, 4, 1, 1]",
        "[32, 4, 3, 3]",
        &path.display().to_string(),
    ] {
        assert!(msg.contains(part), "error does not mention `{part}`: {msg}");
    }
    Ok(())
}

#[test]
fn unsupported_configs_are_refused() -> Result<()> {
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("config.json"))?)?;
    let cases = [
        (
            "down_block_types",
            serde_json::json!([
                "DownEncoderBlock2D",
                "AttnDownEncoderBlock2D",
                "DownEncoderBlock2D"
            ]),
            "AttnDownEncoderBlock2D",
        ),
        (
            "up_block_types",
            serde_json::json!(["UpDecoderBlock2D"]),
            "must have the same",
        ),
        ("act_fn", serde_json::json!("gelu"), "act_fn `gelu`"),
        ("shift_factor", serde_json::json!(0.0609), "shift_factor"),
        (
            "norm_num_groups",
            serde_json::json!(12),
            "norm_num_groups 12",
        ),
    ];
    for (field, value, expected) in cases {
        let mut config = base.clone();
        config[field] = value;
        let config: VaeConfig = serde_json::from_value(config)?;
        let err = build(&config).expect_err(&format!("{field} must be refused"));
        let msg = format!("{err:#}");
        assert!(
            msg.contains(expected),
            "{field}: error `{msg}` does not mention `{expected}`"
        );
    }
    Ok(())
}
