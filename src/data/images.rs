//! Image decoding and the training-time preprocessing of diffusers' text-to-image scripts:
//! `Resize(resolution)` of the shorter side, `CenterCrop`/`RandomCrop(resolution)`, optional
//! `RandomHorizontalFlip`, `ToTensor`, `Normalize([0.5], [0.5])`, giving CHW f32 in [-1, 1].
//!
//! Any JPEG, PNG or WebP becomes RGB: grayscale is replicated, CMYK/YCCK JPEGs and palettes are
//! converted by the decoders, 16-bit samples are scaled to [0, 1] (PIL would clip them), and
//! alpha is dropped by default, as PIL's `convert("RGB")` in the reference scripts does
//! ([`Alpha::OverWhite`] composites on white instead). EXIF orientation is applied.
//!
//! A JPEG whose last scan does not end in an EOI marker is reported as truncated: the decoder
//! would otherwise fill the missing rows with grey, whereas PIL raises for such files.
use super::ImageSource;
use anyhow::{anyhow, bail, Context, Result};
use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Rgb32FImage};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::io::Cursor;
use tch::Tensor;

/// Resampling filter of the resize; all are antialiased when downscaling (the kernel widens
/// with the scale factor), as PIL and torchvision's `Resize(antialias=True)` are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeFilter {
    /// Triangle kernel: PIL/torchvision BILINEAR, what diffusers' training scripts use.
    Bilinear,
    /// Catmull-Rom (a = -0.5): PIL BICUBIC.
    Bicubic,
    Lanczos3,
}

impl ResizeFilter {
    fn filter_type(self) -> FilterType {
        match self {
            ResizeFilter::Bilinear => FilterType::Triangle,
            ResizeFilter::Bicubic => FilterType::CatmullRom,
            ResizeFilter::Lanczos3 => FilterType::Lanczos3,
        }
    }
}

impl std::str::FromStr for ResizeFilter {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bilinear" => Ok(ResizeFilter::Bilinear),
            "bicubic" => Ok(ResizeFilter::Bicubic),
            "lanczos3" => Ok(ResizeFilter::Lanczos3),
            _ => bail!("unknown resize filter {s:?} (expected bilinear, bicubic or lanczos3)"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Crop {
    /// torchvision `CenterCrop`: offsets `round((size - resolution) / 2)`, ties to even.
    Center,
    /// torchvision `RandomCrop`: offsets uniform in `0..=size - resolution`.
    Random,
}

impl std::str::FromStr for Crop {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "center" => Ok(Crop::Center),
            "random" => Ok(Crop::Random),
            _ => bail!("unknown crop {s:?} (expected center or random)"),
        }
    }
}

/// What happens to an alpha channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Alpha {
    /// Keep the colour channels as they are (PIL `convert("RGB")`).
    Drop,
    /// Composite on a white background.
    OverWhite,
}

impl std::str::FromStr for Alpha {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "drop" => Ok(Alpha::Drop),
            "over_white" => Ok(Alpha::OverWhite),
            _ => bail!("unknown alpha handling {s:?} (expected drop or over_white)"),
        }
    }
}

/// Preprocessing settings. Defaults: 512, bilinear, centre crop, no flip, alpha dropped — the
/// reference training script with `--center_crop` and without `--random_flip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Preprocess {
    /// Side of the square output.
    pub resolution: u32,
    pub filter: ResizeFilter,
    pub crop: Crop,
    /// Flip horizontally with probability 1/2.
    pub random_flip: bool,
    pub alpha: Alpha,
}

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            resolution: 512,
            filter: ResizeFilter::Bilinear,
            crop: Crop::Center,
            random_flip: false,
            alpha: Alpha::Drop,
        }
    }
}

/// A preprocessed image: CHW f32 in [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTensor {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
}

impl ImageTensor {
    /// A `[3, height, width]` CPU f32 tensor.
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.data).view([3, self.height as i64, self.width as i64])
    }
}

/// Ends the entropy-coded data of the last scan: `FF D9` never occurs inside scan data (0xFF is
/// byte-stuffed there), so a complete JPEG has an EOI after its last SOS (`FF DA`). An EXIF
/// thumbnail's own markers all precede the main image's scans.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let last = |marker: u8| {
        bytes
            .windows(2)
            .rposition(|w| w[0] == 0xFF && w[1] == marker)
    };
    match (last(0xDA), last(0xD9)) {
        (Some(sos), Some(eoi)) => eoi > sos,
        _ => false,
    }
}

/// Decodes an encoded JPEG/PNG/WebP image and applies its EXIF orientation.
pub fn decode(bytes: &[u8]) -> Result<DynamicImage> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .context("sniffing the image format")?;
    let format = reader
        .format()
        .ok_or_else(|| anyhow!("not a JPEG, PNG or WebP image (unrecognised format)"))?;
    let mut decoder = reader
        .into_decoder()
        .with_context(|| format!("reading the {format:?} header"))?;
    let orientation = decoder
        .orientation()
        .with_context(|| format!("reading the {format:?} orientation"))?;
    let mut image = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("decoding the {format:?} image"))?;
    // Checked after decoding so that a corrupt file reports the decoder's error.
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        bail!("truncated JPEG: no end-of-image marker after the last scan");
    }
    image.apply_orientation(orientation);
    Ok(image)
}

/// The image as RGB in [0, 1].
pub fn to_rgb(image: &DynamicImage, alpha: Alpha) -> Rgb32FImage {
    if alpha == Alpha::Drop || !image.color().has_alpha() {
        return image.to_rgb32f();
    }
    let rgba = image.to_rgba32f();
    Rgb32FImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        image::Rgb([r * a + (1.0 - a), g * a + (1.0 - a), b * a + (1.0 - a)])
    })
}

/// Reads and decodes a sample's image to RGB in [0, 1]; errors name the file or parquet row.
pub fn decode_rgb(source: &ImageSource, alpha: Alpha) -> Result<Rgb32FImage> {
    let decode_source = || -> Result<Rgb32FImage> {
        let bytes = source.read()?;
        Ok(to_rgb(&decode(&bytes)?, alpha))
    };
    decode_source().with_context(|| format!("loading image {}", source.describe()))
}

/// Python's `round` (ties to even) of `n / 2`, as torchvision's `CenterCrop` computes offsets.
fn half_round_even(n: u32) -> u32 {
    let half = n / 2;
    if n % 2 == 1 && half % 2 == 1 {
        half + 1
    } else {
        half
    }
}

/// Resize of the shorter side to `pre.resolution` (longer side truncated as torchvision
/// computes it), crop, optional flip, scale to [-1, 1]. `rng` drives the random crop and flip.
pub fn preprocess(
    rgb: &Rgb32FImage,
    pre: &Preprocess,
    rng: &mut ChaCha8Rng,
) -> Result<ImageTensor> {
    let (w, h) = rgb.dimensions();
    let size = pre.resolution;
    if size == 0 || w == 0 || h == 0 {
        bail!("cannot resize a {w}x{h} image to {size}");
    }
    let (new_w, new_h) = if w <= h {
        (size, (u64::from(size) * u64::from(h) / u64::from(w)) as u32)
    } else {
        ((u64::from(size) * u64::from(w) / u64::from(h)) as u32, size)
    };
    let resized = image::imageops::resize(rgb, new_w, new_h, pre.filter.filter_type());
    let (left, top) = match pre.crop {
        Crop::Center => (half_round_even(new_w - size), half_round_even(new_h - size)),
        Crop::Random => (
            rng.random_range(0..=new_w - size),
            rng.random_range(0..=new_h - size),
        ),
    };
    let flip = pre.random_flip && rng.random_bool(0.5);
    let side = size as usize;
    let mut data = vec![0f32; 3 * side * side];
    for y in 0..size {
        for x in 0..size {
            let source_x = if flip { size - 1 - x } else { x };
            let pixel = resized.get_pixel(left + source_x, top + y).0;
            for (c, value) in pixel.iter().enumerate() {
                data[(c * side + y as usize) * side + x as usize] =
                    value.clamp(0.0, 1.0) * 2.0 - 1.0;
            }
        }
    }
    Ok(ImageTensor {
        data,
        height: side,
        width: side,
    })
}

/// The random stream of item `index` of a batch drawn with `seed`: independent of thread
/// scheduling and batch composition.
fn item_rng(seed: u64, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    rng
}

/// Decodes and preprocesses one image.
pub fn load(source: &ImageSource, pre: &Preprocess, rng: &mut ChaCha8Rng) -> Result<ImageTensor> {
    let rgb = decode_rgb(source, pre.alpha)?;
    preprocess(&rgb, pre, rng).with_context(|| format!("preprocessing image {}", source.describe()))
}

/// Decodes and preprocesses `sources` on all cores; item `i` draws its crop/flip from stream `i`
/// of `seed`. Each item's error names its file or parquet row.
pub fn load_all(sources: &[&ImageSource], pre: &Preprocess, seed: u64) -> Vec<Result<ImageTensor>> {
    sources
        .par_iter()
        .enumerate()
        .map(|(i, source)| load(source, pre, &mut item_rng(seed, i)))
        .collect()
}

/// An image that could not be loaded.
#[derive(Debug)]
pub struct ImageFailure {
    /// Position in the requested batch.
    pub index: usize,
    pub error: anyhow::Error,
}

/// A stacked batch of the images that loaded.
#[derive(Debug)]
pub struct ImageBatch {
    /// `[kept.len(), 3, resolution, resolution]` CPU f32 in [-1, 1].
    pub images: Tensor,
    /// Positions (in the requested batch) of the rows of `images`.
    pub kept: Vec<usize>,
    pub failures: Vec<ImageFailure>,
}

/// [`load_all`], stacked. In strict mode the first failure is an error; otherwise failed images
/// are left out and reported in `failures`.
pub fn load_batch(
    sources: &[&ImageSource],
    pre: &Preprocess,
    seed: u64,
    strict: bool,
) -> Result<ImageBatch> {
    let side = pre.resolution as i64;
    let mut data = Vec::with_capacity(sources.len() * 3 * (side * side) as usize);
    let mut kept = Vec::new();
    let mut failures = Vec::new();
    for (index, result) in load_all(sources, pre, seed).into_iter().enumerate() {
        match result {
            Ok(image) => {
                data.extend_from_slice(&image.data);
                kept.push(index);
            }
            Err(error) if strict => return Err(error),
            Err(error) => failures.push(ImageFailure { index, error }),
        }
    }
    let images = Tensor::from_slice(&data).view([kept.len() as i64, 3, side, side]);
    Ok(ImageBatch {
        images,
        kept,
        failures,
    })
}
