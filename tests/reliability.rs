//! Nothing lost, nothing silently wrong (issue 16): damaged checkpoints are never used and an
//! intact older one is resumed instead; one run folder has one writer at a time; settings no
//! user means are refused; no temp copy of a file outlives the write that made it.
#[path = "common/tiny_run.rs"]
mod tiny_run;

use difftune::error::CheckpointError;
use difftune::peft::MethodSettings;
use difftune::train::checkpoint;
use difftune::train::config::RunConfig;
use difftune::train::metrics::MetricsLog;
use difftune::train::trainer::{ADAPTER_FILE, CHECKPOINTS_DIR, METRICS_FILE};
use difftune::train::{train, Resume};
use difftune::util::lock::DirLock;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tiny_run::{serial, TinyRun};

/// The tiny model and a 4-class dataset of 8 training images per class (32 samples) at 64 px.
fn fixture() -> TinyRun {
    TinyRun::new(4, 8)
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn flip_last_bit(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    std::fs::write(path, bytes).unwrap();
}

fn step_dir(out: &Path, step: usize) -> PathBuf {
    out.join(CHECKPOINTS_DIR).join(format!("step-{step:08}"))
}

/// A flipped bit in the newest checkpoint: resuming skips it (moved aside, named with why) and
/// continues from the previous one, ending bit-identical to a resume from that one alone.
#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_previous_one() {
    let _guard = serial();
    let fx = fixture();
    let mut config = fx.config("bitfit", 6, 1e-3);
    config.train.checkpoint_every = 2;
    let mut first = fx.options(config.clone(), "damaged");
    first.stop_after = Some(4);
    assert_eq!(train(&first).unwrap().step, 4);
    let (damaged, clean) = (fx.root.join("damaged"), fx.root.join("clean"));
    copy_tree(&damaged, &clean);
    flip_last_bit(&step_dir(&damaged, 4).join("trainable.safetensors"));
    std::fs::remove_dir_all(step_dir(&clean, 4)).unwrap();

    let scan = checkpoint::scan(&damaged.join(CHECKPOINTS_DIR)).unwrap();
    assert_eq!(scan.newest.unwrap().state.step, 2);
    assert_eq!(scan.rejected.len(), 1);
    assert_eq!(
        refusal(&step_dir(&damaged, 4)),
        CheckpointError::Damaged {
            file: "trainable.safetensors".into()
        }
        .to_string()
    );

    for out in ["damaged", "clean"] {
        let mut rest = fx.options(config.clone(), out);
        rest.resume = Resume::Newest;
        let summary = train(&rest).unwrap();
        assert!(summary.finished && summary.step == 6);
    }
    let rejected = damaged.join(CHECKPOINTS_DIR).join("rejected-step-00000004");
    assert!(
        rejected.is_dir(),
        "the damaged checkpoint was not set aside"
    );
    let read = |out: &Path| std::fs::read(out.join(ADAPTER_FILE)).unwrap();
    assert!(read(&damaged) == read(&clean), "the adapters differ");
    let trainable = |out: &Path| std::fs::read(step_dir(out, 6).join("trainable.safetensors"));
    assert!(trainable(&damaged).unwrap() == trainable(&clean).unwrap());
    let steps: Vec<usize> = MetricsLog::read(&damaged.join(METRICS_FILE))
        .unwrap()
        .iter()
        .map(|m| m.step)
        .collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
}

/// No checkpoint can be trusted: resuming is refused naming each and why, and nothing moves.
/// A checkpoint without checksums (an older difftune's) is one of those, with how to vouch for it.
#[test]
fn resume_refuses_when_no_checkpoint_verifies() {
    let _guard = serial();
    let fx = fixture();
    let mut config = fx.config("bitfit", 4, 1e-3);
    config.train.checkpoint_every = 1;
    let mut first = fx.options(config.clone(), "run");
    first.stop_after = Some(2);
    train(&first).unwrap();
    let out = fx.root.join("run");
    flip_last_bit(&step_dir(&out, 2).join("state.json"));
    std::fs::remove_file(step_dir(&out, 1).join("SHA256SUMS")).unwrap();

    let mut rest = fx.options(config, "run");
    rest.resume = Resume::Newest;
    let err = train(&rest).unwrap_err();
    let Some(CheckpointError::NoneTrusted { rejected, .. }) = err.downcast_ref() else {
        panic!("not a refusal of every checkpoint: {err:#}");
    };
    let dirs: Vec<&PathBuf> = rejected.iter().map(|(dir, _)| dir).collect();
    assert_eq!(dirs, [&step_dir(&out, 2), &step_dir(&out, 1)]);
    assert_eq!(
        refusal(&step_dir(&out, 2)),
        CheckpointError::Damaged {
            file: "state.json".into()
        }
        .to_string()
    );
    let err = checkpoint::Checkpoint::open_verified(&step_dir(&out, 1)).unwrap_err();
    let Some(CheckpointError::Unverified { files, .. }) = err.downcast_ref() else {
        panic!("not refused for want of checksums: {err:#}");
    };
    assert!(files.contains("trainable.safetensors"), "{files}");
    assert!(step_dir(&out, 2).is_dir() && step_dir(&out, 1).is_dir());
}

/// Why the checkpoint in `dir` is refused, as a [`CheckpointError`] (its message).
fn refusal(dir: &Path) -> String {
    let err = checkpoint::Checkpoint::open_verified(dir).unwrap_err();
    match err.downcast_ref::<CheckpointError>() {
        Some(typed) => typed.to_string(),
        None => panic!("not a checkpoint error: {err:#}"),
    }
}

/// Waits until the run in `out` has logged a step (so it holds its folder's lock).
fn wait_for_first_step(out: &Path, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let metrics = out.join(METRICS_FILE);
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 1 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        assert!(Instant::now() < deadline, "no step logged in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A second `train` on a folder in use is refused naming the first's PID; once the first is
/// killed (`kill -9`: no clean-up at all), its lock is taken over and the run resumes.
#[test]
fn a_second_train_on_one_folder_is_refused_and_a_killed_holder_taken_over() {
    let _guard = serial();
    let fx = fixture();
    let mut config = fx.config("bitfit", 100_000, 1e-3);
    config.train.checkpoint_every = 1;
    let config_file = fx.root.join("config.toml");
    std::fs::write(&config_file, config.to_toml().unwrap()).unwrap();
    let out = fx.root.join("run");

    let mut holder = fx.cli(&config_file, "run").spawn().unwrap();
    let pid = holder.id();
    wait_for_first_step(&out, &mut holder);
    let second = fx
        .cli(&config_file, "run")
        .arg("--resume")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("in use by difftune train (PID {pid})")),
        "{stderr}"
    );

    holder.kill().unwrap();
    holder.wait().unwrap();
    let resumed = fx
        .cli(&config_file, "run")
        .args(["--resume", "--stop-after", "1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "was left locked by difftune train (PID {pid}), which is no longer running; taking it over"
        )),
        "{stderr}"
    );
}

/// A temp file of a write killed midway (what `kill -9` during the metrics log's rewrite left)
/// is removed by the next run in the folder; resuming cuts the log in place, making no copy.
#[test]
fn no_temp_file_outlives_a_run() {
    let _guard = serial();
    let fx = fixture();
    let config = fx.config("bitfit", 3, 1e-3);
    let mut first = fx.options(config.clone(), "run");
    first.stop_after = Some(2);
    train(&first).unwrap();
    let out = fx.root.join("run");
    std::fs::write(out.join(".difftune-tmp-Ab12Cd"), "a copy of metrics.jsonl").unwrap();
    let mut rest = fx.options(config, "run");
    rest.resume = Resume::Newest;
    assert!(train(&rest).unwrap().finished);
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".difftune-tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(MetricsLog::read(&out.join(METRICS_FILE)).unwrap().len(), 3);
}

/// Settings no user means: a batch larger than the dataset, a LoRA rank larger than a layer.
#[test]
fn a_batch_larger_than_the_data_and_a_rank_larger_than_a_layer_are_refused() {
    let _guard = serial();
    let fx = fixture();
    let mut config = fx.config("bitfit", 1, 1e-3);
    config.train.batch_size = 33;
    let err = format!("{:#}", train(&fx.options(config, "batch")).unwrap_err());
    assert!(
        err.contains("batch_size 33 is larger than the 32 samples"),
        "{err}"
    );

    let mut config = fx.config("lora", 1, 1e-3);
    config.method = MethodSettings::parse("lora", "rank = 100000").unwrap();
    let err = format!("{:#}", train(&fx.options(config, "rank")).unwrap_err());
    assert!(
        err.contains("LoRA rank 100000 is larger than layer"),
        "{err}"
    );
}

/// A seed above i64::MAX cannot be recorded in run.toml (a TOML integer): refused by name, not
/// as "integer -1"; the largest one that fits is kept exactly.
#[test]
fn seeds_beyond_a_toml_integer_are_refused_clearly() {
    let output = Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args(["train", "--method", "lora", "--model", "m", "--data", "d"])
        .args(["--out", "o", "--seed", "9223372036854775808"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("9223372036854775808 is not in 0..=9223372036854775807"),
        "{stderr}"
    );
    let mut config = RunConfig::for_method("lora").unwrap();
    config.train.seed = i64::MAX as u64;
    let back = RunConfig::from_toml(&config.to_toml().unwrap()).unwrap();
    assert_eq!(back.train.seed, i64::MAX as u64);
}

/// `compare` is refused a folder another process holds, naming it.
#[test]
fn compare_refuses_a_folder_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _held = DirLock::acquire(dir.path(), "train").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args(["compare", "--out", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    let pid = std::process::id();
    assert!(
        stderr.contains(&format!("in use by difftune train (PID {pid})")),
        "{stderr}"
    );
}

/// A cache build waits (saying for whom) while another process builds the same folder, then
/// goes on.
#[test]
fn a_cache_build_waits_for_the_process_building_its_folder() {
    let fx = {
        let _guard = serial();
        fixture()
    };
    let cache = fx.root.join("shared-cache");
    let held = DirLock::acquire(&cache, "cache").unwrap();
    let log = fx.root.join("cache.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_difftune"))
        .arg("cache")
        .args(["--model", fx.model.to_str().unwrap()])
        .args(["--data", fx.data.to_str().unwrap()])
        .args(["--out", cache.to_str().unwrap()])
        .args(["--resolution", "64", "--device", "cpu"])
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let waiting = format!("waiting for difftune cache (PID {})", std::process::id());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&log).unwrap().contains(&waiting) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the build did not wait"
        );
        assert!(Instant::now() < deadline, "no waiting message in time");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!cache.join("manifest.json").exists());
    drop(held);
    assert!(child.wait().unwrap().success());
    assert!(cache.join("manifest.json").is_file());
}

/// Runs `difftune ARGS`, which must fail naming `needle`, with `out` not created. Returns how
/// long it took, for the log: the order of the checks is what the callers prove (a timing bound
/// would measure the machine's load, not the order).
fn refused_at_once(args: &[&str], out: &Path, needle: &str) -> Duration {
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args(args)
        .env("OMP_NUM_THREADS", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} ran: {stderr}");
    assert!(stderr.contains(needle), "{args:?}: {stderr}");
    assert!(!out.exists(), "{args:?} wrote {}", out.display());
    started.elapsed()
}

/// Rewrites the safetensors file `path` so that its first tensor claims a byte more than it has:
/// a header whose offsets lie about the data.
fn lie_about_offsets(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let length = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + length]).unwrap();
    let (_, first) = header
        .iter_mut()
        .find(|(name, _)| *name != "__metadata__")
        .unwrap();
    let end = &mut first["data_offsets"][1];
    *end = (end.as_u64().unwrap() + 1).into();
    let header = serde_json::to_vec(&header).unwrap();
    let mut lying = (header.len() as u64).to_le_bytes().to_vec();
    lying.extend(header);
    lying.extend(&bytes[8 + length..]);
    std::fs::write(path, lying).unwrap();
}

/// Every bad setting of issue 24 — a method's, a training setting, a model file whose header
/// lies — fails before the data is read and before a cache, run.toml or output folder exists;
/// the same for `cache`, `compare`, `sample` and `merge`.
#[test]
fn bad_settings_fail_at_once_and_write_nothing() {
    let fx = {
        let _guard = serial();
        TinyRun::new(2, 2)
    };
    // Settings and model files are checked before the data: the data folder holds no dataset,
    // which is refused (last case) with another message than the one each other case expects.
    let no_images = fx.root.join("no-images");
    std::fs::create_dir(&no_images).unwrap();
    std::fs::write(no_images.join("notes.txt"), "not an image").unwrap();
    let (model, data) = (fx.model.to_str().unwrap(), no_images.to_str().unwrap());
    let out = fx.root.join("out");
    let out_arg = out.to_str().unwrap();
    let train = ["train", "--model", model, "--data", data, "--out", out_arg];
    let cases: [(&[&str], &str); 9] = [
        (
            &["--method", "lora", "--set", "rnak=8"],
            "unknown field `rnak`",
        ),
        (
            &["--method", "lora", "--set", "rank=0"],
            "rank 0 must be at least 1",
        ),
        (
            &["--method", "lora", "--set", "rank=-1"],
            "rank -1 must be at least 1",
        ),
        (
            &["--method", "lora", "--set", "dora=maybe"],
            "expected a boolean",
        ),
        (&["--method", "lorax"], "unknown tuning method `lorax`"),
        (
            &["--method", "adapter", "--set", "widht=8"],
            "unknown field `widht`",
        ),
        (
            &["--method", "prefix", "--set", "length=0"],
            "length 0 must be at least 1",
        ),
        (
            &["--method", "bitfit", "--set", "checkpoint_every=0"],
            "checkpoint_every",
        ),
        // With every setting and the model right, the folder itself is refused, unread.
        (&["--method", "lora"], "matches no dataset layout"),
    ];
    let mut slowest = Duration::ZERO;
    for (args, needle) in cases {
        let args: Vec<&str> = train.iter().chain(args).copied().collect();
        slowest = slowest.max(refused_at_once(&args, &out, needle));
    }

    let lying = fx.root.join("lying-model");
    copy_tree(&fx.model, &lying);
    lie_about_offsets(&lying.join("unet/diffusion_pytorch_model.safetensors"));
    let lying = lying.to_str().unwrap();
    let not_safetensors = "is not a valid safetensors file";
    let train = [
        "train", "--method", "lora", "--model", lying, "--data", data,
    ];
    let cache = [
        "cache",
        "--model",
        lying,
        "--data",
        data,
        "--resolution",
        "64",
    ];
    let adapter = fx.root.join("adapter.safetensors");
    std::fs::write(fx.root.join("adapter.json"), r#"{"format": "difftune-adapter", "method": "lora", "settings": {"rank": 0}, "base_model": null, "difftune_version": "0"}"#).unwrap();
    std::fs::write(&adapter, b"").unwrap();
    let adapter = adapter.to_str().unwrap();
    let sample = [
        "sample",
        "--model",
        model,
        "--prompt",
        "soup",
        "--adapter",
        adapter,
    ];
    let cases: [(Vec<&str>, &str); 6] = [
        (train.to_vec(), not_safetensors),
        (cache.to_vec(), not_safetensors),
        (
            vec!["compare", "--set", "train.checkpoint_every=0"],
            "checkpoint_every",
        ),
        (vec!["compare", "--model", lying], not_safetensors),
        (sample.to_vec(), "rank 0 must be at least 1"),
        (
            vec!["merge", "--model", model, "--adapter", adapter],
            "rank 0 must be at least 1",
        ),
    ];
    for (mut args, needle) in cases {
        args.extend(["--out", out_arg]);
        slowest = slowest.max(refused_at_once(&args, &out, needle));
    }
    println!("slowest refusal: {slowest:?}, process start included");
}

/// Damage that shows a step after its checkpoint (issue 24.3): Adam's first moment of step 4's
/// checkpoint made infinite, so the update from it is infinite at any learning rate and the loss
/// of the next step is not finite. The run names step 4 (its loss was finite); resumed from it
/// at a lower learning rate it diverges at the same step again, which names an older checkpoint
/// and `--resume-from`, from which the run ends. Checkpoints are kept 3 and a healthy older one.
#[test]
fn a_divergence_repeated_at_a_lower_learning_rate_names_an_older_checkpoint() {
    let _guard = serial();
    let fx = fixture();
    let mut config = fx.config("lora", 8, 1e-2);
    config.train.checkpoint_every = 1;
    let mut first = fx.options(config.clone(), "run");
    first.stop_after = Some(4);
    train(&first).unwrap();
    let out = fx.root.join("run");
    let root = out.join(CHECKPOINTS_DIR);
    // Three in the rotation, and step 1: trained past for a rotation's length (3 steps).
    let present = |steps: &[usize]| steps.iter().all(|&s| step_dir(&out, s).is_dir());
    assert!(present(&[1, 2, 3, 4]));

    let damaged = checkpoint::open_step(&root, 4).unwrap();
    let mut optimizer: Vec<(String, tch::Tensor)> =
        damaged.optimizer().unwrap().into_iter().collect();
    for (name, t) in &mut optimizer {
        if name == "optimizer.exp_avg" {
            *t = t.full_like(f64::INFINITY);
        }
    }
    let trainable: Vec<(String, tch::Tensor)> = damaged.trainable().unwrap().into_iter().collect();
    let everything = checkpoint::Retention {
        keep: 10,
        healthy_span: None,
    };
    checkpoint::save(&root, &damaged.state, &trainable, &optimizer, everything).unwrap();

    let resume = |lr: f64, from: Resume| {
        let mut config = config.clone();
        config.train.learning_rate = lr;
        let mut options = fx.options(config, "run");
        options.resume = from;
        train(&options)
    };
    let err = format!("{:#}", resume(1e-2, Resume::Newest).unwrap_err());
    assert!(err.contains("computed on the weights of step 5"), "{err}");
    assert!(
        err.contains(&format!(
            "resume from {} (step 4",
            step_dir(&out, 4).display()
        )),
        "{err}"
    );

    let err = format!("{:#}", resume(1e-3, Resume::Newest).unwrap_err());
    assert!(
        err.contains("the loss is not finite at step 6 again")
            && err.contains("a lower learning rate did not help (0.001 after 0.01)")
            && err.contains("The weights of step 4 this run resumed from are likely damaged"),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "resume from an older checkpoint, {} (step 3), with --resume-from step-00000003 (older ones: step-00000002)",
            step_dir(&out, 3).display()
        )),
        "{err}"
    );
    assert!(root.join("step-00000005.nonfinite").is_dir());

    let summary = resume(1e-2, Resume::From(3)).unwrap();
    assert!(summary.finished && summary.step == 8);
    assert!(root.join("step-00000004.abandoned").is_dir());
    let log = MetricsLog::read(&out.join(METRICS_FILE)).unwrap();
    assert_eq!(
        log.iter().map(|m| m.step).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert!(log.iter().all(|m| m.loss.is_finite()), "{log:?}");
    // Steps 6-8 in the rotation and 5, trained past for 3 steps.
    assert!(present(&[5, 6, 7, 8]) && !step_dir(&out, 4).exists());
}

/// Runs `command` to a successful exit; its peak resident memory (wait4's, the child's VmHWM).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn peak_memory_of(mut command: Command, log: &Path) -> u64 {
    // Reaped by wait4 below, which std's Child cannot do.
    #[allow(clippy::zombie_processes)]
    let child = command
        .env("OMP_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    // SAFETY: waits for our own child, writing into the two locals.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32);
    let stderr = std::fs::read_to_string(log).unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{stderr}"
    );
    usage.ru_maxrss as u64 * 1024
}

/// Saving streams each tensor to its file, and resuming reads one at a time (issue 24.7). Full
/// fine-tuning of a mid-size U-Net (channels 256 and 512: 45M parameters, 180 MB of weights; with
/// their gradients and Adam's two moments 720 MB) for one step, with a checkpoint (weights and
/// optimizer state) and the adapter file (every weight) after it: the process's peak resident
/// memory may exceed the training step's by at most the largest weight tensor and a margin; a
/// second process resuming from the checkpoint for one more step stays within the same bound.
/// Writing a copy of each file first added the weights and the moments twice over; reading every
/// tensor of the checkpoint before copying it in added them once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn saving_and_resuming_a_checkpoint_add_at_most_one_tensor_to_the_peak_memory() {
    let fx = {
        let _guard = serial();
        TinyRun::new(2, 2)
    };
    let model = fx.root.join("mid-model");
    let shape = difftune::model::tiny::TinyUnetShape {
        block_out_channels: vec![256, 512],
        layers_per_block: 1,
    };
    let captions = difftune::data::synthetic::captions();
    difftune::model::tiny::write_tiny_model_with(&model, 0, 32, 4, &shape, &captions).unwrap();
    let unet_file = model.join("unet/diffusion_pytorch_model.safetensors");
    let largest = difftune::model::weights::read_all(&unet_file)
        .unwrap()
        .values()
        .map(|t| t.numel() as u64 * 4)
        .max()
        .unwrap();
    let out = fx.root.join("mid-run");
    let train = |steps: usize, extra: &[&str]| {
        let mut config = RunConfig::for_method("full").unwrap();
        let t = &mut config.train;
        (t.steps, t.batch_size, t.gradient_accumulation_steps) = (steps, 1, 1);
        (t.resolution, t.checkpoint_every, t.learning_rate) = (32, 1, 1e-4);
        t.device = difftune::train::config::DeviceChoice::Cpu;
        let config_file = fx.root.join("mid.toml");
        std::fs::write(&config_file, config.to_toml().unwrap()).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_difftune"));
        command
            .arg("train")
            .args(["--model", model.to_str().unwrap()])
            .args(["--data", fx.data.to_str().unwrap()])
            .args(["--config", config_file.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .args(extra);
        peak_memory_of(command, &fx.root.join("mid.log"))
    };
    let first = train(1, &[]);
    let training = MetricsLog::read(&out.join(METRICS_FILE)).unwrap()[0]
        .peak_rss_bytes
        .unwrap();
    assert!(step_dir(&out, 1).is_dir() && out.join(ADAPTER_FILE).is_file());
    let resumed = train(2, &["--resume"]);
    assert!(step_dir(&out, 2).is_dir());
    let mib = |bytes: u64| bytes >> 20;
    eprintln!(
        "peak resident memory: training step {} MiB, with the saves {} MiB, resumed for a step {} MiB; \
         largest tensor {} MiB",
        mib(training),
        mib(first),
        mib(resumed),
        mib(largest)
    );
    let bound = training + largest + (32 << 20);
    assert!(
        first <= bound && resumed <= bound,
        "saving, then resuming, raised the training step's peak {} MiB to {} and {} MiB \
         (largest tensor {} MiB)",
        mib(training),
        mib(first),
        mib(resumed),
        mib(largest)
    );
}
