//! Which device runs the encoder: CUDA when present, the CPU otherwise.

use std::fmt;
use std::str::FromStr;

use tch::{Cuda, Device};

use super::EmbedError;

/// What the operator asked for with `--device`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChoice {
    /// Every CUDA device when there is one, else the CPU.
    Auto,
    Cpu,
    /// These CUDA devices (`cuda:0,1` or `cuda:0,cuda:1`).
    Cuda(Vec<usize>),
}

impl FromStr for DeviceChoice {
    type Err = EmbedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || EmbedError::UnknownDevice(s.to_string());
        let lower = s.trim().to_ascii_lowercase();
        match lower.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(vec![0])),
            other => {
                let list = other.strip_prefix("cuda:").ok_or_else(bad)?;
                let mut ordinals = Vec::new();
                for part in list.split(',') {
                    let n = part.trim().trim_start_matches("cuda:").parse().map_err(|_| bad())?;
                    if !ordinals.contains(&n) {
                        ordinals.push(n);
                    }
                }
                Ok(Self::Cuda(ordinals))
            }
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(ordinals) => {
                let list: Vec<String> = ordinals.iter().map(|n| n.to_string()).collect();
                write!(f, "cuda:{}", list.join(","))
            }
        }
    }
}

/// What libtorch reports about CUDA on this machine.
#[derive(Debug, Clone, Copy)]
pub struct CudaInfo {
    pub available: bool,
    pub device_count: usize,
}

impl CudaInfo {
    pub fn probe() -> Self {
        let available = Cuda::is_available();
        let device_count = if available { Cuda::device_count().max(0) as usize } else { 0 };
        Self { available, device_count }
    }
}

/// Resolves a choice against what exists; asking for a missing GPU is an error,
/// not a silent fall-back, so a misconfigured GPU host fails loudly at start.
pub fn resolve(choice: &DeviceChoice, cuda: CudaInfo) -> Result<Vec<Device>, EmbedError> {
    match choice {
        DeviceChoice::Auto if cuda.available && cuda.device_count > 0 => {
            Ok((0..cuda.device_count).map(Device::Cuda).collect())
        }
        DeviceChoice::Auto | DeviceChoice::Cpu => Ok(vec![Device::Cpu]),
        DeviceChoice::Cuda(ordinals) => ordinals
            .iter()
            .map(|&n| {
                if n < cuda.device_count {
                    Ok(Device::Cuda(n))
                } else {
                    Err(EmbedError::MissingCuda { ordinal: n, visible: cuda.device_count })
                }
            })
            .collect(),
    }
}

pub fn describe(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_GPU: CudaInfo = CudaInfo { available: false, device_count: 0 };
    const TWO_GPUS: CudaInfo = CudaInfo { available: true, device_count: 2 };

    #[test]
    fn parses_choices() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!("CPU".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(vec![0]));
        assert_eq!("cuda:1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(vec![1]));
        assert_eq!("cuda:0,1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(vec![0, 1]));
        assert_eq!("cuda:1,cuda:0,1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(vec![1, 0]));
        assert_eq!(DeviceChoice::Cuda(vec![0, 2]).to_string(), "cuda:0,2");
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert!("cuda:0,".parse::<DeviceChoice>().is_err());
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn auto_takes_every_gpu_and_falls_back_to_cpu() {
        assert_eq!(resolve(&DeviceChoice::Auto, TWO_GPUS).unwrap(), vec![Device::Cuda(0), Device::Cuda(1)]);
        assert_eq!(resolve(&DeviceChoice::Auto, NO_GPU).unwrap(), vec![Device::Cpu]);
        assert_eq!(resolve(&DeviceChoice::Cuda(vec![1]), TWO_GPUS).unwrap(), vec![Device::Cuda(1)]);
        assert!(resolve(&DeviceChoice::Cuda(vec![0, 2]), TWO_GPUS).is_err());
        assert!(resolve(&DeviceChoice::Cuda(vec![0]), NO_GPU).is_err());
    }

    #[test]
    fn this_machine_resolves_auto() {
        // Whatever the machine, `auto` must resolve; on a CPU-only CI it is the CPU.
        let cuda = CudaInfo::probe();
        let devices = resolve(&DeviceChoice::Auto, cuda).unwrap();
        assert_eq!(devices == vec![Device::Cpu], !cuda.available);
    }
}
