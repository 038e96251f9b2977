//! LoRA and DoRA against HF peft 0.21.2 applied to the tiny diffusers U-Net of
//! tests/fixtures/unet/sd1_conv (fixtures from tools/make_lora_fixtures.py): peft's and diffusers'
//! adapter files load unchanged and give peft's output, adapted or merged.
use difftune::model::unet::{UNet2DConditionModel, UNetConfig};
use difftune::model::weights::{load_into, read_all, LoadOptions};
use difftune::peft::formats::read_adapter;
use difftune::peft::freeze;
use difftune::peft::merge::merge_adapter;
use difftune::util::tensor::relative_l2;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn base_unet() -> (nn::VarStore, UNet2DConditionModel) {
    let dir = fixtures().join("unet/sd1_conv");
    let config = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
    load_into(
        &vs,
        &[dir.join("diffusion_pytorch_model.safetensors")],
        &LoadOptions::default(),
    )
    .unwrap();
    freeze(&vs);
    (vs, unet)
}

fn output(unet: &UNet2DConditionModel) -> Tensor {
    let io = read_all(&fixtures().join("unet/sd1_conv/io.safetensors")).unwrap();
    tch::no_grad(|| unet.forward(&io["sample"], &io["timesteps"], &io["context"]))
}

fn reference(case: &str) -> Tensor {
    read_all(
        &fixtures()
            .join("lora")
            .join(case)
            .join("output.safetensors"),
    )
    .unwrap()
    .remove("output")
    .unwrap()
}

/// Relative error of the U-Net with the adapter at `adapter` against peft's output for `case`.
fn adapted_error(case: &str, adapter: &Path) -> f64 {
    let (vs, mut unet) = base_unet();
    let file = read_adapter(adapter, &vs).unwrap();
    // Keeps the parameters the adapter file added alive while the U-Net runs.
    let _tuned = file
        .attach(&mut unet, &vs, "imported adapters record no base")
        .unwrap();
    let err = relative_l2(&output(&unet), &reference(case));
    println!(
        "{case} ({}): relative L2 error {err:.3e}",
        adapter.display()
    );
    err
}

#[test]
fn peft_adapters_match_peft() {
    for case in ["r4_alpha4", "r4_alpha8", "dora_conv"] {
        assert!(
            adapted_error(case, &fixtures().join("lora").join(case)) <= 1e-4,
            "{case}"
        );
    }
}

#[test]
fn diffusers_lora_files_match_peft() {
    // r4_alpha8's file carries alpha only in diffusers' lora_adapter_metadata header.
    for case in ["r4_alpha4", "r4_alpha8"] {
        let file = fixtures()
            .join("lora")
            .join(case)
            .join("diffusers/pytorch_lora_weights.safetensors");
        assert!(adapted_error(case, &file) <= 1e-4, "{case}");
    }
}

#[test]
fn merged_peft_dora_matches_peft() {
    let (vs, mut unet) = base_unet();
    let adapter = read_adapter(&fixtures().join("lora/dora_conv"), &vs).unwrap();
    merge_adapter(&mut unet, &vs, &adapter, "imported adapters record no base").unwrap();
    let err = relative_l2(&output(&unet), &reference("dora_conv"));
    println!("dora_conv merged: relative L2 error {err:.3e}");
    assert!(err <= 1e-4);
}
