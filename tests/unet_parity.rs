//! The U-Net against diffusers' UNet2DConditionModel (fixtures from tools/make_unet_fixtures.py).
use difftune::model::unet::{UNet2DConditionModel, UNetConfig};
use difftune::model::weights::{load_into, read_all, LoadOptions};
use difftune::util::tensor::relative_l2;
use std::path::{Path, PathBuf};
use tch::{nn, Device};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet")
        .join(case)
}

fn load_case(case: &str) -> (nn::VarStore, UNet2DConditionModel) {
    let dir = fixture(case);
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
    load_into(
        &vs,
        &[dir.join("diffusion_pytorch_model.safetensors")],
        &LoadOptions::default(),
    )
    .unwrap();
    (vs, unet)
}

fn check(case: &str) -> f64 {
    let (_vs, unet) = load_case(case);
    let io = read_all(&fixture(case).join("io.safetensors")).unwrap();
    let out = tch::no_grad(|| unet.forward(&io["sample"], &io["timesteps"], &io["context"]));
    let err = relative_l2(&out, &io["output"]);
    println!("{case}: relative L2 error {err:.3e}");
    err
}

#[test]
fn sd1_conv_projection_matches_diffusers() {
    assert!(check("sd1_conv") <= 1e-4);
}

#[test]
fn sd2_linear_projection_per_block_heads_matches_diffusers() {
    assert!(check("sd2_linear") <= 1e-4);
}

#[test]
fn sd14_config_has_the_published_parameter_count() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/configs/sd-v1-4");
    let config = UNetConfig::from_file(&dir.join("unet_config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    UNet2DConditionModel::new(vs.root(), &config).unwrap();
    let count: usize = vs.variables().values().map(|t| t.numel()).sum();
    assert_eq!(count, 859_520_964);
    assert_eq!(
        config.transformer_block_widths().iter().sum::<i64>(),
        12_480
    );
    assert_eq!(config.transformer_block_widths().len(), 16);
}

#[test]
fn unknown_block_type_is_a_clear_error() {
    let text = std::fs::read_to_string(fixture("sd1_conv").join("config.json")).unwrap();
    let text = text.replacen("\"DownBlock2D\"", "\"KDownBlock2D\"", 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, text).unwrap();
    let err = format!("{:#}", UNetConfig::from_file(&path).unwrap_err());
    assert!(
        err.contains("unknown down block type `KDownBlock2D`"),
        "{err}"
    );
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let dir = fixture("sd1_conv");
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let mut tensors: Vec<(String, tch::Tensor)> =
        read_all(&dir.join("diffusion_pytorch_model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let tmp = tempfile::tempdir().unwrap();

    let shaped: Vec<(String, tch::Tensor)> = tensors
        .iter()
        .map(|(k, v)| {
            let v = if k == "conv_in.weight" {
                v.narrow(0, 0, 8)
            } else {
                v.shallow_clone()
            };
            (k.clone(), v)
        })
        .collect();
    let path = tmp.path().join("shape.safetensors");
    difftune::model::weights::save_tensors(&path, &shaped, None).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    UNet2DConditionModel::new(vs.root(), &config).unwrap();
    let err = format!(
        "{:#}",
        load_into(&vs, &[path], &LoadOptions::default()).unwrap_err()
    );
    assert!(
        err.contains("`conv_in.weight`")
            && err.contains("[8, 4, 3, 3]")
            && err.contains("[16, 4, 3, 3]"),
        "{err}"
    );

    tensors.retain(|(k, _)| k != "mid_block.attentions.0.proj_out.bias");
    let path = tmp.path().join("missing.safetensors");
    difftune::model::weights::save_tensors(&path, &tensors, None).unwrap();
    let err = format!(
        "{:#}",
        load_into(&vs, &[path], &LoadOptions::default()).unwrap_err()
    );
    assert!(
        err.contains("`mid_block.attentions.0.proj_out.bias`"),
        "{err}"
    );

    let path = tmp.path().join("truncated.safetensors");
    let bytes = std::fs::read(dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!(
        "{:#}",
        load_into(&vs, &[path], &LoadOptions::default()).unwrap_err()
    );
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

/// Run by tools/check_unet_full.py, which writes the weights and reference output.
#[test]
#[ignore = "needs tools/check_unet_full.py's 3.4 GB scratch files"]
fn full_size_sd14_matches_diffusers() {
    let dir =
        PathBuf::from(std::env::var("DIFFTUNE_FULL_UNET_DIR").expect("DIFFTUNE_FULL_UNET_DIR"));
    let config_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/configs/sd-v1-4");
    let config = UNetConfig::from_file(&config_dir.join("unet_config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
    load_into(
        &vs,
        &[dir.join("diffusion_pytorch_model.safetensors")],
        &LoadOptions::default(),
    )
    .unwrap();
    let io = read_all(&dir.join("io.safetensors")).unwrap();
    let forward = || tch::no_grad(|| unet.forward(&io["sample"], &io["timesteps"], &io["context"]));
    let _ = forward();
    let mut times: Vec<f64> = (0..3)
        .map(|_| {
            let start = std::time::Instant::now();
            let _ = forward();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let err = relative_l2(&forward(), &io["output"]);
    println!(
        "difftune forward (CPU, {} threads): median {:.3} s",
        tch::get_num_threads(),
        times[1]
    );
    println!("full-size SD v1.4 U-Net: relative L2 error {err:.3e}");
    assert!(err <= 1e-4);
}
