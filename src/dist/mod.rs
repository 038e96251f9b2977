//! Data-parallel execution on PyTorch's own c10d (TCPStore rendezvous, Gloo on CPU, NCCL on CUDA),
//! reached through the C++ shim in csrc/dist.cpp. Jobs are launched like PyTorch jobs (torchrun,
//! SLURM's srun, a Kubernetes PyTorchJob); without launcher variables a process is a trivial
//! group of one whose collectives do nothing.
mod ffi;
mod group;
pub mod hostlist;
mod launch;

pub use group::{shard_range, Backend, ProcessGroup, DEFAULT_TIMEOUT};
pub use launch::{Launch, Launcher, StoreHost, DEFAULT_MASTER_PORT};
