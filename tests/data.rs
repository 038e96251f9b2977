//! Dataset layouts, image decoding/preprocessing and the synthetic generator.
//! Fixtures: tests/fixtures/data/, written by tools/make_data_fixtures.py.
use anyhow::Result;
use difftune::data::images::{self, Alpha, Crop, DecodeOptions, Preprocess, ResizeFilter};
use difftune::data::synthetic::{generate_food101_like, Domain, SyntheticSpec, DISHES};
use difftune::data::{Dataset, DatasetOptions, ImageSource, Layout, PromptTemplate, Split};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data")
        .join(name)
}

fn rng() -> rand_chacha::ChaCha8Rng {
    rand::SeedableRng::seed_from_u64(0)
}

fn opts(split: Split, limit_per_class: Option<usize>) -> DatasetOptions {
    DatasetOptions {
        split,
        limit_per_class,
        ..Default::default()
    }
}

fn small_spec(domain: Domain, seed: u64) -> SyntheticSpec {
    SyntheticSpec {
        classes: 4,
        train_per_class: 6,
        test_per_class: 3,
        resolution: 32,
        domain,
        seed,
        jpeg_quality: 90,
    }
}

/// All files under `dir` with their contents, sorted by path.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((
                    path.strip_prefix(dir).unwrap().to_path_buf(),
                    std::fs::read(&path).unwrap(),
                ));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn synthetic_food101_loads_with_counts_captions_splits_and_limits() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("synthetic");
    generate_food101_like(&root, &small_spec(Domain::Source, 7))?;

    let train = Dataset::open(&root, &opts(Split::Train, None))?;
    assert_eq!(train.layout, Layout::Food101);
    let names: Vec<&str> = train.classes.iter().map(|c| c.name.as_str()).collect();
    // The first four dishes, listed alphabetically as Food101 does.
    assert_eq!(
        names,
        [
            "blueberry_pie",
            "lemon_tart",
            "pepperoni_pizza",
            "tomato_soup"
        ]
    );
    assert_eq!(train.len(), 24);
    assert_eq!(train.class_counts(), [6, 6, 6, 6]);
    let first = &train.samples[0];
    assert_eq!(first.id, "blueberry_pie/100000");
    assert_eq!(first.label, Some(0));
    assert_eq!(first.caption, "a photo of blueberry pie, a type of food");
    assert_eq!(
        first.image,
        ImageSource::File(root.join("images/blueberry_pie/100000.jpg"))
    );

    let test = Dataset::open(&root, &opts(Split::Test, None))?;
    assert_eq!(test.class_counts(), [3, 3, 3, 3]);
    assert_eq!(test.samples[0].id, "blueberry_pie/100006");

    let limited = Dataset::open(
        &root,
        &DatasetOptions {
            prompt: PromptTemplate::new("{label}")?,
            ..opts(Split::Train, Some(2))
        },
    )?;
    assert_eq!(limited.class_counts(), [2, 2, 2, 2]);
    assert_eq!(limited.samples[2].id, "lemon_tart/100000");
    assert_eq!(limited.samples[2].caption, "lemon tart");

    // Every listed image exists and decodes at the spec's resolution.
    let sources: Vec<&ImageSource> = test.samples.iter().map(|s| &s.image).collect();
    let pre = Preprocess {
        resolution: 32,
        ..Default::default()
    };
    for result in images::load_all(&sources, &pre, 0) {
        let image = result?;
        assert_eq!((image.height, image.width), (32, 32));
    }
    Ok(())
}

#[test]
fn food101_archive_layout_with_labels_txt_and_top_folder() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join("food-101");
    let write = |rel: &str, text: &str| {
        std::fs::create_dir_all(root.join(rel).parent().unwrap())
            .and_then(|_| std::fs::write(root.join(rel), text))
    };
    write("meta/classes.txt", "apple_pie\neggs_benedict\n")?;
    write("meta/labels.txt", "Apple pie\nEggs Benedict\n")?;
    write(
        "meta/train.txt",
        "apple_pie/1005649\neggs_benedict/12\napple_pie/99\n",
    )?;
    write("meta/test.txt", "eggs_benedict/7\n")?;
    // Opened from the archive's parent folder.
    let train = Dataset::open(tmp.path(), &opts(Split::Train, Some(1)))?;
    assert_eq!(train.root, root);
    let ids: Vec<&str> = train.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["apple_pie/1005649", "eggs_benedict/12"]);
    assert_eq!(
        train.samples[1].caption,
        "a photo of eggs benedict, a type of food"
    );
    assert_eq!(
        train.samples[1].image,
        ImageSource::File(root.join("images/eggs_benedict/12.jpg"))
    );
    let test = Dataset::open(&root, &opts(Split::Test, None))?;
    assert_eq!((test.len(), test.samples[0].label), (1, Some(1)));

    write("meta/test.txt", "eggs_benedict/7\nsushi/3\n")?;
    let err = format!(
        "{:#}",
        Dataset::open(&root, &opts(Split::Test, None)).unwrap_err()
    );
    assert!(
        err.contains("test.txt:2") && err.contains("\"sushi\""),
        "{err}"
    );
    write("meta/labels.txt", "Apple pie\n")?;
    let err = format!(
        "{:#}",
        Dataset::open(&root, &opts(Split::Train, None)).unwrap_err()
    );
    assert!(err.contains("labels.txt has 1 labels"), "{err}");
    Ok(())
}

#[test]
fn hf_parquet_loads_labels_captions_splits_and_limits() -> Result<()> {
    let root = fixture("hf");
    let train = Dataset::open(&root, &opts(Split::Train, None))?;
    assert_eq!(train.layout, Layout::Parquet);
    let names: Vec<&str> = train.classes.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["apple_pie", "baby_back_ribs", "baklava"]);
    assert_eq!(train.len(), 9);
    assert_eq!(train.class_counts(), [4, 3, 2]);
    assert_eq!(
        train.samples[1].caption,
        "a photo of baby back ribs, a type of food"
    );
    assert_eq!(train.samples[5].id, "train-00001-of-00002/0");
    assert!(train.samples[5]
        .image
        .describe()
        .ends_with("train-00001-of-00002.parquet row 0"));

    // Images decode to their class colours (JPEG and PNG bytes alternate).
    let expected = [[200u8, 40, 40], [40, 200, 40], [40, 40, 200]];
    let pre = Preprocess {
        resolution: 8,
        ..Default::default()
    };
    let sources: Vec<&ImageSource> = train.samples.iter().map(|s| &s.image).collect();
    for (sample, result) in train
        .samples
        .iter()
        .zip(images::load_all(&sources, &pre, 0))
    {
        let image = result?;
        let want = expected[sample.label.unwrap()];
        for c in 0..3 {
            let got = image.data[c * 64 + 27];
            let want = f32::from(want[c]) / 127.5 - 1.0;
            assert!(
                (got - want).abs() < 0.05,
                "{} channel {c}: {got} vs {want}",
                sample.id
            );
        }
    }

    // Limits cross shard and row-group boundaries.
    let limited = Dataset::open(&root, &opts(Split::Train, Some(2)))?;
    let ids: Vec<&str> = limited.samples.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "train-00000-of-00002/0",
            "train-00000-of-00002/1",
            "train-00000-of-00002/2",
            "train-00000-of-00002/3",
            "train-00000-of-00002/4",
            "train-00001-of-00002/3"
        ]
    );

    // The Hub's Food101 has a validation split and no test split.
    let test = Dataset::open(&root, &opts(Split::Test, None))?;
    assert_eq!(
        test.samples
            .iter()
            .map(|s| s.label.unwrap())
            .collect::<Vec<_>>(),
        [2, 1, 0]
    );
    assert_eq!(test.samples[0].id, "validation-00000-of-00001/0");

    // A classes file overrides the embedded names.
    let tmp = tempfile::tempdir()?;
    let classes = tmp.path().join("classes.txt");
    std::fs::write(&classes, "red_curry\ngreen_curry\nblue_cheese\n")?;
    let renamed = Dataset::open(
        &root,
        &DatasetOptions {
            classes_file: Some(classes),
            ..opts(Split::Test, None)
        },
    )?;
    assert_eq!(
        renamed.samples[0].caption,
        "a photo of blue cheese, a type of food"
    );
    Ok(())
}

#[test]
fn captioned_parquet_takes_captions_from_the_text_column() -> Result<()> {
    let root = fixture("hf_text");
    let train = Dataset::open(&root, &opts(Split::Train, Some(2)))?;
    assert_eq!(train.layout, Layout::Parquet);
    assert!(train.classes.is_empty());
    let captions: Vec<&str> = train.samples.iter().map(|s| s.caption.as_str()).collect();
    assert_eq!(captions, ["a red dish", "a green dish"]);
    assert_eq!(train.samples[1].label, None);
    let pre = Preprocess {
        resolution: 8,
        ..Default::default()
    };
    let image = images::load(&train.samples[1].image, &pre, &mut rng())?;
    assert_close(
        centre(&image),
        [40.0 / 127.5 - 1.0, 200.0 / 127.5 - 1.0, 40.0 / 127.5 - 1.0],
        1e-6,
        "green",
    );
    let err = format!(
        "{:#}",
        Dataset::open(&root, &opts(Split::Test, None)).unwrap_err()
    );
    assert!(err.contains("no parquet shard for the test split"), "{err}");
    Ok(())
}

#[test]
fn image_folder_with_metadata_jsonl() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let root = tmp.path();
    for (i, name) in ["a.png", "b.png", "c.png"].iter().enumerate() {
        ImageBuffer::from_pixel(20, 10, Rgb([i as u8 * 100, 0, 0])).save(root.join(name))?;
    }
    std::fs::write(
        root.join("metadata.jsonl"),
        "{\"file_name\": \"a.png\", \"text\": \"a red square\", \"extra\": 1}\n\n{\"file_name\": \"b.png\", \"text\": \"a dark one\"}\n{\"file_name\": \"c.png\", \"text\": \"another\"}\n",
    )?;
    let train = Dataset::open(root, &opts(Split::Train, None))?;
    assert_eq!(train.layout, Layout::ImageFolder);
    assert_eq!(train.len(), 3);
    assert!(train.classes.is_empty());
    assert_eq!(
        (
            train.samples[1].id.as_str(),
            train.samples[1].caption.as_str()
        ),
        ("b.png", "a dark one")
    );
    assert_eq!(
        train.samples[1].image,
        ImageSource::File(root.join("b.png"))
    );
    assert_eq!(Dataset::open(root, &opts(Split::Train, Some(2)))?.len(), 2);
    let err = format!(
        "{:#}",
        Dataset::open(root, &opts(Split::Test, None)).unwrap_err()
    );
    assert!(err.contains("no test split"), "{err}");

    std::fs::write(
        root.join("metadata.jsonl"),
        "{\"file_name\": \"a.png\", \"caption\": \"x\"}\n",
    )?;
    let err = format!(
        "{:#}",
        Dataset::open(root, &opts(Split::Train, None)).unwrap_err()
    );
    assert!(
        err.contains("metadata.jsonl:1") && err.contains("no \"text\" field"),
        "{err}"
    );
    let custom = Dataset::open(
        root,
        &DatasetOptions {
            caption_column: "caption".into(),
            ..opts(Split::Train, None)
        },
    )?;
    assert_eq!(custom.samples[0].caption, "x");
    Ok(())
}

#[test]
fn unknown_layout_and_bad_template_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        Dataset::open(tmp.path(), &DatasetOptions::default()).unwrap_err()
    );
    assert!(err.contains("matches no dataset layout"), "{err}");
    let err = PromptTemplate::new("a photo of food")
        .unwrap_err()
        .to_string();
    assert!(err.contains("{label}"), "{err}");
}

#[test]
fn settings_parse_from_their_names() -> Result<()> {
    assert_eq!("test".parse::<Split>()?, Split::Test);
    assert_eq!("bicubic".parse::<ResizeFilter>()?, ResizeFilter::Bicubic);
    assert_eq!("random".parse::<Crop>()?, Crop::Random);
    assert_eq!("over_white".parse::<Alpha>()?, Alpha::OverWhite);
    assert_eq!("target".parse::<Domain>()?, Domain::Target);
    assert!("validation"
        .parse::<Split>()
        .unwrap_err()
        .to_string()
        .contains("\"validation\""));
    let pre: Preprocess = serde_json::from_str(
        r#"{"resolution": 256, "filter": "lanczos3", "crop": "center", "random_flip": true, "alpha": "drop"}"#,
    )?;
    assert_eq!(
        pre,
        Preprocess {
            resolution: 256,
            filter: ResizeFilter::Lanczos3,
            random_flip: true,
            ..Default::default()
        }
    );
    Ok(())
}

/// Encodes `image` in `format` and preprocesses it to 8x8.
fn decode_as(
    image: &DynamicImage,
    format: ImageFormat,
    pre: Preprocess,
) -> Result<images::ImageTensor> {
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), format)?;
    let source = ImageSource::Encoded {
        bytes: bytes.into(),
        origin: format!("{format:?} test image"),
    };
    images::load(&source, &pre, &mut rng())
}

/// The centre pixel of each channel.
fn centre(image: &images::ImageTensor) -> [f32; 3] {
    let (h, w) = (image.height, image.width);
    std::array::from_fn(|c| image.data[(c * h + h / 2) * w + w / 2])
}

fn assert_close(got: [f32; 3], want: [f32; 3], tol: f32, what: &str) {
    for c in 0..3 {
        assert!(
            (got[c] - want[c]).abs() <= tol,
            "{what}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn every_colour_mode_becomes_rgb_in_range() -> Result<()> {
    let pre = Preprocess {
        resolution: 8,
        ..Default::default()
    };
    let check = |image: &images::ImageTensor, what: &str| {
        assert_eq!(
            (image.height, image.width, image.data.len()),
            (8, 8, 3 * 64),
            "{what}"
        );
        assert!(
            image.data.iter().all(|v| (-1.0..=1.0).contains(v)),
            "{what}"
        );
    };
    let grey = DynamicImage::ImageLuma8(ImageBuffer::from_pixel(24, 12, Luma([51u8])));
    for format in [ImageFormat::Jpeg, ImageFormat::Png, ImageFormat::WebP] {
        let image = decode_as(&grey, format, pre)?;
        check(&image, "grey");
        assert_close(centre(&image), [-0.6; 3], 0.02, &format!("grey {format:?}"));
    }
    let grey_alpha = DynamicImage::ImageLumaA8(ImageBuffer::from_pixel(12, 12, LumaA([0u8, 0])));
    let image = decode_as(
        &grey_alpha,
        ImageFormat::Png,
        Preprocess {
            alpha: Alpha::OverWhite,
            ..pre
        },
    )?;
    assert_close(
        centre(&image),
        [1.0; 3],
        1e-6,
        "transparent grey over white",
    );

    let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_pixel(12, 16, Luma([49151u16])));
    let image = decode_as(&grey16, ImageFormat::Png, pre)?;
    check(&image, "grey16");
    assert_close(
        centre(&image),
        [0.5; 3],
        1e-4,
        "16-bit grey is scaled, not clipped",
    );
    let rgb16 =
        DynamicImage::ImageRgb16(ImageBuffer::from_pixel(16, 16, Rgb([65535u16, 0, 32768])));
    assert_close(
        centre(&decode_as(&rgb16, ImageFormat::Png, pre)?),
        [1.0, -1.0, 0.0],
        1e-4,
        "rgb16",
    );

    // Transparent red: alpha dropped keeps red, composited on white gives white.
    let rgba = DynamicImage::ImageRgba8(ImageBuffer::from_fn(16, 16, |x, _| {
        if x < 8 {
            Rgba([255, 0, 0, 0])
        } else {
            Rgba([0, 0, 255, 255])
        }
    }));
    let dropped = decode_as(&rgba, ImageFormat::Png, pre)?;
    check(&dropped, "rgba");
    assert_close(
        [dropped.data[8], dropped.data[72], dropped.data[136]],
        [1.0, -1.0, -1.0],
        1e-6,
        "alpha dropped",
    );
    let white = decode_as(
        &rgba,
        ImageFormat::Png,
        Preprocess {
            alpha: Alpha::OverWhite,
            ..pre
        },
    )?;
    assert_close(
        [white.data[8], white.data[72], white.data[136]],
        [1.0, 1.0, 1.0],
        1e-6,
        "alpha over white",
    );
    assert_close(
        [white.data[15], white.data[79], white.data[143]],
        [-1.0, -1.0, 1.0],
        1e-6,
        "opaque blue",
    );

    // An indexed PNG with a transparent palette entry.
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, 16, 16);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette(vec![0, 255, 0, 10, 20, 30]);
        encoder.set_trns(vec![255, 0]);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&[0u8; 256])?;
    }
    let source = ImageSource::Encoded {
        bytes: bytes.into(),
        origin: "palette".into(),
    };
    let palette = images::load(&source, &pre, &mut rng())?;
    check(&palette, "palette");
    assert_close(centre(&palette), [-1.0, 1.0, -1.0], 1e-6, "palette green");

    let cmyk = images::load(
        &ImageSource::File(fixture("cmyk.jpg")),
        &Preprocess {
            resolution: 32,
            ..pre
        },
        &mut rng(),
    )?;
    let quadrant = |x: usize, y: usize| -> [f32; 3] {
        std::array::from_fn(|c| cmyk.data[(c * 32 + y) * 32 + x])
    };
    // Pillow's RGB of the quadrants: red, green, blue, white.
    assert_close(quadrant(4, 4), [1.0, -1.0, -1.0], 0.1, "cmyk red");
    assert_close(quadrant(20, 4), [-1.0, 1.0, -1.0], 0.1, "cmyk green");
    assert_close(quadrant(4, 20), [-1.0, -1.0, 1.0], 0.1, "cmyk blue");
    assert_close(quadrant(20, 20), [1.0, 1.0, 1.0], 0.1, "cmyk white");
    Ok(())
}

#[test]
fn preprocessing_matches_torchvision_resize_and_centre_crop() -> Result<()> {
    let expected = difftune::model::weights::read_all(&fixture("resize_expected.safetensors"))?;
    let source = ImageSource::File(fixture("resize_input.png"));
    for (name, filter) in [
        ("bilinear", ResizeFilter::Bilinear),
        ("bicubic", ResizeFilter::Bicubic),
    ] {
        let pre = Preprocess {
            resolution: 16,
            filter,
            ..Default::default()
        };
        let got = images::load(&source, &pre, &mut rng())?.to_tensor();
        let max_error = (got - &expected[name]).abs().max().double_value(&[]);
        // PIL resamples in 8-bit fixed point; we resample in f32: within ~1.5 levels of 255.
        assert!(max_error < 3.0 / 255.0, "{name}: max |error| {max_error}");
    }
    Ok(())
}

#[test]
fn random_crop_and_flip_are_seeded() -> Result<()> {
    let image = DynamicImage::ImageRgb8(ImageBuffer::from_fn(40, 16, |x, y| {
        Rgb([(x * 6) as u8, (y * 15) as u8, 0])
    }));
    let mut bytes = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)?;
    let source = ImageSource::Encoded {
        bytes: bytes.into(),
        origin: "gradient".into(),
    };
    let pre = Preprocess {
        resolution: 16,
        crop: Crop::Random,
        random_flip: true,
        ..Default::default()
    };
    let sources = vec![&source; 16];
    let first: Vec<_> = images::load_all(&sources, &pre, 3)
        .into_iter()
        .collect::<Result<_>>()?;
    let again: Vec<_> = images::load_all(&sources, &pre, 3)
        .into_iter()
        .collect::<Result<_>>()?;
    assert_eq!(first, again);
    // Items draw different crops and flips: the red channel's first column differs.
    let first_columns: std::collections::BTreeSet<i32> =
        first.iter().map(|t| (t.data[0] * 1000.0) as i32).collect();
    assert!(first_columns.len() > 4, "{first_columns:?}");
    let other: Vec<_> = images::load_all(&sources, &pre, 4)
        .into_iter()
        .collect::<Result<_>>()?;
    assert_ne!(first, other);
    Ok(())
}

#[test]
fn corrupt_and_truncated_images_are_reported_with_their_paths() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let good = tmp.path().join("good.jpg");
    // Busy enough that most of the file is scan data, so the cut falls inside it.
    DynamicImage::ImageRgb8(ImageBuffer::from_fn(128, 128, |x, y| {
        Rgb([(x * y % 251) as u8, (x * 7 + y * 3) as u8, 77])
    }))
    .save(&good)?;
    let bytes = std::fs::read(&good)?;
    let truncated = tmp.path().join("cut.jpg");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3])?;
    let corrupt = tmp.path().join("corrupt.jpg");
    let mut garbage = bytes[..4].to_vec();
    garbage.extend((0..500u32).map(|i| (i * 7919 % 251) as u8));
    std::fs::write(&corrupt, &garbage)?;
    let missing = tmp.path().join("missing.jpg");

    let sources: Vec<ImageSource> = [&good, &truncated, &corrupt, &missing, &good]
        .iter()
        .map(|p| ImageSource::File(p.to_path_buf()))
        .collect();
    let refs: Vec<&ImageSource> = sources.iter().collect();
    let pre = Preprocess {
        resolution: 16,
        ..Default::default()
    };
    let batch = images::load_batch(&refs, &pre, 0, false)?;
    assert_eq!(batch.kept, [0, 4]);
    assert_eq!(batch.images.size(), [2, 3, 16, 16]);
    let failures: Vec<(usize, String)> = batch
        .failures
        .iter()
        .map(|f| (f.index, format!("{:#}", f.error)))
        .collect();
    assert_eq!(failures.iter().map(|f| f.0).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(
        failures[0].1.contains(&truncated.display().to_string())
            && failures[0].1.contains("truncated JPEG"),
        "{}",
        failures[0].1
    );
    assert!(
        failures[1].1.contains(&corrupt.display().to_string()),
        "{}",
        failures[1].1
    );
    assert!(
        failures[2].1.contains(&missing.display().to_string()),
        "{}",
        failures[2].1
    );

    let err = format!(
        "{:#}",
        images::load_batch(&refs, &pre, 0, true).unwrap_err()
    );
    assert!(err.contains(&truncated.display().to_string()), "{err}");
    Ok(())
}

#[test]
fn synthetic_generation_is_deterministic_and_domains_differ() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let spec = small_spec(Domain::Source, 11);
    generate_food101_like(&tmp.path().join("a"), &spec)?;
    generate_food101_like(&tmp.path().join("b"), &spec)?;
    let a = snapshot(&tmp.path().join("a"));
    assert_eq!(a.len(), 4 * 9 + 7);
    assert_eq!(a, snapshot(&tmp.path().join("b")));

    generate_food101_like(
        &tmp.path().join("seed"),
        &SyntheticSpec {
            seed: 12,
            ..spec.clone()
        },
    )?;
    let image = |dir: &str| {
        std::fs::read(tmp.path().join(dir).join("images/lemon_tart/100000.jpg")).unwrap()
    };
    assert_ne!(image("a"), image("seed"));

    // The target domain has other colours (a blue gingham tablecloth, yellow crockery, a warmer
    // palette) but is not much darker: a dark target turns the latents around (see the module).
    generate_food101_like(
        &tmp.path().join("target"),
        &SyntheticSpec {
            domain: Domain::Target,
            ..spec.clone()
        },
    )?;
    // Per-channel means, in [-1, 1].
    let mean = |dir: &str| -> [f64; 3] {
        let dataset = Dataset::open(&tmp.path().join(dir), &opts(Split::Train, None)).unwrap();
        let sources: Vec<&ImageSource> = dataset.samples.iter().map(|s| &s.image).collect();
        let batch = images::load_batch(
            &sources,
            &Preprocess {
                resolution: 32,
                ..Default::default()
            },
            0,
            true,
        )
        .unwrap();
        let channels = batch
            .images
            .mean_dim([0i64, 2, 3].as_slice(), false, tch::Kind::Double);
        std::array::from_fn(|c| channels.double_value(&[c as i64]))
    };
    let (source, target) = (mean("a"), mean("target"));
    let brightness = |m: [f64; 3]| m.iter().sum::<f64>() / 3.0;
    assert!(
        (0..3).all(|c| (source[c] - target[c]).abs() > 0.2)
            && (brightness(source) - brightness(target)).abs() < 0.3,
        "source {source:?}, target {target:?}"
    );

    let err = generate_food101_like(&tmp.path().join("a"), &spec)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty"), "{err}");
    let err = generate_food101_like(
        &tmp.path().join("many"),
        &SyntheticSpec {
            classes: DISHES.len() + 1,
            ..spec
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("1 to 12 classes"), "{err}");
    Ok(())
}

/// Nearest class-mean on 8x8 thumbnails recognises held-out images of each domain: the
/// classes carry learnable features despite the per-image jitter.
#[test]
fn synthetic_classes_are_separable() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for domain in [Domain::Source, Domain::Target] {
        let root = tmp.path().join(format!("{domain:?}"));
        let spec = SyntheticSpec {
            classes: 12,
            train_per_class: 12,
            test_per_class: 6,
            resolution: 32,
            domain,
            seed: 5,
            jpeg_quality: 90,
        };
        generate_food101_like(&root, &spec)?;
        let pre = Preprocess {
            resolution: 8,
            ..Default::default()
        };
        let features = |split: Split| -> Result<(Vec<Vec<f32>>, Vec<usize>)> {
            let dataset = Dataset::open(&root, &opts(split, None))?;
            let sources: Vec<&ImageSource> = dataset.samples.iter().map(|s| &s.image).collect();
            let images = images::load_all(&sources, &pre, 0)
                .into_iter()
                .map(|r| r.map(|t| t.data))
                .collect::<Result<_>>()?;
            Ok((
                images,
                dataset.samples.iter().map(|s| s.label.unwrap()).collect(),
            ))
        };
        let (train, train_labels) = features(Split::Train)?;
        let (test, test_labels) = features(Split::Test)?;
        let mut centroids = vec![vec![0f32; train[0].len()]; 12];
        for (x, &label) in train.iter().zip(&train_labels) {
            centroids[label]
                .iter_mut()
                .zip(x)
                .for_each(|(c, v)| *c += v / 12.0);
        }
        let distance =
            |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>();
        let correct = test
            .iter()
            .zip(&test_labels)
            .filter(|(x, &label)| {
                let nearest = (0..12)
                    .min_by(|&i, &j| {
                        distance(x, &centroids[i]).total_cmp(&distance(x, &centroids[j]))
                    })
                    .unwrap();
                nearest == label
            })
            .count();
        let accuracy = correct as f32 / test.len() as f32;
        assert!(
            accuracy > 0.6,
            "{domain:?}: nearest-centroid accuracy {accuracy}"
        );
    }
    Ok(())
}

/// tools/make_jpeg_fixtures.py: JPEGs covering chroma subsampling, progressive, restart markers,
/// grey, CMYK, YCCK and an EXIF orientation, and Pillow 12's decoded pixels of each.
fn jpeg_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jpeg")
        .join(name)
}

/// Largest per-channel difference between two RGB images of one size.
fn max_pixel_difference(ours: &image::RgbImage, pillow: &image::RgbImage) -> u8 {
    assert_eq!(ours.dimensions(), pillow.dimensions());
    ours.as_raw()
        .iter()
        .zip(pillow.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0)
}

#[test]
fn jpegs_decode_to_pillows_exact_pixels() -> Result<()> {
    let cases = [
        "s444",
        "s422",
        "s420",
        "progressive",
        "restart",
        "gray",
        "cmyk",
        "ycck",
        "exif_rot6",
    ];
    for case in cases {
        let bytes = std::fs::read(jpeg_fixture(&format!("images/{case}.jpg")))?;
        let ours = images::decode(&bytes, &DecodeOptions::PILLOW_OPEN)?.to_rgb8();
        let pillow = image::open(jpeg_fixture(&format!("pillow/{case}.png")))?.to_rgb8();
        let diff = max_pixel_difference(&ours, &pillow);
        println!("{case}: max difference from Pillow {diff}");
        assert_eq!(diff, 0, "{case}: decoded pixels differ from Pillow's");
    }
    // Training applies the EXIF orientation by default (Pillow's ImageOps.exif_transpose).
    let bytes = std::fs::read(jpeg_fixture("images/exif_rot6.jpg"))?;
    let rotated = images::decode(&bytes, &DecodeOptions::default())?.to_rgb8();
    let pillow = image::open(jpeg_fixture("pillow/exif_rot6_transposed.png"))?.to_rgb8();
    assert_eq!(max_pixel_difference(&rotated, &pillow), 0);
    Ok(())
}

#[test]
fn buckets_keep_the_pixel_budget_and_images_go_to_the_nearest_aspect() -> Result<()> {
    use difftune::data::buckets::{buckets, nearest, Bucket};
    let sd = buckets(512, 64)?;
    let sizes: Vec<(u32, u32)> = sd.iter().map(|b| (b.width, b.height)).collect();
    assert_eq!(
        sizes,
        [
            (256, 1024),
            (320, 768),
            (384, 640),
            (448, 576),
            (512, 512),
            (576, 448),
            (640, 384),
            (768, 320),
            (1024, 256)
        ]
    );
    assert!(sd.iter().all(|b| b.width * b.height <= 512 * 512));
    let bucket_of = |w: u32, h: u32| sd[nearest(&sd, w, h)];
    let size = |width, height| Bucket { width, height };
    assert_eq!(bucket_of(1000, 1000), size(512, 512));
    assert_eq!(bucket_of(1920, 1080), size(640, 384)); // 16:9 -> 5:3
    assert_eq!(bucket_of(1080, 1920), size(384, 640));
    assert_eq!(bucket_of(4000, 3000), size(576, 448)); // 4:3 -> 9:7
    assert_eq!(bucket_of(3000, 1000), size(768, 320)); // 3:1 -> 2.4:1
    assert_eq!(bucket_of(10000, 100), size(1024, 256)); // beyond 4:1: the widest
    assert_eq!(bucket_of(100, 10000), size(256, 1024));

    let tiny = buckets(64, 16)?;
    let sizes: Vec<(u32, u32)> = tiny.iter().map(|b| (b.width, b.height)).collect();
    assert_eq!(sizes, [(32, 128), (48, 80), (64, 64), (80, 48), (128, 32)]);
    assert!(format!("{:#}", buckets(512, 60).unwrap_err()).contains("multiple of 8"));
    assert!(buckets(64, 128).is_err());
    Ok(())
}

#[test]
fn bucketed_images_are_resized_to_cover_and_centre_cropped() -> Result<()> {
    use difftune::data::buckets::{buckets, Bucket};
    let dir = tempfile::tempdir()?;
    // A 200x100 image whose left half is black and right half white, a red column in the middle.
    let image = image::RgbImage::from_fn(200, 100, |x, _| match x {
        99..=100 => Rgb([255, 0, 0]),
        x if x < 100 => Rgb([0, 0, 0]),
        _ => Rgb([255, 255, 255]),
    });
    let path = dir.path().join("wide.png");
    image.save(&path)?;
    let source = ImageSource::File(path);
    let pre = Preprocess {
        resolution: 64,
        ..Preprocess::default()
    };
    let sizes = buckets(64, 16)?;
    let loaded = images::load_bucketed(&[&source], &pre, &sizes);
    let (bucket, tensor) = loaded.into_iter().next().unwrap()?;
    assert_eq!(
        sizes[bucket],
        Bucket {
            width: 80,
            height: 48
        }
    );
    assert_eq!((tensor.width, tensor.height), (80, 48));
    // Resized to 96x48 (the height fits), 8 columns cut on each side: the halves stay centred.
    let t = tensor.to_tensor();
    let at = |x: i64| t.get(0).get(24).get(x).double_value(&[]);
    assert!(at(5) < -0.9 && at(74) > 0.9, "{} {}", at(5), at(74));
    // The square path is the same function at resolution x resolution.
    let square = images::preprocess_to(
        &images::decode_rgb(&source, Alpha::Drop, &DecodeOptions::default())?,
        &pre,
        Bucket::square(64),
        &mut rng(),
    )?;
    let plain = images::load(&source, &pre, &mut rng())?;
    assert_eq!(square, plain);
    Ok(())
}
