//! The Gaussian summary of a feature set that FID compares (mean and covariance, float64), and
//! its `.npz` file format, the one pytorch-fid reads and writes (`mu`, `sigma`).
use anyhow::{bail, Context, Result};
use faer::{Mat, MatRef};
use npyz::npz::{NpzArchive, NpzWriter};
use npyz::WriterBuilder;
use std::io::{Cursor, Read};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct Statistics {
    /// Mean feature, length `dims`.
    pub mu: Vec<f64>,
    /// Sample covariance (divided by N - 1, as `np.cov`), `dims x dims`.
    pub sigma: Mat<f64>,
}

impl Statistics {
    /// Mean and covariance of feature rows `[N, dims]`. Needs N >= 2.
    pub fn from_features(features: MatRef<'_, f64>) -> Result<Self> {
        let (n, dims) = features.shape();
        if n < 2 {
            bail!("FID statistics need at least 2 images, got {n}");
        }
        if !features.is_all_finite() {
            bail!("the Inception features contain NaN or infinite values");
        }
        let mu: Vec<f64> = (0..dims)
            .map(|j| features.col(j).sum() / n as f64)
            .collect();
        let centered = Mat::from_fn(n, dims, |i, j| features[(i, j)] - mu[j]);
        let scale = 1.0 / (n - 1) as f64;
        let gram = centered.transpose() * &centered;
        let sigma = Mat::from_fn(dims, dims, |i, j| gram[(i, j)] * scale);
        Ok(Self { mu, sigma })
    }

    pub fn dims(&self) -> usize {
        self.mu.len()
    }

    /// Reads pytorch-fid's `.npz` statistics (`mu` `[d]`, `sigma` `[d, d]`, float64 or float32,
    /// C or Fortran order).
    pub fn read_npz(path: &Path) -> Result<Self> {
        let mut archive = NpzArchive::open(path)
            .with_context(|| format!("opening FID statistics {}", path.display()))?;
        let (mu_shape, mu) =
            read_array(&mut archive, "mu").with_context(|| format!("{}: `mu`", path.display()))?;
        let (sigma_shape, sigma) = read_array(&mut archive, "sigma")
            .with_context(|| format!("{}: `sigma`", path.display()))?;
        let dims = mu.len();
        if mu_shape.len() != 1 || sigma_shape != [dims as u64, dims as u64] {
            bail!(
                "{}: `mu` has shape {mu_shape:?} and `sigma` {sigma_shape:?}; expected [d] and [d, d]",
                path.display()
            );
        }
        Ok(Self {
            mu,
            sigma: Mat::from_fn(dims, dims, |i, j| sigma[i * dims + j]),
        })
    }

    /// Writes the statistics as pytorch-fid does (`np.savez_compressed(path, mu=mu, sigma=sigma)`),
    /// atomically.
    pub fn write_npz(&self, path: &Path) -> Result<()> {
        let dims = self.dims();
        let mut bytes = Cursor::new(Vec::new());
        {
            let mut npz = NpzWriter::new(&mut bytes);
            let options = || {
                npyz::zip::write::FileOptions::default()
                    .compression_method(npyz::zip::CompressionMethod::Deflated)
            };
            let mut mu = npz
                .array::<f64>("mu", options())?
                .default_dtype()
                .shape(&[dims as u64])
                .begin_nd()?;
            mu.extend(self.mu.iter().copied())?;
            mu.finish()?;
            let mut sigma = npz
                .array::<f64>("sigma", options())?
                .default_dtype()
                .shape(&[dims as u64, dims as u64])
                .begin_nd()?;
            sigma.extend(
                (0..dims)
                    .flat_map(|i| (0..dims).map(move |j| (i, j)))
                    .map(|(i, j)| self.sigma[(i, j)]),
            )?;
            sigma.finish()?;
            npz.zip_writer().finish()?;
        }
        crate::util::fs::write_atomic(path, &bytes.into_inner())
    }
}

/// One array of an npz archive as (shape, C-order float64 values).
fn read_array<R: Read + std::io::Seek>(
    archive: &mut NpzArchive<R>,
    name: &str,
) -> Result<(Vec<u64>, Vec<f64>)> {
    let Some(array) = archive.by_name(name)? else {
        bail!("array missing (not an FID statistics file?)");
    };
    let shape = array.shape().to_vec();
    let order = array.order();
    let values: Vec<f64> = match array.try_data::<f64>() {
        Ok(reader) => reader.collect::<std::io::Result<_>>()?,
        Err(array) => {
            let reader = array
                .data::<f32>()
                .context("expected float64 or float32 values")?;
            reader
                .map(|v| v.map(f64::from))
                .collect::<std::io::Result<_>>()?
        }
    };
    Ok(match (order, shape.as_slice()) {
        (npyz::Order::Fortran, &[rows, cols]) => {
            let (rows, cols) = (rows as usize, cols as usize);
            let c_order = (0..rows * cols)
                .map(|k| values[(k % cols) * rows + k / cols])
                .collect();
            (shape, c_order)
        }
        _ => (shape, values),
    })
}
