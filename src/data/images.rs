//! Image decoding and the training-time preprocessing of diffusers' text-to-image scripts:
//! `Resize(resolution)` of the shorter side, `CenterCrop`/`RandomCrop(resolution)`, optional
//! `RandomHorizontalFlip`, `ToTensor`, `Normalize([0.5], [0.5])`, giving CHW f32 in [-1, 1].
//!
//! Any JPEG, PNG or WebP becomes RGB: JPEGs are decoded by libjpeg-turbo exactly as Pillow decodes
//! them (see [`super::jpeg`]), grayscale is replicated, CMYK/YCCK JPEGs and palettes are
//! converted as Pillow converts them, 16-bit samples are scaled to [0, 1] (PIL would clip them),
//! and alpha is dropped by default, as PIL's `convert("RGB")` in the reference scripts does
//! ([`Alpha::OverWhite`] composites on white instead). EXIF orientation is applied by default
//! ([`ExifOrientation`]); FID reads images as Pillow's `open` does, without it.
//!
//! Decoding is bounded: an image whose header claims more than [`DecodeOptions::max_pixels`]
//! pixels is refused before its pixels are allocated, and truncated or corrupt data is an error
//! for that file (PIL raises for such files too), never a silently padded image.
use super::buckets::{nearest, Bucket};
use super::{jpeg, ImageSource};
use crate::model::conditioning::SizeConditions;
use anyhow::{anyhow, bail, Context, Result};
use image::imageops::FilterType;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, Rgb32FImage};
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
    /// Left out of older settings: the default (EXIF orientation applied, Pillow's pixel limit).
    #[serde(default)]
    pub decode: DecodeOptions,
}

impl Default for Preprocess {
    fn default() -> Self {
        Self {
            resolution: 512,
            filter: ResizeFilter::Bilinear,
            crop: Crop::Center,
            random_flip: false,
            alpha: Alpha::Drop,
            decode: DecodeOptions::default(),
        }
    }
}

/// A preprocessed image: CHW f32 in [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct ImageTensor {
    pub data: Vec<f32>,
    pub height: usize,
    pub width: usize,
    /// SDXL's micro-conditioning of this image, as the preprocessing that made it knows it: the
    /// decoded image's size, the crop's top-left corner in the resized image (in the mirrored
    /// image when flipped) and the output size.
    pub size: SizeConditions,
}

impl ImageTensor {
    /// A `[3, height, width]` CPU f32 tensor.
    pub fn to_tensor(&self) -> Tensor {
        Tensor::from_slice(&self.data).view([3, self.height as i64, self.width as i64])
    }
}

/// Pillow's decompression-bomb limit (twice `Image.MAX_IMAGE_PIXELS`): far above any real photo
/// (a 100-megapixel camera makes 1e8 pixels), far below what a forged header can claim.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 178_956_970;

/// Whether an image's EXIF orientation tag is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExifOrientation {
    /// Rotate/flip the pixels as the tag says (how the photo is meant to be seen).
    Apply,
    /// Keep the stored pixels, as Pillow's `Image.open` (and so pytorch-fid) does.
    Ignore,
}

impl std::str::FromStr for ExifOrientation {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "apply" => Ok(ExifOrientation::Apply),
            "ignore" => Ok(ExifOrientation::Ignore),
            _ => bail!("unknown EXIF orientation handling {s:?} (expected apply or ignore)"),
        }
    }
}

/// How encoded images are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecodeOptions {
    pub exif_orientation: ExifOrientation,
    /// Images with more pixels are refused from their header, before any pixel memory is taken.
    pub max_pixels: u64,
}

impl DecodeOptions {
    /// As pytorch-fid reads images: Pillow's `Image.open(f).convert("RGB")`, no EXIF rotation.
    pub const PILLOW_OPEN: Self = Self {
        exif_orientation: ExifOrientation::Ignore,
        max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
    };
}

impl Default for DecodeOptions {
    /// Training's default: EXIF orientation applied.
    fn default() -> Self {
        Self {
            exif_orientation: ExifOrientation::Apply,
            max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
        }
    }
}

/// The decoder name recorded in cache keys: latents made by another decoder are stale.
pub const JPEG_DECODER: &str = "libjpeg-turbo 3.1 (islow, fancy upsampling)";

/// Decodes a PNG or WebP with the `image` crate, bounded by `max_pixels`; returns the image and
/// its EXIF orientation.
fn decode_with_image_crate(
    bytes: &[u8],
    max_pixels: u64,
) -> Result<(DynamicImage, Option<Orientation>)> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .context("sniffing the image format")?;
    let format = reader
        .format()
        .ok_or_else(|| anyhow!("not a JPEG, PNG or WebP image (unrecognised format)"))?;
    let mut limits = Limits::default();
    // The largest decoded pixel is 16-bit RGBA (8 bytes).
    limits.max_alloc = Some(max_pixels.saturating_mul(8));
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .with_context(|| format!("reading the {format:?} header"))?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        bail!(
            "the {format:?} image is {width}x{height} = {pixels} pixels, over the limit of \
             {max_pixels} (raise max_image_pixels if this image is genuine)"
        );
    }
    let orientation = decoder.orientation().ok();
    let image = DynamicImage::from_decoder(decoder)
        .with_context(|| format!("decoding the {format:?} image"))?;
    Ok((image, orientation))
}

/// Decodes an encoded JPEG/PNG/WebP image: JPEGs with libjpeg-turbo as Pillow decodes them
/// ([`super::jpeg`]), the others with the `image` crate. Truncated or corrupt data is an error.
pub fn decode(bytes: &[u8], options: &DecodeOptions) -> Result<DynamicImage> {
    let (mut image, orientation) = if jpeg::is_jpeg(bytes) {
        (
            jpeg::decode(bytes, options.max_pixels)?,
            jpeg::orientation(bytes),
        )
    } else {
        decode_with_image_crate(bytes, options.max_pixels)?
    };
    if let (ExifOrientation::Apply, Some(orientation)) = (options.exif_orientation, orientation) {
        image.apply_orientation(orientation);
    }
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
pub fn decode_rgb(
    source: &ImageSource,
    alpha: Alpha,
    options: &DecodeOptions,
) -> Result<Rgb32FImage> {
    let decode_source = || -> Result<Rgb32FImage> {
        let bytes = source.read()?;
        Ok(to_rgb(&decode(&bytes, options)?, alpha))
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
    preprocess_to(rgb, pre, Bucket::square(pre.resolution), rng)
}

/// [`preprocess`] to a `size.width × size.height` output: the image is resized to cover it (the
/// side that fits tighter matches, the other is truncated) and cropped as `pre.crop` says.
pub fn preprocess_to(
    rgb: &Rgb32FImage,
    pre: &Preprocess,
    size: Bucket,
    rng: &mut ChaCha8Rng,
) -> Result<ImageTensor> {
    let (w, h) = rgb.dimensions();
    let (out_w, out_h) = (size.width, size.height);
    if out_w == 0 || out_h == 0 || w == 0 || h == 0 {
        bail!("cannot resize a {w}x{h} image to {out_w}x{out_h}");
    }
    let (new_w, new_h) = resized_size((w, h), size);
    let resized = image::imageops::resize(rgb, new_w, new_h, pre.filter.filter_type());
    let (left, top) = match pre.crop {
        Crop::Center => (
            half_round_even(new_w - out_w),
            half_round_even(new_h - out_h),
        ),
        Crop::Random => (
            rng.random_range(0..=new_w - out_w),
            rng.random_range(0..=new_h - out_h),
        ),
    };
    let flip = pre.random_flip && rng.random_bool(0.5);
    let (width, height) = (out_w as usize, out_h as usize);
    let mut data = vec![0f32; 3 * width * height];
    for y in 0..out_h {
        for x in 0..out_w {
            let source_x = if flip { out_w - 1 - x } else { x };
            let pixel = resized.get_pixel(left + source_x, top + y).0;
            for (c, value) in pixel.iter().enumerate() {
                data[(c * height + y as usize) * width + x as usize] =
                    value.clamp(0.0, 1.0) * 2.0 - 1.0;
            }
        }
    }
    let crop_left = match flip {
        true => new_w - out_w - left,
        false => left,
    };
    let pixels = |w: u32, h: u32| (i64::from(h), i64::from(w));
    Ok(ImageTensor {
        data,
        height,
        width,
        size: SizeConditions {
            original_size: pixels(w, h),
            crop_top_left: pixels(crop_left, top),
            target_size: pixels(out_w, out_h),
        },
    })
}

/// The `(width, height)` a `(w, h)` image is resized to before it is cropped to `size`: it
/// covers `size`, the side that fits tighter matching and the other truncated, as torchvision's
/// `Resize` computes it.
fn resized_size((w, h): (u32, u32), size: Bucket) -> (u32, u32) {
    let (out_w, out_h) = (u64::from(size.width), u64::from(size.height));
    let (w64, h64) = (u64::from(w), u64::from(h));
    // Width matches when the image is at least as tall, relative to its width, as the output.
    match w64 * out_h <= h64 * out_w {
        true => (size.width, (out_w * h64 / w64) as u32),
        false => ((out_h * w64 / h64) as u32, size.height),
    }
}

/// The micro-conditioning of the mirror image of an image preprocessed with `size`: the crop's
/// left edge measured in the mirrored resized image (what a flipped cached latent shows).
pub fn mirrored(size: &SizeConditions) -> SizeConditions {
    let ((h, w), (top, left), (out_h, out_w)) =
        (size.original_size, size.crop_top_left, size.target_size);
    let (new_w, _) = resized_size(
        (w as u32, h as u32),
        Bucket {
            width: out_w as u32,
            height: out_h as u32,
        },
    );
    SizeConditions {
        crop_top_left: (top, i64::from(new_w) - out_w - left),
        ..*size
    }
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
    let rgb = decode_rgb(source, pre.alpha, &pre.decode)?;
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

/// Decodes `sources` on all cores and preprocesses each to the bucket nearest its aspect ratio
/// (centre crop, no flip); returns each image's bucket index with it.
pub fn load_bucketed(
    sources: &[&ImageSource],
    pre: &Preprocess,
    buckets: &[Bucket],
) -> Vec<Result<(usize, ImageTensor)>> {
    let centred = Preprocess {
        crop: Crop::Center,
        random_flip: false,
        ..*pre
    };
    sources
        .par_iter()
        .enumerate()
        .map(|(i, source)| {
            let rgb = decode_rgb(source, pre.alpha, &pre.decode)?;
            let bucket = nearest(buckets, rgb.width(), rgb.height());
            let image = preprocess_to(&rgb, &centred, buckets[bucket], &mut item_rng(0, i))
                .with_context(|| format!("preprocessing image {}", source.describe()))?;
            Ok((bucket, image))
        })
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
