//! How a command joins a multi-process launch (torchrun, srun): the process group built from the
//! shared `--dist-timeout` setting and the device the user asked for, and the device this rank
//! computes on (`cuda:LOCAL_RANK` in CUDA jobs).
use super::dist_check::DistArgs;
use crate::dist::ProcessGroup;
use anyhow::Result;
use tch::Device;

/// This process's group and the device its tensors live on. Without launcher variables: a
/// single process on `requested`.
pub fn join(dist: &DistArgs, requested: Device) -> Result<(ProcessGroup, Device)> {
    let group = ProcessGroup::from_env(requested, dist.timeout())?;
    let device = group.local_device(requested);
    Ok((group, device))
}
