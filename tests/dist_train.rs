//! Data-parallel training: the real binary as 2 Gloo ranks on 127.0.0.1 against one process with
//! the doubled batch (from a dataset, a cache, and aspect-ratio buckets), resume of a 2-rank run,
//! and a killed rank. Tiny model, few steps, a hard time limit on every run, children killed by
//! PID when a test fails.
#[path = "common/launch.rs"]
mod common;
#[path = "common/tiny_run.rs"]
mod tiny_run;

use common::{difftune, launch_with, Job, LIMIT};
use difftune::data::cache::{build, LatentCache};
use difftune::train::checkpoint::CheckpointState;
use difftune::train::metrics::StepMetrics;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::Tensor;
use tiny_run::TinyRun;

/// The tiny model and a latent cache of a 4-class, 4-images-per-class synthetic dataset.
struct Fixture {
    /// Owns the temp folder.
    _run: TinyRun,
    root: PathBuf,
    model: String,
    cache: String,
}

impl Fixture {
    fn new() -> Self {
        tch::set_num_threads(1);
        let run = TinyRun::new(4, 4);
        let cache = run.root.join("cache");
        build(&run.files(), &run.data, &run.cache_settings(), &cache).unwrap();
        Self {
            root: run.root.clone(),
            model: run.model.display().to_string(),
            cache: cache.display().to_string(),
            _run: run,
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
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// [`Fixture::args`] training from the image folder `data`, cached into `cache` first (the
    /// encoding shared by the ranks in batches of 4).
    fn folder_args(
        &self,
        (data, cache): (&Path, &Path),
        out: &Path,
        batch: usize,
        steps: usize,
        extra: &[&str],
    ) -> Vec<String> {
        let mut args = self.args(out, batch, steps, extra);
        let at = args.iter().position(|a| a == "--data").unwrap() + 1;
        args[at] = data.display().to_string();
        args.extend(["--cache".into(), cache.display().to_string()]);
        args.extend(["--set".into(), "cache_batch_size=4".into()]);
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

type Named = BTreeMap<String, Tensor>;

/// The trainable tensors of the checkpoint at `step` of a run folder.
fn trainable_at(out: &Path, step: usize) -> Named {
    let file = out.join(format!("checkpoints/step-{step:08}/trainable.safetensors"));
    difftune::model::weights::read_all(&file).unwrap()
}

/// `after - before`, tensor by tensor.
fn change(before: &Named, after: &Named) -> Named {
    after
        .iter()
        .map(|(name, t)| (name.clone(), t - &before[name]))
        .collect()
}

/// The largest relative difference of a tensor of `b` from its namesake in `a` (max |a - b| over
/// max |a|), with that tensor's name.
fn max_relative_difference(a: &Named, b: &Named) -> (f64, String) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .map(|(name, x)| {
            let diff = (x - &b[name]).abs().max().double_value(&[]);
            let scale = x.abs().max().double_value(&[]).max(1e-30);
            (diff / scale, name.clone())
        })
        .fold(
            (0.0, String::new()),
            |worst, d| if d.0 > worst.0 { d } else { worst },
        )
}

fn metrics(out: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(1e-30)
}

/// The files under `dir`; TensorBoard event files, named by start time and PID, as one name.
fn files_under(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = walk(dir)
        .into_iter()
        .map(|p| p.strip_prefix(dir).unwrap().display().to_string())
        .map(|name| match name.contains("tfevents") {
            true => "tensorboard/EVENTS".to_string(),
            false => name,
        })
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

/// How the equality of a 2-rank run and one process is measured. Both compute the same gradient
/// up to float32 summation order (the all-reduce adds two half-batch sums where one process sums
/// the whole batch): a few 1e-7 relative. AdamW with its default epsilon (1e-8) divides each
/// element's gradient by its own magnitude, so an element whose true gradient is about 0 (LoRA's
/// A while B is still near 0) moves by ±lr whichever way its rounding error points, and the
/// weights of the two runs differ by ~1e-3 relative after one step: the same happens to one
/// process run with another thread count. With an epsilon far above every gradient element
/// (|g| <= 2e-3 here) the update is lr·m/(√v + ε) ≈ lr·m/ε, linear in the gradient, so the weights
/// compare the gradients themselves, and the 1e-5 target is checked on them.
const LINEAR_UPDATE: [&str; 6] = ["--set", "optimizer.eps=1.0", "--lr", "1.0", "--seed", "7"];

#[test]
fn two_ranks_train_as_one_process_with_the_doubled_batch_and_resume_exactly() {
    let fx = Fixture::new();
    let single = fx.root.join("single");
    let output = fx.train_single(&fx.args(&single, 4, 3, &LINEAR_UPDATE));
    assert!(output.status.success(), "{output:?}");

    // Rank 1 is pointed at a folder of its own, which it must never create.
    let dist = fx.root.join("dist");
    let elsewhere = fx.root.join("rank1-out");
    // From the dataset: the ranks build the run's cache (the same latents) first.
    let dist_cache = fx.root.join("dist-cache");
    let data = fx.root.join("data");
    let mut job = launch_with(2, &[0, 1], |rank| {
        let out = if rank == 0 { &dist } else { &elsewhere };
        fx.folder_args((&data, &dist_cache), out, 2, 3, &LINEAR_UPDATE)
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
    assert_eq!(files_under(&single), files_under(&dist));

    // The all-reduced loss and gradient norm of every step (measured: ~1e-7 relative).
    for (one, two) in metrics(&single).iter().zip(&metrics(&dist)) {
        assert_eq!(two.global_batch, 4);
        assert!(relative(one.loss, two.loss) <= 1e-6, "{one:?} vs {two:?}");
        assert!(
            relative(one.grad_norm, two.grad_norm) <= 1e-6,
            "{one:?} vs {two:?}"
        );
    }
    // After step 1 LoRA's B (0 before) is the first update, -lr·g/ε: the reduced gradient
    // itself; then every later update, and the weights at the end (measured: ~3e-6).
    let (one, two) = (trainable_at(&single, 1), trainable_at(&dist, 1));
    let first = max_relative_difference(&one, &two);
    assert!(first.0 <= 1e-5, "first update: {first:?}");
    let (one_end, two_end) = (trainable_at(&single, 3), trainable_at(&dist, 3));
    let later = max_relative_difference(&change(&one, &one_end), &change(&two, &two_end));
    assert!(later.0 <= 1e-5, "updates of steps 2 and 3: {later:?}");
    let end = max_relative_difference(&one_end, &two_end);
    assert!(end.0 <= 1e-5, "weights after 3 steps: {end:?}");
    eprintln!("relative differences: first update {first:?}, later {later:?}, end {end:?}");
    let state = std::fs::read_to_string(dist.join("checkpoints/step-00000003/state.json")).unwrap();
    let state: CheckpointState = serde_json::from_str(&state).unwrap();
    assert_eq!(state.world_size, 2);

    // Interrupted after 2 steps and resumed on 2 ranks: the same weights as without the stop.
    let resumed = fx.root.join("resumed");
    let stop = [&LINEAR_UPDATE[..], &["--stop-after", "2"]].concat();
    let mut job = launch_with(2, &[0, 1], |_| fx.args(&resumed, 2, 3, &stop));
    all_succeed(&mut job);
    assert!(!resumed.join("adapter.safetensors").exists());
    let resume = [&LINEAR_UPDATE[..], &["--resume"]].concat();
    let mut job = launch_with(2, &[0, 1], |_| fx.args(&resumed, 2, 3, &resume));
    all_succeed(&mut job);
    let exact = max_relative_difference(&two_end, &trainable_at(&resumed, 3));
    assert_eq!(exact.0, 0.0, "{exact:?}");

    // One process with the doubled batch may not continue a 2-rank checkpoint.
    let output = fx.train_single(&fx.args(&resumed, 4, 4, &resume));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("written by a run on 2 rank(s), this one has 1"),
        "{stderr}"
    );
}

/// A captioned folder of 12 images, 4 wide (2:1), 4 tall (1:2) and 4 square: with buckets on at
/// 64 px and a step of 16, three buckets (80x48, 48x80, 64x64) of four images each.
fn write_bucketed_folder(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..12u32 {
        let (w, h) = [(96, 48), (48, 96), (64, 64)][i as usize % 3];
        let image = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 5 + i * 20) as u8, (y * 3) as u8, (i * 21) as u8])
        });
        image.save(dir.join(format!("{i:02}.png"))).unwrap();
        std::fs::write(dir.join(format!("{i:02}.txt")), format!("thing{i}, red")).unwrap();
    }
}

#[test]
fn two_ranks_with_buckets_train_as_one_process_with_the_doubled_batch() {
    let fx = Fixture::new();
    let data = fx.root.join("bucketed");
    write_bucketed_folder(&data);
    let buckets = ["--set", "bucket=true", "--set", "bucket_step=16"];
    let extra = [&LINEAR_UPDATE[..], &buckets[..]].concat();
    let args = |out: &Path, cache: &Path, batch: usize| {
        fx.folder_args((&data, cache), out, batch, 3, &extra)
    };
    let (single, single_cache) = (fx.root.join("b-single"), fx.root.join("b-cache-1"));
    let output = fx.train_single(&args(&single, &single_cache, 4));
    assert!(output.status.success(), "{output:?}");
    let (dist, dist_cache) = (fx.root.join("b-dist"), fx.root.join("b-cache-2"));
    let mut job = launch_with(2, &[0, 1], |_| args(&dist, &dist_cache, 2));
    all_succeed(&mut job);

    let cache = LatentCache::open(&dist_cache).unwrap();
    let buckets: BTreeSet<usize> = cache.plan_samples().iter().map(|s| s.bucket).collect();
    assert_eq!(
        buckets.len(),
        3,
        "the folder's images fall in three buckets"
    );
    // Each rank's half of a global batch comes from that batch's bucket: the same losses and
    // gradients as one process drawing the whole batch (a rank on another bucket's images
    // would change both by far more than rounding).
    let (one, two) = (metrics(&single), metrics(&dist));
    assert_eq!((one.len(), two.len()), (3, 3));
    for (one, two) in one.iter().zip(&two) {
        assert!(relative(one.loss, two.loss) <= 1e-6, "{one:?} vs {two:?}");
        assert!(
            relative(one.grad_norm, two.grad_norm) <= 1e-6,
            "{one:?} vs {two:?}"
        );
    }
    let end = max_relative_difference(&trainable_at(&single, 3), &trainable_at(&dist, 3));
    assert!(end.0 <= 1e-5, "weights after 3 steps: {end:?}");
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

/// Runs a 2-rank job of `train` into `out` with `extra` arguments, returning the ranks' exit
/// statuses and rank 0's stderr.
fn run_job(fx: &Fixture, out: &Path, steps: usize, extra: &[&str]) -> (Vec<bool>, String) {
    let mut job = launch_with(2, &[0, 1], |_| fx.args(out, 2, steps, extra));
    let deadline = Instant::now() + LIMIT;
    let ok = job
        .ranks
        .iter_mut()
        .map(|r| r.wait(deadline).success())
        .collect();
    (ok, job.ranks[0].output().1)
}

#[test]
fn a_diverged_run_stops_before_the_update_and_resumes_from_the_named_checkpoint() {
    let fx = Fixture::new();
    let out = fx.root.join("run");
    let (ok, stderr) = run_job(&fx, &out, 5, &["--lr", "1e-2", "--stop-after", "2"]);
    assert_eq!(ok, [true, true], "{stderr}");

    // Resumed with a learning rate that explodes the weights at step 3: the loss of step 4,
    // computed on them, is not finite. Both ranks stop (decided on the reduced values), nothing
    // of step 4 is applied or saved, step 3's checkpoint is set aside and step 2's named.
    let (ok, stderr) = run_job(&fx, &out, 5, &["--lr", "1e12", "--resume"]);
    assert_eq!(ok, [false, false], "{stderr}");
    let checkpoints = out.join("checkpoints");
    assert!(
        stderr.contains("computed on the weights of step 3"),
        "{stderr}"
    );
    let named = checkpoints.join("step-00000002");
    assert!(
        stderr.contains(&format!("resume from {}", named.display())),
        "{stderr}"
    );
    assert!(checkpoints.join("step-00000003.nonfinite").is_dir());
    assert!(!checkpoints.join("step-00000003").exists());
    assert!(!checkpoints.join("step-00000004").exists());
    assert!(!out.join("adapter.safetensors").exists());

    // Resumed from the named checkpoint with the lower learning rate, it runs to the end.
    let (ok, stderr) = run_job(&fx, &out, 5, &["--lr", "1e-2", "--resume"]);
    assert_eq!(ok, [true, true], "{stderr}");
    assert!(out.join("adapter.safetensors").is_file());
    let log = metrics(&out);
    assert_eq!(
        log.iter().map(|m| m.step).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(
        log.iter().all(|m| m.loss.is_finite() && m.lr == 1e-2),
        "{log:?}"
    );
    for (name, weights) in trainable_at(&out, 5) {
        assert!(weights.isfinite().all().int64_value(&[]) == 1, "{name}");
    }
}

/// The processes whose parent is `pid` (from /proc/*/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `PID (COMM) STATE PPID ...`: COMM may hold spaces and parentheses.
        let after = &stat[stat.rfind(')').unwrap() + 1..];
        let parent: u32 = after.split_whitespace().nth(1).unwrap().parse().unwrap();
        if parent == pid {
            children.push(child);
        }
    }
    children
}

/// The worker of `rank` that `torchrun` (PID `agent`) runs now, if it has started.
fn torchrun_worker(agent: u32, rank: usize) -> Option<u32> {
    children_of(agent).into_iter().find(|&child| {
        std::fs::read(format!("/proc/{child}/environ"))
            .map(|env| {
                env.split(|&b| b == 0)
                    .any(|var| var == format!("RANK={rank}").as_bytes())
            })
            .unwrap_or(false)
    })
}

/// The recipe for preemptible clusters (issue 24.8, docs/preemption.md): `torchrun
/// --max-restarts 1 ... difftune train --resume`. Rank 1 is killed (`kill -9`) after a few
/// steps; torchrun stops rank 0 and starts both again, they resume from the last checkpoint and
/// the run ends with the weights of an uninterrupted 2-rank run, bit for bit. (About 25 s, 10 of
/// them rank 0's wait for its lost peer, `PEER_PROBE_WINDOW`.)
#[test]
fn torchrun_restarts_a_killed_rank_and_the_run_ends_as_an_uninterrupted_one() {
    let fx = Fixture::new();
    let torchrun = |out: &Path| {
        let mut args = vec![
            "--standalone".to_string(),
            "--nproc-per-node".into(),
            "2".into(),
            "--max-restarts".into(),
            "1".into(),
            "--no-python".into(),
            env!("CARGO_BIN_EXE_difftune").into(),
        ];
        args.extend(fx.args(out, 2, 12, &["--resume"]));
        let mut command = std::process::Command::new("torchrun");
        command
            .args(args)
            .env("OMP_NUM_THREADS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(out.with_extension("log")).unwrap());
        command
    };
    let log = |out: &Path| std::fs::read_to_string(out.with_extension("log")).unwrap();
    let whole = fx.root.join("whole");
    let status = torchrun(&whole).status().unwrap();
    assert!(status.success(), "{}", log(&whole));

    let preempted = fx.root.join("preempted");
    let mut agent = torchrun(&preempted).spawn().unwrap();
    let deadline = Instant::now() + LIMIT;
    let logged = |out: &Path| {
        std::fs::read_to_string(out.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
    };
    while logged(&preempted) < 3 {
        assert!(agent.try_wait().unwrap().is_none(), "{}", log(&preempted));
        assert!(Instant::now() < deadline, "no third step in time");
        std::thread::sleep(Duration::from_millis(10));
    }
    let victim = torchrun_worker(agent.id(), 1).expect("rank 1 is running");
    // SAFETY: a plain kill(2) of a process this test started (torchrun's worker).
    assert_eq!(unsafe { libc::kill(victim as i32, libc::SIGKILL) }, 0);
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            agent.kill().unwrap();
            panic!(
                "torchrun still running at the deadline: {}",
                log(&preempted)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = log(&preempted);
    assert!(status.success(), "{stderr}");
    assert!(stderr.contains("difftune train: no checkpoint"), "{stderr}");
    // Each launch of rank 0 starts an event file: the first and the restarted one.
    let events = |out: &Path| walk(&out.join("tensorboard")).len();
    assert_eq!((events(&whole), events(&preempted)), (1, 2), "{stderr}");
    let steps: Vec<usize> = metrics(&preempted).iter().map(|m| m.step).collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
    let (a, b) = (trainable_at(&whole, 12), trainable_at(&preempted, 12));
    let end = max_relative_difference(&a, &b);
    assert_eq!(end.0, 0.0, "{end:?}");
}
