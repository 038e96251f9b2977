//! LoHa, LoKr and OFT against HF peft 0.21.2 applied to the tiny diffusers U-Net of
//! tests/fixtures/unet/sd1_conv (fixtures from tools/make_lycoris_fixtures.py): peft's adapter
//! folders load unchanged and give peft's output, adapted and merged; three AdamW steps on a fixed
//! batch from the same initial tensors give peft's trained tensors; difftune writes the adapters
//! back in peft's layout (peft's keys and tensors) and in the LyCORIS/kohya layout A1111 and
//! ComfyUI load, both of which read back to the same output.
use difftune::model::unet::{UNet2DConditionModel, UNetConfig};
use difftune::model::weights::{load_into, read_all, LoadOptions};
use difftune::peft::file::AdapterFile;
use difftune::peft::formats::read_adapter;
use difftune::peft::freeze;
use difftune::peft::lycoris::{export_kohya, export_peft};
use difftune::peft::merge::merge_adapter;
use difftune::train::optim::{AdamW, AdamWConfig};
use difftune::util::tensor::relative_l2;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

/// The LoRA parity tests' bound on the relative L2 error of the U-Net output.
const OUTPUT_TOLERANCE: f64 = 1e-4;
/// Cases with peft training references (oft_conv has peft's merged output only).
const TRAINED: [&str; 5] = ["loha", "loha_conv", "lokr", "oft", "oft_coft"];
const NOT_ADAPTER: &str = "imported adapters record no base";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("lycoris").join(case)
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

fn forward(unet: &UNet2DConditionModel) -> Tensor {
    let io = read_all(&fixtures().join("unet/sd1_conv/io.safetensors")).unwrap();
    unet.forward(&io["sample"], &io["timesteps"], &io["context"])
}

fn reference(case: &str, what: &str) -> Tensor {
    read_all(&case_dir(case).join("output.safetensors")).unwrap()[what].shallow_clone()
}

/// The relative error of the U-Net with the adapter file at `path` against peft's output.
fn adapted_error(case: &str, path: &Path) -> f64 {
    let (vs, mut unet) = base_unet();
    let _tuned = read_adapter(path, &vs)
        .unwrap()
        .attach(&mut unet, &vs, NOT_ADAPTER)
        .unwrap();
    let err = relative_l2(&tch::no_grad(|| forward(&unet)), &reference(case, "output"));
    println!("{case} ({}): relative L2 error {err:.3e}", path.display());
    err
}

#[test]
fn peft_adapters_match_peft_adapted_and_merged() {
    let (_, plain) = base_unet();
    let base = tch::no_grad(|| forward(&plain));
    for case in TRAINED.iter().chain(&["oft_conv"]) {
        let moved = relative_l2(&reference(case, "output"), &base);
        assert!(
            moved > 1e-2,
            "{case}: the adapter barely changes the output ({moved:.2e})"
        );
        assert!(
            adapted_error(case, &case_dir(case)) <= OUTPUT_TOLERANCE,
            "{case}"
        );

        let (vs, mut unet) = base_unet();
        let adapter = read_adapter(&case_dir(case), &vs).unwrap();
        merge_adapter(&mut unet, &vs, &adapter, NOT_ADAPTER).unwrap();
        let err = relative_l2(&tch::no_grad(|| forward(&unet)), &reference(case, "output"));
        println!("{case} merged: relative L2 error {err:.3e}");
        assert!(err <= OUTPUT_TOLERANCE, "{case} merged");
    }
}

/// Three AdamW steps (lr 1e-3, weight decay 1e-2, as the fixture script takes with torch's
/// AdamW) on the MSE to the fixture's target, from peft's initial tensors. Each trained tensor
/// must end within 1e-3 of its training change (relative L2) of peft's; measured up to 1.4e-4
/// (OFT), float rounding compounded over three steps.
#[test]
fn training_steps_match_peft() {
    for case in TRAINED {
        let (vs, mut unet) = base_unet();
        let tuned = read_adapter(&case_dir(case), &vs)
            .unwrap()
            .attach(&mut unet, &vs, NOT_ADAPTER)
            .unwrap();
        let params = tuned
            .trained
            .iter()
            .map(|(_, t)| t.shallow_clone())
            .collect();
        let mut optimizer = AdamW::new(params, AdamWConfig::default()).unwrap();
        let target = reference(case, "target");
        for _ in 0..3 {
            optimizer.zero_grad();
            let loss = (forward(&unet) - &target).square().mean(Kind::Float);
            loss.backward();
            optimizer.step(1e-3, None).unwrap();
        }
        let peft: BTreeMap<String, Tensor> = read_all(&case_dir(case).join("trained.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k.trim_start_matches("base_model.model.").to_string(), t))
            .collect();
        assert_eq!(peft.len(), tuned.trained.len(), "{case}");
        let initial = read_all(&case_dir(case).join("adapter_model.safetensors")).unwrap();
        let mut worst: f64 = 0.0;
        for (name, t) in &tuned.trained {
            let err = relative_l2(t, &peft[name]);
            let moved = relative_l2(&peft[name], &initial[&format!("base_model.model.{name}")]);
            assert!(moved > 1e-5, "{case}: `{name}` did not train in peft");
            if err / moved > 1e-2 {
                println!(
                    "{case}: `{name}` differs by {:.2e} of its change",
                    err / moved
                );
            }
            worst = worst.max(err / moved);
        }
        println!("{case}: trained tensors differ by at most {worst:.2e} of their training change");
        assert!(worst <= 1e-3, "{case}: {worst:.2e}");
    }
}

/// The LyCORIS/kohya layout's tensor suffixes (LyCORIS' modules; A1111's network_hada.py and
/// network_lokr.py, ComfyUI's weight_adapter/loha.py and lokr.py read the same names).
const LYCORIS_SUFFIXES: [&str; 14] = [
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "alpha",
];

#[test]
fn adapters_round_trip_through_peft_and_lycoris_files() {
    let tmp = tempfile::tempdir().unwrap();
    for case in TRAINED.iter().chain(&["oft_conv"]) {
        let (vs, _) = base_unet();
        let adapter = read_adapter(&case_dir(case), &vs).unwrap();
        let peft_dir = tmp.path().join(format!("{case}-peft"));
        export_peft(&adapter, None, &peft_dir).unwrap();
        let ours = read_all(&peft_dir.join("adapter_model.safetensors")).unwrap();
        let theirs = read_all(&case_dir(case).join("adapter_model.safetensors")).unwrap();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{case}: peft keys"
        );
        assert!(ours.iter().all(|(k, t)| t.equal(&theirs[k])), "{case}");
        let config = |dir: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        let (ours, theirs) = (config(&peft_dir), config(&case_dir(case)));
        // Every key difftune writes is one peft writes itself (its config classes take them).
        for key in ours.as_object().unwrap().keys() {
            assert!(theirs.get(key).is_some(), "{case}: peft writes no `{key}`");
        }
        for key in [
            "peft_type",
            "r",
            "alpha",
            "oft_block_size",
            "coft",
            "use_cayley_neumann",
        ] {
            assert_eq!(ours.get(key), theirs.get(key), "{case}: `{key}`");
        }
        assert!(adapted_error(case, &peft_dir) <= OUTPUT_TOLERANCE, "{case}");

        if case.starts_with("oft") {
            let err =
                export_kohya(&adapter, None, &tmp.path().join("oft.safetensors")).unwrap_err();
            assert!(
                format!("{err:#}").contains("no LyCORIS/kohya form"),
                "{err:#}"
            );
            continue;
        }
        let file = tmp.path().join(format!("{case}.safetensors"));
        export_kohya(&adapter, None, &file).unwrap();
        let keys = read_all(&file).unwrap();
        for key in keys.keys() {
            let (stem, suffix) = key.split_once('.').unwrap();
            assert!(
                stem.starts_with("lora_unet_") && !stem.contains('.'),
                "{key}"
            );
            assert!(LYCORIS_SUFFIXES.contains(&suffix), "{key}");
        }
        let stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2";
        if *case == "loha" {
            assert_eq!(keys[&format!("{stem}_to_q.hada_w1_a")].size(), [16, 4]);
            assert_eq!(keys[&format!("{stem}_to_q.alpha")].double_value(&[]), 8.0);
        }
        assert!(
            adapted_error(case, &file) <= OUTPUT_TOLERANCE,
            "{case} (LyCORIS)"
        );
        let reread = AdapterFile::load(&file);
        assert!(reread.is_err(), "a LyCORIS file has no difftune sidecar");
    }
}
