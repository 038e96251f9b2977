//! Sample grids: generated images laid out side by side with their row and column captions, so
//! the methods' outputs for the same prompts and seeds can be compared at a glance.
use super::plots::register_font;
use crate::util::fs::write_atomic;
use anyhow::{anyhow, bail, Context, Result};
use image::{imageops, Rgb, RgbImage};
use plotters::prelude::*;
use std::path::Path;

/// Space between tiles and around the grid.
const GAP: u32 = 4;
const HEADER_HEIGHT: u32 = 28;
/// Wide enough for the longest row label, "No fine-tuning (base model)".
const LABEL_WIDTH: u32 = 240;
const FONT_SIZE: u32 = 15;

/// One captioned row of tiles.
#[derive(Debug, Clone)]
pub struct GridRow {
    pub label: String,
    pub tiles: Vec<RgbImage>,
}

/// Lays the rows out as a grid of `tile`-pixel squares (images are resized to fit), with each
/// row's label at its left and `column_titles` above the columns. Rows may be shorter than the
/// widest one; missing tiles stay blank.
pub fn compose(rows: &[GridRow], column_titles: &[String], tile: u32) -> Result<RgbImage> {
    if rows.is_empty() || rows.iter().all(|r| r.tiles.is_empty()) {
        bail!("a sample grid needs at least one image");
    }
    if tile == 0 {
        bail!("grid tile size must be positive");
    }
    register_font()?;
    let columns = rows
        .iter()
        .map(|r| r.tiles.len())
        .max()
        .unwrap_or(0)
        .max(column_titles.len()) as u32;
    let header = if column_titles.is_empty() {
        0
    } else {
        HEADER_HEIGHT
    };
    let width = LABEL_WIDTH + columns * (tile + GAP) + GAP;
    let height = header + rows.len() as u32 * (tile + GAP) + GAP;
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, image) in row.tiles.iter().enumerate() {
            let fitted = if image.dimensions() == (tile, tile) {
                image.clone()
            } else {
                imageops::resize(image, tile, tile, imageops::FilterType::Triangle)
            };
            let x = LABEL_WIDTH + c as u32 * (tile + GAP) + GAP;
            let y = header + r as u32 * (tile + GAP) + GAP;
            imageops::replace(&mut canvas, &fitted, x as i64, y as i64);
        }
    }
    draw_captions(&mut canvas, rows, column_titles, tile, header)?;
    Ok(canvas)
}

fn draw_captions(
    canvas: &mut RgbImage,
    rows: &[GridRow],
    column_titles: &[String],
    tile: u32,
    header: u32,
) -> Result<()> {
    let (width, height) = canvas.dimensions();
    let caption_error = |e: DrawingAreaErrorKind<_>| anyhow!("drawing grid captions: {e}");
    let root = BitMapBackend::with_buffer(canvas, (width, height)).into_drawing_area();
    let style = TextStyle::from(("sans-serif", FONT_SIZE).into_font()).color(&BLACK);
    // Roughly 0.55 em per character: enough to keep captions inside their cells.
    let fits = |px: u32| (px as f64 / (FONT_SIZE as f64 * 0.55)).floor().max(1.0) as usize;
    for (r, row) in rows.iter().enumerate() {
        let y = header + r as u32 * (tile + GAP) + GAP + tile / 2 - FONT_SIZE / 2;
        root.draw(&Text::new(
            truncate(&row.label, fits(LABEL_WIDTH - 2 * GAP)),
            (GAP as i32, y as i32),
            style.clone(),
        ))
        .map_err(caption_error)?;
    }
    for (c, title) in column_titles.iter().enumerate() {
        let x = LABEL_WIDTH + c as u32 * (tile + GAP) + GAP;
        root.draw(&Text::new(
            truncate(title, fits(tile)),
            (x as i32, (GAP + 2) as i32),
            style.clone(),
        ))
        .map_err(caption_error)?;
    }
    root.present().map_err(caption_error)?;
    Ok(())
}

/// `text` cut to `max` characters, with an ellipsis when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// Writes `image` to `path` as PNG, atomically.
pub fn write_png(image: &RgbImage, path: &Path) -> Result<()> {
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding a sample grid as PNG")?;
    write_atomic(path, &png).with_context(|| format!("writing sample grid {}", path.display()))
}

/// Reads an image file as 8-bit RGB.
pub fn read_rgb(path: &Path) -> Result<RgbImage> {
    Ok(image::open(path)
        .with_context(|| format!("reading sample {}", path.display()))?
        .to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(color: [u8; 3], side: u32) -> RgbImage {
        RgbImage::from_pixel(side, side, Rgb(color))
    }

    #[test]
    fn tiles_land_in_their_cells_and_captions_are_drawn() {
        let rows = vec![
            GridRow {
                label: "LoRA".into(),
                tiles: vec![solid([255, 0, 0], 16), solid([0, 255, 0], 16)],
            },
            GridRow {
                label: "BitFit".into(),
                tiles: vec![solid([0, 0, 255], 16)],
            },
        ];
        let grid = compose(&rows, &["apple pie".into(), "waffles".into()], 32).unwrap();
        assert_eq!(
            grid.dimensions(),
            (LABEL_WIDTH + 2 * 36 + GAP, HEADER_HEIGHT + 2 * 36 + GAP)
        );
        let centre = |r: u32, c: u32| {
            *grid.get_pixel(
                LABEL_WIDTH + c * 36 + GAP + 16,
                HEADER_HEIGHT + r * 36 + GAP + 16,
            )
        };
        assert_eq!(centre(0, 0), Rgb([255, 0, 0]));
        assert_eq!(centre(0, 1), Rgb([0, 255, 0]));
        assert_eq!(centre(1, 0), Rgb([0, 0, 255]));
        assert_eq!(
            centre(1, 1),
            Rgb([255, 255, 255]),
            "a missing tile stays blank"
        );
        let label_ink = (0..LABEL_WIDTH)
            .flat_map(|x| (HEADER_HEIGHT..HEADER_HEIGHT + 36).map(move |y| (x, y)))
            .filter(|&(x, y)| grid.get_pixel(x, y)[0] < 128)
            .count();
        assert!(
            label_ink > 20,
            "the row label was not drawn ({label_ink} dark pixels)"
        );
    }

    #[test]
    fn empty_grids_are_refused() {
        assert!(compose(&[], &[], 32).is_err());
    }

    #[test]
    fn long_captions_are_truncated() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
