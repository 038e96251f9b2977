//! kohya-style captioned folders: listing, repeats, fallback captions, caption dropout and tag
//! shuffling over seeded epochs; training from their cache with buckets, flips and caption
//! variants, resumed exactly.
use difftune::data::cache::{build, CacheSettings, LatentCache, Manifest};
use difftune::data::captions::CaptionOptions;
use difftune::data::epochs::{CaptionChoice, Draw, EpochPlan, PlanSample};
use difftune::data::images::{load_bucketed, Preprocess};
use difftune::data::kohya::KohyaFolder;
use difftune::data::{Dataset, DatasetOptions, ImageSource, Layout, SkipReason, SkippedEntry};
use difftune::model::pipeline::{load_text_encoder, load_vae};
use difftune::model::source::ModelFiles;
use difftune::model::tokenizer::ClipTokenizer;
use difftune::train::config::{DeviceChoice, RunConfig};
use difftune::train::metrics::MetricsLog;
use difftune::train::trainer::METRICS_FILE;
use difftune::train::{train, Resume, TrainOptions, TrainSummary};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tch::{Device, Tensor};

fn png(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::RgbImage::new(4, 4).save(path).unwrap();
}

fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    png(&root.join("a.png"));
    std::fs::write(root.join("a.txt"), "  tag1, tag2, tag3, tag4, tag5 \n").unwrap();
    png(&root.join("3_red_dog/b.png"));
    std::fs::write(root.join("3_red_dog/b.caption"), "a dog").unwrap();
    png(&root.join("3_red_dog/c.png"));
    png(&root.join("notes/ignored.png"));
    dir
}

#[test]
fn lists_repeats_and_fallback_captions() {
    let dir = folder();
    let f = KohyaFolder::open(dir.path()).unwrap();
    let got: Vec<(String, usize, bool)> = f
        .items
        .iter()
        .map(|i| (i.caption.clone(), i.repeats, i.fallback))
        .collect();
    assert_eq!(
        got,
        [
            ("tag1, tag2, tag3, tag4, tag5".to_string(), 1, false),
            ("a dog".to_string(), 3, false),
            ("red dog".to_string(), 3, true),
        ]
    );
    assert_eq!(f.fallback_count(), 1);
    // A folder that is not an `N_name` one is not read, and the listing says so.
    assert_eq!(
        f.skipped,
        [SkippedEntry {
            path: dir.path().join("notes"),
            reason: SkipReason::Folder
        }]
    );
    let ds = Dataset::open(dir.path(), &DatasetOptions::default()).unwrap();
    assert_eq!(ds.layout, Layout::Kohya);
    assert_eq!(ds.samples[2].id, "3_red_dog/c.png");
    assert_eq!(
        ds.samples.iter().map(|s| s.repeats).collect::<Vec<_>>(),
        [1, 3, 3]
    );
}

/// The plan of the folder's three images as one bucket, with `dropout` and 4 caption variants.
/// Adds to a kohya folder what used to be left out without a word: a folder named like an image,
/// a symlink loop between two images, a link to the folder itself, a GIF, and a folder inside a
/// repeat folder.
fn add_unusable_entries(root: &Path) {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(root.join("x.jpg")).unwrap();
    symlink(root.join("loop-b.png"), root.join("loop-a.png")).unwrap();
    symlink(root.join("loop-a.png"), root.join("loop-b.png")).unwrap();
    symlink(".", root.join("loopdir")).unwrap();
    std::fs::write(root.join("anim.gif"), b"GIF89a").unwrap();
    std::fs::create_dir_all(root.join("3_red_dog/nested")).unwrap();
}

#[test]
fn unusable_entries_are_listed_with_their_reasons() {
    let dir = folder();
    add_unusable_entries(dir.path());
    let f = KohyaFolder::open(dir.path()).unwrap();
    assert_eq!(f.items.len(), 3);
    let got: Vec<(String, String)> = f
        .skipped
        .iter()
        .map(|s| {
            let path = s.path.strip_prefix(dir.path()).unwrap();
            let reason = match &s.reason {
                SkipReason::Unreadable(e) => format!("unreadable: {e}"),
                other => format!("{other:?}"),
            };
            (path.display().to_string(), reason)
        })
        .collect();
    let loop_error = std::fs::metadata(dir.path().join("loop-a.png"))
        .unwrap_err()
        .to_string();
    let expected = [
        ("anim.gif", "UnsupportedFormat(\"gif\")".to_string()),
        ("loop-a.png", format!("unreadable: {loop_error}")),
        ("loop-b.png", format!("unreadable: {loop_error}")),
        ("loopdir", "Folder".to_string()),
        ("notes", "Folder".to_string()),
        ("x.jpg", "Folder".to_string()),
        ("3_red_dog/nested", "Folder".to_string()),
    ];
    let expected: Vec<(String, String)> = expected.map(|(p, r)| (p.to_string(), r)).into();
    assert_eq!(got, expected);
}

fn plan(f: &KohyaFolder, seed: u64, dropout: f64) -> EpochPlan {
    EpochPlan {
        samples: f
            .items
            .iter()
            .map(|i| PlanSample {
                bucket: 0,
                repeats: i.repeats,
                variants: 4,
            })
            .collect(),
        seed,
        dropout,
        flip: false,
        global_batch: 1,
    }
}

#[test]
fn epochs_follow_repeats_dropout_and_caption_variants() {
    let dir = folder();
    let f = KohyaFolder::open(dir.path()).unwrap();
    let plain = plan(&f, 7, 0.0);
    let epoch = plain.epoch(0);
    assert_eq!(plain.len(), 7);
    let mut counts = [0; 3];
    epoch.iter().for_each(|d| counts[d.sample] += 1);
    assert_eq!(counts, [1, 3, 3]);
    assert_eq!(epoch, plain.epoch(0), "same seed, same epoch");
    let orders: HashSet<Vec<usize>> = (0..10)
        .map(|e| plain.epoch(e).into_iter().map(|d| d.sample).collect())
        .collect();
    assert!(orders.len() > 1, "epochs differ in order");
    // Turning dropout on changes the captions drawn, not the order.
    let with_dropout = plan(&f, 7, 0.3);
    let order = |p: &EpochPlan| p.epoch(3).iter().map(|d| d.sample).collect::<Vec<_>>();
    assert_eq!(order(&plain), order(&with_dropout));

    let draws: Vec<Draw> = (0..300).flat_map(|e| with_dropout.epoch(e)).collect();
    let dropped = draws
        .iter()
        .filter(|d| d.caption == CaptionChoice::Dropped)
        .count() as f64
        / draws.len() as f64;
    assert!((0.27..0.33).contains(&dropped), "dropout rate {dropped}");
    let mut variants = [0usize; 4];
    for d in &draws {
        if let CaptionChoice::Variant(k) = d.caption {
            variants[k] += 1;
        }
    }
    assert!(
        variants.iter().all(|&n| n > 300),
        "every variant is drawn: {variants:?}"
    );
}

#[test]
fn caption_variants_are_the_caption_then_seeded_shuffles_keeping_the_first_tags() {
    let shuffle = CaptionOptions {
        shuffle: true,
        keep_first: 2,
        variants: 40,
        ..Default::default()
    };
    let caption = "tag1, tag2, tag3, tag4, tag5";
    let variants = shuffle.variants(caption, "a.png");
    assert_eq!(variants.len(), 40);
    assert_eq!(variants[0], caption);
    assert_eq!(
        variants,
        shuffle.variants(caption, "a.png"),
        "seeded by the id"
    );
    assert_ne!(variants, shuffle.variants(caption, "b.png"));
    for v in &variants {
        let tags: Vec<&str> = v.split(", ").collect();
        assert_eq!(&tags[..2], ["tag1", "tag2"]);
        let mut sorted = tags.clone();
        sorted.sort();
        assert_eq!(sorted, ["tag1", "tag2", "tag3", "tag4", "tag5"]);
    }
    let distinct: HashSet<&String> = variants.iter().collect();
    assert_eq!(
        distinct.len(),
        6,
        "all orders of the three shuffled tags appear"
    );
    let plain = CaptionOptions::default();
    assert_eq!(plain.variants(caption, "a.png"), [caption]);
    let bad = CaptionOptions {
        dropout: 1.5,
        ..Default::default()
    };
    assert!(format!("{:#}", bad.validate().unwrap_err()).contains("dropout"));
}

#[test]
fn a_caption_that_is_not_utf8_is_reported_with_its_path() {
    let dir = folder();
    png(&dir.path().join("2_cat/d.jpg"));
    std::fs::write(dir.path().join("2_cat/d.txt"), b"caf\xe9").unwrap();
    let e = format!("{:#}", KohyaFolder::open(dir.path()).unwrap_err());
    assert!(e.contains("2_cat/d.txt") && e.contains("not UTF-8"), "{e}");
}

/// Training reseeds torch's process-wide generator; tests that train or encode take turns.
static TORCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    let guard = TORCH.lock().unwrap_or_else(|e| e.into_inner());
    tch::set_num_threads(1);
    guard
}

/// A kohya folder of wide (2:1), tall (1:2) and square images, with tag captions and one
/// `2_name` repeat folder, and the tiny model.
struct Fixture {
    _dir: tempfile::TempDir,
    model: PathBuf,
    data: PathBuf,
    root: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let model = root.join("model");
        difftune::model::tiny::write_tiny_model(&model, 0, &difftune::data::synthetic::captions())
            .unwrap();
        let data = root.join("data");
        let sizes = [(96, 48), (48, 96), (64, 64)];
        for i in 0..9u32 {
            let (w, h) = sizes[i as usize % 3];
            let folder = if i < 3 {
                data.join("2_thing")
            } else {
                data.clone()
            };
            std::fs::create_dir_all(&folder).unwrap();
            let image = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x * 5 + i * 20) as u8, (y * 3) as u8, (i * 27) as u8])
            });
            image.save(folder.join(format!("{i}.png"))).unwrap();
            let caption = format!("style{i}, red, round, small{}, shiny", i % 2);
            std::fs::write(folder.join(format!("{i}.txt")), caption).unwrap();
        }
        Self {
            _dir: dir,
            model,
            data,
            root,
        }
    }

    fn files(&self) -> ModelFiles {
        ModelFiles::resolve(&self.model.display().to_string(), None).unwrap()
    }
}

fn captions() -> CaptionOptions {
    CaptionOptions {
        dropout: 0.25,
        shuffle: true,
        keep_first: 1,
        variants: 3,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// The ids of a cache's skipped images, sorted.
fn skipped_ids(manifest: &Manifest) -> Vec<String> {
    let mut ids: Vec<String> = manifest.skipped.iter().map(|s| s.id.clone()).collect();
    ids.sort();
    ids
}

/// Every layout: a cache lists what its dataset leaves out (kohya's listing, or the images the
/// other layouts name that fail to load) among its skipped images, which `difftune cache`
/// counts; a rebuild lists them once; strict mode refuses them.
#[test]
fn caches_list_and_count_what_every_layout_leaves_out() {
    use std::os::unix::fs::symlink;
    let _guard = serial();
    let fx = Fixture::new();
    let files = fx.files();
    let settings = CacheSettings {
        resolution: 64,
        shard_size: 16,
        batch_size: 4,
        ..CacheSettings::default()
    };
    add_unusable_entries(&fx.data);
    let dir = fx.root.join("kohya-cache");
    let (manifest, report) = build(&files, &fx.data, &settings, &dir).unwrap();
    assert_eq!(manifest.len(), 9);
    let kohya = [
        "3_red_dog/nested",
        "anim.gif",
        "loop-a.png",
        "loop-b.png",
        "loopdir",
        "x.jpg",
    ];
    assert_eq!(skipped_ids(&manifest), kohya);
    assert_eq!(report.skipped.len(), kohya.len());
    let (again, _) = build(&files, &fx.data, &settings, &dir).unwrap();
    assert_eq!(skipped_ids(&again), kohya);
    let strict = CacheSettings {
        strict: true,
        ..settings.clone()
    };
    let err = format!(
        "{:#}",
        build(&files, &fx.data, &strict, &fx.root.join("strict")).unwrap_err()
    );
    assert!(
        err.contains("strict mode") && err.contains("anim.gif"),
        "{err}"
    );

    // An image folder whose metadata names a folder, a symlink loop and a GIF.
    let folder = fx.root.join("imagefolder");
    std::fs::create_dir_all(folder.join("x.jpg")).unwrap();
    std::fs::copy(fx.data.join("5.png"), folder.join("good.png")).unwrap();
    symlink(folder.join("loop-b.png"), folder.join("loop-a.png")).unwrap();
    symlink(folder.join("loop-a.png"), folder.join("loop-b.png")).unwrap();
    std::fs::write(folder.join("anim.gif"), b"GIF89a").unwrap();
    let lines: Vec<String> = ["good.png", "x.jpg", "loop-a.png", "anim.gif"]
        .iter()
        .map(|f| format!("{{\"file_name\": \"{f}\", \"text\": \"a thing\"}}"))
        .collect();
    std::fs::write(folder.join("metadata.jsonl"), lines.join("\n")).unwrap();
    let (manifest, _) = build(&files, &folder, &settings, &fx.root.join("if-cache")).unwrap();
    assert_eq!(manifest.len(), 1);
    assert_eq!(skipped_ids(&manifest), ["anim.gif", "loop-a.png", "x.jpg"]);

    // Food101 whose listed images are a folder and a symlink loop.
    let food = fx.root.join("food");
    let spec = difftune::data::synthetic::SyntheticSpec {
        classes: 1,
        train_per_class: 3,
        test_per_class: 1,
        resolution: 64,
        ..Default::default()
    };
    difftune::data::synthetic::generate_food101_like(&food, &spec).unwrap();
    let listed = Dataset::open(&food, &DatasetOptions::default()).unwrap();
    let file = |i: usize| match &listed.samples[i].image {
        ImageSource::File(path) => path.clone(),
        other => panic!("Food101 lists files, not {other:?}"),
    };
    let (a, b) = (file(0), file(1));
    std::fs::remove_file(&a).unwrap();
    std::fs::create_dir(&a).unwrap();
    std::fs::remove_file(&b).unwrap();
    symlink(&b, &b).unwrap();
    let (manifest, _) = build(&files, &food, &settings, &fx.root.join("food-cache")).unwrap();
    assert_eq!(manifest.len(), 1);
    let mut expected = [listed.samples[0].id.clone(), listed.samples[1].id.clone()];
    expected.sort();
    assert_eq!(skipped_ids(&manifest), expected);
}

#[test]
fn the_cache_holds_every_caption_variant_bucket_and_flip_that_training_draws() {
    let _guard = serial();
    let fx = Fixture::new();
    let files = fx.files();
    let settings = CacheSettings {
        resolution: 64,
        captions: captions(),
        bucket_step: Some(16),
        flip: true,
        shard_size: 4,
        batch_size: 2,
        ..CacheSettings::default()
    };
    let dir = fx.root.join("cache");
    let (manifest, _) = build(&files, &fx.data, &settings, &dir).unwrap();
    assert_eq!(manifest.len(), 9);
    let dataset = Dataset::open(&fx.data, &DatasetOptions::default()).unwrap();
    let cache = LatentCache::open(&dir).unwrap();
    let buckets = settings.buckets().unwrap();

    // Each image at its bucket's size: wide ones 80x48, tall 48x80, square 64x64.
    for (i, sample) in dataset.samples.iter().enumerate() {
        let cached = cache.sample(i).unwrap();
        assert_eq!(cached.id, sample.id);
        assert_eq!(cached.repeats, sample.repeats);
        let (mean, _, _) = cache.batch(&[i]).unwrap();
        let bucket = buckets[cached.bucket];
        assert_eq!(
            mean.size(),
            [
                1,
                4,
                i64::from(bucket.height / 8),
                i64::from(bucket.width / 8)
            ]
        );
        let stem: u32 = sample.id.rsplit('/').next().unwrap()[..1].parse().unwrap();
        let expected = [(80, 48), (48, 80), (64, 64)][stem as usize % 3];
        assert_eq!((bucket.width, bucket.height), expected, "{}", sample.id);
    }

    // Every batch of four of the first epochs comes from one bucket, and its captions are the
    // text encoder's output for the caption each draw chose.
    let plan = EpochPlan {
        samples: cache.plan_samples(),
        seed: 5,
        dropout: 0.25,
        flip: true,
        global_batch: 4,
    };
    assert_eq!(plan.len() % 4, 0);
    let tokenizer = ClipTokenizer::from_dir(&files.tokenizer_dir).unwrap();
    let encoder = load_text_encoder(&files, Device::Cpu).unwrap();
    let (mut dropped, mut flipped, mut shuffled) = (0, 0, 0);
    for epoch in 0..3 {
        for batch in plan.epoch(epoch).chunks(4) {
            let (mean, _, context) = cache.read(batch).unwrap();
            let first = cache.sample(batch[0].sample).unwrap().bucket;
            assert!(batch
                .iter()
                .all(|d| cache.sample(d.sample).unwrap().bucket == first));
            assert_eq!(mean.size()[0], 4);
            let texts: Vec<String> = batch
                .iter()
                .map(|d| {
                    let sample = &dataset.samples[d.sample];
                    flipped += usize::from(d.flipped);
                    match d.caption {
                        CaptionChoice::Dropped => {
                            dropped += 1;
                            String::new()
                        }
                        CaptionChoice::Variant(k) => {
                            shuffled += usize::from(k > 0);
                            captions().variants(&sample.caption, &sample.id)[k].clone()
                        }
                    }
                })
                .collect();
            let direct = tch::no_grad(|| encoder.forward(&tokenizer.input_ids(&texts).unwrap()));
            assert!(max_abs_diff(&context, &direct) < 1e-5, "{texts:?}");
        }
    }
    assert!(dropped > 0 && flipped > 0 && shuffled > 0);

    // The flipped latent is the VAE's encoding of the mirror image.
    let vae = load_vae(&files, Device::Cpu).unwrap();
    let pre = Preprocess {
        resolution: 64,
        ..Preprocess::default()
    };
    let (_, image) = load_bucketed(&[&dataset.samples[0].image], &pre, &buckets)
        .remove(0)
        .unwrap();
    let mirror = image.to_tensor().flip([2]).unsqueeze(0);
    let expected = tch::no_grad(|| vae.encode(&mirror)).mean;
    let draw = |flipped| Draw {
        sample: 0,
        caption: CaptionChoice::Variant(0),
        flipped,
    };
    let (mean, _, _) = cache.read(&[draw(true)]).unwrap();
    assert!(max_abs_diff(&mean, &expected) < 1e-4);
    let (unflipped, _, _) = cache.read(&[draw(false)]).unwrap();
    assert!(max_abs_diff(&mean, &unflipped) > 1e-2);
}

#[test]
fn training_with_buckets_flips_and_caption_variants_resumes_exactly() {
    let _guard = serial();
    let fx = Fixture::new();
    let mut config = RunConfig::for_method("bitfit").unwrap();
    let t = &mut config.train;
    t.steps = 6;
    t.batch_size = 2;
    t.gradient_accumulation_steps = 2;
    t.learning_rate = 1e-3;
    t.resolution = 64;
    t.checkpoint_every = t.steps;
    t.device = DeviceChoice::Cpu;
    t.bucket = true;
    t.bucket_step = 16;
    t.random_flip = true;
    t.caption_dropout_rate = 0.25;
    t.shuffle_caption = true;
    t.keep_tokens = 1;
    t.caption_variants = 3;
    let options = |out: &str| TrainOptions {
        model: fx.model.display().to_string(),
        data: fx.data.clone(),
        cache: Some(fx.root.join("cache")),
        out: fx.root.join(out),
        config: config.clone(),
        resume: Resume::No,
        strict: false,
        stop_after: None,
        interrupt: Arc::new(AtomicBool::new(false)),
        progress: false,
    };
    let whole = train(&options("whole")).unwrap();
    assert!(whole.finished);
    // 9 images, 3 of them twice: 12 appearances, 4 per bucket, in global batches of 2.
    assert_eq!(whole.cached_samples, 9);
    let manifest = Manifest::read(&fx.root.join("cache")).unwrap();
    assert_eq!(manifest.key.bucket_step, Some(16));
    assert!(manifest.key.flip && manifest.dropped_prompt.is_some());

    let mut first = options("parts");
    first.stop_after = Some(3);
    assert_eq!(train(&first).unwrap().step, 3);
    let mut rest = options("parts");
    rest.resume = Resume::Newest;
    let resumed = train(&rest).unwrap();
    assert!(resumed.finished && resumed.step == 6);
    let bytes = |s: &TrainSummary| std::fs::read(s.adapter.as_ref().unwrap()).unwrap();
    assert!(
        bytes(&whole) == bytes(&resumed),
        "the resumed run's adapter differs"
    );
    let losses = |out: &str| -> Vec<f64> {
        MetricsLog::read(&fx.root.join(out).join(METRICS_FILE))
            .unwrap()
            .iter()
            .map(|m| m.loss)
            .collect()
    };
    assert_eq!(losses("whole"), losses("parts"));
}
