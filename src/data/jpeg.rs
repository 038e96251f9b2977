//! JPEG decoding with libjpeg-turbo (built from the source vendored by `turbojpeg-sys`), set up as
//! Pillow 12 decodes JPEGs for `Image.open(f).convert("RGB")`, so that FID and training see the
//! pixels the reference tools see: libjpeg's defaults (accurate integer IDCT, fancy chroma
//! upsampling), grey kept as one channel (replicated to RGB later, as Pillow's `L` → `RGB`), and
//! four-component CMYK/YCCK files decoded to CMYK by libjpeg, read as Adobe-inverted and turned
//! into RGB with Pillow's `cmyk2rgb` formula.
//!
//! libjpeg's warnings (corrupt but decodable data, e.g. extraneous bytes before a marker) are
//! ignored, as Pillow ignores them; a truncated file is an error, as in Pillow.
use anyhow::{bail, Result};
use image::{DynamicImage, GrayImage, RgbImage};
use std::ffi::{c_int, CStr};
use turbojpeg_sys as tj;

/// True for data that starts with a JPEG SOI marker.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Ends the entropy-coded data of the last scan: `FF D9` never occurs inside scan data (0xFF is
/// byte-stuffed there), so a complete JPEG has an EOI after its last SOS (`FF DA`). An EXIF
/// thumbnail's own markers all precede the main image's scans.
fn is_complete(bytes: &[u8]) -> bool {
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

/// The EXIF orientation of a JPEG (its first `APP1` `Exif` segment before the first scan).
pub fn orientation(bytes: &[u8]) -> Option<image::metadata::Orientation> {
    let mut at = 2;
    while at + 4 <= bytes.len() && bytes[at] == 0xFF {
        let marker = bytes[at + 1];
        if marker == 0xFF {
            at += 1; // fill byte
            continue;
        }
        if marker == 0xDA || marker == 0xD9 {
            return None;
        }
        let length = usize::from(u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]));
        let segment = bytes.get(at + 4..at + 2 + length)?;
        if marker == 0xE1 {
            if let Some(tiff) = segment.strip_prefix(b"Exif\0\0") {
                return image::metadata::Orientation::from_exif_chunk(tiff);
            }
        }
        at += 2 + length;
    }
    None
}

/// A TurboJPEG decompression instance.
struct Decompressor(tj::tjhandle);

impl Decompressor {
    fn new() -> Result<Self> {
        // SAFETY: tj3Init has no preconditions; a null handle is checked.
        let handle = unsafe { tj::tj3Init(tj::TJINIT_TJINIT_DECOMPRESS as c_int) };
        if handle.is_null() {
            bail!("libjpeg-turbo could not create a decompressor");
        }
        Ok(Self(handle))
    }

    fn message(&self) -> String {
        // SAFETY: the handle is valid; the message is a NUL-terminated string owned by it.
        unsafe { CStr::from_ptr(tj::tj3GetErrorStr(self.0)) }
            .to_string_lossy()
            .into_owned()
    }

    /// Whether the last failure was only a warning (the output is complete).
    fn warned(&self) -> bool {
        // SAFETY: the handle is valid.
        unsafe { tj::tj3GetErrorCode(self.0) == tj::TJERR_TJERR_WARNING as c_int }
    }

    fn get(&self, param: tj::TJPARAM) -> c_int {
        // SAFETY: the handle is valid; unknown parameters return -1.
        unsafe { tj::tj3Get(self.0, param as c_int) }
    }

    fn set(&self, param: tj::TJPARAM, value: c_int) -> Result<()> {
        // SAFETY: the handle is valid.
        if unsafe { tj::tj3Set(self.0, param as c_int, value) } != 0 {
            bail!("libjpeg-turbo: {}", self.message());
        }
        Ok(())
    }

    /// Reads the header: (width, height, colorspace).
    fn header(&self, bytes: &[u8]) -> Result<(usize, usize, c_int)> {
        // SAFETY: the pointer and length describe `bytes`.
        let rc = unsafe { tj::tj3DecompressHeader(self.0, bytes.as_ptr(), bytes.len() as _) };
        if rc != 0 {
            bail!("reading the JPEG header: {}", self.message());
        }
        let dimension = |param| usize::try_from(self.get(param)).unwrap_or(0);
        Ok((
            dimension(tj::TJPARAM_TJPARAM_JPEGWIDTH),
            dimension(tj::TJPARAM_TJPARAM_JPEGHEIGHT),
            self.get(tj::TJPARAM_TJPARAM_COLORSPACE),
        ))
    }

    /// Decodes into `out` (`height` rows of `width * channels` bytes) as `format`.
    fn decode(&self, bytes: &[u8], out: &mut [u8], pitch: usize, format: tj::TJPF) -> Result<()> {
        // SAFETY: `out` holds height * pitch bytes for the header's height, as the caller sized it
        // from the same header; the pointer and length describe `bytes`.
        let rc = unsafe {
            tj::tj3Decompress8(
                self.0,
                bytes.as_ptr(),
                bytes.len() as _,
                out.as_mut_ptr(),
                pitch as c_int,
                format as c_int,
            )
        };
        if rc != 0 && !self.warned() {
            bail!("decoding the JPEG: {}", self.message());
        }
        Ok(())
    }
}

impl Drop for Decompressor {
    fn drop(&mut self) {
        // SAFETY: the handle came from tj3Init and is destroyed once.
        unsafe { tj::tj3Destroy(self.0) }
    }
}

/// Pillow's `MULDIV255`: `a * b / 255`, rounded.
fn muldiv255(a: u32, b: u32) -> u32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// Pillow's `cmyk2rgb` of libjpeg's CMYK output read as Adobe-inverted (`CMYK;I`).
fn cmyk_to_rgb(cmyk: &[u8], width: usize, height: usize) -> RgbImage {
    let mut rgb = Vec::with_capacity(width * height * 3);
    for px in cmyk.chunks_exact(4) {
        let not_k = u32::from(px[3]);
        for &raw in &px[..3] {
            let ink = 255 - u32::from(raw);
            rgb.push(not_k.saturating_sub(muldiv255(ink, not_k)) as u8);
        }
    }
    RgbImage::from_raw(width as u32, height as u32, rgb).expect("buffer sized from the header")
}

/// Decodes a JPEG as Pillow does: an RGB image, or a grey one for one-component files. Images of
/// more than `max_pixels` pixels are refused from their header, before anything is allocated.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage> {
    let decompressor = Decompressor::new()?;
    let (width, height, colorspace) = decompressor.header(bytes)?;
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        bail!("the JPEG header gives an empty {width}x{height} image");
    }
    if pixels > max_pixels {
        bail!(
            "the JPEG is {width}x{height} = {pixels} pixels, over the limit of {max_pixels} \
             (raise max_image_pixels if this image is genuine)"
        );
    }
    decompressor.set(
        tj::TJPARAM_TJPARAM_MAXPIXELS,
        c_int::try_from(max_pixels).unwrap_or(c_int::MAX),
    )?;
    let channels = match colorspace as tj::TJCS {
        tj::TJCS_TJCS_GRAY => 1,
        tj::TJCS_TJCS_CMYK | tj::TJCS_TJCS_YCCK => 4,
        _ => 3,
    };
    let format = match channels {
        1 => tj::TJPF_TJPF_GRAY,
        4 => tj::TJPF_TJPF_CMYK,
        _ => tj::TJPF_TJPF_RGB,
    };
    let mut out = vec![0u8; width * height * channels];
    decompressor.decode(bytes, &mut out, width * channels, format)?;
    // Checked after decoding so that a corrupt file reports the decoder's error.
    if !is_complete(bytes) {
        bail!("truncated JPEG: no end-of-image marker after the last scan");
    }
    let (w, h) = (width as u32, height as u32);
    Ok(match channels {
        1 => DynamicImage::ImageLuma8(GrayImage::from_raw(w, h, out).expect("sized from header")),
        4 => DynamicImage::ImageRgb8(cmyk_to_rgb(&out, width, height)),
        _ => DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, out).expect("sized from header")),
    })
}
