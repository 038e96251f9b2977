//! The tuning methods: parameter counts on SD v1.4, the invariants every method must keep on a tiny
//! U-Net (output unchanged at init, gradients only where trained, frozen weights untouched),
//! settings, adapter files, LoRA formats and merging.
use difftune::model::unet::{UNet2DConditionModel, UNetConfig};
use difftune::model::weights::{load_into, read_all, LoadOptions};
use difftune::peft::file::{random_init_identity, save_adapter, AdapterFile};
use difftune::peft::formats::{export_lora, load_adapter, read_adapter, LoraFormat};
use difftune::peft::merge::{merge_adapter, save_unet};
use difftune::peft::InitSeed;
use difftune::peft::{
    freeze, has_extensions, method_from_settings, parse_set_pairs, trainable_parameter_count,
    TuningMethod, METHODS,
};
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
}

fn method(name: &str, settings: &str) -> Box<dyn TuningMethod> {
    method_from_settings(name, &toml::from_str::<toml::Value>(settings).unwrap()).unwrap()
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
const VARIANTS: [(&str, &str); 4] = [
    ("lora", "dora = true\nalpha = 8\ntargets = ['*.attn2.to_q', '*.resnets.*.conv1', '*.proj_in']\nrank_pattern = { '*.conv1' = 2 }"),
    ("prefix", "reparam_hidden = 8"),
    ("adapter", "input = 'attn2_out'\noutput = 'ff_in'\nactivation = 'relu'"),
    ("bitfit", "scope = 'all'"),
];

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
    // The reference configs sit next to the checkout (or a level up, from a worktree).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|a| a.join("shared/reference/sd-v1-4"))
        .find(|d| d.is_dir())
        .expect("shared/reference/sd-v1-4 next to the checkout");
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
        let trained = method(name, settings)
            .apply(
                &mut tiny.unet,
                &tiny.vs,
                params.root(),
                &InitSeed::new(0, "test"),
            )
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
    let lora = method_from_settings("lora", &toml::Value::Table(table)).unwrap();
    let settings = lora.settings();
    assert_eq!(settings["rank"], 8);
    assert_eq!(settings["targets"], serde_json::json!(["*.attn2.to_q"]));
    assert_eq!(settings["dora"], true);
    assert_eq!(settings["rank_pattern"]["*.to_q"], 2);

    let table = parse_set_pairs(&["input=attn2_out".into(), "output=ff_in".into()]).unwrap();
    let adapter = method_from_settings("adapter", &toml::Value::Table(table)).unwrap();
    assert_eq!(adapter.settings()["input"], "attn2_out");

    let err = |name: &str, settings: &str| {
        let value = toml::from_str::<toml::Value>(settings).unwrap();
        format!("{:#}", method_from_settings(name, &value).unwrap_err())
    };
    assert!(err("lora", "rnak = 3").contains("unknown field `rnak`"));
    assert!(err("lora", "rank = 0").contains("rank 0 must be at least 1"));
    assert!(err("lora", "alpha = -1").contains("alpha -1 must be a finite number above 0"));
    assert!(err("lora", "alpha = 0").contains("must be a finite number above 0"));
    let known: Vec<&str> = difftune::peft::method_names().collect();
    assert!(err("loha", "").contains(&format!(
        "unknown tuning method `loha` (known: {})",
        known.join(", ")
    )));
    assert!(err("adapter", "input = 'ff_out'\noutput = 'attn2_out'")
        .contains("comes before input site"));
    assert!(err("bitfit", "scope = 'some'").contains("unknown variant `some`"));
}

#[test]
fn a_pattern_that_matches_nothing_names_the_closest_modules() {
    let mut tiny = Tiny::new();
    let params = nn::VarStore::new(Device::Cpu);
    let err = method("lora", "targets = ['*.attn2.to_z']")
        .apply(
            &mut tiny.unet,
            &tiny.vs,
            params.root(),
            &InitSeed::new(0, "test"),
        )
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("`*.attn2.to_z` matches none") && err.contains("attn2.to_q`"),
        "{err}"
    );
    let err = method("prefix", "targets = ['*.atn2']")
        .apply(
            &mut tiny.unet,
            &tiny.vs,
            params.root(),
            &InitSeed::new(0, "test"),
        )
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
    let trained = m
        .apply(
            &mut tiny.unet,
            &tiny.vs,
            params.root(),
            &InitSeed::new(0, "test"),
        )
        .unwrap();
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
            vec![LoraFormat::Peft, LoraFormat::Diffusers, LoraFormat::Kohya],
        ),
        (dora, vec![LoraFormat::Peft, LoraFormat::Diffusers]),
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
            let out = if format == LoraFormat::Kohya {
                out.with_extension("safetensors")
            } else {
                out
            };
            export_lora(&adapter, format, &trainer.unet.config, &out).unwrap();
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
            let err = export_lora(
                &adapter,
                LoraFormat::Kohya,
                &trainer.unet.config,
                &tmp.path().join("dora.safetensors"),
            )
            .unwrap_err();
            assert!(
                format!("{err:#}").contains("DoRA adapters have no kohya form"),
                "{err:#}"
            );
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

#[test]
fn merged_unets_compute_what_the_adapters_compute() {
    let tmp = tempfile::tempdir().unwrap();
    let mergeable = [
        ("lora", "alpha = 8"),
        ("lora", "dora = true\ntargets = ['*.attn2.to_k', '*.resnets.*.conv1', '*.proj_in']\nrank_pattern = { '*.conv1' = 2 }"),
        ("bitfit", "scope = 'all'"),
        ("full", ""),
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
