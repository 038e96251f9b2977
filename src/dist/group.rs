//! The process group: rendezvous through a c10d TCPStore and collectives on Gloo (CPU) or NCCL
//! (CUDA). A single process gets a trivial group whose collectives cost nothing.
use super::ffi;
use super::launch::{Launch, StoreHost};
use crate::util::device::DeviceChoice;
use anyhow::{anyhow, bail, ensure, Context, Result};
use std::ffi::{c_int, c_void, CString};
use std::net::TcpListener;
use std::ops::Range;
use std::os::fd::IntoRawFd;
use std::ptr::NonNull;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// How long a collective or the rendezvous may wait for a peer before failing (torch's own
/// default for NCCL/Gloo process groups is 10-30 min; a slow first step must fit in it).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The longest a failed rank waits for its peers to report in before naming the silent ones.
const PEER_PROBE_WINDOW: Duration = Duration::from_secs(10);

/// The collective engine, chosen by the device the tensors live on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Gloo over TCP, for CPU tensors.
    Gloo,
    /// NCCL, for CUDA tensors (one GPU per rank).
    Nccl,
}

impl Backend {
    pub fn for_device(device: Device) -> Backend {
        match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        }
    }

    /// Whether this build of difftune can run this backend (NCCL needs its headers at build time).
    pub fn is_available(self) -> bool {
        match self {
            Backend::Gloo => true,
            // SAFETY: a constant query without arguments.
            Backend::Nccl => unsafe { ffi::dt_has_nccl() != 0 },
        }
    }

    fn code(self) -> c_int {
        match self {
            Backend::Gloo => 0,
            Backend::Nccl => 1,
        }
    }
}

/// How Gloo picks this rank's network interface (as torch.distributed does).
enum GlooDevice {
    /// A host name or address (127.0.0.1 when the whole job is on this machine).
    Hostname(String),
    /// A named interface (GLOO_SOCKET_IFNAME).
    Interface(String),
    /// The address this machine's hostname resolves to.
    Default,
}

impl GlooDevice {
    fn for_launch(launch: &Launch) -> GlooDevice {
        if let Ok(names) = std::env::var("GLOO_SOCKET_IFNAME") {
            if let Some(first) = names.split(',').find(|n| !n.trim().is_empty()) {
                return GlooDevice::Interface(first.trim().to_string());
            }
        }
        match launch.master_addr.as_str() {
            "localhost" => GlooDevice::Hostname("127.0.0.1".into()),
            addr if addr.starts_with("127.") || addr == "::1" => GlooDevice::Hostname(addr.into()),
            _ => GlooDevice::Default,
        }
    }

    fn code_and_name(&self) -> (c_int, &str) {
        match self {
            GlooDevice::Hostname(name) => (0, name),
            GlooDevice::Interface(name) => (1, name),
            GlooDevice::Default => (2, ""),
        }
    }
}

/// A connected c10d process group.
struct Connected {
    handle: NonNull<c_void>,
    launch: Launch,
    backend: Backend,
    timeout: Duration,
}

/// This process's group: every rank of a launched job, or just this process.
pub struct ProcessGroup {
    connected: Option<Connected>,
}

impl ProcessGroup {
    /// The group of a process started without a launcher: rank 0 of 1; collectives do nothing.
    pub fn single() -> ProcessGroup {
        ProcessGroup { connected: None }
    }

    /// Joins the job this process was launched into (torchrun or SLURM variables), with the
    /// backend `device` needs; a single process when no launcher variables are set.
    /// `device` is what the user asked for; use [`ProcessGroup::local_device`] for the tensors.
    pub fn from_env(device: Device, timeout: Duration) -> Result<ProcessGroup> {
        match Launch::from_env().context("reading the launcher's environment")? {
            Some(launch) => Self::connect(launch, Backend::for_device(device), timeout),
            None => Ok(Self::single()),
        }
    }

    /// Rendezvous with the other ranks of `launch` and build the `backend` process group.
    /// Fails (never hangs beyond `timeout`) when a rank does not arrive.
    pub fn connect(launch: Launch, backend: Backend, timeout: Duration) -> Result<ProcessGroup> {
        if backend == Backend::Nccl {
            // Asked before NCCL is: without a GPU that is the answer, whatever the build has.
            DeviceChoice::Cuda(launch.local_rank)
                .resolve()
                .with_context(|| {
                    format!("rank {} (LOCAL_RANK {})", launch.rank, launch.local_rank)
                })?;
        }
        if !backend.is_available() {
            bail!(
                "this difftune was built without NCCL support (nccl.h and the CUDA headers were \
                 not found at build time); run on CPU (Gloo) or rebuild with them"
            );
        }
        let rendezvous_context = format!(
            "rank {} of {}: rendezvous at {}:{} ({:?} backend, timeout {} s)",
            launch.rank,
            launch.world_size,
            launch.master_addr,
            launch.master_port,
            backend,
            timeout.as_secs()
        );
        let handle = Self::rendezvous(&launch, backend, timeout).context(rendezvous_context)?;
        Ok(ProcessGroup {
            connected: Some(Connected {
                handle,
                launch,
                backend,
                timeout,
            }),
        })
    }

    fn rendezvous(launch: &Launch, backend: Backend, timeout: Duration) -> Result<NonNull<c_void>> {
        // Rank 0 binds MASTER_ADDR itself (the TCPStore would bind every interface) and hands the
        // listening socket to the store, which then owns it.
        let listen_fd = if launch.rank == 0 && launch.store_host == StoreHost::Rank0 {
            let listener = TcpListener::bind((launch.master_addr.as_str(), launch.master_port))
                .with_context(|| {
                    format!(
                        "rank 0 cannot listen on MASTER_ADDR:MASTER_PORT {}:{}",
                        launch.master_addr, launch.master_port
                    )
                })?;
            listener.into_raw_fd()
        } else {
            -1
        };
        let host = CString::new(launch.master_addr.as_str())?;
        let prefix = CString::new(format!("difftune/restart{}", launch.restart_count))?;
        let gloo = GlooDevice::for_launch(launch);
        let (gloo_kind, gloo_name) = gloo.code_and_name();
        let gloo_name = CString::new(gloo_name)?;
        let device_index = match backend {
            Backend::Nccl => launch.local_rank as c_int,
            Backend::Gloo => -1,
        };
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the strings outlive the call; `out` receives an owned group on success.
        unsafe {
            ffi::check(ffi::dt_group_new(
                backend.code(),
                host.as_ptr(),
                launch.master_port,
                listen_fd,
                launch.rank as c_int,
                launch.world_size as c_int,
                prefix.as_ptr(),
                timeout.as_millis().min(i64::MAX as u128) as i64,
                gloo_kind,
                gloo_name.as_ptr(),
                device_index,
                &mut out,
            ))
        }
        .map_err(|e| anyhow!(e))?;
        NonNull::new(out).context("the c10d shim returned no group")
    }

    pub fn rank(&self) -> usize {
        self.connected.as_ref().map_or(0, |c| c.launch.rank)
    }

    pub fn world_size(&self) -> usize {
        self.connected.as_ref().map_or(1, |c| c.launch.world_size)
    }

    pub fn local_rank(&self) -> usize {
        self.connected.as_ref().map_or(0, |c| c.launch.local_rank)
    }

    /// Rank 0: the one that writes files, logs and progress bars.
    pub fn is_main(&self) -> bool {
        self.rank() == 0
    }

    /// More than one process takes part (false for [`ProcessGroup::single`]).
    pub fn is_distributed(&self) -> bool {
        self.connected.is_some()
    }

    /// The backend in use; `None` for a single process.
    pub fn backend(&self) -> Option<Backend> {
        self.connected.as_ref().map(|c| c.backend)
    }

    /// The launch this group was built from; `None` for a single process.
    pub fn launch(&self) -> Option<&Launch> {
        self.connected.as_ref().map(|c| &c.launch)
    }

    /// The sub-group of this group's ranks `members`, as torch's `new_group` makes it: its own
    /// collectives among those ranks only, its keys under `name` in the job's rendezvous store
    /// (`name` tells a job's sub-groups apart). Only its members call this, each with the same
    /// `members` and `name`, so sub-groups of disjoint ranks form at once. This rank's rank in it
    /// is its position in `members`; it keeps its device.
    pub fn sub_group(&self, members: Range<usize>, name: &str) -> Result<ProcessGroup> {
        ensure!(
            members.contains(&self.rank()) && members.end <= self.world_size(),
            "rank {} of {} cannot join the sub-group of ranks {members:?}",
            self.rank(),
            self.world_size()
        );
        let Some(c) = &self.connected else {
            return Ok(Self::single());
        };
        let mut launch = c.launch.clone();
        launch.rank -= members.start;
        launch.world_size = members.len();
        let prefix = CString::new(format!("subgroup/{name}"))?;
        let mut out: *mut c_void = std::ptr::null_mut();
        // SAFETY: the parent group and the prefix are live for the call; `out` receives an owned
        // group on success.
        unsafe {
            ffi::check(ffi::dt_group_sub(
                c.handle.as_ptr(),
                prefix.as_ptr(),
                launch.rank as c_int,
                launch.world_size as c_int,
                &mut out,
            ))
        }
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("forming the sub-group `{name}` of ranks {members:?}"))?;
        let handle = NonNull::new(out).context("the c10d shim returned no sub-group")?;
        Ok(ProcessGroup {
            connected: Some(Connected {
                handle,
                launch,
                backend: c.backend,
                timeout: c.timeout,
            }),
        })
    }

    /// The device this rank computes on: CUDA jobs use one GPU per rank, `cuda:LOCAL_RANK`;
    /// a single process keeps what was asked for.
    pub fn local_device(&self, requested: Device) -> Device {
        match (requested, &self.connected) {
            (Device::Cuda(_), Some(c)) => Device::Cuda(c.launch.local_rank),
            _ => requested,
        }
    }

    /// This rank's contiguous share of `0..len`: shares differ by at most one item and, taken in
    /// rank order, tile `0..len` in order.
    pub fn shard_range(&self, len: usize) -> Range<usize> {
        shard_range(len, self.rank(), self.world_size())
    }

    /// This rank's share of `items` (see [`ProcessGroup::shard_range`]).
    pub fn shard<'a, T>(&self, items: &'a [T]) -> &'a [T] {
        &items[self.shard_range(items.len())]
    }

    /// Sums `tensor` over all ranks, in place (f32 or f64, contiguous, on this rank's device).
    pub fn all_reduce_sum(&self, tensor: &mut Tensor) -> Result<()> {
        let Some(c) = &self.connected else {
            return Ok(());
        };
        c.check_tensor(tensor, "all_reduce_sum")?;
        if !matches!(tensor.kind(), Kind::Float | Kind::Double) {
            bail!(
                "all_reduce_sum takes f32 or f64 tensors, not {:?}",
                tensor.kind()
            );
        }
        // SAFETY: the group and the tensor are live for the call.
        let result = unsafe {
            ffi::check(ffi::dt_allreduce_sum(
                c.handle.as_ptr(),
                tensor.as_mut_ptr(),
            ))
        };
        c.collective_result("all_reduce_sum", result)
    }

    /// Overwrites `tensor` on every rank with rank 0's (contiguous, on this rank's device, the
    /// same shape and kind on every rank).
    pub fn broadcast_from_main(&self, tensor: &mut Tensor) -> Result<()> {
        let Some(c) = &self.connected else {
            return Ok(());
        };
        c.check_tensor(tensor, "broadcast_from_main")?;
        // SAFETY: the group and the tensor are live for the call.
        let result =
            unsafe { ffi::check(ffi::dt_broadcast(c.handle.as_ptr(), tensor.as_mut_ptr(), 0)) };
        c.collective_result("broadcast_from_main", result)
    }

    /// Rank 0's `bytes` on every rank (the other ranks' `bytes` are ignored): how a decision taken
    /// on rank 0 alone, serialized, reaches every rank.
    pub fn broadcast_bytes_from_main(&self, bytes: &[u8]) -> Result<Vec<u8>> {
        let Some(c) = &self.connected else {
            return Ok(bytes.to_vec());
        };
        let device = c.collective_device();
        let mut len = Tensor::from_slice(&[bytes.len() as i64]).to_device(device);
        self.broadcast_from_main(&mut len)?;
        let len = len.to_device(Device::Cpu).int64_value(&[0]);
        let mut payload = match self.is_main() {
            true => Tensor::from_slice(bytes).to_device(device),
            false => Tensor::zeros([len], (Kind::Uint8, device)),
        };
        self.broadcast_from_main(&mut payload)?;
        Ok(Vec::<u8>::try_from(payload.to_device(Device::Cpu))?)
    }

    /// Whether `flag` is set on any rank (every rank gets the same answer; a collective).
    pub fn any(&self, flag: bool) -> Result<bool> {
        let Some(c) = &self.connected else {
            return Ok(flag);
        };
        let mut count =
            Tensor::from_slice(&[f32::from(u8::from(flag))]).to_device(c.collective_device());
        self.all_reduce_sum(&mut count)?;
        Ok(count.to_device(Device::Cpu).double_value(&[0]) > 0.0)
    }

    /// Waits until every rank has reached this point.
    pub fn barrier(&self) -> Result<()> {
        let Some(c) = &self.connected else {
            return Ok(());
        };
        // SAFETY: the group is live for the call.
        let result = unsafe { ffi::check(ffi::dt_barrier(c.handle.as_ptr())) };
        c.collective_result("barrier", result)
    }

    /// Every rank's rows, concatenated in rank order, on every rank. `rows` is `[n, ...]` with
    /// `n` free per rank (0 too) and the trailing shape and kind the same on every rank; a 1-D
    /// tensor's elements are its rows. With [`ProcessGroup::shard_range`] shares, the result is
    /// in the original order.
    pub fn all_gather_rows(&self, rows: &Tensor) -> Result<Tensor> {
        let Some(c) = &self.connected else {
            return Ok(rows.shallow_clone());
        };
        let rows = rows.contiguous();
        c.check_tensor(&rows, "all_gather_rows")?;
        if rows.dim() == 0 {
            bail!("all_gather_rows needs a tensor with a row dimension, not a scalar");
        }
        let shape = rows.size();
        let row_numel: i64 = shape[1..].iter().product();
        let header = Tensor::from_slice(&[shape[0], row_numel, kind_code(rows.kind())])
            .to_device(rows.device());
        let headers = c.all_gather(&header)?;
        let headers: Vec<Vec<i64>> = headers
            .iter()
            .map(|h| Vec::<i64>::try_from(h.to_device(Device::Cpu)))
            .collect::<Result<_, _>>()?;
        // Every rank sees the same headers, so every rank takes the same decision here.
        if let Some((r, _)) = headers
            .iter()
            .enumerate()
            .find(|(_, h)| h[1] != row_numel || h[2] != kind_code(rows.kind()))
        {
            bail!(
                "all_gather_rows: rank {r} holds rows of another shape or kind than rank {} \
                 ({shape:?}, {:?})",
                self.rank(),
                rows.kind()
            );
        }
        let max_rows = headers.iter().map(|h| h[0]).max().unwrap_or(0);
        let mut trailing = shape.clone();
        if max_rows == 0 {
            trailing[0] = 0;
            return Ok(Tensor::zeros(&trailing, (rows.kind(), rows.device())));
        }
        // Gloo and NCCL gather equal sizes: pad each share to the longest, then trim.
        let flat = rows.reshape([-1]);
        let padded = flat.constant_pad_nd([0, (max_rows - shape[0]) * row_numel]);
        let gathered = c.all_gather(&padded)?;
        let parts: Vec<Tensor> = gathered
            .iter()
            .zip(&headers)
            .map(|(buffer, h)| {
                trailing[0] = h[0];
                buffer.narrow(0, 0, h[0] * row_numel).reshape(&trailing)
            })
            .collect();
        Ok(Tensor::cat(&parts, 0))
    }

    /// Ends this rank's part in the group (NCCL wants this before exit). Dropping the group
    /// does the same, ignoring errors.
    pub fn shutdown(mut self) -> Result<()> {
        match self.connected.take() {
            Some(c) => c.shutdown(),
            None => Ok(()),
        }
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(c) = self.connected.take() {
            let _ = c.shutdown();
        }
    }
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .field("backend", &self.backend())
            .finish()
    }
}

/// `rank`'s contiguous share of `0..len` among `world` ranks (see [`ProcessGroup::shard_range`]).
pub fn shard_range(len: usize, rank: usize, world: usize) -> Range<usize> {
    assert!(rank < world, "rank {rank} outside a world of {world}");
    let bound = |r: usize| ((len as u128 * r as u128) / world as u128) as usize;
    bound(rank)..bound(rank + 1)
}

/// A number per tensor kind, so ranks can compare kinds inside an i64 header.
fn kind_code(kind: Kind) -> i64 {
    kind as i64
}

impl Connected {
    fn check_tensor(&self, tensor: &Tensor, op: &str) -> Result<()> {
        if !tensor.is_contiguous() {
            bail!("{op} needs a contiguous tensor");
        }
        let device_ok = match self.backend {
            Backend::Gloo => tensor.device() == Device::Cpu,
            Backend::Nccl => matches!(tensor.device(), Device::Cuda(_)),
        };
        if !device_ok {
            bail!(
                "{op}: a {:?} tensor on {:?} cannot go through {:?}",
                tensor.kind(),
                tensor.device(),
                self.backend
            );
        }
        Ok(())
    }

    /// Where this rank's collective buffers live: the CPU for Gloo, this rank's GPU for NCCL.
    fn collective_device(&self) -> Device {
        match self.backend {
            Backend::Gloo => Device::Cpu,
            Backend::Nccl => Device::Cuda(self.launch.local_rank),
        }
    }

    /// One same-shaped tensor per rank, gathered from `input` on every rank.
    fn all_gather(&self, input: &Tensor) -> Result<Vec<Tensor>> {
        let mut outputs: Vec<Tensor> = (0..self.launch.world_size)
            .map(|_| input.empty_like())
            .collect();
        let mut pointers: Vec<*mut torch_sys::C_tensor> =
            outputs.iter_mut().map(Tensor::as_mut_ptr).collect();
        // The shim only reads the input; a second handle on its storage gives the pointer.
        let mut input = input.shallow_clone();
        // SAFETY: the group, input and outputs are live for the call; the shim only reads the
        // pointer array and writes into the tensors' storage.
        let result = unsafe {
            ffi::check(ffi::dt_allgather(
                self.handle.as_ptr(),
                input.as_mut_ptr(),
                pointers.as_mut_ptr(),
                pointers.len() as c_int,
            ))
        };
        self.collective_result("all_gather", result)?;
        Ok(outputs)
    }

    /// A collective's outcome; on failure, the peers that no longer answer are named.
    fn collective_result(&self, op: &str, result: Result<(), String>) -> Result<()> {
        let Err(message) = result else {
            return Ok(());
        };
        Err(crate::error::LostRank {
            op: op.to_string(),
            rank: self.launch.rank,
            world_size: self.launch.world_size,
            peers: self.lost_peers(),
            message,
        }
        .into())
    }

    /// After a failed collective, every surviving rank reports in through the store; the ranks
    /// that stay silent for the probe window are the lost ones.
    fn lost_peers(&self) -> String {
        let key = |rank: usize| CString::new(format!("alive-after-failure/{rank}")).unwrap();
        let one = CString::new("1").unwrap();
        // SAFETY: the group and strings are live for the calls.
        let announce = unsafe {
            ffi::check(ffi::dt_store_set(
                self.handle.as_ptr(),
                key(self.launch.rank).as_ptr(),
                one.as_ptr(),
            ))
        };
        if announce.is_err() {
            return format!(
                "rank 0 is lost (its rendezvous store at {}:{} does not answer)",
                self.launch.master_addr, self.launch.master_port
            );
        }
        let window = PEER_PROBE_WINDOW.min(self.timeout);
        let start = Instant::now();
        loop {
            let silent: Vec<usize> = (0..self.launch.world_size)
                .filter(|&r| r != self.launch.rank)
                .filter(|&r| {
                    let mut present: c_int = 0;
                    // SAFETY: as above; `present` is written by the call.
                    let checked = unsafe {
                        ffi::check(ffi::dt_store_check(
                            self.handle.as_ptr(),
                            key(r).as_ptr(),
                            &mut present,
                        ))
                    };
                    checked.is_err() || present == 0
                })
                .collect();
            if silent.is_empty() {
                return "every peer is still running (no process was lost)".into();
            }
            if start.elapsed() >= window {
                let names: Vec<String> = silent.iter().map(|r| format!("rank {r}")).collect();
                return format!(
                    "lost peer(s): {} (died or stopped answering; silent for {} s after the failure)",
                    names.join(", "),
                    window.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn shutdown(self) -> Result<()> {
        // SAFETY: the group is live; it is freed exactly once, here.
        unsafe {
            let result = ffi::check(ffi::dt_shutdown(self.handle.as_ptr()));
            ffi::dt_group_free(self.handle.as_ptr());
            result.map_err(|e| anyhow!("shutting down the process group: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_range_in_order() {
        for len in [0usize, 1, 2, 7, 10, 101] {
            for world in 1..=5 {
                let shards: Vec<Range<usize>> =
                    (0..world).map(|r| shard_range(len, r, world)).collect();
                assert_eq!(shards[0].start, 0);
                assert_eq!(shards[world - 1].end, len);
                for pair in shards.windows(2) {
                    assert_eq!(pair[0].end, pair[1].start);
                }
                let sizes: Vec<usize> = shards.iter().map(|s| s.len()).collect();
                let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(max - min <= 1, "len {len} world {world}: {sizes:?}");
            }
        }
    }

    #[test]
    fn a_single_process_group_is_trivial() {
        let group = ProcessGroup::single();
        assert_eq!(
            (group.rank(), group.world_size(), group.local_rank()),
            (0, 1, 0)
        );
        assert!(group.is_main() && !group.is_distributed());
        let mut t = Tensor::from_slice(&[1.0f32, 2.0]);
        group.all_reduce_sum(&mut t).unwrap();
        group.broadcast_from_main(&mut t).unwrap();
        group.barrier().unwrap();
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), [1.0, 2.0]);
        assert_eq!(group.broadcast_bytes_from_main(b"abc").unwrap(), b"abc");
        assert!(group.any(true).unwrap() && !group.any(false).unwrap());
        let rows = Tensor::from_slice(&[1i64, 2, 3, 4]).reshape([2, 2]);
        assert_eq!(group.all_gather_rows(&rows).unwrap().size(), [2, 2]);
        assert_eq!(group.shard(&[1, 2, 3]), &[1, 2, 3]);
        assert_eq!(group.local_device(Device::Cuda(3)), Device::Cuda(3));
        group.shutdown().unwrap();
    }
}
