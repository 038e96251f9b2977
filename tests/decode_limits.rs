//! Bounded image decoding: a decompression bomb (a 1 KB JPEG or PNG whose header claims
//! 60000x60000 pixels) and a truncated JPEG are errors naming their file in every path, and a
//! dataset holding them still caches (or fails with `--strict`) without the process growing.
//! Its own test binary, so the process's peak memory is this test's alone.
use difftune::data::cache::{build, CacheSettings};
use difftune::data::images::{self, DecodeOptions};
use difftune::data::synthetic::{generate_food101_like, SyntheticSpec};
use difftune::data::ImageSource;
use difftune::eval::images::load_image;
use difftune::model::source::ModelFiles;
use std::path::{Path, PathBuf};

/// A real 53x41 JPEG with the SOF0 frame size rewritten to 60000x60000.
fn jpeg_bomb() -> Vec<u8> {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg/images/s420.jpg");
    let mut bytes = std::fs::read(fixture).unwrap();
    let sof = bytes
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("a baseline JPEG has an SOF0 marker");
    // FF C0, length (2), precision (1), height (2), width (2).
    bytes[sof + 5..sof + 7].copy_from_slice(&60000u16.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&60000u16.to_be_bytes());
    bytes
}

/// A PNG (valid IHDR) claiming 60000x60000 RGB, with one tiny IDAT chunk.
fn png_bomb() -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, 60000, 60000);
    encoder.set_color(png::ColorType::Rgb);
    let mut writer = encoder.write_header().unwrap();
    writer
        .write_chunk(png::chunk::IDAT, &[0x78, 0x9C, 0x03, 0x00])
        .unwrap();
    drop(writer);
    bytes
}

/// The process's peak resident memory (Linux `VmHWM`), in bytes.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[test]
fn bombs_and_truncated_images_are_named_and_skipped_and_the_cache_completes() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let model = root.join("model");
    difftune::model::tiny::write_tiny_model(&model, 0, &difftune::data::synthetic::captions())
        .unwrap();
    let data = root.join("data");
    let spec = SyntheticSpec {
        classes: 2,
        train_per_class: 4,
        test_per_class: 1,
        resolution: 32,
        ..Default::default()
    };
    generate_food101_like(&data, &spec).unwrap();
    let listing = std::fs::read_to_string(data.join("meta/train.txt")).unwrap();
    let entries: Vec<&str> = listing.lines().collect();
    let image = |i: usize| -> PathBuf { data.join("images").join(format!("{}.jpg", entries[i])) };
    let (bomb, truncated) = (image(1), image(5));
    std::fs::write(&bomb, jpeg_bomb()).unwrap();
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();

    let files = ModelFiles::resolve(&model.display().to_string(), None).unwrap();
    let settings = CacheSettings {
        resolution: 32,
        shard_size: 4,
        batch_size: 4,
        ..CacheSettings::default()
    };
    let strict = CacheSettings {
        strict: true,
        ..settings.clone()
    };
    let err = format!(
        "{:#}",
        build(&files, &data, &strict, &root.join("strict")).unwrap_err()
    );
    assert!(err.contains(&bomb.display().to_string()), "{err}");

    let (manifest, report) = build(&files, &data, &settings, &root.join("cache")).unwrap();
    assert!(manifest.complete);
    assert_eq!(manifest.len(), 6);
    let skipped: Vec<(&str, &str)> = report
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.error.as_str()))
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, bomb.display().to_string());
    assert!(skipped[0].1.contains("over the limit"), "{}", skipped[0].1);
    assert_eq!(skipped[1].0, truncated.display().to_string());
    assert!(skipped[1].1.contains("truncated"), "{}", skipped[1].1);

    // FID's reader refuses them too, naming the file; a PNG bomb likewise.
    let png = root.join("bomb.png");
    std::fs::write(&png, png_bomb()).unwrap();
    for path in [&bomb, &truncated, &png] {
        let err = format!(
            "{:#}",
            load_image(
                &ImageSource::File(path.to_path_buf()),
                &DecodeOptions::PILLOW_OPEN
            )
            .unwrap_err()
        );
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
    let err = format!(
        "{:#}",
        images::decode(&png_bomb(), &DecodeOptions::default()).unwrap_err()
    );
    assert!(err.contains("over the limit"), "{err}");

    // A limit from the settings: the 32x32 images pass at 1024 pixels and fail at 1023.
    let good = std::fs::read(image(0)).unwrap();
    let limit = |max_pixels| DecodeOptions {
        max_pixels,
        ..DecodeOptions::default()
    };
    assert!(images::decode(&good, &limit(1024)).is_ok());
    assert!(images::decode(&good, &limit(1023)).is_err());

    // Refused from the header: nothing near the 10 GB a decoded 60000x60000 image takes.
    let peak = peak_rss_bytes();
    println!("peak RSS {} MiB", peak >> 20);
    assert!(peak < 1 << 30, "peak RSS {peak} bytes");
}
