//! FID/KID against pytorch-fid 0.3.0 (fixtures from tools/make_fid_fixtures.py), analytic
//! Fréchet distances, the `.npz` format, and bad input.
//!
//! The Inception weights are rebuilt here: conv weights from the formula documented in
//! tools/make_fid_fixtures.py, BatchNorm tensors from the fixture, plus `num_batches_tracked` and
//! `fc.*` as in the real weights file, written once per run under the cargo target tmp dir.
use difftune::data::images::DecodeOptions;
use difftune::data::ImageSource;
use difftune::eval::fid::trace_sqrt_product;
use difftune::eval::images::list_images;
use difftune::eval::images::load_image;
use difftune::eval::inception::{preprocess, FeatureDims, InceptionV3};
use difftune::eval::{frechet_distance, kid, resolve_weights, FidModel, Statistics};
use difftune::model::weights::{read_all, save_tensors};
use faer::Mat;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{nn, Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fid")
        .join(name)
}

fn reference(name: &str) -> Tensor {
    let mut all = read_all(&fixture("reference.safetensors")).unwrap();
    all.remove(name)
        .unwrap_or_else(|| panic!("`{name}` missing from reference.safetensors"))
}

fn reference_matrix(name: &str) -> Mat<f64> {
    matrix(&reference(name))
}

/// A 2-d tensor as a float64 matrix.
fn matrix(t: &Tensor) -> Mat<f64> {
    let t = t.to_kind(Kind::Double).contiguous();
    let (n, d) = (t.size()[0] as usize, t.size()[1] as usize);
    let values = Vec::<f64>::try_from(t.view([-1])).unwrap();
    Mat::from_fn(n, d, |i, j| values[i * d + j])
}

fn reference_scalar(name: &str) -> f64 {
    reference(name).double_value(&[0])
}

/// The formula of tools/make_fid_fixtures.py: a pseudo-random uniform with variance 1/fan_in
/// from integer hashing of the element index and the parameter name.
fn formula_conv_weight(name: &str, shape: &[i64]) -> Tensor {
    const P: u64 = (1 << 31) - 1;
    let seed = name.bytes().fold(0x811C_9DC5_u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    }) as u64
        % P;
    let fan_in: i64 = shape[1..].iter().product();
    let scale = 3f64.sqrt() / (fan_in as f64).sqrt();
    let numel: i64 = shape.iter().product();
    let values: Vec<f32> = (0..numel as u64)
        .map(|i| {
            let a = (i * 48271 + seed) % P;
            let b = (a * a + 12345) % P;
            let c = (b * b + 67890) % P;
            ((2.0 * (c as f64 / P as f64) - 1.0) * scale) as f32
        })
        .collect();
    Tensor::from_slice(&values).view(shape)
}

/// The test weights, in the real file's layout (566 tensors).
fn weights() -> &'static Path {
    static WEIGHTS: OnceLock<PathBuf> = OnceLock::new();
    WEIGHTS.get_or_init(|| {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = InceptionV3::new(vs.root());
        let bn = read_all(&fixture("inception_bn.safetensors")).unwrap();
        let mut tensors: Vec<(String, Tensor)> = bn
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        for (name, var) in vs.variables() {
            if name.ends_with("conv.weight") {
                tensors.push((name.clone(), formula_conv_weight(&name, &var.size())));
            } else if let Some(prefix) = name.strip_suffix(".running_mean") {
                tensors.push((format!("{prefix}.num_batches_tracked"), Tensor::from(0i64)));
            }
        }
        tensors.push((
            "fc.weight".into(),
            Tensor::zeros([1008, 2048], (Kind::Float, Device::Cpu)),
        ));
        tensors.push((
            "fc.bias".into(),
            Tensor::zeros([1008], (Kind::Float, Device::Cpu)),
        ));
        assert_eq!(
            tensors.len(),
            566,
            "the real pt_inception file has 566 tensors"
        );
        let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fid_formula_inception.safetensors");
        save_tensors(&path, &tensors, None).unwrap();
        path
    })
}

fn relative_error(ours: &Mat<f64>, reference: &Mat<f64>) -> f64 {
    assert_eq!(ours.shape(), reference.shape());
    (ours - reference).norm_l2() / reference.norm_l2()
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// Features of both folders against pytorch-fid's, then FID from our own features.
fn check_dims(dims: usize) -> (Mat<f64>, Mat<f64>) {
    let model = FidModel::load(weights(), Device::Cpu, dims)
        .unwrap()
        .with_batch_size(4);
    let ours_a = model
        .features_of_images(&list_images(&fixture("a")).unwrap())
        .unwrap();
    let ours_b = model
        .features_of_images(&list_images(&fixture("b")).unwrap())
        .unwrap();
    let err_a = relative_error(&ours_a, &reference_matrix(&format!("features_a_{dims}")));
    let err_b = relative_error(&ours_b, &reference_matrix(&format!("features_b_{dims}")));
    let stats_a = Statistics::from_features(ours_a.as_ref()).unwrap();
    let stats_b = Statistics::from_features(ours_b.as_ref()).unwrap();
    let fid = frechet_distance(&stats_a, &stats_b).unwrap();
    let fid_err = relative(fid, reference_scalar(&format!("fid_{dims}")));
    println!("dims {dims}: feature rel. error a {err_a:.2e} b {err_b:.2e}; FID {fid:.6} rel. error {fid_err:.2e}");
    assert!(err_a <= 1e-4 && err_b <= 1e-4);
    assert!(fid_err <= 1e-4);
    (ours_a, ours_b)
}

#[test]
fn pool3_features_fid_and_kid_match_pytorch_fid() {
    let (ours_a, ours_b) = check_dims(2048);
    // KID with one subset holding both whole sets is deterministic, so it compares exactly with
    // the reference formula on the reference features, and closely on ours.
    let reference_kid = reference_scalar("kid_2048");
    let (fa, fb) = (
        reference_matrix("features_a_2048"),
        reference_matrix("features_b_2048"),
    );
    let exact = kid(fa.as_ref(), fb.as_ref(), 100, 1000, 0).unwrap();
    let ours = kid(ours_a.as_ref(), ours_b.as_ref(), 100, 1000, 0).unwrap();
    println!(
        "KID {:.6e}: rel. error {:.2e} (reference features), {:.2e} (ours)",
        exact.mean,
        relative(exact.mean, reference_kid),
        relative(ours.mean, reference_kid)
    );
    assert_eq!((exact.subset_size, exact.std), (6, 0.0));
    assert!(relative(exact.mean, reference_kid) <= 1e-9);
    assert!(relative(ours.mean, reference_kid) <= 1e-4);
}

#[test]
fn first_and_second_pool_features_match_pytorch_fid() {
    check_dims(64);
    check_dims(192);
}

#[test]
fn unfolded_network_is_pytorch_fid_op_for_op_and_folding_keeps_it() {
    let mut inception = InceptionV3::load(weights(), Device::Cpu).unwrap();
    let inputs: Vec<Tensor> = list_images(&fixture("a"))
        .unwrap()
        .iter()
        .map(|p| {
            preprocess(
                &load_image(&ImageSource::File(p.clone()), &DecodeOptions::PILLOW_OPEN)
                    .unwrap()
                    .unsqueeze(0),
            )
        })
        .collect();
    let features = |net: &InceptionV3| {
        let rows: Vec<Tensor> = tch::no_grad(|| {
            inputs
                .iter()
                .map(|x| net.features(x, FeatureDims::D64))
                .collect()
        });
        matrix(&Tensor::cat(&rows, 0))
    };
    let unfolded = features(&inception);
    inception.fold_batch_norm();
    let folded = features(&inception);
    let unfolded_err = relative_error(&unfolded, &reference_matrix("features_a_64"));
    let folding_err = relative_error(&folded, &unfolded);
    println!("unfolded vs pytorch-fid {unfolded_err:.2e}, folded vs unfolded {folding_err:.2e}");
    // The same ops in the same order: equal up to the CPU's kernel choice (bit for bit on the
    // machine that made the fixtures).
    assert!(unfolded_err <= 1e-6);
    assert!(folding_err > 0.0 && folding_err <= 1e-5);
}

#[test]
fn tensor_input_matches_the_file_pipeline() {
    // The first two images of folder a are 299x299, so they can form one tensor batch.
    let model = FidModel::load(weights(), Device::Cpu, 64).unwrap();
    let files = list_images(&fixture("a")).unwrap();
    let images: Vec<Tensor> = files[..2]
        .iter()
        .map(|p| load_image(&ImageSource::File(p.clone()), &DecodeOptions::PILLOW_OPEN).unwrap())
        .collect();
    let ours = model
        .features_of_tensor(&Tensor::stack(&images, 0))
        .unwrap();
    let reference = reference_matrix("features_a_64");
    let err = relative_error(&ours, &reference.subrows(0, 2).to_owned());
    println!("tensor input: rel. error {err:.2e}");
    assert!(err <= 1e-4);
}

#[test]
fn numpy_npz_statistics_round_trip() {
    let features = reference_matrix("features_a_64");
    let ours = Statistics::from_features(features.as_ref()).unwrap();
    let numpy = Statistics::read_npz(&fixture("stats_a_64.npz")).unwrap();
    let mu_err = ours
        .mu
        .iter()
        .zip(&numpy.mu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let sigma_err = relative_error(&ours.sigma, &numpy.sigma);
    println!("np.mean/np.cov vs ours: mu max abs {mu_err:.2e}, sigma rel. {sigma_err:.2e}");
    assert!(mu_err <= 1e-12 && sigma_err <= 1e-12);

    let f32_fortran = Statistics::read_npz(&fixture("stats_a_64_f32_fortran.npz")).unwrap();
    assert!(relative_error(&f32_fortran.sigma, &numpy.sigma) <= 1e-6);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stats.npz");
    numpy.write_npz(&path).unwrap();
    let again = Statistics::read_npz(&path).unwrap();
    assert_eq!(again.mu, numpy.mu);
    assert_eq!(again.sigma, numpy.sigma);
}

#[test]
fn well_conditioned_fid_matches_scipy_sqrtm() {
    let x = Statistics::from_features(reference_matrix("wellcond_x").as_ref()).unwrap();
    let y = Statistics::from_features(reference_matrix("wellcond_y").as_ref()).unwrap();
    let fid = frechet_distance(&x, &y).unwrap();
    let err = relative(fid, reference_scalar("wellcond_fid"));
    println!("well-conditioned FID {fid:.9}: rel. error {err:.2e}");
    assert!(err <= 1e-9);
}

fn stats(mu: Vec<f64>, sigma: Mat<f64>) -> Statistics {
    Statistics { mu, sigma }
}

fn diagonal(values: &[f64]) -> Mat<f64> {
    Mat::from_fn(values.len(), values.len(), |i, j| {
        if i == j {
            values[i]
        } else {
            0.0
        }
    })
}

#[test]
fn analytic_frechet_distances() {
    // Identical distributions: 0.
    let sigma = {
        let x = reference_matrix("wellcond_x");
        Statistics::from_features(x.as_ref()).unwrap().sigma
    };
    let trace: f64 = (0..sigma.nrows()).map(|i| sigma[(i, i)]).sum();
    let same = stats(vec![0.5; sigma.nrows()], sigma.clone());
    let fid = frechet_distance(&same, &same).unwrap();
    assert!(fid.abs() <= 1e-9 * trace, "identical: {fid}");

    // Diagonal covariances (one rank-deficient): ||dmu||^2 + sum (sqrt a - sqrt b)^2.
    let (a, b) = ([1.0, 0.0, 4.0, 2.5], [0.0, 0.0, 9.0, 0.7]);
    let (mu_a, mu_b) = (vec![1.0, 2.0, 3.0, 4.0], vec![0.0, 2.0, 5.0, 4.5]);
    let expected = 1.0
        + 4.0
        + 0.25
        + a.iter()
            .zip(&b)
            .map(|(x, y): (&f64, &f64)| (x.sqrt() - y.sqrt()).powi(2))
            .sum::<f64>();
    let fid = frechet_distance(&stats(mu_a, diagonal(&a)), &stats(mu_b, diagonal(&b))).unwrap();
    assert!(
        relative(fid, expected) <= 1e-9,
        "diagonal: {fid} vs {expected}"
    );

    // c*I against a rotated diagonal Q diag(l) Q^T (Q a Householder reflection): the product does
    // not commute with any diagonal, and tr sqrt(S1 S2) = sqrt(c) sum sqrt(l).
    let n = 6;
    let l = [0.3, 1.0, 2.0, 5.0, 0.01, 7.5];
    let c = 1.7;
    let v: Vec<f64> = (0..n).map(|i| (i as f64 + 1.0).sin()).collect();
    let vv: f64 = v.iter().map(|x| x * x).sum();
    let q = Mat::from_fn(n, n, |i, j| {
        f64::from(u8::from(i == j)) - 2.0 * v[i] * v[j] / vv
    });
    let rotated = &q * diagonal(&l) * q.transpose();
    let rotated = Mat::from_fn(n, n, |i, j| 0.5 * (rotated[(i, j)] + rotated[(j, i)]));
    let scalar = diagonal(&[c; 6]);
    let expected_trace_sqrt = c.sqrt() * l.iter().map(|x: &f64| x.sqrt()).sum::<f64>();
    let got = trace_sqrt_product(scalar.as_ref(), rotated.as_ref()).unwrap();
    assert!(
        relative(got, expected_trace_sqrt) <= 1e-9,
        "rotated: {got} vs {expected_trace_sqrt}"
    );
    let fid =
        frechet_distance(&stats(vec![0.0; n], scalar), &stats(vec![1.0; n], rotated)).unwrap();
    let expected = n as f64 + n as f64 * c + l.iter().sum::<f64>() - 2.0 * expected_trace_sqrt;
    assert!(
        relative(fid, expected) <= 1e-9,
        "rotated FID: {fid} vs {expected}"
    );
}

#[test]
fn invalid_statistics_are_errors_not_numbers() {
    let good = stats(vec![0.0; 3], diagonal(&[1.0, 2.0, 3.0]));
    let not_psd = stats(vec![0.0; 3], diagonal(&[1.0, -0.5, 3.0]));
    let err = frechet_distance(&good, &not_psd).unwrap_err().to_string();
    assert!(err.contains("positive semi-definite"), "{err}");
    let nan = stats(vec![f64::NAN, 0.0, 0.0], diagonal(&[1.0, 2.0, 3.0]));
    assert!(frechet_distance(&good, &nan)
        .unwrap_err()
        .to_string()
        .contains("NaN"));
    let small = stats(vec![0.0; 2], diagonal(&[1.0, 2.0]));
    assert!(frechet_distance(&good, &small)
        .unwrap_err()
        .to_string()
        .contains("different dimensions"));
    let one_row = Mat::<f64>::zeros(1, 3);
    assert!(Statistics::from_features(one_row.as_ref())
        .unwrap_err()
        .to_string()
        .contains("at least 2"));
}

/// `n` rows of `d` uniform [0, 1) features plus `shift`.
fn uniform_features(n: usize, d: usize, shift: f64, seed: u64) -> Mat<f64> {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Mat::from_fn(n, d, |_, _| rng.random::<f64>() + shift)
}

#[test]
fn kid_subsets_are_seeded_and_unbiased() {
    let x = uniform_features(400, 16, 0.0, 1);
    let x2 = uniform_features(300, 16, 0.0, 2);
    let y = uniform_features(300, 16, 0.1, 3);
    let same = kid(x.as_ref(), x2.as_ref(), 50, 100, 3).unwrap();
    let shifted = kid(x.as_ref(), y.as_ref(), 50, 100, 3).unwrap();
    assert_eq!(shifted, kid(x.as_ref(), y.as_ref(), 50, 100, 3).unwrap());
    assert_ne!(shifted, kid(x.as_ref(), y.as_ref(), 50, 100, 4).unwrap());
    println!(
        "KID same distribution {:.3e} ± {:.1e}, shifted {:.3e} ± {:.1e}",
        same.mean, same.std, shifted.mean, shifted.std
    );
    assert_eq!(shifted.subset_size, 100);
    assert!(shifted.std > 0.0);
    // Unbiased: two samples of one distribution give ~0 (within its spread over subsets), far
    // below a real difference.
    assert!(same.mean.abs() < same.std && same.mean.abs() < 0.05 * shifted.mean);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("a/00_299x299.png"), dir.path().join("good.png")).unwrap();
    std::fs::write(dir.path().join("broken.png"), b"not a png").unwrap();
    std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
    let files = list_images(dir.path()).unwrap();
    assert_eq!(files.len(), 2);
    let model = FidModel::load(weights(), Device::Cpu, 64).unwrap();
    let err = format!("{:#}", model.features_of_images(&files).unwrap_err());
    assert!(err.contains("broken.png"), "{err}");

    std::fs::write(dir.path().join("scan.tif"), b"").unwrap();
    let err = list_images(dir.path()).unwrap_err().to_string();
    assert!(err.contains("scan.tif"), "{err}");

    let missing = dir.path().join("nowhere.safetensors");
    let err = resolve_weights(Some(&missing)).unwrap_err().to_string();
    assert!(
        err.contains("nowhere.safetensors")
            && err.contains("releases/download")
            && err.contains("convert_inception.py"),
        "{err}"
    );
    assert!(FidModel::load(weights(), Device::Cpu, 100).is_err());
}

fn difftune(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_difftune"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cli_reports_json_and_saves_statistics() {
    let weights = weights().to_str().unwrap();
    let (a, b) = (fixture("a"), fixture("b"));
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let npz = dir.path().join("a.npz");
    let npz = npz.to_str().unwrap();
    let common = [
        "--dims",
        "64",
        "--weights",
        weights,
        "--device",
        "cpu",
        "--json",
    ];
    let out = difftune(&[&["fid", a, b, "--kid", "--save-stats", npz][..], &common].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fid = report["fid"].as_f64().unwrap();
    assert!(
        relative(fid, reference_scalar("fid_64")) <= 1e-4,
        "{report}"
    );
    assert!(report["kid_mean"].as_f64().is_some() && report["kid_std"].as_f64().is_some());
    assert_eq!(
        (report["n_a"].as_u64(), report["n_b"].as_u64()),
        (Some(6), Some(6))
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("biased"));

    let out = difftune(&[&["fid", npz, b][..], &common].concat());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        relative(report["fid"].as_f64().unwrap(), fid) <= 1e-12,
        "{report}"
    );
    assert!(report["n_a"].is_null() && report["kid_mean"].is_null());

    let out = difftune(&[&["fid", npz, b, "--kid"][..], &common].concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--kid needs image folders"));
}

/// tools/make_jpeg_fixtures.py: a folder of JPEGs (4:4:4/4:2:2/4:2:0, progressive, restart
/// markers, grey, CMYK, YCCK, EXIF-rotated) and pytorch-fid's features of it and FID against
/// folder b, with the same Inception.
fn jpeg_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jpeg")
        .join(name)
}

#[test]
fn jpeg_folder_features_and_fid_match_pytorch_fid_at_every_width() {
    let mut reference = read_all(&jpeg_fixture("reference.safetensors")).unwrap();
    let jpegs = list_images(&jpeg_fixture("images")).unwrap();
    assert_eq!(jpegs.len(), 9);
    for dims in [64, 192, 768, 2048] {
        let model = FidModel::load(weights(), Device::Cpu, dims)
            .unwrap()
            .with_batch_size(9);
        let ours = model.features_of_images(&jpegs).unwrap();
        let ours_b = model
            .features_of_images(&list_images(&fixture("b")).unwrap())
            .unwrap();
        let expected = matrix(&reference.remove(&format!("features_{dims}")).unwrap());
        let feature_err = relative_error(&ours, &expected);
        let fid = frechet_distance(
            &Statistics::from_features(ours.as_ref()).unwrap(),
            &Statistics::from_features(ours_b.as_ref()).unwrap(),
        )
        .unwrap();
        let want = reference[&format!("fid_{dims}")].double_value(&[0]);
        let fid_err = relative(fid, want);
        println!(
            "JPEG dims {dims}: feature rel. error {feature_err:.2e}; FID {fid:.6} vs {want:.6}, rel. error {fid_err:.2e}"
        );
        assert!(feature_err <= 1e-4, "dims {dims}: features {feature_err}");
        assert!(fid_err <= 1e-4, "dims {dims}: FID {fid_err}");
    }
}

#[test]
fn pytorch_pickle_weights_name_the_conversion_command() {
    let dir = tempfile::tempdir().unwrap();
    let pth = dir.path().join("pt_inception-2015-12-05-6726825d.pth");
    std::fs::write(&pth, b"PK\x03\x04 a torch zip archive").unwrap();
    let err = format!("{:#}", resolve_weights(Some(&pth)).unwrap_err());
    assert!(
        err.contains("tools/convert_inception.py") && !err.contains('\n'),
        "{err}"
    );
}
