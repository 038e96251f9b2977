//! Where this process sits in a multi-process job, read from the launcher's environment:
//! torchrun (also Kubernetes PyTorchJob, which sets the same variables) or SLURM's `srun`.
use super::hostlist;
use anyhow::{bail, Context, Result};

/// torch's default rendezvous port, used under SLURM when MASTER_PORT is not set.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher started the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// `torchrun` or anything setting its variables (RANK, WORLD_SIZE, MASTER_ADDR, ...).
    Torchrun,
    /// `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the job's node list).
    Slurm,
}

/// Who serves the rendezvous store (a c10d TCPStore) on MASTER_ADDR:MASTER_PORT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreHost {
    /// Rank 0 binds the address and serves the store; the other ranks connect.
    Rank0,
    /// torchrun's agent already serves it (TORCHELASTIC_USE_AGENT_STORE=True): all are clients.
    Agent,
}

/// This process's place in the job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    /// Processes on this node, when the launcher says (torchrun always does).
    pub local_world_size: Option<usize>,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun's restart count: store keys are prefixed with it so a restarted job starts clean.
    pub restart_count: u32,
    pub store_host: StoreHost,
}

impl Launch {
    /// The launch described by this process's environment; `None` when no launcher variables
    /// are set (or SLURM runs a single task): an ordinary single process.
    pub fn from_env() -> Result<Option<Launch>> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// As [`Launch::from_env`], reading variables through `var` (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let launch = if var("RANK").is_some() || var("WORLD_SIZE").is_some() {
            Some(torchrun(&var)?)
        } else if var("SLURM_PROCID").is_some() {
            slurm(&var)?
        } else {
            None
        };
        if let Some(launch) = &launch {
            launch.validate()?;
        }
        Ok(launch)
    }

    fn validate(&self) -> Result<()> {
        if self.world_size == 0 {
            bail!("the world size is 0");
        }
        if self.rank >= self.world_size {
            bail!(
                "rank {} is not below the world size {}",
                self.rank,
                self.world_size
            );
        }
        if let Some(local) = self.local_world_size {
            if self.local_rank >= local {
                bail!(
                    "local rank {} is not below the local world size {local}",
                    self.local_rank
                );
            }
        }
        Ok(())
    }
}

fn required(var: &impl Fn(&str) -> Option<String>, name: &str, launcher: &str) -> Result<String> {
    var(name).with_context(|| format!("{launcher} launch: {name} is not set"))
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .trim()
        .parse()
        .ok()
        .with_context(|| format!("{name}=`{value}` is not a valid number"))
}

fn torchrun(var: &impl Fn(&str) -> Option<String>) -> Result<Launch> {
    let get = |name| -> Result<String> { required(var, name, "torchrun") };
    let optional = |name: &str| var(name).map(|v| number::<usize>(name, &v)).transpose();
    let agent_store = var("TORCHELASTIC_USE_AGENT_STORE")
        .is_some_and(|v| matches!(v.trim(), "True" | "true" | "1"));
    Ok(Launch {
        launcher: Launcher::Torchrun,
        rank: number("RANK", &get("RANK")?)?,
        world_size: number("WORLD_SIZE", &get("WORLD_SIZE")?)?,
        // A Kubernetes PyTorchJob runs one process per pod and sets no LOCAL_RANK.
        local_rank: optional("LOCAL_RANK")?.unwrap_or(0),
        local_world_size: optional("LOCAL_WORLD_SIZE")?,
        master_addr: get("MASTER_ADDR")?,
        master_port: number("MASTER_PORT", &get("MASTER_PORT")?)?,
        restart_count: var("TORCHELASTIC_RESTART_COUNT")
            .map(|v| number("TORCHELASTIC_RESTART_COUNT", &v))
            .transpose()?
            .unwrap_or(0),
        store_host: if agent_store {
            StoreHost::Agent
        } else {
            StoreHost::Rank0
        },
    })
}

/// A SLURM task; `None` for a single-task step (nothing to coordinate).
fn slurm(var: &impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
    let get = |name| -> Result<String> { required(var, name, "SLURM") };
    let world_size: usize = number("SLURM_NTASKS", &get("SLURM_NTASKS")?)?;
    if world_size == 1 {
        return Ok(None);
    }
    let master_addr = match var("MASTER_ADDR") {
        Some(addr) => addr,
        None => {
            let nodes = var("SLURM_JOB_NODELIST")
                .or_else(|| var("SLURM_NODELIST"))
                .context("SLURM launch: neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")?;
            hostlist::first_host(&nodes)?
        }
    };
    let master_port = match var("MASTER_PORT") {
        Some(port) => number("MASTER_PORT", &port)?,
        None => DEFAULT_MASTER_PORT,
    };
    Ok(Some(Launch {
        launcher: Launcher::Slurm,
        rank: number("SLURM_PROCID", &get("SLURM_PROCID")?)?,
        world_size,
        local_rank: var("SLURM_LOCALID")
            .map(|v| number("SLURM_LOCALID", &v))
            .transpose()?
            .unwrap_or(0),
        // SLURM_NTASKS_PER_NODE is a plain number only when every node runs the same count.
        local_world_size: var("SLURM_NTASKS_PER_NODE").and_then(|v| v.trim().parse().ok()),
        master_addr,
        master_port,
        restart_count: var("SLURM_RESTART_COUNT")
            .map(|v| number("SLURM_RESTART_COUNT", &v))
            .transpose()?
            .unwrap_or(0),
        store_host: StoreHost::Rank0,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::from_vars(|name| map.get(name).cloned())
    }

    #[test]
    fn no_variables_is_a_single_process() {
        assert_eq!(launch(&[]).unwrap(), None);
        assert_eq!(launch(&[("PATH", "/bin")]).unwrap(), None);
    }

    #[test]
    fn reads_torchrun() {
        let got = launch(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            Launch {
                launcher: Launcher::Torchrun,
                rank: 3,
                world_size: 8,
                local_rank: 1,
                local_world_size: Some(2),
                master_addr: "10.0.0.1".into(),
                master_port: 29400,
                restart_count: 2,
                store_host: StoreHost::Agent,
            }
        );
    }

    #[test]
    fn torchrun_without_agent_store_is_hosted_by_rank_0() {
        let got = launch(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "False"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(got.store_host, StoreHost::Rank0);
        assert_eq!(
            (got.local_rank, got.local_world_size, got.restart_count),
            (0, None, 0)
        );
    }

    #[test]
    fn torchrun_errors_name_the_variable() {
        let missing = launch(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")]);
        assert!(format!("{:#}", missing.unwrap_err()).contains("MASTER_ADDR"));
        let bad = launch(&[
            ("RANK", "x"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
        ]);
        assert!(format!("{:#}", bad.unwrap_err()).contains("RANK=`x`"));
        let outside = launch(&[
            ("RANK", "2"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "1"),
        ]);
        assert!(format!("{:#}", outside.unwrap_err()).contains("rank 2"));
        let port = launch(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "a"),
            ("MASTER_PORT", "70000"),
        ]);
        assert!(format!("{:#}", port.unwrap_err()).contains("MASTER_PORT"));
    }

    #[test]
    fn reads_slurm_with_the_first_host_of_the_node_list() {
        let got = launch(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS_PER_NODE", "4"),
            ("SLURM_JOB_NODELIST", "gpu[07-08,11],cpu1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            got,
            Launch {
                launcher: Launcher::Slurm,
                rank: 5,
                world_size: 8,
                local_rank: 1,
                local_world_size: Some(4),
                master_addr: "gpu07".into(),
                master_port: DEFAULT_MASTER_PORT,
                restart_count: 0,
                store_host: StoreHost::Rank0,
            }
        );
    }

    #[test]
    fn slurm_respects_master_variables_and_single_tasks() {
        let got = launch(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_NODELIST", "n[1-2]"),
            ("SLURM_NTASKS_PER_NODE", "2(x1)"),
            ("MASTER_ADDR", "head"),
            ("MASTER_PORT", "4000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((got.master_addr.as_str(), got.master_port), ("head", 4000));
        assert_eq!(got.local_world_size, None);
        let single = launch(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap();
        assert_eq!(single, None);
    }

    #[test]
    fn torchrun_variables_win_over_slurm() {
        let got = launch(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "9"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(got.launcher, Launcher::Torchrun);
    }
}
