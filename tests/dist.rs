//! Multi-process runs of the real binary as Gloo ranks on 127.0.0.1, launched the way torchrun
//! launches them (its environment variables). Every run has a hard time limit; children still
//! running when a test ends (or fails) are killed by PID.
#[path = "common/launch.rs"]
mod common;

use common::{difftune, launch, run_to_success, Job, LIMIT};
use std::process::Command;
use std::time::{Duration, Instant};

fn check_all_succeed(world: usize) -> Job {
    run_to_success(
        world,
        &["dist-check", "--sizes", "1000,100000", "--repeats", "3"],
    )
}

#[test]
fn two_ranks_compute_every_collective_correctly() {
    let job = check_all_succeed(2);
    let (stdout, _) = job.ranks[0].output();
    assert!(
        stdout.contains("2 ranks (Torchrun launch, Gloo backend"),
        "{stdout}"
    );
    assert!(stdout.contains("correct on every rank"), "{stdout}");
    assert!(
        stdout.contains("two sub-groups at once (ranks 0..1 and 1..2): correct"),
        "{stdout}"
    );
    assert!(stdout.contains("all_reduce_sum of 100000 f32"), "{stdout}");
    // Only rank 0 reports.
    let (stdout_1, stderr_1) = job.ranks[1].output();
    assert!(stdout_1.is_empty(), "{stdout_1}");
    assert!(
        stderr_1.contains("rank 1: collectives correct"),
        "{stderr_1}"
    );
}

#[test]
fn three_ranks_gather_uneven_shares_in_the_group_and_in_sub_groups() {
    // Rank r holds r rows: 0, 1 and 2 rows are gathered in rank order; the same again in a
    // sub-group of ranks 0 and 1, beside rank 2 alone in its own.
    let job = check_all_succeed(3);
    let (stdout, _) = job.ranks[0].output();
    assert!(stdout.contains("correct on every rank"), "{stdout}");
    assert!(
        stdout.contains("two sub-groups at once (ranks 0..2 and 2..3): correct"),
        "{stdout}"
    );
}

#[test]
fn without_launcher_variables_it_is_one_process() {
    let output = difftune(&["dist-check", "--sizes", "1000", "--repeats", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(stdout.contains("1 rank (single process"), "{stdout}");
    assert!(stdout.contains("correct on every rank"), "{stdout}");
}

/// Starts a 2-rank job that all-reduces until it fails, with the given timeout.
fn endless_job(timeout_s: &str) -> Job {
    let args = [
        "dist-check",
        "--sizes",
        "1000",
        "--repeats",
        "1000000000",
        "--dist-timeout",
        timeout_s,
    ];
    let job = launch(2, &[0, 1], &args);
    job.ranks[1].wait_for_stderr("rank 1: collectives correct", Instant::now() + LIMIT);
    job
}

fn assert_rank_0_names_rank_1(job: &mut Job, within: Duration) {
    let status = job.ranks[0].wait(Instant::now() + within);
    let (_, stderr) = job.ranks[0].output();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("failed on rank 0 of 2"), "{stderr}");
    assert!(stderr.contains("lost peer(s): rank 1"), "{stderr}");
}

#[test]
fn a_killed_rank_makes_its_peer_fail_naming_it() {
    let mut job = endless_job("60");
    job.ranks[1].child.kill().unwrap();
    // The dead socket is seen at once; naming the rank takes the 10 s probe window.
    assert_rank_0_names_rank_1(&mut job, Duration::from_secs(45));
}

#[test]
fn a_hung_rank_makes_its_peer_fail_after_the_timeout() {
    let mut job = endless_job("4");
    let pid = job.ranks[1].child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    // 4 s collective timeout, then 4 s of probing, well within the limit.
    assert_rank_0_names_rank_1(&mut job, Duration::from_secs(45));
}

#[test]
fn a_rank_that_never_arrives_fails_the_rendezvous() {
    let args = ["dist-check", "--sizes", "1000", "--dist-timeout", "3"];
    for present in [0, 1] {
        let mut job = launch(2, &[present], &args);
        let status = job.ranks[0].wait(Instant::now() + Duration::from_secs(45));
        let (_, stderr) = job.ranks[0].output();
        assert!(!status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("rank {present} of 2: rendezvous at 127.0.0.1")),
            "{stderr}"
        );
    }
}

/// The binary built here has NCCL (the shim says it compiled ProcessGroupNCCL in), and asking for
/// CUDA where there is no GPU fails with "no CUDA device", never "built without NCCL" nor a C++
/// backtrace, in one process and as a rank of a launched job.
#[test]
fn nccl_is_built_in_and_cuda_without_a_gpu_is_a_clear_error() {
    let output = difftune(&["dist-check", "--sizes", "1000", "--repeats", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("this build has Gloo (CPU) and NCCL (CUDA)"),
        "{stdout}"
    );
    if tch::Cuda::device_count() > 0 {
        return; // the no-GPU error cannot be seen here
    }
    let single = difftune(&["dist-check", "--device", "cuda"])
        .output()
        .unwrap();
    let mut job = launch(1, &[0], &["dist-check", "--device", "cuda"]);
    let launched_status = job.ranks[0].wait(Instant::now() + LIMIT);
    let (_, launched) = job.ranks[0].output();
    for (how, failed, stderr) in [
        (
            "single",
            !single.status.success(),
            String::from_utf8_lossy(&single.stderr).to_string(),
        ),
        ("launched", !launched_status.success(), launched),
    ] {
        assert!(failed, "{how}: {stderr}");
        assert!(stderr.contains("no CUDA device"), "{how}: {stderr}");
        assert!(
            !stderr.contains("without NCCL") && !stderr.contains("frame #"),
            "{how}: {stderr}"
        );
    }
}
