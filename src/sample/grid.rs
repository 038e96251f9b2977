//! A contact sheet of a run's samples: images tiled row by row, in order.
use anyhow::{ensure, Result};
use tch::Tensor;

/// Columns for `n` tiles: the smallest count giving a grid at most as tall as wide.
pub fn grid_columns(n: usize) -> usize {
    (1..=n.max(1)).find(|c| c * c >= n).unwrap_or(1)
}

/// Tiles `images` `[n, 3, H, W]` into `[3, rows * H, columns * W]`, row-major; cells past the
/// last image stay white.
pub fn image_grid(images: &Tensor, columns: usize) -> Result<Tensor> {
    let (n, c, h, w) = images.size4()?;
    ensure!(n > 0 && columns > 0, "a grid needs images and columns");
    let columns = columns.min(n as usize) as i64;
    let rows = (n + columns - 1) / columns;
    let padded = if rows * columns > n {
        let blank = Tensor::ones(
            [rows * columns - n, c, h, w],
            (images.kind(), images.device()),
        );
        Tensor::cat(&[images.shallow_clone(), blank], 0)
    } else {
        images.shallow_clone()
    };
    // [rows, columns, c, h, w] -> [c, rows, h, columns, w]
    Ok(padded
        .view([rows, columns, c, h, w])
        .permute([2, 0, 3, 1, 4])
        .reshape([c, rows * h, columns * w]))
}
