//! The heavy stages around training as 2 Gloo ranks on 127.0.0.1 (see tests/common/launch.rs):
//! each gives what one process gives.
#[path = "common/launch.rs"]
mod common;

use common::{difftune, run_to_success};
use difftune::eval::inception::InceptionV3;
use difftune::eval::Statistics;
use difftune::model::weights::save_tensors;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(path)
}

/// FID Inception weights with seeded random convolutions (any weights do for comparing runs).
fn random_inception(dir: &Path) -> PathBuf {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let _ = InceptionV3::new(vs.root());
    let tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, var)| {
            let value = if name.ends_with("conv.weight") {
                let fan_in: i64 = var.size()[1..].iter().product();
                Tensor::randn(var.size(), (Kind::Float, Device::Cpu)) / (fan_in as f64).sqrt()
            } else {
                var
            };
            (name, value)
        })
        .collect();
    let path = dir.join("inception.safetensors");
    save_tensors(&path, &tensors, None).unwrap();
    path
}

fn single_process(args: &[&str]) -> String {
    let output = difftune(args).output().unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn two_rank_fid_equals_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let weights = random_inception(dir.path());
    let (a, b) = (fixture("fid/a"), fixture("fid/b"));
    let stats = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // Batches of 2 over 6 images: 3 batches, so rank 0 runs one and rank 1 two.
    let args = |stats: &str| -> Vec<String> {
        [
            "fid",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            "--dims",
            "64",
            "--batch",
            "2",
            "--kid",
            "--kid-subset-size",
            "4",
            "--weights",
            weights.to_str().unwrap(),
            "--device",
            "cpu",
            "--json",
            "--save-stats",
            stats,
        ]
        .map(String::from)
        .to_vec()
    };
    let one = args(&stats("one.npz"));
    let one: Vec<&str> = one.iter().map(String::as_str).collect();
    let expected = single_process(&one);
    let two = args(&stats("two.npz"));
    let two: Vec<&str> = two.iter().map(String::as_str).collect();
    let job = run_to_success(2, &two);
    let (stdout, _) = job.ranks[0].output();
    // The same features bit for bit, so the same FID and KID digits and the same statistics.
    assert_eq!(stdout, expected);
    let report: serde_json::Value = serde_json::from_str(&expected).unwrap();
    assert!(report["fid"].as_f64().unwrap() > 0.0, "{report}");
    // The .npz (a zip) carries its write time: compare the statistics, bit for bit.
    let (one, two) = (
        Statistics::read_npz(stats("one.npz").as_ref()).unwrap(),
        Statistics::read_npz(stats("two.npz").as_ref()).unwrap(),
    );
    assert!(one.mu == two.mu && one.sigma == two.sigma);
    let (stdout_1, _) = job.ranks[1].output();
    assert!(stdout_1.is_empty(), "rank 1 printed {stdout_1}");
}

/// Every file of `dir`, by name, with its bytes.
/// The files of `dir` by name, without the (empty, released) folder lock.
fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .filter(|(name, _)| name != difftune::util::lock::LOCK_FILE)
        .collect();
    files.sort();
    files
}

#[test]
fn two_rank_sample_writes_the_same_png_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a red apple\na bowl of ramen\nthe moon\n").unwrap();
    let model = fixture("pipeline/model");
    let args = |out: &Path| -> Vec<String> {
        let mut args: Vec<String> = ["sample", "--model", model.to_str().unwrap()]
            .map(String::from)
            .to_vec();
        args.extend(
            [
                "--prompts",
                prompts.to_str().unwrap(),
                "--images-per-prompt",
                "2",
                "--seed",
                "7",
                "--steps",
                "2",
                "--scheduler",
                "ddim",
                "--width",
                "64",
                "--height",
                "64",
                // 6 images in 3 batches of 2: rank 0 renders one batch, rank 1 two.
                "--batch",
                "2",
                "--out",
                out.to_str().unwrap(),
            ]
            .map(String::from),
        );
        args
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let one_args = args(&one);
    single_process(&one_args.iter().map(String::as_str).collect::<Vec<_>>());
    let two_args = args(&two);
    let job = run_to_success(2, &two_args.iter().map(String::as_str).collect::<Vec<_>>());
    let (expected, got) = (files_of(&one), files_of(&two));
    assert_eq!(expected.len(), 7, "6 images and the grid");
    let names = |files: &[(String, Vec<u8>)]| files.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&expected));
    for ((name, a), (_, b)) in expected.iter().zip(&got) {
        assert!(a == b, "{name} differs between 1 and 2 ranks");
    }
    let (stdout_1, _) = job.ranks[1].output();
    assert!(stdout_1.is_empty(), "rank 1 printed {stdout_1}");
}

#[test]
fn two_rank_cache_equals_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spec = difftune::data::synthetic::SyntheticSpec {
        classes: 3,
        train_per_class: 5,
        test_per_class: 1,
        resolution: 64,
        ..Default::default()
    };
    difftune::data::synthetic::generate_food101_like(&data, &spec).unwrap();
    // One unreadable image: skipped, and listed as skipped, by whichever rank encodes it.
    let mut images: Vec<PathBuf> = walk(&data.join("images"));
    images.sort();
    std::fs::write(&images[7], b"not a jpeg").unwrap();
    let model = fixture("pipeline/model");
    let args = |out: &Path| -> Vec<String> {
        let mut args: Vec<String> = ["cache", "--model", model.to_str().unwrap()]
            .map(String::from)
            .to_vec();
        args.extend(
            [
                "--data",
                data.to_str().unwrap(),
                "--resolution",
                "64",
                "--device",
                "cpu",
                // 15 images in 4 shards of 4: each rank encodes two, in batches of 2.
                "--shard-size",
                "4",
                "--batch-size",
                "2",
                "--out",
                out.to_str().unwrap(),
            ]
            .map(String::from),
        );
        args
    };
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let one_args = args(&one);
    let stdout = single_process(&one_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stdout.contains("14 samples"), "{stdout}");
    let two_args = args(&two);
    let job = run_to_success(2, &two_args.iter().map(String::as_str).collect::<Vec<_>>());
    let (expected, got) = (files_of(&one), files_of(&two));
    let names = |files: &[(String, Vec<u8>)]| files.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&got), names(&expected));
    assert_eq!(
        expected.len(),
        6,
        "manifest, prompts, 4 shards: {:?}",
        names(&expected)
    );
    // The manifest too: the same shards, checksums and skipped image, in the same order.
    for ((name, a), (_, b)) in expected.iter().zip(&got) {
        assert!(a == b, "{name} differs between 1 and 2 ranks");
    }
    let (stdout_0, _) = job.ranks[0].output();
    assert!(stdout_0.contains("14 samples"), "{stdout_0}");
    let (stdout_1, _) = job.ranks[1].output();
    assert!(stdout_1.is_empty(), "rank 1 printed {stdout_1}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        match path.is_dir() {
            true => found.extend(walk(&path)),
            false => found.push(path),
        }
    }
    found
}
