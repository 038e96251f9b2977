//! Seeded initialisation of the tensors a method adds: each tensor's values are drawn from its own
//! generator, seeded by (run seed, method, tensor name), so a method's initial weights depend on
//! nothing else — not the order in which tensors or methods are attached, not any earlier draw —
//! and no global generator (torch's included) is read or advanced.
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};
use sha2::{Digest, Sha256};
use tch::{nn, Tensor};

/// Where a method's random initial values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitSeed {
    seed: u64,
    method: &'static str,
}

impl InitSeed {
    pub fn new(seed: u64, method: &'static str) -> Self {
        Self { seed, method }
    }

    /// The generator of the tensor called `name` (its full store path).
    fn generator(&self, name: &str) -> ChaCha8Rng {
        let digest = Sha256::new()
            .chain_update(self.seed.to_le_bytes())
            .chain_update(self.method.as_bytes())
            .chain_update([0])
            .chain_update(name.as_bytes())
            .finalize();
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&digest);
        ChaCha8Rng::from_seed(seed)
    }

    /// A new trainable variable `name` under `path`, initialised as `init` says with values
    /// drawn from the tensor's own generator (constants need none).
    pub fn var(&self, path: &nn::Path, name: &str, dims: &[i64], init: nn::Init) -> Tensor {
        let count: i64 = dims.iter().product();
        let mut rng = self.generator(&path.path(name));
        let values: Vec<f32> = match init {
            nn::Init::Uniform { lo, up } => {
                let uniform = Uniform::new(lo, up).expect("a uniform init needs lo < up");
                (0..count)
                    .map(|_| uniform.sample(&mut rng) as f32)
                    .collect()
            }
            nn::Init::Randn { mean, stdev } => {
                let normal = Normal::new(mean, stdev).expect("a normal init needs a finite stdev");
                (0..count).map(|_| normal.sample(&mut rng) as f32).collect()
            }
            nn::Init::Const(_) => return path.var(name, dims, init),
            other => panic!("seeded init of {other:?} is not supported"),
        };
        let values = Tensor::from_slice(&values)
            .reshape(dims)
            .to_kind(path.kind());
        path.var_copy(name, &values)
    }
}
