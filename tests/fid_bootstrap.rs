//! `difftune fid --bootstrap N`: the uncertainty of FID and KID by resampling both image sets.
//! On two copies of one folder FID is 0 (within 1e-4 of its spread: eigenvalue rounding) and its
//! interval is centred on 0 (the midpoint within a quarter of the width of 0, with 0 inside); the
//! same seed gives the same interval, another seed another.
use difftune::eval::inception::write_random_weights;
use std::path::{Path, PathBuf};

/// 16 seeded images: a colour gradient whose direction, hue and brightness vary.
fn image_folder(dir: &Path) -> PathBuf {
    let folder = dir.join("images");
    std::fs::create_dir_all(&folder).unwrap();
    for k in 0..16u32 {
        let image = image::RgbImage::from_fn(32, 32, |x, y| {
            let t = if k % 2 == 0 { x } else { y } * 8;
            let shade = |c: u32| ((t + c * 37 + k * 11) % 256) as u8;
            image::Rgb([shade(k % 3), shade(k % 5 + 1), shade(k % 7 + 2)])
        });
        image.save(folder.join(format!("{k:02}.png"))).unwrap();
    }
    folder
}

fn fid_json(args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
        .arg("fid")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn bootstrap_on_identical_folders_is_centred_on_zero_and_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let folder = image_folder(dir.path());
    let weights = dir.path().join("inception.safetensors");
    write_random_weights(&weights, 0).unwrap();
    let (folder, weights) = (folder.to_str().unwrap(), weights.to_str().unwrap());
    let run = |seed: &str| {
        fid_json(&[
            folder,
            folder,
            "--kid",
            "--bootstrap",
            "40",
            "--seed",
            seed,
            "--dims",
            "64",
            "--weights",
            weights,
            "--device",
            "cpu",
            "--json",
        ])
    };
    let report = run("3");
    let estimate = |score: &str| {
        let e = &report[score];
        assert_eq!(e["resamples"], 40, "{e}");
        let value = |k: &str| e[k].as_f64().unwrap();
        (value("value"), value("std"), value("low"), value("high"))
    };
    let (fid, std, low, high) = estimate("fid_bootstrap");
    assert!(std > 0.0, "{report}");
    assert!(fid.abs() <= 1e-4 * std, "{report}");
    assert!(low < 0.0 && 0.0 < high, "{report}");
    let (midpoint, width) = ((low + high) / 2.0, high - low);
    assert!(midpoint.abs() <= 0.25 * width, "{report}");
    // KID's unbiased estimate of a set against itself is below 0 (the cross term keeps the
    // diagonal the within terms leave out); its interval still holds 0.
    let (_, std, low, high) = estimate("kid_bootstrap");
    assert!(std > 0.0 && low < 0.0 && 0.0 < high, "{report}");
    assert_eq!(
        run("3"),
        report,
        "the same seed must give the same interval"
    );
    let other = run("4");
    assert_ne!(
        other["fid_bootstrap"]["low"],
        report["fid_bootstrap"]["low"]
    );
    assert_eq!(
        other["fid_bootstrap"]["value"],
        report["fid_bootstrap"]["value"]
    );
}

#[test]
fn bootstrap_needs_image_folders_and_two_resamples() {
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("a.npz");
    std::fs::write(&npz, b"not read").unwrap();
    let folder = image_folder(dir.path());
    for (args, needle) in [
        (
            vec![
                npz.to_str().unwrap(),
                folder.to_str().unwrap(),
                "--bootstrap",
                "5",
            ],
            "--bootstrap needs image folders",
        ),
        (
            vec![
                folder.to_str().unwrap(),
                folder.to_str().unwrap(),
                "--bootstrap",
                "1",
            ],
            "at least 2 resamples",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
            .arg("fid")
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{err}");
    }
}
