//! diffusers' ResnetBlock2D, Downsample2D and Upsample2D, shared by the U-Net and the VAE.
use super::checkpoint::Scope;
use super::layers::{Conv2d, GroupNorm, Linear};
use tch::{nn, Tensor};

#[derive(Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    /// Projects the time embedding; absent in the VAE.
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f64,
}

pub struct ResnetConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::Path, c: &ResnetConfig) -> Self {
        let (cin, cout) = (c.in_channels, c.out_channels);
        Self {
            norm1: GroupNorm::new(&vs / "norm1", c.groups, cin, c.eps),
            conv1: Conv2d::new(&vs / "conv1", cin, cout, 3, 1, 1),
            time_emb_proj: c
                .temb_channels
                .map(|t| Linear::new(&vs / "time_emb_proj", t, cout, true)),
            norm2: GroupNorm::new(&vs / "norm2", c.groups, cout, c.eps),
            conv2: Conv2d::new(&vs / "conv2", cout, cout, 3, 1, 1),
            conv_shortcut: (cin != cout)
                .then(|| Conv2d::new(&vs / "conv_shortcut", cin, cout, 1, 1, 0)),
            output_scale_factor: c.output_scale_factor,
        }
    }

    /// [`ResnetBlock2D::forward`], checkpointed in `scope` when there is one.
    pub fn forward_in<'env>(
        &'env self,
        scope: Option<&Scope<'_, 'env>>,
        x: &Tensor,
        temb: &Tensor,
    ) -> Tensor {
        match scope {
            Some(scope) => scope.checkpoint(&[x, temb], |xs| self.forward(&xs[0], Some(&xs[1]))),
            None => self.forward(x, Some(temb)),
        }
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            h += proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x.shallow_clone(),
        };
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// A stride-2 3x3 convolution, named `conv` as in diffusers.
#[derive(Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    /// The VAE pads asymmetrically (right/bottom by one) and convolves without padding.
    pub asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(vs: nn::Path, channels: i64, padding: i64) -> Self {
        Self {
            conv: Conv2d::new(&vs / "conv", channels, channels, 3, 2, padding),
            asymmetric_pad: padding == 0,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.asymmetric_pad {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour 2x upsampling followed by a 3x3 convolution.
#[derive(Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vs: nn::Path, channels: i64) -> Self {
        Self {
            conv: Conv2d::new(&vs / "conv", channels, channels, 3, 1, 1),
        }
    }

    /// `size` forces the output's spatial size (the U-Net passes its skip connection's size when the
    /// input was not a multiple of the total downsampling factor).
    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (_, _, h, w) = x.size4().expect("upsample input must be [b, c, h, w]");
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        self.conv
            .forward(&x.upsample_nearest2d([oh, ow], None, None))
    }
}
