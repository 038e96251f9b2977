//! Data-parallel training: the real binary as 2 Gloo ranks on 127.0.0.1 against one process with
//! the doubled batch, resume of a 2-rank run, and a killed rank. Tiny model, few steps, a hard
//! time limit on every run, children killed by PID when a test fails.
#[path = "common/launch.rs"]
mod common;

use common::{difftune, launch_with, Job, LIMIT};
use difftune::data::cache::{build, CacheSettings};
use difftune::data::synthetic::{generate_food101_like, SyntheticSpec};
use difftune::model::source::ModelFiles;
use difftune::train::trainer::latest_trainable;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The tiny model and a latent cache of a 4-class, 4-images-per-class synthetic dataset.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    model: String,
    cache: String,
}

impl Fixture {
    fn new() -> Self {
        tch::set_num_threads(1);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let model = root.join("model");
        difftune::model::tiny::write_tiny_model(&model, 0).unwrap();
        let data = root.join("data");
        let spec = SyntheticSpec {
            classes: 4,
            train_per_class: 4,
            test_per_class: 1,
            resolution: 64,
            ..Default::default()
        };
        generate_food101_like(&data, &spec).unwrap();
        let cache = root.join("cache");
        let settings = CacheSettings {
            resolution: 64,
            shard_size: 8,
            batch_size: 4,
            ..CacheSettings::default()
        };
        let files = ModelFiles::resolve(&model.display().to_string(), None).unwrap();
        build(&files, &data, &settings, &cache).unwrap();
        Self {
            _dir: dir,
            model: model.display().to_string(),
            cache: cache.display().to_string(),
            root,
        }
    }

    /// `train` arguments of a tiny LoRA run into `out` with `batch` samples per rank.
    fn args(&self, out: &Path, batch: usize, steps: usize, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--method",
            "lora",
            "--model",
            &self.model,
            "--data",
            &self.cache,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["--out".into(), out.display().to_string()]);
        for (flag, value) in [("--batch", batch), ("--steps", steps)] {
            args.extend([flag.to_string(), value.to_string()]);
        }
        for setting in [
            "device=\"cpu\"",
            "resolution=64",
            "checkpoint_every=1",
            "gradient_accumulation_steps=1",
        ] {
            args.extend(["--set".to_string(), setting.to_string()]);
        }
        args.extend(["--lr".into(), "1e-2".into(), "--seed".into(), "7".into()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Runs `train` in one process (no launcher variables).
    fn train_single(&self, args: &[String]) -> std::process::Output {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        difftune(&args).output().unwrap()
    }
}

/// Waits for every rank of `job`, asserting each succeeded.
fn all_succeed(job: &mut Job) {
    let deadline = Instant::now() + LIMIT;
    for rank in &mut job.ranks {
        let status = rank.wait(deadline);
        assert!(status.success(), "{status}: {:?}", rank.output());
    }
}

/// Largest relative difference between the trainable tensors of two run folders.
fn max_relative_difference(a: &Path, b: &Path) -> f64 {
    let (a, b) = (latest_trainable(a).unwrap(), latest_trainable(b).unwrap());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(name, x)| {
            let y = &b[name];
            let diff = (x - y).abs().max().double_value(&[]);
            diff / x.abs().max().double_value(&[]).max(1e-12)
        })
        .fold(0.0, f64::max)
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .collect();
    found.sort();
    found
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

#[test]
fn two_ranks_train_as_one_process_with_the_doubled_batch_and_resume_exactly() {
    let fx = Fixture::new();
    let single = fx.root.join("single");
    let output = fx.train_single(&fx.args(&single, 4, 3, &[]));
    assert!(output.status.success(), "{output:?}");

    // Rank 1 is pointed at a folder of its own, which it must never create.
    let dist = fx.root.join("dist");
    let elsewhere = fx.root.join("rank1-out");
    let mut job = launch_with(2, &[0, 1], |rank| {
        let out = if rank == 0 { &dist } else { &elsewhere };
        fx.args(out, 2, 3, &[])
    });
    all_succeed(&mut job);
    let (stdout, stderr) = job.ranks[0].output();
    assert!(stdout.contains("adapter"), "{stdout}");
    assert!(
        stderr.contains("2 ranks x batch 2 x accumulation 1 = global batch 4"),
        "{stderr}"
    );
    assert!(job.ranks[1].output().0.is_empty());
    assert!(
        !elsewhere.exists(),
        "rank 1 wrote {:?}",
        files_under(&elsewhere)
    );
    let difference = max_relative_difference(&single, &dist);
    assert!(difference <= 1e-5, "relative difference {difference}");
    assert_eq!(files_under(&single), files_under(&dist));
    let metrics = std::fs::read_to_string(dist.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"global_batch\":4"), "{metrics}");
    let state = std::fs::read_to_string(dist.join("checkpoints/step-00000003/state.json")).unwrap();
    assert!(state.contains("\"world_size\":2"), "{state}");

    // Interrupted after 2 steps and resumed on 2 ranks: the same weights as without the stop.
    let resumed = fx.root.join("resumed");
    let mut job = launch_with(2, &[0, 1], |_| {
        fx.args(&resumed, 2, 3, &["--stop-after", "2"])
    });
    all_succeed(&mut job);
    assert!(!resumed.join("adapter.safetensors").exists());
    let mut job = launch_with(2, &[0, 1], |_| fx.args(&resumed, 2, 3, &["--resume"]));
    all_succeed(&mut job);
    assert_eq!(max_relative_difference(&dist, &resumed), 0.0);

    // One process with the doubled batch may not continue a 2-rank checkpoint.
    let output = fx.train_single(&fx.args(&resumed, 4, 4, &["--resume"]));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("written by a run on 2 rank(s), this one has 1"),
        "{stderr}"
    );
}

#[test]
fn a_killed_rank_stops_training_naming_it() {
    let fx = Fixture::new();
    let out = fx.root.join("run");
    let mut job = launch_with(2, &[0, 1], |_| {
        fx.args(&out, 2, 100_000, &["--dist-timeout", "60"])
    });
    job.ranks[0].wait_for_stderr("global batch 4", Instant::now() + LIMIT);
    job.ranks[1].child.kill().unwrap();
    let status = job.ranks[0].wait(Instant::now() + Duration::from_secs(60));
    let (_, stderr) = job.ranks[0].output();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("lost peer(s): rank 1"), "{stderr}");
}
