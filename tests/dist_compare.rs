//! `difftune compare` as 2 Gloo ranks on 127.0.0.1 (see tests/common/launch.rs) against one
//! process, on the tiny preset at a budget of seconds: the same files, the same sample PNG bytes,
//! the same numbers, and rank 0 alone reports; a batch the ranks cannot share is refused. With
//! `study.parallel = "run"` the ranks share out whole units, with one process's science, and a
//! method's `ranks` trains its runs data-parallel over a team of ranks.
#[path = "common/launch.rs"]
mod common;
#[path = "common/science.rs"]
mod science;
#[path = "common/study.rs"]
mod study;

use common::{difftune, launch, run_to_success, Job, LIMIT};
use difftune::compare::report::BASE_ROW;
use difftune::compare::teams::widths;
use difftune::compare::{CompareConfig, StudyResults};
use difftune::dist::Launch;
use difftune::model::source::ModelFiles;
use difftune::settings::compare::preset;
use difftune::train::metrics::MetricsLog;
use difftune::train::trainer::METRICS_FILE;
use science::science;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use study::{compare_args, write_config};
use tch::Device;

/// The tiny preset with the pre-training, LoRA and full runs at a budget of seconds. The study's
/// batch of 4 is 2 per rank on 2 ranks; the 9 sampled images are 3 sampling batches (rank 0
/// renders one, rank 1 two) and 3 feature batches (the same split). Pre-training runs (on both
/// ranks, then rank 0 merges) at learning rate 0, which leaves the weights bit for bit as they
/// were, so the base row cannot inherit the rounding differences of a data-parallel gradient
/// and its samples and scores must be exactly those of one process.
fn small_config() -> CompareConfig {
    small_config_with(&[])
}

/// [`small_config`] with the `set` pairs.
fn small_config_with(set: &[&str]) -> CompareConfig {
    let overrides = [
        "model.tiny_vae.steps=2",
        "eval.must_improve=[\"full\"]",
        "data.synthetic.classes=3",
        "data.synthetic.train_per_class=4",
        "data.synthetic.test_per_class=4",
        "data.synthetic.resolution=32",
        "train.resolution=32",
        "train.batch_size=4",
        "train.steps=3",
        "train.device=\"cpu\"",
        "pretrain.steps=3",
        "pretrain.learning_rate=0.0",
        "sample.per_class=3",
        "sample.steps=2",
        "sample.batch_size=3",
        "sample.grid_classes=2",
        "sample.grid_seeds=2",
        "eval.dims=64",
        "eval.batch_size=3",
        "eval.feature_weights=\"random\"",
        "eval.kid_subsets=5",
        "eval.bootstrap=20",
        // One run per method at its configured rate, scored also along the budget; the study's
        // other stages (repeated runs, the search, the timing pass, the classifier) have their
        // tests in tests/compare.rs.
        "study.runs=1",
        "study.lr_search.candidates=[]",
        "methods.full.lr_candidates=[]",
        "eval.at_steps=[2]",
        "study.timing.rounds=0",
    ];
    let overrides: Vec<String> = overrides.iter().chain(set).map(|s| s.to_string()).collect();
    let mut config = preset("tiny", &overrides).unwrap();
    config.eval.classifier = None;
    config
        .methods
        .retain(|m| m.name() == "lora" || m.name() == "full");
    config
}

/// Every file under `dir` (relative path → bytes), without the released folder locks. A
/// TensorBoard event file's name holds its start time and process id: it is listed as
/// `tfevents-N`, N counting them in its folder.
fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.file_name().unwrap() != difftune::util::lock::LOCK_FILE {
                let bytes = std::fs::read(&path).unwrap();
                let mut name = path.strip_prefix(dir).unwrap().to_path_buf();
                if name.to_string_lossy().contains("tfevents") {
                    let folder = name.parent().unwrap().to_path_buf();
                    let n = (0..)
                        .find(|n| !files.contains_key(&folder.join(format!("tfevents-{n}"))))
                        .unwrap();
                    name = folder.join(format!("tfevents-{n}"));
                }
                files.insert(name, bytes);
            }
        }
    }
    files
}

/// The small study with the `set` pairs, run by one process into `DIR/one` and by `world` ranks
/// into `DIR/ranks`; the folder and the ranks.
fn one_process_and_ranks(world: usize, set: &[&str]) -> (tempfile::TempDir, Job) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &small_config_with(set));
    let one_args = compare_args(&config, &dir.path().join("one"), &[]);
    let single = difftune(&one_args.iter().map(String::as_str).collect::<Vec<_>>())
        .output()
        .unwrap();
    assert!(single.status.success(), "{single:?}");
    let ranks_args = compare_args(&config, &dir.path().join("ranks"), &[]);
    let job = run_to_success(
        world,
        &ranks_args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    (dir, job)
}

fn results(out: &Path) -> StudyResults {
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn assert_close(what: &str, one: f64, two: f64, relative: f64) {
    let scale = one.abs().max(two.abs()).max(1e-12);
    assert!(
        (one - two).abs() <= relative * scale,
        "{what}: {one} (1 process) against {two} (2 ranks)"
    );
}

#[test]
fn two_rank_compare_equals_one_process() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &small_config());
    let (one, two) = (dir.path().join("one"), dir.path().join("ranks"));
    let single = difftune(
        &compare_args(&config, &one, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .output()
    .unwrap();
    assert!(single.status.success(), "{single:?}");
    let two_args = compare_args(&config, &two, &[]);
    let job = run_to_success(2, &two_args.iter().map(String::as_str).collect::<Vec<_>>());
    eprintln!(
        "1 process and 2 ranks in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Rank 0 prints the tables, rank 1 nothing.
    let (stdout_0, _) = job.ranks[0].output();
    assert!(stdout_0.contains("Table 1. FID"), "{stdout_0}");
    let (stdout_1, _) = job.ranks[1].output();
    assert!(stdout_1.is_empty(), "rank 1 printed {stdout_1}");

    // The same files: nothing written twice under another name, no per-rank leftovers.
    let (expected, got) = (files_under(&one), files_under(&two));
    let names = |files: &BTreeMap<PathBuf, Vec<u8>>| files.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&got), names(&expected));

    // The base model's samples do not depend on training: the same bytes. The tuned rows'
    // adapters match one process to float rounding (the batch is split over ranks), so their
    // 8-bit samples may differ by one level in a rare pixel.
    let samples: Vec<&PathBuf> = expected
        .keys()
        .filter(|p| p.starts_with("samples"))
        .collect();
    assert_eq!(
        samples.len(),
        45,
        "9 images for each of 5 sets: the base model's, and each method's at its end and at step 2"
    );
    let mut differing = Vec::new();
    for path in samples {
        let (a, b) = (&expected[path], &got[path]);
        if path.starts_with(Path::new("samples").join(BASE_ROW)) {
            assert!(a == b, "{} differs between 1 and 2 ranks", path.display());
        } else if a != b {
            let (a, b) = (
                image::load_from_memory(a).unwrap().to_rgb8(),
                image::load_from_memory(b).unwrap().to_rgb8(),
            );
            let most = a
                .as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap();
            assert!(most <= 1, "{}: pixels differ by {most}", path.display());
            differing.push(path);
        }
    }
    eprintln!("tuned rows' samples differing by one level somewhere: {differing:?}");

    let (a, b) = (results(&one), results(&two));
    assert_eq!((a.world_size, b.world_size), (1, 2));
    assert_eq!(a.rows.len(), 3);
    for (x, y) in a.rows.iter().zip(&b.rows) {
        assert_eq!((&x.method, x.images), (&y.method, y.images));
        assert_eq!(x.trainable_params, y.trainable_params);
        let row = &x.method;
        let exact = row == BASE_ROW;
        let tolerance = if exact { 0.0 } else { 1e-3 };
        assert_close(&format!("{row} FID"), x.fid, y.fid, tolerance);
        assert_close(&format!("{row} KID"), x.kid_mean, y.kid_mean, tolerance);
        eprintln!(
            "{row}: FID {} against {}, KID {} against {}",
            x.fid, y.fid, x.kid_mean, y.kid_mean
        );
        if let (Some(tx), Some(ty)) = (&x.train, &y.train) {
            assert_eq!(tx.steps, ty.steps);
            assert_close(
                &format!("{row} final loss"),
                tx.final_loss.unwrap(),
                ty.final_loss.unwrap(),
                1e-4,
            );
        }
    }
    assert!(
        started.elapsed() < 2 * LIMIT,
        "took {:?}",
        started.elapsed()
    );
}

/// `study.parallel = "run"`: each rank does whole units alone (one torch thread each, as
/// torchrun gives several ranks a node), so the science equals one process's at one thread bit
/// for bit, the learning-rate search's choice included; the report is written once.
#[test]
fn two_run_parallel_ranks_equal_one_process() {
    let started = Instant::now();
    let (dir, job) = one_process_and_ranks(
        2,
        &[
            "study.parallel=\"run\"",
            "study.lr_search.candidates=[1e-2, 3e-2]",
            "study.lr_search.steps=2",
            "study.lr_search.validation_per_class=1",
        ],
    );
    let (one, two) = (dir.path().join("one"), dir.path().join("ranks"));
    eprintln!(
        "1 process and 2 run-parallel ranks in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let outputs: Vec<(String, String)> = job.ranks.iter().map(|r| r.output()).collect();
    for (rank, (_, stderr)) in outputs.iter().enumerate() {
        let line = format!("rank {rank} of 2 does whole units on Cpu with 1 torch thread(s)");
        assert!(stderr.contains(&line), "{stderr}");
    }
    let writers = outputs
        .iter()
        .filter(|(_, stderr)| stderr.contains("compare: wrote the report"))
        .count();
    assert_eq!(writers, 1, "{outputs:?}");
    assert!(outputs[0].0.contains("Table 1. FID"), "{}", outputs[0].0);
    assert!(outputs[1].0.is_empty(), "rank 1 printed {}", outputs[1].0);
    assert!(two.join("report.md").is_file());

    let (a, b) = (science(&one), science(&two));
    assert!(a["lr_search"]["methods"][0]["chosen"].is_number(), "{a}");
    assert_eq!(b, a);
}

/// `methods.full.ranks = 2` in a run-parallel study: full fine-tuning's runs are data-parallel
/// over a team of both ranks (a c10d sub-group), LoRA's each on one rank. The base model's and
/// LoRA's science equals one process's bit for bit, full fine-tuning's to float rounding (the
/// team splits its batch; at this budget its samples come out the same bytes).
#[test]
fn a_method_s_runs_are_data_parallel_over_a_team_of_ranks() {
    let (dir, job) = one_process_and_ranks(2, &["study.parallel=\"run\"", "methods.full.ranks=2"]);
    let (one, two) = (dir.path().join("one"), dir.path().join("ranks"));

    let outputs: Vec<(String, String)> = job.ranks.iter().map(|r| r.output()).collect();
    for (rank, (_, stderr)) in outputs.iter().enumerate() {
        let line = format!("rank {rank} trains data-parallel runs with ranks 0..2");
        assert!(stderr.contains(&line), "{stderr}");
    }
    assert!(
        outputs[0]
            .1
            .contains("compare: ranks 0..2 train run-full as a team"),
        "{}",
        outputs[0].1
    );
    // Full fine-tuning's steps all-reduced their gradients over the team; LoRA's ran alone.
    let steps = |run: &str| MetricsLog::read(&two.join("runs").join(run).join(METRICS_FILE));
    let (full, lora) = (steps("full").unwrap(), steps("lora").unwrap());
    assert_eq!((full.len(), lora.len()), (3, 3));
    assert!(full.iter().all(|s| s.all_reduce_s.is_some()));
    assert!(lora.iter().all(|s| s.all_reduce_s.is_none()));

    let (a, b) = (science(&one), science(&two));
    let rows = |s: &serde_json::Value| s["rows"].as_array().unwrap().clone();
    let (rows_a, rows_b) = (rows(&a), rows(&b));
    assert_eq!(rows_a.len(), 3);
    for (x, y) in rows_a.iter().zip(&rows_b) {
        let method = x["method"].as_str().unwrap();
        if method != "full" {
            assert_eq!(x, y, "{method}");
            continue;
        }
        for score in ["fid", "kid_mean"] {
            let (x, y) = (x[score].as_f64().unwrap(), y[score].as_f64().unwrap());
            assert_close(&format!("full {score}"), x, y, 1e-3);
            eprintln!("full {score}: {x} (1 process) against {y} (a team of 2)");
        }
    }
}

/// 4 ranks, `methods.full.ranks = 2`: two teams at once share full fine-tuning's runs (two
/// learning-rate candidates, two final runs), each trained by exactly one team, while their
/// first runs need the same latent caches; the one-rank rows equal one process's.
#[test]
fn two_teams_share_the_data_parallel_runs() {
    let (dir, job) = one_process_and_ranks(
        4,
        &[
            "study.parallel=\"run\"",
            "methods.full.ranks=2",
            "study.runs=2",
            "methods.full.lr_candidates=[1e-4, 3e-4]",
            "study.lr_search.steps=2",
            "study.lr_search.validation_per_class=1",
        ],
    );
    let stderr: String = job.ranks.iter().map(|r| r.output().1).collect();
    for run in ["full-lr1e-4", "full-lr3e-4", "full", "full-r1"] {
        let trained = stderr
            .lines()
            .filter(|l| l.ends_with(&format!(" train run-{run} as a team")))
            .count();
        assert_eq!(trained, 1, "run-{run}: {stderr}");
    }
    // Which team trains which run depends on which claims it first: shown, not asserted.
    let teams: Vec<&str> = stderr
        .lines()
        .filter(|l| l.ends_with("as a team"))
        .collect();
    eprintln!("{teams:#?}");
    let (a, b) = (
        science(&dir.path().join("one")),
        science(&dir.path().join("ranks")),
    );
    let rows = |s: &serde_json::Value| s["rows"].as_array().unwrap().clone();
    for (x, y) in rows(&a).iter().zip(&rows(&b)) {
        match x["method"].as_str().unwrap() {
            "full" => assert_close(
                "full FID",
                x["fid"].as_f64().unwrap(),
                y["fid"].as_f64().unwrap(),
                1e-3,
            ),
            method => assert_eq!(x, y, "{method}"),
        }
    }
}

#[test]
fn print_config_prints_once_under_a_launcher() {
    let printed = |rank: &str| {
        let output = difftune(&["compare", "--preset", "tiny", "--print-config"])
            .envs([
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "29500"),
            ])
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    assert!(printed("0").contains("name = \"tiny\""));
    assert_eq!(printed("1"), "");
}

/// A launch of 2 ranks on one node, as its environment describes it.
fn two_ranks() -> Launch {
    let vars = [
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
    ];
    let var = |name: &str| {
        vars.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.to_string())
    };
    Launch::from_vars(var).unwrap().unwrap()
}

/// A method's width is its `ranks`, else the default for its kind and the model's size: full
/// fine-tuning of the tiny U-Net (far below SD's 860M parameters) runs on one GPU.
#[test]
fn widths_are_the_settings_or_the_default_for_the_model_s_size() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    difftune::model::tiny::write_tiny_model(&model, 0, &["a dish".into()]).unwrap();
    let count = ModelFiles::resolve(model.to_str().unwrap(), None)
        .unwrap()
        .unet_parameter_count()
        .unwrap();
    assert!(count > 0 && count < 5_000_000, "{count}");
    let source = format!("model.source={:?}", model.to_str().unwrap());
    let config = preset("tiny", &[source.clone(), "methods.lora.ranks=2".into()]).unwrap();
    let chosen = widths(&config, &two_ranks(), Device::Cuda(0)).unwrap();
    assert_eq!(
        (chosen["full"], chosen["lora"], chosen["bitfit"]),
        (1, 2, 1)
    );
    for (set, message) in [
        (
            "methods.lora.ranks=3",
            "3 ranks a run cannot form teams from the 2 ranks",
        ),
        ("train.batch_size=3", "cannot be shared evenly by 2 ranks"),
    ] {
        let set = [source.clone(), "methods.lora.ranks=2".into(), set.into()];
        let config = preset("tiny", &set).unwrap();
        let err = widths(&config, &two_ranks(), Device::Cpu).unwrap_err();
        let err = format!("{err:#}");
        assert!(
            err.contains("methods.lora.ranks") && err.contains(message),
            "{err}"
        );
    }
}

/// Launches 2 ranks on the small study with the `set` pairs and checks that every rank refuses it
/// with `message` before anything is written.
fn refused_before_anything_is_written(set: &[&str], message: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &small_config_with(set));
    let out = dir.path().join("out");
    let args = compare_args(&config, &out, &[]);
    let mut job = launch(
        2,
        &[0, 1],
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for rank in &mut job.ranks {
        let status = rank.wait(Instant::now() + LIMIT);
        let (_, stderr) = rank.output();
        assert!(!status.success(), "{stderr}");
        assert!(stderr.contains(message), "{stderr}");
    }
    assert!(!out.exists(), "{} was written", out.display());
}

#[test]
fn a_batch_the_ranks_cannot_share_is_refused_before_anything_is_written() {
    refused_before_anything_is_written(
        &["train.batch_size=3"],
        "global batch of 3 (batch_size 3 x gradient_accumulation_steps 1) cannot be shared evenly by 2 ranks",
    );
}

#[test]
fn teams_the_ranks_cannot_form_are_refused_before_anything_is_written() {
    refused_before_anything_is_written(
        &["study.parallel=\"run\"", "methods.full.ranks=3"],
        "methods.full.ranks: 3 ranks a run cannot form teams from the 2 ranks of this launch",
    );
}
