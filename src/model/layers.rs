//! The leaf layers of every model, as plain structs over tch tensors. `Linear` and `Conv2d` carry an
//! optional extension so tuning methods (LoRA, DoRA, ...) can change what the layer computes without
//! the model code knowing about them.
use tch::{nn, Tensor};

/// The dotted name of a VarStore path (`down_blocks.1.attentions.0`), as in diffusers state dicts.
pub fn path_name(vs: &nn::Path) -> String {
    vs.components().collect::<Vec<_>>().join(".")
}

/// Something a tuning method attaches to a `Linear`: it computes the layer's whole output, so it can
/// add a low-rank delta (LoRA) or re-derive the weight (DoRA).
pub trait LinearExtension: Send + std::fmt::Debug {
    fn forward(&self, base: &Linear, x: &Tensor) -> Tensor;
}

/// The `Conv2d` counterpart of [`LinearExtension`].
pub trait Conv2dExtension: Send + std::fmt::Debug {
    fn forward(&self, base: &Conv2d, x: &Tensor) -> Tensor;
}

#[derive(Debug)]
pub struct Linear {
    /// Dotted parameter prefix, as in the diffusers state dict (`...attn2.to_q`).
    pub path: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub extension: Option<Box<dyn LinearExtension>>,
}

impl Linear {
    pub fn new(vs: nn::Path, in_dim: i64, out_dim: i64, bias: bool) -> Self {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let weight = vs.var(
            "weight",
            &[out_dim, in_dim],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let bias = bias.then(|| {
            vs.var(
                "bias",
                &[out_dim],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            )
        });
        Self {
            path: path_name(&vs),
            weight,
            bias,
            extension: None,
        }
    }

    /// The frozen layer's own output, ignoring any extension.
    pub fn base_forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match &self.extension {
            Some(ext) => ext.forward(self, x),
            None => self.base_forward(x),
        }
    }
}

#[derive(Debug)]
pub struct Conv2d {
    pub path: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: i64,
    pub padding: i64,
    pub extension: Option<Box<dyn Conv2dExtension>>,
}

impl Conv2d {
    pub fn new(
        vs: nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Self {
        let fan_in = (in_channels * kernel * kernel) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let weight = vs.var(
            "weight",
            &[out_channels, in_channels, kernel, kernel],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        );
        let bias = Some(vs.var(
            "bias",
            &[out_channels],
            nn::Init::Uniform {
                lo: -bound,
                up: bound,
            },
        ));
        Self {
            path: path_name(&vs),
            weight,
            bias,
            stride,
            padding,
            extension: None,
        }
    }

    /// Runs the convolution with another weight/bias but this layer's geometry (used by DoRA and merges).
    pub fn conv_with(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
        x.conv2d(weight, bias, [self.stride; 2], [self.padding; 2], [1, 1], 1)
    }

    pub fn base_forward(&self, x: &Tensor) -> Tensor {
        self.conv_with(x, &self.weight, self.bias.as_ref())
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match &self.extension {
            Some(ext) => ext.forward(self, x),
            None => self.base_forward(x),
        }
    }
}

#[derive(Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: i64,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vs: nn::Path, groups: i64, channels: i64, eps: f64) -> Self {
        Self {
            weight: vs.var("weight", &[channels], nn::Init::Const(1.0)),
            bias: vs.var("bias", &[channels], nn::Init::Const(0.0)),
            groups,
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (weight, bias) = affine_operands(&self.weight, &self.bias);
        x.group_norm(self.groups, Some(&weight), Some(&bias), self.eps, true)
    }
}

#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vs: nn::Path, dim: i64, eps: f64) -> Self {
        Self {
            weight: vs.var("weight", &[dim], nn::Init::Const(1.0)),
            bias: vs.var("bias", &[dim], nn::Init::Const(0.0)),
            eps,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let dim = *x.size().last().expect("layer norm of a scalar");
        let (weight, bias) = affine_operands(&self.weight, &self.bias);
        x.layer_norm([dim], Some(&weight), Some(&bias), self.eps, true)
    }
}

/// A norm's scale and shift in one dtype: f32 when they differ, as when a bf16-frozen model trains
/// its f32 biases (BitFit). CUDA autocast runs norms in f32 anyway; the CPU's kernels accept a
/// bf16 input with f32 parameters, but not bf16 and f32 parameters together.
fn affine_operands(weight: &Tensor, bias: &Tensor) -> (Tensor, Tensor) {
    if weight.kind() == bias.kind() {
        (weight.shallow_clone(), bias.shallow_clone())
    } else {
        (
            weight.to_kind(tch::Kind::Float),
            bias.to_kind(tch::Kind::Float),
        )
    }
}
