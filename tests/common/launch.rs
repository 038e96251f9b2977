//! Spawning the real binary as the ranks of a job on 127.0.0.1, launched the way torchrun
//! launches them (its environment variables). Every run has a hard time limit; children still
//! running when a test ends (or fails) are killed by PID.
use std::io::Read;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Generous for 2 shared cores; a healthy 2-rank check takes a few seconds.
pub const LIMIT: Duration = Duration::from_secs(120);

/// One spawned rank and what it printed so far.
pub struct Rank {
    pub child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Rank {
    pub fn output(&self) -> (String, String) {
        let read = |s: &Arc<Mutex<String>>| s.lock().unwrap().clone();
        (read(&self.stdout), read(&self.stderr))
    }

    /// Waits for the exit, failing the test (the job's drop kills everyone) at `deadline`.
    pub fn wait(&mut self, deadline: Instant) -> ExitStatus {
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

    #[allow(dead_code)] // not every test binary waits for a message
    pub fn wait_for_stderr(&self, needle: &str, deadline: Instant) {
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
pub struct Job {
    pub ranks: Vec<Rank>,
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
pub fn difftune(args: &[&str]) -> Command {
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
pub fn launch(world: usize, ranks: &[usize], args: &[&str]) -> Job {
    launch_with(world, ranks, |_| {
        args.iter().map(|a| a.to_string()).collect()
    })
}

/// As [`launch`], with each rank's arguments from `args_of(rank)`.
pub fn launch_with(world: usize, ranks: &[usize], args_of: impl Fn(usize) -> Vec<String>) -> Job {
    let port = free_port().to_string();
    let ranks = ranks
        .iter()
        .map(|&rank| {
            let args = args_of(rank);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut command = difftune(&args);
            command
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", &port);
            spawn(command)
        })
        .collect();
    Job { ranks }
}

/// Starts `command` with its stdout and stderr captured into a [`Rank`].
fn spawn(mut command: Command) -> Rank {
    let mut child = command
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
}

/// Runs every rank of a `world`-rank job of `difftune ARGS` to a successful exit (within
/// [`LIMIT`]); the job keeps what each rank printed.
#[allow(dead_code)] // not every test binary runs jobs to completion
pub fn run_to_success(world: usize, args: &[&str]) -> Job {
    let mut job = launch(world, &(0..world).collect::<Vec<_>>(), args);
    let deadline = Instant::now() + LIMIT;
    for rank in &mut job.ranks {
        let status = rank.wait(deadline);
        assert!(status.success(), "{status}: {:?}", rank.output());
    }
    job
}

/// Starts one process of `difftune ARGS` per entry of `commands`, without a launcher (processes
/// that cooperate on their own, e.g. `compare` invocations on one folder), each printing into
/// its [`Rank`].
#[allow(dead_code)] // not every test binary starts independent processes
pub fn start(commands: &[Vec<String>]) -> Job {
    let ranks = commands
        .iter()
        .map(|args| {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            spawn(difftune(&args))
        })
        .collect();
    Job { ranks }
}
