//! The InceptionV3 that FID is defined with: pytorch-fid's `InceptionV3` with
//! `use_fid_inception=True`, i.e. torchvision's Inception3 layout patched like TensorFlow's graph
//! (`FIDInceptionA`/`FIDInceptionC`/`FIDInceptionE_1` average-pool without counting the zero
//! padding, `FIDInceptionE_2` max-pools). Parameter names are those of the ported weights file
//! `pt_inception-2015-12-05-6726825d.pth` (`Mixed_5b.branch1x1.conv.weight`, ...).
use anyhow::{bail, Result};
use tch::{nn, Tensor};

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

/// Conv (no bias) + BatchNorm (eval) + ReLU, torchvision's `BasicConv2d`.
#[derive(Debug)]
struct BasicConv2d {
    conv_weight: Tensor,
    bn_weight: Tensor,
    bn_bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
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
        let conv = &vs / "conv";
        let bn = &vs / "bn";
        Self {
            conv_weight: conv
                .zeros_no_train("weight", &[out_channels, in_channels, kernel[0], kernel[1]]),
            bn_weight: bn.ones_no_train("weight", &[out_channels]),
            bn_bias: bn.zeros_no_train("bias", &[out_channels]),
            running_mean: bn.zeros_no_train("running_mean", &[out_channels]),
            running_var: bn.ones_no_train("running_var", &[out_channels]),
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

    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(
            &self.conv_weight,
            None::<Tensor>,
            [self.stride; 2],
            self.padding,
            [1, 1],
            1,
        )
        .batch_norm(
            Some(&self.bn_weight),
            Some(&self.bn_bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            false,
            0.0,
            BN_EPS,
            true,
        )
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

/// pytorch-fid's input transform: images `[N, 3, H, W]` in [0, 1] (float) are resized to 299x299
/// with torch's bilinear interpolation (`align_corners=False`, no antialiasing), then mapped to
/// [-1, 1].
pub fn preprocess(images: &Tensor) -> Tensor {
    let resized = images.upsample_bilinear2d([INPUT_SIZE, INPUT_SIZE], false, None, None);
    resized * 2.0 - 1.0
}
