//! What a comparison ran on, and the peak-memory probe used for each method: the report names the
//! machine and the commit so numbers from different runs are never compared blindly.
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Command;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MachineInfo {
    pub cpu_model: String,
    /// Logical CPUs this process may use.
    pub cpu_cores: usize,
    /// GPU names as nvidia-smi lists them; empty without a GPU.
    pub gpus: Vec<String>,
    /// The device models ran on (`cpu` or `cuda:N`).
    pub device: String,
    pub os: String,
}

/// The machine's cores (what this process may use).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl MachineInfo {
    pub fn detect(device: tch::Device) -> Self {
        Self {
            cpu_model: cpu_model().unwrap_or_else(|| "unknown".into()),
            cpu_cores: cores(),
            gpus: if device.is_cuda() {
                nvidia_smi(&["--query-gpu=name", "--format=csv,noheader"])
            } else {
                Vec::new()
            },
            device: match device {
                tch::Device::Cuda(i) => format!("cuda:{i}"),
                other => format!("{other:?}").to_lowercase(),
            },
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        }
    }

    /// One line for the report: "AMD EPYC, 2 cores, no GPU (device cpu)".
    pub fn describe(&self) -> String {
        let gpus = if self.gpus.is_empty() {
            "no GPU".to_string()
        } else {
            self.gpus.join(", ")
        };
        format!(
            "{}, {} cores, {} (device {}, {})",
            self.cpu_model, self.cpu_cores, gpus, self.device, self.os
        )
    }
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// Lines nvidia-smi prints for a query; empty when it is missing or fails.
fn nvidia_smi(args: &[&str]) -> Vec<String> {
    match Command::new("nvidia-smi").args(args).output() {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        _ => Vec::new(),
    }
}

/// The 1-, 5- and 15-minute load averages of the machine (`/proc/loadavg`); `None` where it
/// cannot be read. Timings are reported with it: on a shared machine they depend on it.
pub fn load_averages() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut values = text.split_whitespace().map(|v| v.parse().ok());
    Some([values.next()??, values.next()??, values.next()??])
}

/// The 1-minute load average (see [`load_averages`]).
pub fn load_average() -> Option<f64> {
    load_averages().map(|l| l[0])
}

/// The commit of the git checkout at `dir`, or "unknown" outside one (or without git).
pub fn git_commit(dir: &Path) -> String {
    Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// What a peak-memory figure measured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryKind {
    /// Peak resident set size of the process (VmHWM), reset before the measured phase (after
    /// returning the heap's free memory to the OS).
    CpuRss,
    /// Peak memory allocated to tensors by torch's CUDA caching allocator
    /// (`torch.cuda.max_memory_allocated`), its cache emptied and peak reset before the phase.
    CudaAllocated,
    /// Peak GPU memory in use sampled from nvidia-smi: what earlier difftune versions measured,
    /// still read from their reports.
    CudaUsed,
}

impl MemoryKind {
    pub fn describe(self) -> &'static str {
        match self {
            MemoryKind::CpuRss => {
                "peak resident memory of the process (VmHWM, reset before each run once the heap \
                 has returned what earlier runs freed)"
            }
            MemoryKind::CudaAllocated => {
                "peak GPU memory allocated by torch (torch.cuda.max_memory_allocated, reset before \
                 each run with the allocator's cache emptied)"
            }
            MemoryKind::CudaUsed => "peak GPU memory in use (nvidia-smi, sampled every 200 ms)",
        }
    }
}

/// Measures the peak memory of one phase (a method's training, a benchmark's steps).
///
/// On the CPU the kernel's high-water mark is reset at the start and read at the end. On CUDA,
/// torch's caching allocator is asked (as the Python peer asks `torch.cuda.max_memory_allocated`,
/// so bench's figures compare like with like): its peak sees every allocation, where sampling
/// nvidia-smi missed peaks shorter than its interval and counted the CUDA context, the
/// allocator's cache and other processes on the GPU. Its cache is emptied first, so each phase
/// starts from the same allocator state whatever ran before it.
pub struct PeakMemory {
    probe: Probe,
}

enum Probe {
    Cpu,
    /// The CUDA device, if its statistics were reset.
    Cuda(Option<usize>),
}

impl PeakMemory {
    pub fn start(device: tch::Device) -> Self {
        if let tch::Device::Cuda(index) = device {
            let reset = crate::util::cuda_memory::reset_peak(index)
                .inspect_err(|e| eprintln!("warning: {e:#}; peak memory not measured"));
            return Self {
                probe: Probe::Cuda(reset.ok().map(|()| index)),
            };
        }
        // Memory an earlier phase freed stays resident in glibc's heap until trimmed, and would
        // count toward this phase's peak: return it to the OS first.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free heap pages; it touches no live allocation.
        unsafe {
            libc::malloc_trim(0);
        }
        // Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0); where that is
        // refused the figure is the process-lifetime peak, still an upper bound.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        Self { probe: Probe::Cpu }
    }

    /// The peak in bytes since `start`, if it could be measured.
    pub fn finish(self) -> (MemoryKind, Option<u64>) {
        match self.probe {
            Probe::Cpu => (MemoryKind::CpuRss, status_bytes("VmHWM")),
            Probe::Cuda(index) => {
                let peak = index.and_then(|index| {
                    crate::util::cuda_memory::peak_allocated(index)
                        .inspect_err(|e| eprintln!("warning: {e:#}"))
                        .ok()
                });
                (MemoryKind::CudaAllocated, peak)
            }
        }
    }
}

/// A memory figure of /proc/self/status (`VmHWM`, `VmRSS`, ...) in bytes.
fn status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..]
        .trim_start_matches(':')
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_peak_memory_sees_an_allocation() {
        let probe = PeakMemory::start(tch::Device::Cpu);
        let block = vec![1u8; 64 << 20];
        std::hint::black_box(&block);
        let (kind, peak) = probe.finish();
        assert_eq!(kind, MemoryKind::CpuRss);
        assert!(peak.unwrap() >= 64 << 20, "peak {peak:?}");
    }

    #[test]
    #[ignore = "needs a CUDA device"]
    fn cuda_peak_memory_sees_an_allocation_of_this_phase_only() {
        let device = tch::Device::Cuda(0);
        let earlier = tch::Tensor::zeros([64 << 20], (tch::Kind::Float, device));
        drop(earlier);
        let probe = PeakMemory::start(device);
        let block = tch::Tensor::zeros([16 << 20], (tch::Kind::Float, device));
        let (kind, peak) = probe.finish();
        drop(block);
        assert_eq!(kind, MemoryKind::CudaAllocated);
        let peak = peak.unwrap();
        assert!((64 << 20..256 << 20).contains(&peak), "peak {peak} B");
    }

    /// Every other 64 KiB block of 512 MiB freed: 256 MiB of holes between live blocks, which
    /// stay resident (a heap shrinks only at its end), yet are not this phase's memory.
    #[test]
    fn cpu_peak_memory_leaves_out_what_an_earlier_phase_freed() {
        let mut blocks: Vec<Option<Vec<u8>>> =
            (0..8192).map(|_| Some(vec![1u8; 64 << 10])).collect();
        blocks.iter_mut().step_by(2).for_each(|b| *b = None);
        let resident = status_bytes("VmRSS").unwrap();
        let probe = PeakMemory::start(tch::Device::Cpu);
        let (_, peak) = probe.finish();
        std::hint::black_box(&blocks);
        let peak = peak.unwrap();
        assert!(
            peak < resident - (128 << 20),
            "peak {peak} B, resident {resident} B with the holes"
        );
    }

    #[test]
    fn machine_description_names_cpu_and_device() {
        let info = MachineInfo::detect(tch::Device::Cpu);
        assert!(info.cpu_cores >= 1);
        assert!(
            info.describe().contains("device cpu"),
            "{}",
            info.describe()
        );
    }
}
