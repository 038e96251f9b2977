//! Where a command computes, in one vocabulary for every `--device` flag and the run config's
//! `device` key: `auto` (CUDA when libtorch sees it, else the CPU), `cpu`, `cuda` (the first
//! CUDA device) or `cuda:N`.
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use tch::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceChoice {
    /// CUDA when available, else the CPU.
    #[default]
    Auto,
    Cpu,
    /// The CUDA device of this index.
    Cuda(usize),
}

impl DeviceChoice {
    /// The device, checking that a CUDA one exists.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceChoice::Auto => Ok(Device::cuda_if_available()),
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(index) => {
                let available = tch::Cuda::device_count() as usize;
                if available == 0 {
                    bail!(
                        "device `{self}`: no CUDA device (libtorch sees none: no NVIDIA GPU or \
                         driver here)"
                    );
                }
                if index >= available {
                    bail!(
                        "device `{self}`: no such CUDA device (libtorch sees {available}: cuda:0 \
                         to cuda:{})",
                        available - 1
                    );
                }
                Ok(Device::Cuda(index))
            }
        }
    }
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|i| i.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{other}` is not a device (auto, cpu, cuda or cuda:N)")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(0) => f.write_str("cuda"),
            DeviceChoice::Cuda(index) => write!(f, "cuda:{index}"),
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;

    fn try_from(name: String) -> Result<Self, String> {
        name.parse()
    }
}

impl From<DeviceChoice> for String {
    fn from(choice: DeviceChoice) -> Self {
        choice.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for name in ["auto", "cpu", "cuda", "cuda:1"] {
            assert_eq!(name.parse::<DeviceChoice>().unwrap().to_string(), name);
        }
        assert_eq!("cuda:0".parse(), Ok(DeviceChoice::Cuda(0)));
        assert!("gpu"
            .parse::<DeviceChoice>()
            .unwrap_err()
            .contains("cuda:N"));
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert_eq!(DeviceChoice::Cpu.resolve().unwrap(), Device::Cpu);
    }
}
