//! The tuning methods: parameter counts on SD v1.4, the invariants every method must keep on a tiny
//! U-Net (output unchanged at init, gradients only where trained, frozen weights untouched),
//! settings, adapter files, LoRA formats and merging.
use difftune::error::SettingsError;
use difftune::model::unet::{UNet2DConditionModel, UNetConfig};
use difftune::model::weights::{load_into, read_all, LoadOptions};
use difftune::peft::export::{check_exports, export, AdapterFormat};
use difftune::peft::file::{random_init_identity, save_adapter, AdapterFile};
use difftune::peft::formats::{load_adapter, read_adapter};
use difftune::peft::merge::{merge_adapter, save_unet};
use difftune::peft::InitSeed;
use difftune::peft::{
    freeze, has_extensions, trainable_parameter_count, MethodSettings, TuningMethod, METHODS,
};
use difftune::settings::parse_set_pairs;
use difftune::util::tensor::relative_l2;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

fn unet_fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet/sd1_conv")
}

/// The tiny SD 1.x-layout U-Net of the U-Net parity fixtures, with its inputs.
struct Tiny {
    vs: nn::VarStore,
    unet: UNet2DConditionModel,
    identity: String,
    io: BTreeMap<String, Tensor>,
}

impl Tiny {
    fn new() -> Self {
        let dir = unet_fixture();
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
        let identity = random_init_identity(&config);
        Self {
            vs,
            unet,
            identity,
            io: read_all(&dir.join("io.safetensors")).unwrap(),
        }
    }

    fn forward(&self) -> Tensor {
        self.unet.forward(
            &self.io["sample"],
            &self.io["timesteps"],
            &self.io["context"],
        )
    }

    fn output(&self) -> Tensor {
        tch::no_grad(|| self.forward())
    }

    /// Applies `m` to the U-Net, its tensors in `params`, initialised from seed 0.
    fn apply(
        &mut self,
        m: &dyn TuningMethod,
        params: &nn::VarStore,
    ) -> anyhow::Result<Vec<(String, Tensor)>> {
        m.apply(
            &mut self.unet,
            &self.vs,
            params.root(),
            &InitSeed::new(0, "test"),
        )
    }
}

fn method(name: &str, settings: &str) -> Box<dyn TuningMethod> {
    MethodSettings::parse(name, settings).unwrap().build()
}

/// Moves every trained tensor off its initial value, as training would.
fn perturb(trained: &[(String, Tensor)]) {
    tch::manual_seed(7);
    tch::no_grad(|| {
        for (_, t) in trained {
            let _ = t.shallow_clone().g_add_(&(t.randn_like() * 0.05));
        }
    });
}

/// Settings other than the defaults that every invariant must hold for too.
const VARIANTS: [(&str, &str); 10] = [
    ("lora", "dora = true\nalpha = 8\ntargets = ['*.attn2.to_q', '*.resnets.*.conv1', '*.proj_in']\nrank_pattern = { '*.conv1' = 2 }"),
    ("prefix", "reparam_hidden = 8"),
    ("adapter", "input = 'attn2_out'\noutput = 'ff_in'\nactivation = 'relu'"),
    ("bitfit", "scope = 'all'"),
    ("loha", LOHA_CONV),
    ("lokr", LOKR_CONV),
    ("oft", OFT_CONSTRAINED),
    ("oft", "block_share = true\nblocks = { size = 4 }\nneumann_terms = 3"),
    ("difffit", "scales = 'transformer_blocks'"),
    ("svdiff", "targets = ['*.attn1.*', 'conv_in']"),
];

/// LoHa on linear, 3x3 (Tucker form) and 1x1 layers with per-layer ranks.
const LOHA_CONV: &str = "rank = 2\nalpha = 4\neffective_conv2d = true\ntargets = ['*.attn2.to_q', '*.resnets.*.conv1', '*.proj_in']\nrank_pattern = { '*.conv1' = 1 }";
/// LoKr with full, low-rank and Tucker factors (the tiny U-Net's widths 16 and 32 at rank 2).
const LOKR_CONV: &str = "rank = 2\ndecompose_both = true\neffective_conv2d = true\ntargets = ['*.attn2.to_k', '*.resnets.*.conv1']";
/// COFT with the exact Cayley transform, by block count, on a linear and a 3x3 layer.
const OFT_CONSTRAINED: &str = "blocks = { count = 2 }\ncoft = true\ncayley = 'exact'\ntargets = ['*.attn2.to_q', '*.resnets.*.conv1']";

/// Every registered method with its default settings, then the [`VARIANTS`].
fn cases() -> Vec<(&'static str, &'static str)> {
    METHODS
        .iter()
        .map(|m| (m.name, ""))
        .chain(VARIANTS)
        .collect()
}

#[test]
fn sd14_counts_match_the_study() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("presets/configs/sd-v1-4");
    let config = UNetConfig::from_file(&dir.join("unet_config.json")).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let mut unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
    let expected = [
        ("bitfit", "", 174_720),
        ("lora", "", 198_912),
        ("lora", "rank = 8", 49_728 * 8),
        ("prefix", "", 249_600),
        ("adapter", "", 1_236_304),
        ("adapter", "width = 48", 24_976 * 48 + 12_480),
        ("full", "", 859_520_964),
        ("loha", "", 2 * 8 * 49_728),
        ("loha", "rank = 4", 2 * 4 * 49_728),
        ("lokr", "", 34_448),
        // 496 parameters per block of 32 inputs; the placement's layers have 24,768 inputs.
        ("oft", "", 24_768 / 32 * 496),
        ("oft", "blocks = { size = 16 }", 24_768 / 16 * 120),
        ("difffit", "", 501_444),
        ("difffit", "scales = 'transformer_blocks'", 501_444 - 20_160),
        ("svdiff", "", 222_696),
    ];
    for (name, settings, count) in expected {
        let m = method(name, settings);
        assert_eq!(
            trainable_parameter_count(m.as_ref(), &mut unet, &vs).unwrap(),
            count,
            "{name} {settings}"
        );
        assert!(!has_extensions(&mut unet));
    }
}

#[test]
fn methods_start_from_the_base_model_and_train_only_their_parameters() {
    let cases = cases().into_iter().map(|(n, s)| (n, s, true)).chain([(
        "prefix",
        "attention = 'joint'",
        false,
    )]);
    for (name, settings, unchanged_at_init) in cases {
        let what = format!("{name} [{settings}]");
        let mut tiny = Tiny::new();
        let base = tiny.output();
        let params = nn::VarStore::new(Device::Cpu);
        let trained = tiny
            .apply(method(name, settings).as_ref(), &params)
            .unwrap();
        let names: std::collections::HashSet<&str> =
            trained.iter().map(|(n, _)| n.as_str()).collect();
        let at_init = relative_l2(&tiny.output(), &base);
        if unchanged_at_init {
            assert!(
                at_init <= 1e-6,
                "{what}: output changed at init by {at_init:.2e}"
            );
        } else if name == "prefix" {
            assert!(
                at_init > 1e-3,
                "{what}: joint prefixes should change the output at init"
            );
        }
        let frozen: Vec<(String, Tensor)> = tiny
            .vs
            .variables()
            .into_iter()
            .filter(|(n, _)| !names.contains(n.as_str()))
            .map(|(n, t)| (n, t.copy()))
            .collect();

        let target = base.randn_like();
        let loss = (tiny.forward() - target).square().mean(Kind::Float);
        loss.backward();
        for (n, t) in tiny.vs.variables() {
            assert_eq!(
                t.grad().defined(),
                names.contains(n.as_str()),
                "{what}: gradient presence of U-Net tensor `{n}`"
            );
        }
        assert!(
            trained.iter().all(|(_, t)| t.grad().defined()),
            "{what}: a trained tensor has no gradient"
        );
        assert!(
            trained
                .iter()
                .any(|(_, t)| t.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0),
            "{what}: all gradients zero"
        );

        let before: Vec<Tensor> = trained.iter().map(|(_, t)| t.copy()).collect();
        tch::no_grad(|| {
            for (_, t) in &trained {
                let _ = t.shallow_clone().g_sub_(&(t.grad() * 0.1));
            }
        });
        for (n, copy) in &frozen {
            assert!(
                tiny.vs.variables()[n].equal(copy),
                "{what}: frozen tensor `{n}` changed"
            );
        }
        assert!(
            trained.iter().zip(&before).any(|((_, t), b)| !t.equal(b)),
            "{what}: the step changed nothing"
        );
        assert!(
            relative_l2(&tiny.output(), &base) > 1e-6,
            "{what}: training does not reach the output"
        );
    }
}

#[test]
fn settings_come_from_toml_and_set_pairs() {
    let table = parse_set_pairs(&[
        "rank=8".into(),
        "targets=['*.attn2.to_q']".into(),
        "dora=true".into(),
        "rank_pattern.'*.to_q'=2".into(),
    ])
    .unwrap();
    let lora = MethodSettings::new("lora", table).unwrap();
    let settings = lora.method().settings();
    assert_eq!(settings["rank"], 8);
    assert_eq!(settings["targets"], serde_json::json!(["*.attn2.to_q"]));
    assert_eq!(settings["dora"], true);
    assert_eq!(settings["rank_pattern"]["*.to_q"], 2);

    let table = parse_set_pairs(&["input=attn2_out".into(), "output=ff_in".into()]).unwrap();
    let adapter = MethodSettings::new("adapter", table).unwrap();
    assert_eq!(adapter.method().settings()["input"], "attn2_out");

    // Each refusal is a settings error of the method, its reason naming what is wrong.
    let refused = |name: &str, settings: &str, needle: &str| {
        let err = MethodSettings::parse(name, settings).unwrap_err();
        match err.downcast_ref::<SettingsError>() {
            Some(SettingsError::Method { method, reason }) => {
                assert_eq!(method, name);
                assert!(reason.contains(needle), "{reason}");
            }
            _ => panic!("not a settings error of method `{name}`: {err:#}"),
        }
    };
    refused("lora", "rnak = 3", "unknown field `rnak`");
    refused("lora", "rank = 0", "rank 0 must be at least 1");
    refused(
        "lora",
        "alpha = -1",
        "alpha -1 must be a finite number above 0",
    );
    refused("lora", "alpha = 0", "must be a finite number above 0");
    refused("lora", "dora = 'maybe'", "expected a boolean");
    refused(
        "adapter",
        "input = 'ff_out'\noutput = 'attn2_out'",
        "comes before input site",
    );
    refused("bitfit", "scope = 'some'", "unknown variant `some`");
    let err = MethodSettings::defaults("vera").unwrap_err();
    let known: Vec<&str> = difftune::peft::method_names().collect();
    assert!(
        matches!(
            err.downcast_ref::<SettingsError>(),
            Some(SettingsError::UnknownMethod { name, known: listed })
                if name == "vera" && *listed == known.join(", ")
        ),
        "{err:#}"
    );
}

#[test]
fn a_pattern_that_matches_nothing_names_the_closest_modules() {
    let mut tiny = Tiny::new();
    let params = nn::VarStore::new(Device::Cpu);
    let err = tiny
        .apply(
            method("lora", "targets = ['*.attn2.to_z']").as_ref(),
            &params,
        )
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("`*.attn2.to_z` matches none") && err.contains("attn2.to_q`"),
        "{err}"
    );
    let err = tiny
        .apply(method("prefix", "targets = ['*.atn2']").as_ref(), &params)
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("transformer_blocks.0.attn2`"),
        "{err:#}"
    );
}

/// Applies a method, trains it a little (perturbs), and returns the adapted output.
fn adapted(
    tiny: &mut Tiny,
    params: &nn::VarStore,
    m: &dyn TuningMethod,
) -> (Vec<(String, Tensor)>, Tensor) {
    let trained = tiny.apply(m, params).unwrap();
    perturb(&trained);
    let out = tiny.output();
    (trained, out)
}

#[test]
fn adapter_files_round_trip_and_refuse_mismatches() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = cases();
    for (i, &(name, settings)) in cases.iter().enumerate() {
        let what = format!("{name} [{settings}]");
        let mut trainer = Tiny::new();
        let params = nn::VarStore::new(Device::Cpu);
        let m = method(name, settings);
        let (trained, expected) = adapted(&mut trainer, &params, m.as_ref());
        let path = tmp.path().join(format!("case{i}.safetensors"));
        save_adapter(&path, m.as_ref(), &trained, &trainer.identity).unwrap();

        let mut user = Tiny::new();
        let loaded = load_adapter(&path, &mut user.unet, &user.vs, &user.identity).unwrap();
        assert_eq!(loaded.method.name(), name);
        let err = relative_l2(&user.output(), &expected);
        assert!(err <= 1e-6, "{what}: reloaded adapter differs by {err:.2e}");
    }
    let prefix = cases.iter().position(|&c| c == ("prefix", "")).unwrap();
    let sidecar: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join(format!("case{prefix}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (&sidecar["method"], &sidecar["settings"]["length"]),
        (&"prefix".into(), &10.into())
    );
    assert!(
        sidecar["settings"].get("reparam_hidden").is_none(),
        "the reparameterisation is folded when saved"
    );

    let mut other = Tiny::new();
    let lora = cases.iter().position(|&c| c == ("lora", "")).unwrap();
    let path = tmp.path().join(format!("case{lora}.safetensors"));
    let err = load_adapter(&path, &mut other.unet, &other.vs, "another-model").unwrap_err();
    assert!(
        format!("{err:#}").contains("trained on another base U-Net"),
        "{err:#}"
    );

    let mut adapter = AdapterFile::load(&path).unwrap();
    adapter.meta.settings["rank"] = 2.into();
    let err = adapter
        .attach(&mut other.unet, &other.vs, &other.identity)
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("attn2.to_q.lora_A.weight` in the `lora` adapter has shape [4, 16] but")
            && err.contains("expects [2, 16]"),
        "{err}"
    );
}

#[test]
fn lora_formats_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let plain = "alpha = 8\ntargets = ['*.attn2.to_q', '*.attn2.to_k', '*.resnets.*.conv1']\nrank_pattern = { '*.conv1' = 2 }";
    let dora = "dora = true\nalpha = 2\ntargets = ['*.attn2.to_q', '*.proj_in']";
    for (settings, formats) in [
        (
            plain,
            vec![
                AdapterFormat::Peft,
                AdapterFormat::Diffusers,
                AdapterFormat::Kohya,
            ],
        ),
        (dora, vec![AdapterFormat::Peft, AdapterFormat::Diffusers]),
    ] {
        let mut trainer = Tiny::new();
        let params = nn::VarStore::new(Device::Cpu);
        let m = method("lora", settings);
        let (trained, expected) = adapted(&mut trainer, &params, m.as_ref());
        let adapter =
            AdapterFile::from_trained(m.as_ref(), &trained, Some(trainer.identity.clone()))
                .unwrap();
        for format in formats {
            let out = tmp.path().join(format!("{format:?}"));
            let out = if format == AdapterFormat::Kohya {
                out.with_extension("safetensors")
            } else {
                out
            };
            export(&adapter, format, Some(&trainer.unet.config), &out).unwrap();
            let mut user = Tiny::new();
            let imported = read_adapter(&out, &user.vs).unwrap();
            assert_eq!(imported.meta.base_model, None);
            imported
                .attach(&mut user.unet, &user.vs, &user.identity)
                .unwrap();
            let err = relative_l2(&user.output(), &expected);
            assert!(
                err <= 1e-6,
                "{format:?} [{settings}]: round trip differs by {err:.2e}"
            );
        }
        if settings == dora {
            let out = tmp.path().join("dora.safetensors");
            let err = format!(
                "{:#}",
                export(&adapter, AdapterFormat::Kohya, None, &out).unwrap_err()
            );
            assert!(
                err.contains(
                    "cannot be written as kohya (DoRA has no kohya form); the formats it can go to: diffusers, peft"
                ) && err.contains("\"dora\":true"),
                "{err}"
            );
            assert!(!out.exists());
        }
    }
    let kohya = read_all(&tmp.path().join("Kohya.safetensors")).unwrap();
    let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q";
    assert_eq!(kohya[&format!("{key}.lora_down.weight")].size(), [4, 16]);
    assert_eq!(kohya[&format!("{key}.alpha")].double_value(&[]), 8.0);
    assert_eq!(
        kohya["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].size(),
        [16, 2, 1, 1]
    );
}

/// A U-Net of SD v1's layout (four levels, two layers per block, the 64-px latent's 8x8 of a
/// 64-px image) at a small width: the index arithmetic of A1111's key conversion assumes it.
fn sd1_layout_unet() -> (nn::VarStore, UNet2DConditionModel, UNetConfig) {
    let config: UNetConfig = serde_json::from_value(serde_json::json!({
        "in_channels": 4,
        "out_channels": 4,
        "attention_head_dim": 8,
        "block_out_channels": [32, 32, 64, 64],
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 2,
        "sample_size": 8
    }))
    .unwrap();
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config).unwrap();
    freeze(&vs);
    (vs, unet, config)
}

/// ComfyUI's LoRA key rule (`comfy/lora.py`, `model_lora_keys_unet`): every U-Net weight
/// `PATH.weight` of the diffusers layout answers to `lora_unet_` + PATH with `.` -> `_`.
fn comfyui_keys(unet_vs: &nn::VarStore) -> BTreeMap<String, String> {
    unet_vs
        .variables()
        .keys()
        .filter_map(|name| name.strip_suffix(".weight"))
        .map(|path| {
            (
                format!("lora_unet_{}", path.replace('.', "_")),
                path.to_string(),
            )
        })
        .collect()
}

/// A1111's rule (`extensions-builtin/Lora/networks.py`, `convert_diffusers_name_to_compvis`,
/// SD v1): a `lora_unet_` key of the diffusers layout becomes the `_`-joined name of an LDM
/// module, looked up among `diffusion_model_` + each LDM module path with `.` -> `_`.
fn a1111_module(key: &str) -> Option<String> {
    let rest = key.strip_prefix("lora_unet_")?;
    let number = |s: &str| s.parse::<usize>().ok();
    let resnet_suffix = |s: &str| {
        match s {
            "conv1" => "in_layers_2",
            "conv2" => "out_layers_3",
            "time_emb_proj" => "emb_layers_1",
            "conv_shortcut" => "skip_connection",
            other => other,
        }
        .to_string()
    };
    // `BLOCK_(attentions|resnets)_I_SUFFIX` -> (block, attention?, i, converted suffix).
    let layer = |s: &str| -> Option<(bool, usize, String)> {
        let (kind, s) = s.split_once('_')?;
        let (i, suffix) = s.split_once('_')?;
        let attention = match kind {
            "attentions" => true,
            "resnets" => false,
            _ => return None,
        };
        let suffix = match attention {
            true => suffix.to_string(),
            false => resnet_suffix(suffix),
        };
        Some((attention, number(i)?, suffix))
    };
    let converted = if let Some(s) = rest.strip_prefix("conv_in") {
        format!("input_blocks_0_0{s}")
    } else if let Some(s) = rest.strip_prefix("conv_out") {
        format!("out_2{s}")
    } else if let Some(s) = rest.strip_prefix("time_embedding_linear_") {
        let (i, s) = s.split_at(1);
        format!("time_embed_{}{s}", number(i)? * 2 - 2)
    } else if let Some(s) = rest.strip_prefix("down_blocks_") {
        let (block, s) = s.split_once('_')?;
        let block = number(block)?;
        if s == "downsamplers_0_conv" {
            format!("input_blocks_{}_0_op", 3 + block * 3)
        } else {
            let (attention, i, suffix) = layer(s)?;
            format!(
                "input_blocks_{}_{}_{suffix}",
                1 + block * 3 + i,
                attention as usize
            )
        }
    } else if let Some(s) = rest.strip_prefix("mid_block_") {
        let (attention, i, suffix) = layer(s)?;
        let index = if attention { 1 } else { i * 2 };
        format!("middle_block_{index}_{suffix}")
    } else if let Some(s) = rest.strip_prefix("up_blocks_") {
        let (block, s) = s.split_once('_')?;
        let block = number(block)?;
        if s == "upsamplers_0_conv" {
            format!(
                "output_blocks_{}_{}_conv",
                2 + block * 3,
                if block > 0 { 2 } else { 1 }
            )
        } else {
            let (attention, i, suffix) = layer(s)?;
            format!(
                "output_blocks_{}_{}_{suffix}",
                block * 3 + i,
                attention as usize
            )
        }
    } else {
        return None;
    };
    Some(format!("diffusion_model_{converted}"))
}

/// Every layer kind ComfyUI and A1111 adapt in the U-Net.
const EVERY_LAYER: &str = "targets = ['*.attn1.to_q', '*.attn1.to_k', '*.attn1.to_v', '*.attn1.to_out.0', \
    '*.attn2.to_q', '*.attn2.to_k', '*.attn2.to_v', '*.attn2.to_out.0', '*.ff.net.0.proj', '*.ff.net.2', \
    '*.proj_in', '*.proj_out', '*.conv1', '*.conv2', '*.time_emb_proj', '*.conv_shortcut', \
    '*.downsamplers.0.conv', '*.upsamplers.0.conv', 'conv_in', 'conv_out', 'time_embedding.linear_1']
rank = 4
alpha = 8
rank_pattern = { '*.conv2' = 2 }";

#[test]
fn kohya_exports_load_by_comfyui_and_a1111_key_rules_as_the_merged_weights() {
    let (vs, mut unet, config) = sd1_layout_unet();
    let m = method("lora", EVERY_LAYER);
    let params = nn::VarStore::new(Device::Cpu);
    let trained = m
        .apply(&mut unet, &vs, params.root(), &InitSeed::new(0, "kohya"))
        .unwrap();
    perturb(&trained);
    let identity = random_init_identity(&config);
    let adapter = AdapterFile::from_trained(m.as_ref(), &trained, Some(identity.clone())).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("lora.safetensors");
    export(&adapter, AdapterFormat::Kohya, Some(&config), &file).unwrap();
    let kohya = read_all(&file).unwrap();

    let comfyui = comfyui_keys(&vs);
    let layout = difftune::model::ldm::UnetLayout::from_config(&config).names();
    let a1111: std::collections::BTreeSet<String> = vs
        .variables()
        .keys()
        .filter_map(|name| layout.to_ldm(name))
        .filter_map(|ldm| {
            let path = ldm.strip_suffix(".weight")?.replace('.', "_");
            Some(format!("diffusion_model_{path}"))
        })
        .collect();
    // The base weights as ComfyUI patches them: W + alpha / rank * up @ down.
    let base: BTreeMap<String, Tensor> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let mut patched: BTreeMap<String, Tensor> = base
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect();
    let mut layers = 0;
    for key in kohya.keys() {
        let (stem, part) = key.split_once('.').unwrap();
        assert!(
            ["lora_down.weight", "lora_up.weight", "alpha"].contains(&part),
            "`{key}`: a part neither loader reads"
        );
        let path = comfyui
            .get(stem)
            .unwrap_or_else(|| panic!("ComfyUI maps no U-Net weight to `{key}`"));
        let module = a1111_module(stem).unwrap_or_else(|| panic!("A1111 converts no `{key}`"));
        assert!(
            a1111.contains(&module),
            "A1111's `{module}` (of `{key}`) is no LDM module"
        );
        if part != "alpha" {
            continue;
        }
        layers += 1;
        let (down, up) = (
            &kohya[&format!("{stem}.lora_down.weight")],
            &kohya[&format!("{stem}.lora_up.weight")],
        );
        let weight = &base[&format!("{path}.weight")];
        let rank = down.size()[0];
        let scale = kohya[key].double_value(&[]) / rank as f64;
        let delta = up
            .reshape([up.size()[0], rank])
            .matmul(&down.reshape([rank, -1]))
            .reshape(weight.size());
        patched.insert(format!("{path}.weight"), weight + delta * scale);
    }
    assert_eq!(
        layers * 3,
        kohya.len(),
        "every layer has down, up and alpha"
    );
    assert_eq!(
        layers,
        trained.len() / 2,
        "every adapted layer is in the file"
    );

    // `difftune merge` of the same adapter onto the same base weights (copied: torch's
    // generator is shared with the other tests' threads) gives the weights the loaders compute.
    let (merged_vs, mut merged_unet, _) = sd1_layout_unet();
    tch::no_grad(|| {
        for (name, mut var) in merged_vs.variables() {
            var.copy_(&base[&name]);
        }
    });
    merge_adapter(&mut merged_unet, &merged_vs, &adapter, &identity).unwrap();
    for (name, merged) in merged_vs.variables() {
        let err = relative_l2(&patched[&name], &merged);
        assert!(
            err <= 1e-6,
            "`{name}`: the loaders' weight differs from the merge by {err:.2e}"
        );
    }
}

#[test]
fn each_method_names_the_formats_it_can_go_to() {
    let refused = |name: &str, settings: &str, format: AdapterFormat| {
        let err = check_exports(method(name, settings).as_ref(), &[format]).unwrap_err();
        err.to_string()
    };
    for name in ["full", "adapter", "prefix", "bitfit"] {
        let err = refused(name, "", AdapterFormat::Kohya);
        assert!(
            err.contains(&format!("a `{name}` adapter"))
                && err.contains("cannot be written as kohya")
                && err.contains("none of them"),
            "{err}"
        );
    }
    let err = refused("lora", "dora = true", AdapterFormat::Kohya);
    assert!(
        err.contains("(DoRA has no kohya form); the formats it can go to: diffusers, peft"),
        "{err}"
    );
    check_exports(method("lora", "").as_ref(), &AdapterFormat::ALL).unwrap();
}

/// `difftune export` on `adapter` as `format` to `out`: whether it succeeded, and stderr.
fn export_cli(adapter: &Path, format: &str, out: &Path) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args(["export", "--adapter", adapter.to_str().unwrap()])
        .args(["--format", format, "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stderr)
}

#[test]
fn export_writes_each_format_and_refuses_what_it_cannot_write_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tiny = Tiny::new();
    let params = nn::VarStore::new(Device::Cpu);
    let lora = method("lora", "alpha = 8");
    let (trained, expected) = adapted(&mut tiny, &params, lora.as_ref());
    let adapter = tmp.path().join("adapter.safetensors");
    save_adapter(&adapter, lora.as_ref(), &trained, &tiny.identity).unwrap();
    for (format, out) in [
        ("kohya", "lora.safetensors"),
        ("diffusers", "diffusers"),
        ("peft", "peft"),
    ] {
        let out = tmp.path().join(out);
        let (ok, stderr) = export_cli(&adapter, format, &out);
        assert!(ok, "{format}: {stderr}");
        let mut user = Tiny::new();
        let imported = read_adapter(&out, &user.vs).unwrap();
        imported
            .attach(&mut user.unet, &user.vs, &user.identity)
            .unwrap();
        assert!(relative_l2(&user.output(), &expected) <= 1e-6, "{format}");
        let (ok, stderr) = export_cli(&adapter, format, &out);
        assert!(
            !ok && stderr.contains("already exists"),
            "{format}: {stderr}"
        );
    }
    let (ok, stderr) = export_cli(&adapter, "kohya", &tmp.path().join("lora.bin"));
    assert!(
        !ok && stderr.contains("name it NAME.safetensors"),
        "{stderr}"
    );

    let mut other = Tiny::new();
    let full = method("full", "");
    let (trained, _) = adapted(&mut other, &params, full.as_ref());
    let full_adapter = tmp.path().join("full.safetensors");
    save_adapter(&full_adapter, full.as_ref(), &trained, &other.identity).unwrap();
    let refused = tmp.path().join("full-kohya.safetensors");
    let (ok, stderr) = export_cli(&full_adapter, "kohya", &refused);
    assert!(
        !ok && stderr.contains("a `full` adapter") && stderr.contains("none of them"),
        "{stderr}"
    );
    let (ok, stderr) = export_cli(
        &tmp.path().join("lora.safetensors"),
        "peft",
        &tmp.path().join("x"),
    );
    assert!(
        !ok && stderr.contains("has no difftune sidecar"),
        "{stderr}"
    );
    let (ok, stderr) = export_cli(&adapter, "lycoris", &tmp.path().join("x"));
    assert!(
        !ok && stderr.contains("possible values: kohya, diffusers, peft"),
        "{stderr}"
    );
    let mut written: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !name.ends_with(".json"))
        .collect();
    written.sort();
    assert_eq!(
        written,
        [
            "adapter.safetensors",
            "diffusers",
            "full.safetensors",
            "lora.safetensors",
            "peft"
        ],
        "nothing is written for a refused export"
    );
}

#[test]
fn merged_unets_compute_what_the_adapters_compute() {
    let tmp = tempfile::tempdir().unwrap();
    let mergeable = [
        ("lora", "alpha = 8"),
        ("lora", "dora = true\ntargets = ['*.attn2.to_k', '*.resnets.*.conv1', '*.proj_in']\nrank_pattern = { '*.conv1' = 2 }"),
        ("bitfit", "scope = 'all'"),
        ("full", ""),
        ("loha", LOHA_CONV),
        ("lokr", LOKR_CONV),
        ("oft", OFT_CONSTRAINED),
        ("oft", ""),
        ("difffit", ""),
        ("svdiff", ""),
    ];
    for (name, settings) in mergeable {
        let what = format!("{name} [{settings}]");
        let mut trainer = Tiny::new();
        let params = nn::VarStore::new(Device::Cpu);
        let m = method(name, settings);
        let (trained, expected) = adapted(&mut trainer, &params, m.as_ref());
        let adapter =
            AdapterFile::from_trained(m.as_ref(), &trained, Some(trainer.identity.clone()))
                .unwrap();

        let mut base = Tiny::new();
        merge_adapter(&mut base.unet, &base.vs, &adapter, &base.identity).unwrap();
        assert!(
            !has_extensions(&mut base.unet),
            "{what}: merging leaves no extension"
        );
        let err = relative_l2(&base.output(), &expected);
        assert!(err <= 1e-5, "{what}: merged output differs by {err:.2e}");

        // The merged file is a complete U-Net under diffusers names (the strict loader checks both ways).
        let path = tmp.path().join("merged.safetensors");
        save_unet(&base.vs, &path).unwrap();
        let reloaded = Tiny::new();
        load_into(&reloaded.vs, &[path], &LoadOptions::default()).unwrap();
        assert!(
            reloaded.output().equal(&base.output()),
            "{what}: the saved merge differs"
        );
    }
    for name in ["prefix", "adapter"] {
        let mut trainer = Tiny::new();
        let params = nn::VarStore::new(Device::Cpu);
        let m = method(name, "");
        let (trained, _) = adapted(&mut trainer, &params, m.as_ref());
        let adapter = AdapterFile::from_trained(m.as_ref(), &trained, None).unwrap();
        let mut base = Tiny::new();
        let err = merge_adapter(&mut base.unet, &base.vs, &adapter, &base.identity).unwrap_err();
        assert!(
            format!("{err:#}").contains(&format!("method `{name}` cannot be merged")),
            "{err:#}"
        );
        assert!(!has_extensions(&mut base.unet));
    }
}

/// DiffFit and SVDiff start from the base model bit for bit, as their papers state: DiffFit's
/// scales start at 1 (an exact multiplication), SVDiff's update is the change of the spectrum
/// (`ReLU(s + 0) - s`, exactly 0). SVDiff's shifts act on singular values: merging zero shifts
/// leaves every weight as it was, and a shift of minus the largest singular value clamps the
/// whole spectrum to 0 (ReLU), zeroing the layer.
#[test]
fn difffit_and_svdiff_start_from_the_base_model_exactly() {
    for (name, settings) in [("difffit", ""), ("svdiff", "")] {
        let mut tiny = Tiny::new();
        let base = tiny.output();
        let params = nn::VarStore::new(Device::Cpu);
        let trained = tiny
            .apply(method(name, settings).as_ref(), &params)
            .unwrap();
        assert!(tiny.output().equal(&base), "{name}: output differs at init");
        if name == "difffit" {
            let scales: Vec<&Tensor> = trained
                .iter()
                .filter(|(n, _)| n.ends_with(".gamma"))
                .map(|(_, t)| t)
                .collect();
            // 7 transformer blocks (3 branches each) and 11 resnets in the tiny U-Net.
            assert_eq!(scales.len(), 7 * 3 + 11);
            assert!(scales.iter().all(|g| g.equal(&g.ones_like())));
        }
    }

    let mut tiny = Tiny::new();
    let before: Vec<(String, Tensor)> = tiny
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let svdiff = method("svdiff", "");
    let params = nn::VarStore::new(Device::Cpu);
    let trained = tiny.apply(svdiff.as_ref(), &params).unwrap();
    let zero: BTreeMap<String, Tensor> = trained
        .iter()
        .map(|(n, t)| (n.clone(), t.zeros_like()))
        .collect();
    let mut base = Tiny::new();
    svdiff.merge(&mut base.unet, &base.vs, &zero).unwrap();
    let merged = base.vs.variables();
    for (name, t) in &before {
        assert!(merged[name].equal(t), "`{name}` changed by zero shifts");
    }
    let layer = "down_blocks.0.resnets.0.conv1";
    let mut clamped = zero;
    let largest = tch::no_grad(|| {
        let w = &merged[&format!("{layer}.weight")];
        w.reshape([w.size()[0], -1]).svd(true, false).1.max()
    });
    clamped.insert(
        format!("{layer}.spectral_shift"),
        -largest.expand([16], false),
    );
    let mut base = Tiny::new();
    svdiff.merge(&mut base.unet, &base.vs, &clamped).unwrap();
    let zeroed = base.vs.variables()[&format!("{layer}.weight")].abs().max();
    assert!(zeroed.double_value(&[]) < 1e-5, "{zeroed:?}");
}
