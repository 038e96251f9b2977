//! Hub ids resolved offline through hf-hub's cache: a Hugging Face cache laid out as
//! huggingface_hub writes it (`models--org--name/refs/<branch>`, `snapshots/<commit>/...` linking
//! into `blobs/`), with `HF_HUB_OFFLINE=1`. One test per binary: it sets process-wide variables.
use difftune::model::source::ModelFiles;
use difftune::sample::SdModels;
use std::path::Path;
use tch::Device;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// The weight files of a diffusers SD folder, which get `fp16` variant copies.
const WEIGHTS: [&str; 3] = [
    "unet/diffusion_pytorch_model",
    "vae/diffusion_pytorch_model",
    "text_encoder/model",
];

/// Moves every file of `model` into `blobs/` and links it from `snapshots/COMMIT/`.
fn lay_out_snapshot(model: &Path, repo: &Path, relative: &Path) {
    for entry in std::fs::read_dir(model.join(relative)).unwrap() {
        let entry = entry.unwrap();
        let rel = relative.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            lay_out_snapshot(model, repo, &rel);
            continue;
        }
        let blob = repo
            .join("blobs")
            .join(rel.to_string_lossy().replace('/', "_"));
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::copy(entry.path(), &blob).unwrap();
        let link = repo.join("snapshots").join(COMMIT).join(&rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&blob, &link).unwrap();
    }
}

#[test]
fn hub_ids_and_revisions_resolve_offline_from_the_hf_cache() {
    let home = tempfile::tempdir().unwrap();
    let model = home.path().join("tiny");
    difftune::model::tiny::write_tiny_model(&model, 0, &difftune::data::synthetic::captions())
        .unwrap();
    for stem in WEIGHTS {
        std::fs::copy(
            model.join(format!("{stem}.safetensors")),
            model.join(format!("{stem}.fp16.safetensors")),
        )
        .unwrap();
    }
    let repo = home.path().join("hub/models--difftune-test--tiny-sd");
    lay_out_snapshot(&model, &repo, Path::new(""));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    std::fs::write(repo.join("refs/v1.0"), COMMIT).unwrap();
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    let snapshot = repo.join("snapshots").join(COMMIT);
    for spec in [
        "difftune-test/tiny-sd",
        "difftune-test/tiny-sd@main",
        "difftune-test/tiny-sd@v1.0",
        &format!("difftune-test/tiny-sd@{COMMIT}"),
    ] {
        let files = ModelFiles::resolve(spec, None).unwrap();
        assert_eq!(
            files.unet.weights,
            [snapshot.join("unet/diffusion_pytorch_model.safetensors")],
            "{spec}"
        );
        let fp16 = ModelFiles::resolve(spec, Some("fp16")).unwrap();
        assert_eq!(
            fp16.vae.weights,
            [snapshot.join("vae/diffusion_pytorch_model.fp16.safetensors")],
            "{spec}"
        );
        assert_eq!(
            fp16.text_encoder.weights,
            [snapshot.join("text_encoder/model.fp16.safetensors")]
        );
    }
    // What was resolved loads.
    let files = ModelFiles::resolve("difftune-test/tiny-sd", Some("fp16")).unwrap();
    SdModels::load(&files, Device::Cpu).unwrap();

    for missing in ["difftune-test/absent", "difftune-test/tiny-sd@v2.0"] {
        let err = format!("{:#}", ModelFiles::resolve(missing, None).unwrap_err());
        assert!(
            err.contains("huggingface-cli download") && err.contains("HF_HUB_OFFLINE"),
            "{err}"
        );
    }
}
