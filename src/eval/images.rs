//! Images read the way pytorch-fid reads them: a folder's images are the files directly in it
//! whose extension is one of pytorch-fid's (lower case, as its glob is case-sensitive); each image
//! (such a file, or a dataset's sample) is decoded to RGB uint8 and turned into float [0, 1] like
//! torchvision's `ToTensor`.
//!
//! Pixel values match Pillow's exactly: PNG is lossless, and JPEGs are decoded by libjpeg-turbo
//! set up as Pillow sets it up (see [`crate::data::jpeg`]), without EXIF rotation as
//! `Image.open` does.
use crate::data::images::{decode, DecodeOptions};
use crate::data::ImageSource;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// pytorch-fid's `IMAGE_EXTENSIONS`.
const PYTORCH_FID_EXTENSIONS: [&str; 9] = [
    "bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp",
];
/// The subset the `image` crate is built to decode here.
const DECODABLE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// The images of `dir` (not recursive), sorted by path. Files with another extension are skipped,
/// as pytorch-fid does; image formats that pytorch-fid reads but difftune cannot decode are an
/// error rather than silently changing the sample.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading the image folder {}", dir.display()))?;
    let mut images = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("reading the image folder {}", dir.display()))?
            .path();
        let Some(ext) = path.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !PYTORCH_FID_EXTENSIONS.contains(&ext) || !path.is_file() {
            continue;
        }
        if !DECODABLE_EXTENSIONS.contains(&ext) {
            bail!(
                "{}: .{ext} images are not supported (difftune reads {}); convert the folder to PNG",
                path.display(),
                DECODABLE_EXTENSIONS.join(", ")
            );
        }
        images.push(path);
    }
    images.sort();
    Ok(images)
}

/// Image files as the images [`crate::eval::FidModel::features`] reads.
pub fn image_files(paths: &[PathBuf]) -> Vec<ImageSource> {
    paths.iter().cloned().map(ImageSource::File).collect()
}

/// Decodes an image (a file, or a dataset's encoded bytes) to a `[3, H, W]` float tensor in [0, 1]
/// (grey and alpha images become RGB as PIL's `convert('RGB')` makes them: grey replicated, alpha
/// dropped). [`DecodeOptions::PILLOW_OPEN`] reads it as pytorch-fid does.
pub fn load_image(source: &ImageSource, options: &DecodeOptions) -> Result<Tensor> {
    let bytes = source.read()?;
    let image = decode(&bytes, options)
        .with_context(|| format!("decoding image {}", source.describe()))?
        .to_rgb8();
    let (width, height) = image.dimensions();
    let hwc = Tensor::from_slice(image.as_raw()).view([height as i64, width as i64, 3]);
    // torchvision's ToTensor: CHW contiguous, then float / 255.
    Ok(hwc.permute([2, 0, 1]).contiguous().to_kind(Kind::Float) / 255.0)
}
