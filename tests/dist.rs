//! Multi-process runs of the real binary as Gloo ranks on 127.0.0.1, launched the way torchrun
//! launches them (its environment variables). Every run has a hard time limit; children still
//! running when a test ends (or fails) are killed by PID.
use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Generous for 2 shared cores; a healthy 2-rank check takes a few seconds.
const LIMIT: Duration = Duration::from_secs(120);

/// One spawned rank and what it printed so far.
struct Rank {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Rank {
    fn output(&self) -> (String, String) {
        let read = |s: &Arc<Mutex<String>>| s.lock().unwrap().clone();
        (read(&self.stdout), read(&self.stderr))
    }

    /// Waits for the exit, failing the test (the job's drop kills everyone) at `deadline`.
    fn wait(&mut self, deadline: Instant) -> ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                sleep(Duration::from_millis(200));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "pid {} still running at the deadline; output: {:?}",
                self.child.id(),
                self.output()
            );
            sleep(Duration::from_millis(50));
        }
    }

    fn wait_for_stderr(&self, needle: &str, deadline: Instant) {
        while !self.stderr.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "`{needle}` never appeared; output: {:?}",
                self.output()
            );
            sleep(Duration::from_millis(50));
        }
    }
}

/// The ranks of one job; dropping it kills (by PID) those still running.
struct Job {
    ranks: Vec<Rank>,
}

impl Drop for Job {
    fn drop(&mut self) {
        for rank in &mut self.ranks {
            if rank.child.try_wait().ok().flatten().is_none() {
                let _ = rank.child.kill();
                let _ = rank.child.wait();
            }
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Captures a pipe into a shared string on a reader thread.
fn capture(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buffer) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    });
    text
}

/// `difftune ARGS` with no launcher variables inherited from the test's own environment.
fn difftune(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_difftune"));
    command.args(args).env("OMP_NUM_THREADS", "1");
    for (name, _) in std::env::vars() {
        let launcher = [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
        ]
        .contains(&name.as_str())
            || name == "MASTER_PORT"
            || name == "GLOO_SOCKET_IFNAME"
            || name.starts_with("SLURM_")
            || name.starts_with("TORCHELASTIC_");
        if launcher {
            command.env_remove(name);
        }
    }
    command
}

/// Starts `ranks` of a `world`-rank job as torchrun would (rank 0 hosts the store).
fn launch(world: usize, ranks: &[usize], args: &[&str]) -> Job {
    let port = free_port().to_string();
    let ranks = ranks
        .iter()
        .map(|&rank| {
            let mut child = difftune(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = capture(child.stdout.take().unwrap());
            let stderr = capture(child.stderr.take().unwrap());
            Rank {
                child,
                stdout,
                stderr,
            }
        })
        .collect();
    Job { ranks }
}

fn check_all_succeed(world: usize) -> Job {
    let mut job = launch(
        world,
        &(0..world).collect::<Vec<_>>(),
        &["dist-check", "--sizes", "1000,100000", "--repeats", "3"],
    );
    let deadline = Instant::now() + LIMIT;
    for rank in &mut job.ranks {
        let status = rank.wait(deadline);
        assert!(status.success(), "{status}: {:?}", rank.output());
    }
    job
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
fn three_ranks_gather_uneven_shares() {
    // Rank r holds r rows: 0, 1 and 2 rows are gathered in rank order.
    let job = check_all_succeed(3);
    let (stdout, _) = job.ranks[0].output();
    assert!(stdout.contains("correct on every rank"), "{stdout}");
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
