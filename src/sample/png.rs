//! 8-bit RGB PNGs carrying text metadata (the generation parameters of a sample). Latin-1 values
//! go in `tEXt` chunks, others (non-Latin-1 prompts) in uncompressed `iTXt` (UTF-8) chunks.
use crate::util::fs::write_atomic;
use anyhow::{ensure, Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// `[3, H, W]` floats in `[0, 1]` -> interleaved RGB bytes, rounding as diffusers'
/// `numpy_to_pil` does (`(x * 255).round()`).
pub fn to_rgb8(image: &Tensor) -> Result<(u32, u32, Vec<u8>)> {
    let (c, h, w) = image
        .size3()
        .with_context(|| format!("an image must be [3, H, W], got {:?}", image.size()))?;
    ensure!(c == 3, "an image must have 3 channels, got {c}");
    let bytes = (image.to_device(tch::Device::Cpu).to_kind(Kind::Float) * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .permute([1, 2, 0])
        .contiguous()
        .view([-1]);
    Ok((w as u32, h as u32, Vec::<u8>::try_from(&bytes)?))
}

fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) < 256)
}

/// Encodes RGB bytes (`width * height * 3`) as a PNG with `text` as (keyword, value) chunks.
pub fn encode_png(width: u32, height: u32, rgb: &[u8], text: &[(&str, String)]) -> Result<Vec<u8>> {
    ensure!(
        rgb.len() == width as usize * height as usize * 3,
        "{} bytes are not a {width}x{height} RGB image",
        rgb.len()
    );
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    for (keyword, value) in text {
        ensure!(
            (1..80).contains(&keyword.len()) && is_latin1(keyword),
            "PNG text keyword {keyword:?} must be 1 to 79 Latin-1 characters"
        );
        if is_latin1(value) {
            encoder.add_text_chunk(keyword.to_string(), value.clone())?;
        } else {
            encoder.add_itxt_chunk(keyword.to_string(), value.clone())?;
        }
    }
    let mut writer = encoder.write_header().context("writing the PNG header")?;
    writer
        .write_image_data(rgb)
        .context("encoding the PNG image data")?;
    writer.finish().context("finishing the PNG")?;
    Ok(out)
}

/// Writes `image` (`[3, H, W]` in `[0, 1]`) to `path` atomically, with `text` chunks.
pub fn write_png(path: &Path, image: &Tensor, text: &[(&str, String)]) -> Result<()> {
    let (width, height, rgb) = to_rgb8(image)?;
    let bytes = encode_png(width, height, &rgb, text)
        .with_context(|| format!("encoding {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// The pixels of an 8-bit RGB PNG (as [`write_png`] writes them) as `[3, H, W]` floats in
/// `[0, 1]`; writing them again gives the same bytes.
pub fn read_png_rgb(path: &Path) -> Result<Tensor> {
    let (_, buf, frame) = decode_png_file(path)?;
    ensure!(
        frame.color_type == png::ColorType::Rgb && frame.bit_depth == png::BitDepth::Eight,
        "{} is not an 8-bit RGB PNG",
        path.display()
    );
    let (h, w) = (frame.height as i64, frame.width as i64);
    let hwc = Tensor::from_slice(&buf[..frame.buffer_size()]).view([h, w, 3]);
    Ok(hwc.permute([2, 0, 1]).to_kind(Kind::Float) / 255.0)
}

type PngReader = png::Reader<std::io::BufReader<std::fs::File>>;

/// Decodes the first frame of the PNG at `path`: the reader (positioned after that frame), the
/// pixel buffer and the frame's layout.
fn decode_png_file(path: &Path) -> Result<(PngReader, Vec<u8>, png::OutputInfo)> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .with_context(|| format!("reading the PNG header of {}", path.display()))?;
    let mut buf = vec![
        0;
        reader
            .output_buffer_size()
            .context("the PNG image is too large")?
    ];
    let frame = reader
        .next_frame(&mut buf)
        .with_context(|| format!("decoding {}", path.display()))?;
    Ok((reader, buf, frame))
}

/// The (keyword, value) text chunks of the PNG at `path`, `tEXt`, `zTXt` and `iTXt` alike, in that
/// order.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    // Text chunks may follow the image data; decoding the image reaches them.
    let (mut reader, _, _) = decode_png_file(path)?;
    reader
        .finish()
        .with_context(|| format!("reading the end of {}", path.display()))?;
    let info = reader.info();
    let mut text: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for chunk in &info.compressed_latin1_text {
        text.push((chunk.keyword.clone(), chunk.get_text()?));
    }
    for chunk in &info.utf8_text {
        text.push((chunk.keyword.clone(), chunk.get_text()?));
    }
    Ok(text)
}
