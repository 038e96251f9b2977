//! `difftune bench --json` on the tiny U-Net config: every method at every batch size, in order,
//! with timings consistent with each other and the trainable counts the methods report.
use difftune::bench::BenchReport;
use difftune::model::tiny;
use difftune::model::unet::{UNet2DConditionModel, UNetConfig};
use std::path::Path;
use std::process::Command;

fn write_tiny_configs(dir: &Path) {
    for (name, config) in [
        ("unet_config.json", tiny::unet_config()),
        ("scheduler_config.json", tiny::scheduler_config()),
    ] {
        std::fs::write(dir.join(name), config.to_string()).unwrap();
    }
}

fn bench(dir: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_difftune"))
        .arg("bench")
        .arg("--config-dir")
        .arg(dir)
        .args(["--device", "cpu", "--warmup", "0", "--steps", "1", "--json"])
        // The report must say how many threads libtorch ran with: set them here to check that.
        .env("OMP_NUM_THREADS", "2")
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn bench_json_covers_every_method_and_batch() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_configs(dir.path());
    let out = bench(
        dir.path(),
        &["--methods", "all", "--batch", "1,2", "--resolution", "64"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: BenchReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.tool, "difftune");
    assert_eq!(report.threads, 2);

    let expected: Vec<(String, i64)> = difftune::peft::method_names()
        .flat_map(|m| [(m.to_string(), 1), (m.to_string(), 2)])
        .collect();
    let got: Vec<(String, i64)> = report
        .results
        .iter()
        .map(|r| (r.method.clone(), r.batch))
        .collect();
    assert_eq!(got, expected);

    let config_path = dir.path().join("unet_config.json");
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let _unet = UNet2DConditionModel::new(vs.root(), &UNetConfig::from_file(&config_path).unwrap())
        .unwrap();
    let unet_params: i64 = vs.variables().values().map(|t| t.numel() as i64).sum();
    for r in &report.results {
        assert_eq!(r.resolution, 64);
        assert!(r.median_step_s > 0.0, "{r:?}");
        assert!(
            (r.samples_per_s * r.median_step_s - r.batch as f64).abs() < 1e-9,
            "{r:?}"
        );
        assert!(r.peak_memory_bytes.unwrap() > 0, "{r:?}");
        if r.method == "full" {
            assert_eq!(r.trainable_params, unet_params);
        } else {
            assert!(
                r.trainable_params > 0 && r.trainable_params < unet_params / 10,
                "{r:?}"
            );
        }
    }
}

#[test]
fn bench_rejects_a_resolution_the_vae_cannot_produce() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_configs(dir.path());
    let out = bench(dir.path(), &["--methods", "bitfit", "--resolution", "60"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("multiple of 8"), "{stderr}");
}

#[test]
fn bench_reports_times_attention_kernels_and_writes_profiles_channels_last() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_configs(dir.path());
    let traces = dir.path().join("traces");
    let out = bench(
        dir.path(),
        &[
            "--methods",
            "lora",
            "--batch",
            "2",
            "--resolution",
            "64",
            "--channels-last",
            "--profile",
            traces.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: BenchReport = serde_json::from_slice(&out.stdout).unwrap();
    // On the CPU in f32 torch picks its CPU flash kernel (or the math one): never a CUDA kernel.
    assert!(
        report.sdpa.starts_with("self-attention "),
        "{}",
        report.sdpa
    );
    assert!(
        !report.sdpa.contains("memory-efficient") && !report.sdpa.contains("cuDNN"),
        "{}",
        report.sdpa
    );
    let r = &report.results[0];
    assert!(r.channels_last && !r.fused_adamw);
    assert_eq!(r.step_times_s.len(), 1);
    let mut times = r.step_times_s.clone();
    assert_eq!(difftune::util::stats::median(&mut times), r.median_step_s);
    // The profile is torch's Chrome trace of one step: the U-Net's convolutions are in it.
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(traces.join("difftune-lora-b2.json")).unwrap())
            .unwrap();
    let names: Vec<&str> = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        names.contains(&"aten::convolution"),
        "{:?}",
        &names[..names.len().min(20)]
    );
}

#[test]
fn fused_adamw_is_a_cuda_option() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_configs(dir.path());
    let out = bench(dir.path(), &["--methods", "bitfit", "--fused-adamw"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("CUDA option"), "{stderr}");
}

/// Channels-last changes the layout, never the values, and convolutions keep it.
#[test]
fn channels_last_keeps_values_and_convolutions_keep_the_layout() {
    use difftune::model::memory_format::{channels_last, is_channels_last};
    tch::manual_seed(0);
    let x = tch::Tensor::randn([2, 4, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
    let weight = tch::Tensor::randn([6, 4, 3, 3], (tch::Kind::Float, tch::Device::Cpu));
    let (xl, wl) = (channels_last(&x), channels_last(&weight));
    assert!(!is_channels_last(&x) && is_channels_last(&xl));
    assert!(x.equal(&xl));
    let y = xl.conv2d(&wl, None::<tch::Tensor>, [1, 1], [1, 1], [1, 1], 1);
    assert!(is_channels_last(&y));
    let reference = x.conv2d(&weight, None::<tch::Tensor>, [1, 1], [1, 1], [1, 1], 1);
    assert!(y.allclose(&reference, 1e-5, 1e-5, false));
}
