//! Which kernel torch's scaled_dot_product_attention picks for the U-Net's attention, as torch's
//! own dispatcher (`_fused_sdp_choice`) decides it for the shapes and dtype a step runs with:
//! what `train` logs on CUDA and `bench` reports.
use super::tokenizer::DEFAULT_MAX_LENGTH;
use super::unet::UNetConfig;
use anyhow::Result;
use tch::{Device, Kind, Tensor};

/// torch's `sdp::SDPBackend` values, as `_fused_sdp_choice` returns them.
fn backend_name(choice: i64, device: Device) -> &'static str {
    match (choice, device.is_cuda()) {
        (0, _) => "math",
        (1, false) => "flash (CPU)",
        (1, true) => "flash",
        (2, _) => "memory-efficient",
        (3, _) => "cuDNN",
        (4, _) => "overrideable",
        _ => "none (error)",
    }
}

/// The kernels of the first down block's self- and cross-attention for `batch` latents of
/// `latent` x `latent` on `device`, in the dtype the step computes attention in (bf16 under
/// autocast), e.g. "self-attention flash (CPU), cross-attention flash (CPU)".
pub fn describe(
    config: &UNetConfig,
    batch: i64,
    latent: i64,
    device: Device,
    autocast: bool,
) -> Result<String> {
    let heads = config.heads()?[0];
    let head_dim = config.block_out_channels[0] / heads;
    let kind = if autocast {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    let shaped = |seq: i64| Tensor::zeros([batch, heads, seq, head_dim], (kind, device));
    let query = shaped(latent * latent);
    let scale = (head_dim as f64).powf(-0.5);
    let choice = |keys: &Tensor| {
        Tensor::f_internal_fused_sdp_choice::<Tensor>(
            &query, keys, keys, None, 0.0, false, scale, false,
        )
    };
    let own = choice(&query)?;
    let cross = choice(&shaped(DEFAULT_MAX_LENGTH as i64))?;
    Ok(format!(
        "self-attention {}, cross-attention {}",
        backend_name(own, device),
        backend_name(cross, device)
    ))
}
