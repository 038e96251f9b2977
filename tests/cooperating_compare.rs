//! Cooperating `difftune compare` invocations on one study folder (see compare::claim) at a
//! budget of seconds: two invocations share out the units (every run trained once) and one
//! writes the report; `--jobs 2` does the same by itself; an invocation killed with `kill -9`
//! mid-study leaves the rest to the next, which takes over its unit. Each gives the science of
//! one process (every score, loss and chosen learning rate; not the timings).
#[path = "common/launch.rs"]
mod common;
#[path = "common/science.rs"]
mod science;
#[path = "common/study.rs"]
mod study;

use common::{difftune, start, LIMIT};
use difftune::compare::CompareConfig;
use difftune::settings::compare::preset;
use science::science;
use std::path::{Path, PathBuf};
use std::time::Instant;
use study::{compare_args, write_config};

/// The tiny preset's study (two runs per method, the learning-rate search, scores along the
/// budget, the timing pass, the content classifier) with LoRA and full at a budget of seconds.
fn small_config() -> CompareConfig {
    let overrides = [
        "model.tiny_vae.steps=2",
        "eval.must_improve=[\"full\"]",
        "data.synthetic.classes=3",
        "data.synthetic.train_per_class=4",
        "data.synthetic.test_per_class=4",
        "train.batch_size=4",
        "train.steps=8",
        "train.device=\"cpu\"",
        "pretrain.steps=3",
        "sample.per_class=3",
        "sample.steps=2",
        "sample.batch_size=3",
        "sample.grid_classes=2",
        "sample.grid_seeds=2",
        "eval.batch_size=3",
        "eval.feature_weights=\"random\"",
        "eval.kid_subsets=5",
        "eval.bootstrap=20",
        "eval.at_steps=[2]",
        "eval.classifier.steps=2",
        "study.runs=2",
        "study.lr_search.steps=2",
        "study.lr_search.validation_per_class=1",
        "study.lr_search.candidates=[1e-2, 3e-2]",
        "study.timing.rounds=1",
        "study.timing.steps=1",
        "study.timing.warmup=0",
    ];
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let mut config = preset("tiny", &overrides).unwrap();
    config
        .methods
        .retain(|m| m.name() == "lora" || m.name() == "full");
    config
}

/// One process, to a successful exit.
fn one_process(config: &Path, out: &Path, extra: &[&str]) -> String {
    let args = compare_args(config, out, extra);
    let output = difftune(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{stderr}");
    stderr
}

/// The TensorBoard event files of every run folder: one per training session in it.
fn trainings(out: &Path) -> Vec<(String, usize)> {
    let mut runs: Vec<(String, usize)> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|entry| {
            let dir = entry.unwrap().path();
            let events = walk(&dir)
                .iter()
                .filter(|p| p.to_string_lossy().contains("tfevents"))
                .count();
            (
                dir.file_name().unwrap().to_string_lossy().to_string(),
                events,
            )
        })
        .collect();
    runs.sort();
    runs
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        match path.is_dir() {
            true => files.extend(walk(&path)),
            false => files.push(path),
        }
    }
    files
}

const WROTE: &str = "compare: wrote the report";

#[test]
fn two_invocations_and_jobs_2_share_the_units_and_equal_one_process() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &small_config());
    let one = dir.path().join("one");
    one_process(&config, &one, &[]);
    let single = started.elapsed().as_secs_f64();

    let two = dir.path().join("two");
    let mut job = start(&[
        compare_args(&config, &two, &[]),
        compare_args(&config, &two, &[]),
    ]);
    let deadline = Instant::now() + LIMIT;
    let mut stderr = Vec::new();
    for process in &mut job.ranks {
        let status = process.wait(deadline);
        assert!(status.success(), "{status}: {:?}", process.output());
        stderr.push(process.output().1);
    }
    let both = started.elapsed().as_secs_f64() - single;
    let writers = stderr.iter().filter(|e| e.contains(WROTE)).count();
    assert_eq!(writers, 1, "{stderr:?}");
    // Both trained, and no run was trained by both (a run trained in segments, to each of
    // `eval.at_steps` and on, has one event file per segment).
    assert_eq!(trainings(&two), trainings(&one));
    let claimed_by = |e: &String| e.contains("compare: [");
    assert!(stderr.iter().all(claimed_by), "{stderr:?}");
    assert_eq!(science(&two), science(&one));

    let jobs = dir.path().join("jobs");
    // Worker 0 of `--jobs 2` has the cores' share; here, one thread as the test's processes.
    let stderr = one_process(&config, &jobs, &["--jobs", "2"]);
    assert!(stderr.contains("2 worker processes"), "{stderr}");
    assert_eq!(science(&jobs), science(&one));
    eprintln!(
        "1 process {single:.1} s, 2 invocations {both:.1} s, --jobs 2 {:.1} s",
        started.elapsed().as_secs_f64() - single - both
    );
}

#[test]
fn a_killed_invocation_s_unit_is_taken_over_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &small_config());
    let one = dir.path().join("one");
    one_process(&config, &one, &[]);

    let out = dir.path().join("study");
    let mut job = start(&[compare_args(&config, &out, &[])]);
    let deadline = Instant::now() + LIMIT;
    // Killed while training the second final run (holding its unit), past its checkpoint at
    // step 2 (`eval.at_steps`).
    job.ranks[0].wait_for_stderr("compare: [2/4]", deadline);
    loop {
        let stderr = job.ranks[0].output().1;
        let second = &stderr[stderr.find("compare: [2/4]").unwrap()..];
        if second.contains("difftune train: 3/8 steps") {
            break;
        }
        assert!(Instant::now() < deadline, "{stderr}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pid = job.ranks[0].child.id();
    job.ranks[0].child.kill().unwrap();
    job.ranks[0].child.wait().unwrap();
    assert!(!out.join("results.json").exists());

    let stderr = one_process(&config, &out, &[]);
    assert!(
        stderr.contains(&format!(
            "difftune compare (PID {pid}), which is no longer running"
        )),
        "{stderr}"
    );
    assert!(stderr.contains(WROTE), "{stderr}");
    assert_eq!(science(&out), science(&one));

    // A different run file on a folder in use is refused; the same one joins.
    let other = write_config(dir.path(), &{
        let mut c = small_config();
        c.train.steps = 9;
        c
    });
    let held = difftune::compare::claim::FolderUse::enter(
        &out,
        "compare.toml",
        &std::fs::read_to_string(out.join("compare.toml")).unwrap(),
        true,
    )
    .unwrap();
    let refused = difftune(&["compare", "--config", other.to_str().unwrap(), "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(message.contains("another run file"), "{message}");
    drop(held);
}
