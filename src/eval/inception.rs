//! The InceptionV3 that FID is defined with: pytorch-fid's `InceptionV3` with
//! `use_fid_inception=True`, i.e. torchvision's Inception3 layout patched like TensorFlow's graph
//! (`FIDInceptionA`/`FIDInceptionC`/`FIDInceptionE_1` average-pool without counting the zero
//! padding, `FIDInceptionE_2` max-pools). Parameter names are those of the ported weights file
//! `pt_inception-2015-12-05-6726825d.pth` (`Mixed_5b.branch1x1.conv.weight`, ...).
use crate::model::weights::{load_into, save_tensors, LoadOptions, MappedSafetensors};
use anyhow::{bail, Context, Result};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

/// BatchNorm epsilon of every `BasicConv2d` (TensorFlow's 1e-3, not PyTorch's default 1e-5).
const BN_EPS: f64 = 1e-3;
/// The input resolution the network was trained at; pytorch-fid resizes every image to it.
pub const INPUT_SIZE: i64 = 299;

/// The feature layers pytorch-fid offers, named by their width (`--dims`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureDims {
    /// After the first max pooling (block 0).
    D64,
    /// After the second max pooling (block 1).
    D192,
    /// Before the auxiliary classifier (block 2).
    D768,
    /// The final average pooling, "pool3" (block 3): the standard FID features.
    D2048,
}

impl FeatureDims {
    pub fn from_dims(dims: usize) -> Result<Self> {
        Ok(match dims {
            64 => Self::D64,
            192 => Self::D192,
            768 => Self::D768,
            2048 => Self::D2048,
            other => {
                bail!("Inception feature dims must be one of 64, 192, 768, 2048 (got {other})")
            }
        })
    }

    pub fn dims(self) -> usize {
        match self {
            Self::D64 => 64,
            Self::D192 => 192,
            Self::D768 => 768,
            Self::D2048 => 2048,
        }
    }
}

/// A BatchNorm in eval mode: its running statistics and affine parameters.
#[derive(Debug)]
struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
}

impl BatchNorm {
    fn new(vs: nn::Path, channels: i64) -> Self {
        Self {
            weight: vs.ones_no_train("weight", &[channels]),
            bias: vs.zeros_no_train("bias", &[channels]),
            running_mean: vs.zeros_no_train("running_mean", &[channels]),
            running_var: vs.ones_no_train("running_var", &[channels]),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.batch_norm(
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            false,
            0.0,
            BN_EPS,
            true,
        )
    }
}

/// Conv (no bias) + BatchNorm (eval) + ReLU, torchvision's `BasicConv2d`. Once the weights are
/// loaded, [`Self::fold_batch_norm`] merges the BatchNorm into the convolution's weight and bias.
#[derive(Debug)]
struct BasicConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    bn: Option<BatchNorm>,
    stride: i64,
    padding: [i64; 2],
}

impl BasicConv2d {
    fn new(
        vs: nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: [i64; 2],
        stride: i64,
        padding: [i64; 2],
    ) -> Self {
        let shape = [out_channels, in_channels, kernel[0], kernel[1]];
        Self {
            weight: (&vs / "conv").zeros_no_train("weight", &shape),
            bias: None,
            bn: Some(BatchNorm::new(&vs / "bn", out_channels)),
            stride,
            padding,
        }
    }

    /// A square kernel with the same stride and padding along both axes.
    fn square(
        vs: nn::Path,
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    ) -> Self {
        Self::new(
            vs,
            in_channels,
            out_channels,
            [kernel, kernel],
            stride,
            [padding, padding],
        )
    }

    /// conv then BN is one affine map per output channel: w' = w * s, b' = beta - mean * s with
    /// s = gamma / sqrt(var + eps) (computed in float64). Saves a full pass over every
    /// activation; outputs change only by float32 rounding.
    fn fold_batch_norm(&mut self) {
        let Some(bn) = self.bn.take() else { return };
        let kind = self.weight.kind();
        let scale = bn.weight.to_kind(Kind::Double)
            / (bn.running_var.to_kind(Kind::Double) + BN_EPS).sqrt();
        self.weight = (self.weight.to_kind(Kind::Double) * scale.view([-1, 1, 1, 1])).to_kind(kind);
        let shift = bn.bias.to_kind(Kind::Double) - bn.running_mean.to_kind(Kind::Double) * &scale;
        self.bias = Some(shift.to_kind(kind));
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            [self.stride; 2],
            self.padding,
            [1, 1],
            1,
        );
        match &self.bn {
            Some(bn) => bn.forward(&h),
            None => h,
        }
        .relu_()
    }
}

/// 3x3 stride-1 average pooling that, like TensorFlow, leaves the zero padding out of the mean.
fn avg_pool_3x3_excluding_padding(x: &Tensor) -> Tensor {
    x.avg_pool2d([3, 3], [1, 1], [1, 1], false, false, None)
}

/// The 3x3 stride-2 max pooling that halves the resolution between stages.
fn max_pool_3x3_stride2(x: &Tensor) -> Tensor {
    x.max_pool2d([3, 3], [2, 2], [0, 0], [1, 1], false)
}

/// `Mixed_5b/5c/5d` (FIDInceptionA).
#[derive(Debug)]
struct InceptionA {
    branch1x1: BasicConv2d,
    branch5x5_1: BasicConv2d,
    branch5x5_2: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
    branch_pool: BasicConv2d,
}

impl InceptionA {
    fn new(vs: nn::Path, in_channels: i64, pool_features: i64) -> Self {
        Self {
            branch1x1: BasicConv2d::square(&vs / "branch1x1", in_channels, 64, 1, 1, 0),
            branch5x5_1: BasicConv2d::square(&vs / "branch5x5_1", in_channels, 48, 1, 1, 0),
            branch5x5_2: BasicConv2d::square(&vs / "branch5x5_2", 48, 64, 5, 1, 2),
            branch3x3dbl_1: BasicConv2d::square(&vs / "branch3x3dbl_1", in_channels, 64, 1, 1, 0),
            branch3x3dbl_2: BasicConv2d::square(&vs / "branch3x3dbl_2", 64, 96, 3, 1, 1),
            branch3x3dbl_3: BasicConv2d::square(&vs / "branch3x3dbl_3", 96, 96, 3, 1, 1),
            branch_pool: BasicConv2d::square(
                &vs / "branch_pool",
                in_channels,
                pool_features,
                1,
                1,
                0,
            ),
        }
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        vec![
            &mut self.branch1x1,
            &mut self.branch5x5_1,
            &mut self.branch5x5_2,
            &mut self.branch3x3dbl_1,
            &mut self.branch3x3dbl_2,
            &mut self.branch3x3dbl_3,
            &mut self.branch_pool,
        ]
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let branch1x1 = self.branch1x1.forward(x);
        let branch5x5 = self.branch5x5_2.forward(&self.branch5x5_1.forward(x));
        let branch3x3dbl = self
            .branch3x3dbl_3
            .forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        let branch_pool = self.branch_pool.forward(&avg_pool_3x3_excluding_padding(x));
        Tensor::cat(&[branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)
    }
}

/// `Mixed_6a` (torchvision's InceptionB): the 35x35 -> 17x17 reduction.
#[derive(Debug)]
struct InceptionB {
    branch3x3: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3: BasicConv2d,
}

impl InceptionB {
    fn new(vs: nn::Path, in_channels: i64) -> Self {
        Self {
            branch3x3: BasicConv2d::square(&vs / "branch3x3", in_channels, 384, 3, 2, 0),
            branch3x3dbl_1: BasicConv2d::square(&vs / "branch3x3dbl_1", in_channels, 64, 1, 1, 0),
            branch3x3dbl_2: BasicConv2d::square(&vs / "branch3x3dbl_2", 64, 96, 3, 1, 1),
            branch3x3dbl_3: BasicConv2d::square(&vs / "branch3x3dbl_3", 96, 96, 3, 2, 0),
        }
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        vec![
            &mut self.branch3x3,
            &mut self.branch3x3dbl_1,
            &mut self.branch3x3dbl_2,
            &mut self.branch3x3dbl_3,
        ]
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let branch3x3 = self.branch3x3.forward(x);
        let branch3x3dbl = self
            .branch3x3dbl_3
            .forward(&self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x)));
        Tensor::cat(&[branch3x3, branch3x3dbl, max_pool_3x3_stride2(x)], 1)
    }
}

/// `Mixed_6b..6e` (FIDInceptionC): factorised 7x7 convolutions.
#[derive(Debug)]
struct InceptionC {
    branch1x1: BasicConv2d,
    branch7x7: [BasicConv2d; 3],
    branch7x7dbl: [BasicConv2d; 5],
    branch_pool: BasicConv2d,
}

impl InceptionC {
    fn new(vs: nn::Path, in_channels: i64, channels_7x7: i64) -> Self {
        let c7 = channels_7x7;
        let conv = |name: &str, cin, cout, kernel: [i64; 2], padding: [i64; 2]| {
            BasicConv2d::new(&vs / name, cin, cout, kernel, 1, padding)
        };
        let (row, row_pad, col, col_pad) = ([1, 7], [0, 3], [7, 1], [3, 0]);
        Self {
            branch1x1: conv("branch1x1", in_channels, 192, [1, 1], [0, 0]),
            branch7x7: [
                conv("branch7x7_1", in_channels, c7, [1, 1], [0, 0]),
                conv("branch7x7_2", c7, c7, row, row_pad),
                conv("branch7x7_3", c7, 192, col, col_pad),
            ],
            branch7x7dbl: [
                conv("branch7x7dbl_1", in_channels, c7, [1, 1], [0, 0]),
                conv("branch7x7dbl_2", c7, c7, col, col_pad),
                conv("branch7x7dbl_3", c7, c7, row, row_pad),
                conv("branch7x7dbl_4", c7, c7, col, col_pad),
                conv("branch7x7dbl_5", c7, 192, row, row_pad),
            ],
            branch_pool: conv("branch_pool", in_channels, 192, [1, 1], [0, 0]),
        }
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        let mut convs = vec![&mut self.branch1x1, &mut self.branch_pool];
        convs.extend(
            self.branch7x7
                .iter_mut()
                .chain(self.branch7x7dbl.iter_mut()),
        );
        convs
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let chain = |convs: &[BasicConv2d]| {
            let first = convs[0].forward(x);
            convs[1..].iter().fold(first, |h, conv| conv.forward(&h))
        };
        let branch1x1 = self.branch1x1.forward(x);
        let branch7x7 = chain(&self.branch7x7);
        let branch7x7dbl = chain(&self.branch7x7dbl);
        let branch_pool = self.branch_pool.forward(&avg_pool_3x3_excluding_padding(x));
        Tensor::cat(&[branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)
    }
}

/// `Mixed_7a` (torchvision's InceptionD): the 17x17 -> 8x8 reduction.
#[derive(Debug)]
struct InceptionD {
    branch3x3_1: BasicConv2d,
    branch3x3_2: BasicConv2d,
    branch7x7x3: [BasicConv2d; 4],
}

impl InceptionD {
    fn new(vs: nn::Path, in_channels: i64) -> Self {
        Self {
            branch3x3_1: BasicConv2d::square(&vs / "branch3x3_1", in_channels, 192, 1, 1, 0),
            branch3x3_2: BasicConv2d::square(&vs / "branch3x3_2", 192, 320, 3, 2, 0),
            branch7x7x3: [
                BasicConv2d::square(&vs / "branch7x7x3_1", in_channels, 192, 1, 1, 0),
                BasicConv2d::new(&vs / "branch7x7x3_2", 192, 192, [1, 7], 1, [0, 3]),
                BasicConv2d::new(&vs / "branch7x7x3_3", 192, 192, [7, 1], 1, [3, 0]),
                BasicConv2d::square(&vs / "branch7x7x3_4", 192, 192, 3, 2, 0),
            ],
        }
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        let mut convs = vec![&mut self.branch3x3_1, &mut self.branch3x3_2];
        convs.extend(self.branch7x7x3.iter_mut());
        convs
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let branch3x3 = self.branch3x3_2.forward(&self.branch3x3_1.forward(x));
        let first = self.branch7x7x3[0].forward(x);
        let branch7x7x3 = self.branch7x7x3[1..]
            .iter()
            .fold(first, |h, conv| conv.forward(&h));
        Tensor::cat(&[branch3x3, branch7x7x3, max_pool_3x3_stride2(x)], 1)
    }
}

/// How an InceptionE block pools its fourth branch: the FID graph average-pools in `Mixed_7b` but
/// max-pools in `Mixed_7c` (a quirk of the TensorFlow graph that FID scores depend on).
#[derive(Debug, Clone, Copy)]
enum PoolBranch {
    Average,
    Max,
}

/// `Mixed_7b` (FIDInceptionE_1) and `Mixed_7c` (FIDInceptionE_2).
#[derive(Debug)]
struct InceptionE {
    branch1x1: BasicConv2d,
    branch3x3_1: BasicConv2d,
    branch3x3_2a: BasicConv2d,
    branch3x3_2b: BasicConv2d,
    branch3x3dbl_1: BasicConv2d,
    branch3x3dbl_2: BasicConv2d,
    branch3x3dbl_3a: BasicConv2d,
    branch3x3dbl_3b: BasicConv2d,
    branch_pool: BasicConv2d,
    pool: PoolBranch,
}

impl InceptionE {
    fn new(vs: nn::Path, in_channels: i64, pool: PoolBranch) -> Self {
        Self {
            branch1x1: BasicConv2d::square(&vs / "branch1x1", in_channels, 320, 1, 1, 0),
            branch3x3_1: BasicConv2d::square(&vs / "branch3x3_1", in_channels, 384, 1, 1, 0),
            branch3x3_2a: BasicConv2d::new(&vs / "branch3x3_2a", 384, 384, [1, 3], 1, [0, 1]),
            branch3x3_2b: BasicConv2d::new(&vs / "branch3x3_2b", 384, 384, [3, 1], 1, [1, 0]),
            branch3x3dbl_1: BasicConv2d::square(&vs / "branch3x3dbl_1", in_channels, 448, 1, 1, 0),
            branch3x3dbl_2: BasicConv2d::square(&vs / "branch3x3dbl_2", 448, 384, 3, 1, 1),
            branch3x3dbl_3a: BasicConv2d::new(&vs / "branch3x3dbl_3a", 384, 384, [1, 3], 1, [0, 1]),
            branch3x3dbl_3b: BasicConv2d::new(&vs / "branch3x3dbl_3b", 384, 384, [3, 1], 1, [1, 0]),
            branch_pool: BasicConv2d::square(&vs / "branch_pool", in_channels, 192, 1, 1, 0),
            pool,
        }
    }

    fn convs_mut(&mut self) -> Vec<&mut BasicConv2d> {
        vec![
            &mut self.branch1x1,
            &mut self.branch3x3_1,
            &mut self.branch3x3_2a,
            &mut self.branch3x3_2b,
            &mut self.branch3x3dbl_1,
            &mut self.branch3x3dbl_2,
            &mut self.branch3x3dbl_3a,
            &mut self.branch3x3dbl_3b,
            &mut self.branch_pool,
        ]
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let branch1x1 = self.branch1x1.forward(x);
        let h = self.branch3x3_1.forward(x);
        let branch3x3 = Tensor::cat(
            &[self.branch3x3_2a.forward(&h), self.branch3x3_2b.forward(&h)],
            1,
        );
        let h = self.branch3x3dbl_2.forward(&self.branch3x3dbl_1.forward(x));
        let branch3x3dbl = Tensor::cat(
            &[
                self.branch3x3dbl_3a.forward(&h),
                self.branch3x3dbl_3b.forward(&h),
            ],
            1,
        );
        let pooled = match self.pool {
            PoolBranch::Average => avg_pool_3x3_excluding_padding(x),
            PoolBranch::Max => x.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false),
        };
        let branch_pool = self.branch_pool.forward(&pooled);
        Tensor::cat(&[branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)
    }
}

/// The FID InceptionV3 up to the final average pooling (the 1008-class `fc` head is not built;
/// its weights are ignored when loading).
#[derive(Debug)]
pub struct InceptionV3 {
    conv2d_1a_3x3: BasicConv2d,
    conv2d_2a_3x3: BasicConv2d,
    conv2d_2b_3x3: BasicConv2d,
    conv2d_3b_1x1: BasicConv2d,
    conv2d_4a_3x3: BasicConv2d,
    mixed_5: [InceptionA; 3],
    mixed_6a: InceptionB,
    mixed_6: [InceptionC; 4],
    mixed_7a: InceptionD,
    mixed_7b: InceptionE,
    mixed_7c: InceptionE,
}

impl InceptionV3 {
    pub fn new(vs: nn::Path) -> Self {
        Self {
            conv2d_1a_3x3: BasicConv2d::square(&vs / "Conv2d_1a_3x3", 3, 32, 3, 2, 0),
            conv2d_2a_3x3: BasicConv2d::square(&vs / "Conv2d_2a_3x3", 32, 32, 3, 1, 0),
            conv2d_2b_3x3: BasicConv2d::square(&vs / "Conv2d_2b_3x3", 32, 64, 3, 1, 1),
            conv2d_3b_1x1: BasicConv2d::square(&vs / "Conv2d_3b_1x1", 64, 80, 1, 1, 0),
            conv2d_4a_3x3: BasicConv2d::square(&vs / "Conv2d_4a_3x3", 80, 192, 3, 1, 0),
            mixed_5: [
                InceptionA::new(&vs / "Mixed_5b", 192, 32),
                InceptionA::new(&vs / "Mixed_5c", 256, 64),
                InceptionA::new(&vs / "Mixed_5d", 288, 64),
            ],
            mixed_6a: InceptionB::new(&vs / "Mixed_6a", 288),
            mixed_6: [
                InceptionC::new(&vs / "Mixed_6b", 768, 128),
                InceptionC::new(&vs / "Mixed_6c", 768, 160),
                InceptionC::new(&vs / "Mixed_6d", 768, 160),
                InceptionC::new(&vs / "Mixed_6e", 768, 192),
            ],
            mixed_7a: InceptionD::new(&vs / "Mixed_7a", 768),
            mixed_7b: InceptionE::new(&vs / "Mixed_7b", 1280, PoolBranch::Average),
            mixed_7c: InceptionE::new(&vs / "Mixed_7c", 2048, PoolBranch::Max),
        }
    }

    /// The network with the weights of a converted `pt_inception-2015-12-05-6726825d` file. Its
    /// `num_batches_tracked` and `fc.*` tensors (BatchNorm bookkeeping, the unused classifier)
    /// are ignored; anything else missing or extra is an error. The network keeps shallow copies
    /// of the weights, so the VarStore is not needed afterwards.
    pub fn load(weights: &Path, device: Device) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let inception = Self::new(vs.root());
        let ignored: Vec<String> = MappedSafetensors::open(weights)?
            .tensors()
            .names()
            .into_iter()
            .filter(|name| name.ends_with(".num_batches_tracked") || name.starts_with("fc."))
            .map(str::to_string)
            .collect();
        let ignored: Vec<&str> = ignored.iter().map(String::as_str).collect();
        let options = LoadOptions {
            ignore_extra: &ignored,
            ..Default::default()
        };
        load_into(&vs, &[weights.to_path_buf()], &options)
            .with_context(|| format!("loading the FID Inception weights {}", weights.display()))?;
        Ok(inception)
    }

    /// Merges every BatchNorm into its convolution, once the weights are loaded. Before, the
    /// network computes pytorch-fid's graph op for op; after, the same function with one pass
    /// less over every activation, equal up to float32 rounding.
    pub fn fold_batch_norm(&mut self) {
        let mut convs = vec![
            &mut self.conv2d_1a_3x3,
            &mut self.conv2d_2a_3x3,
            &mut self.conv2d_2b_3x3,
            &mut self.conv2d_3b_1x1,
            &mut self.conv2d_4a_3x3,
        ];
        convs.extend(self.mixed_5.iter_mut().flat_map(InceptionA::convs_mut));
        convs.extend(self.mixed_6a.convs_mut());
        convs.extend(self.mixed_6.iter_mut().flat_map(InceptionC::convs_mut));
        convs.extend(self.mixed_7a.convs_mut());
        convs.extend(self.mixed_7b.convs_mut());
        convs.extend(self.mixed_7c.convs_mut());
        debug_assert_eq!(convs.len(), 94, "the FID Inception has 94 BasicConv2d");
        for conv in convs {
            conv.fold_batch_norm();
        }
    }

    /// Features `[N, dims]` of images `[N, 3, 299, 299]` scaled to [-1, 1] (see [`preprocess`]):
    /// the chosen block's output, spatially averaged as pytorch-fid's `get_activations` does.
    pub fn features(&self, x: &Tensor, dims: FeatureDims) -> Tensor {
        let mut h = self.conv2d_1a_3x3.forward(x);
        h = self.conv2d_2a_3x3.forward(&h);
        h = max_pool_3x3_stride2(&self.conv2d_2b_3x3.forward(&h));
        if dims != FeatureDims::D64 {
            h = self.conv2d_3b_1x1.forward(&h);
            h = max_pool_3x3_stride2(&self.conv2d_4a_3x3.forward(&h));
        }
        if matches!(dims, FeatureDims::D768 | FeatureDims::D2048) {
            h = self.mixed_5.iter().fold(h, |h, block| block.forward(&h));
            h = self.mixed_6a.forward(&h);
            h = self.mixed_6.iter().fold(h, |h, block| block.forward(&h));
        }
        if dims == FeatureDims::D2048 {
            h = self.mixed_7a.forward(&h);
            h = self.mixed_7b.forward(&h);
            h = self.mixed_7c.forward(&h);
        }
        h.adaptive_avg_pool2d([1, 1]).flatten(1, -1)
    }
}

/// Writes a seeded random initialisation of the FID InceptionV3 (safetensors, loadable like the
/// converted weights): every convolution He-uniform (variance 2 / fan-in, which keeps activations
/// at unit scale through the ReLUs), batch norms the identity. Each tensor draws from its own stream, so values do not depend on listing order.
pub fn write_random_weights(path: &Path, seed: u64) -> Result<()> {
    let vs = nn::VarStore::new(Device::Cpu);
    let _net = InceptionV3::new(vs.root());
    let mut tensors: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (index, (name, tensor)) in tensors.iter_mut().enumerate() {
        if !name.ends_with("conv.weight") {
            continue;
        }
        let size = tensor.size();
        let fan_in: i64 = size[1..].iter().product();
        let bound = (6.0 / fan_in as f64).sqrt() as f32;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(index as u64);
        let values: Vec<f32> = (0..tensor.numel())
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        *tensor = Tensor::from_slice(&values).view(size.as_slice());
    }
    save_tensors(path, &tensors, None)
        .with_context(|| format!("writing random Inception weights {}", path.display()))
}

/// pytorch-fid's input transform: images `[N, 3, H, W]` in [0, 1] (float) are resized to 299x299
/// with torch's bilinear interpolation (`align_corners=False`, no antialiasing), then mapped to
/// [-1, 1].
pub fn preprocess(images: &Tensor) -> Tensor {
    let resized = images.upsample_bilinear2d([INPUT_SIZE, INPUT_SIZE], false, None, None);
    resized * 2.0 - 1.0
}
