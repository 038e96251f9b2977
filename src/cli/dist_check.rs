//! `difftune dist-check`: the sanity check of a multi-process launch (like torch.distributed's
//! test scripts): every collective difftune uses is run and verified on every rank, then
//! all-reduces are timed. Run it under the launcher the real job will use, e.g.
//! `torchrun --nproc-per-node 2 --no-python difftune dist-check`.
use crate::dist::{Backend, Launch, ProcessGroup, DEFAULT_TIMEOUT};
use crate::util::device::DeviceChoice;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// The settings every data-parallel command shares.
#[derive(Args, Debug, Clone)]
pub struct DistArgs {
    /// Seconds a collective or the rendezvous waits for a peer before the run fails.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_TIMEOUT.as_secs())]
    pub dist_timeout: u64,
}

impl DistArgs {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.dist_timeout)
    }
}

/// Where the checked tensors live (and so the backend: Gloo on CPU, NCCL on CUDA).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CheckDevice {
    Cpu,
    /// One GPU per rank: cuda:LOCAL_RANK.
    Cuda,
}

#[derive(Args, Debug)]
pub struct DistCheckArgs {
    #[arg(long, value_enum, default_value_t = CheckDevice::Cpu)]
    pub device: CheckDevice,
    /// Element counts (f32) of the timed all-reduces.
    #[arg(long, value_delimiter = ',', default_value = "1000000,10000000")]
    pub sizes: Vec<usize>,
    /// Timed all-reduces per size.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    #[command(flatten)]
    pub dist: DistArgs,
}

pub fn run(args: DistCheckArgs) -> Result<()> {
    let launch = Launch::from_env()?;
    if launch.as_ref().is_none_or(|l| l.rank == 0) {
        println!("dist-check: this build has {}", built_backends());
    }
    let requested = match args.device {
        CheckDevice::Cpu => Device::Cpu,
        // Under a launcher the group checks this rank's own GPU, cuda:LOCAL_RANK.
        CheckDevice::Cuda if launch.is_some() => Device::Cuda(0),
        CheckDevice::Cuda => DeviceChoice::Cuda(0).resolve()?,
    };
    let group = ProcessGroup::from_env(requested, args.dist.timeout())?;
    let device = group.local_device(requested);
    if group.is_main() {
        println!("dist-check: {}", describe(&group));
    }
    check_collectives(&group, device)?;
    eprintln!("rank {}: collectives correct", group.rank());
    group.barrier()?;
    if group.is_main() {
        println!("all_reduce_sum, broadcast_from_main, all_gather_rows (uneven), broadcast_bytes_from_main, any, barrier: correct on every rank");
    }
    if group.is_distributed() {
        let halves = check_sub_groups(&group, device)?;
        if group.is_main() {
            println!("the same in two sub-groups at once (ranks {halves}): correct");
        }
    }
    for &size in &args.sizes {
        time_all_reduce(&group, device, size, args.repeats)?;
    }
    group.shutdown()
}

/// The backends compiled into this binary.
fn built_backends() -> &'static str {
    match Backend::Nccl.is_available() {
        true => "Gloo (CPU) and NCCL (CUDA)",
        false => "Gloo (CPU) only: no NCCL",
    }
}

fn describe(group: &ProcessGroup) -> String {
    match group.launch() {
        None => {
            "1 rank (single process: no torchrun or SLURM variables); collectives do nothing".into()
        }
        Some(launch) => format!(
            "{} ranks ({:?} launch, {:?} backend, rendezvous {}:{})",
            launch.world_size,
            launch.launcher,
            group.backend().unwrap_or(Backend::Gloo),
            launch.master_addr,
            launch.master_port
        ),
    }
}

/// Runs each collective on rank-dependent values and compares with the known result.
fn check_collectives(group: &ProcessGroup, device: Device) -> Result<()> {
    let (rank, world) = (group.rank() as f64, group.world_size() as f64);
    let rank_sum = world * (world + 1.0) / 2.0;

    let mut ones = Tensor::full([1000], rank + 1.0, (Kind::Float, device));
    group.all_reduce_sum(&mut ones)?;
    expect_equal(
        "all_reduce_sum (f32)",
        &ones,
        &Tensor::full([1000], rank_sum, (Kind::Float, device)),
    )?;

    let ramp = Tensor::arange(5, (Kind::Double, device));
    let mut scaled = &ramp * (rank + 1.0);
    group.all_reduce_sum(&mut scaled)?;
    expect_equal("all_reduce_sum (f64)", &scaled, &(&ramp * rank_sum))?;

    let from_main = Tensor::arange(4, (Kind::Float, device)) + 42.0;
    let mut received = if group.is_main() {
        from_main.copy()
    } else {
        from_main.zeros_like()
    };
    group.broadcast_from_main(&mut received)?;
    expect_equal("broadcast_from_main", &received, &from_main)?;

    // Rank r holds r rows [r, i]: rank 0 none, the others a different count each.
    let rows_of = |r: i64| -> Tensor {
        let i = Tensor::arange(r, (Kind::Int64, device));
        Tensor::stack(&[i.full_like(r), i], 1)
    };
    let gathered = group.all_gather_rows(&rows_of(group.rank() as i64))?;
    let expected = Tensor::cat(
        &(0..group.world_size() as i64)
            .map(rows_of)
            .collect::<Vec<_>>(),
        0,
    );
    expect_equal("all_gather_rows", &gathered, &expected)?;

    // Rank 0's message, whatever the others hold (their own are longer).
    let message = format!("decided on rank {}", group.rank()).repeat(group.rank() + 1);
    let received = group.broadcast_bytes_from_main(message.as_bytes())?;
    if received != b"decided on rank 0" {
        bail!(
            "broadcast_bytes_from_main gave {:?}",
            String::from_utf8_lossy(&received)
        );
    }
    let last = group.rank() + 1 == group.world_size();
    if !group.any(last)? || group.any(false)? {
        bail!("any gave a wrong result");
    }
    group.barrier().context("barrier")
}

/// Splits the ranks into two sub-groups, the first half (rounded up) and the rest, as a
/// run-parallel study forms its teams, and checks every collective within each, both at once.
/// Returns the halves, in words.
fn check_sub_groups(group: &ProcessGroup, device: Device) -> Result<String> {
    let world = group.world_size();
    let half = world.div_ceil(2);
    let (members, name) = match group.rank() < half {
        true => (0..half, "dist-check-first-half"),
        false => (half..world, "dist-check-second-half"),
    };
    let team = group.sub_group(members.clone(), name)?;
    check_collectives(&team, device)
        .with_context(|| format!("in the sub-group of ranks {members:?}"))?;
    team.shutdown()?;
    group.barrier()?;
    Ok(format!("{:?} and {:?}", 0..half, half..world))
}

fn expect_equal(what: &str, got: &Tensor, expected: &Tensor) -> Result<()> {
    if got.size() != expected.size() || !got.equal(expected) {
        bail!("{what} gave a wrong result: {got:?} instead of {expected:?}");
    }
    Ok(())
}

/// Times `repeats` all-reduces of `size` f32 and prints rank 0's median.
fn time_all_reduce(
    group: &ProcessGroup,
    device: Device,
    size: usize,
    repeats: usize,
) -> Result<()> {
    let mut buffer = Tensor::ones([size as i64], (Kind::Float, device));
    group.all_reduce_sum(&mut buffer)?; // warm-up: the first call sets up Gloo's buffers
    group.barrier()?;
    let mut millis = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        group.all_reduce_sum(&mut buffer)?;
        if let Device::Cuda(index) = device {
            tch::Cuda::synchronize(index as i64);
        }
        millis.push(start.elapsed().as_secs_f64() * 1e3);
    }
    if group.is_main() && !millis.is_empty() {
        millis.sort_by(f64::total_cmp);
        println!(
            "all_reduce_sum of {size} f32 ({:.1} MB): median {:.2} ms, min {:.2} ms over {repeats}",
            size as f64 * 4.0 / 1e6,
            millis[millis.len() / 2],
            millis[0]
        );
    }
    Ok(())
}
