//! kohya-style captioned folders: listing, repeats, fallback captions, caption dropout and tag
//! shuffling over seeded epochs.
use difftune::data::kohya::{CaptionOptions, KohyaFolder};
use difftune::data::{Dataset, DatasetOptions, Layout};
use std::path::Path;

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
    let ds = Dataset::open(dir.path(), &DatasetOptions::default()).unwrap();
    assert_eq!(ds.layout, Layout::Kohya);
    assert_eq!(ds.samples[2].id, "3_red_dog/c.png");
}

#[test]
fn epochs_follow_repeats_dropout_and_shuffle() {
    let dir = folder();
    let f = KohyaFolder::open(dir.path()).unwrap();
    let plain = CaptionOptions::default();
    let epoch = f.epoch(7, 0, &plain);
    let mut counts = [0; 3];
    epoch.iter().for_each(|(i, _)| counts[*i] += 1);
    assert_eq!(counts, [1, 3, 3]);
    assert_eq!(epoch, f.epoch(7, 0, &plain), "same seed, same epoch");
    let orders: std::collections::HashSet<Vec<usize>> = (0..10)
        .map(|e| f.epoch(7, e, &plain).into_iter().map(|(i, _)| i).collect())
        .collect();
    assert!(orders.len() > 1, "epochs differ in order");

    let dropout = CaptionOptions {
        dropout: 0.3,
        ..Default::default()
    };
    let draws: Vec<String> = (0..300)
        .flat_map(|e| f.epoch(1, e, &dropout))
        .map(|(_, c)| c)
        .collect();
    let empty = draws.iter().filter(|c| c.is_empty()).count() as f64 / draws.len() as f64;
    assert!((0.27..0.33).contains(&empty), "dropout rate {empty}");

    let shuffle = CaptionOptions {
        shuffle: true,
        keep_first: 2,
        ..Default::default()
    };
    let mut seen = std::collections::HashSet::new();
    for e in 0..50 {
        for (i, caption) in f.epoch(3, e, &shuffle) {
            if i != 0 {
                assert_eq!(caption, f.items[i].caption);
                continue;
            }
            let tags: Vec<&str> = caption.split(", ").collect();
            assert_eq!(&tags[..2], ["tag1", "tag2"]);
            let mut sorted = tags.clone();
            sorted.sort();
            assert_eq!(sorted, ["tag1", "tag2", "tag3", "tag4", "tag5"]);
            seen.insert(caption.clone());
        }
    }
    assert_eq!(
        seen.len(),
        6,
        "all orders of the three shuffled tags appear"
    );
}

#[test]
fn a_caption_that_is_not_utf8_is_reported_with_its_path() {
    let dir = folder();
    png(&dir.path().join("2_cat/d.jpg"));
    std::fs::write(dir.path().join("2_cat/d.txt"), b"caf\xe9").unwrap();
    let e = format!("{:#}", KohyaFolder::open(dir.path()).unwrap_err());
    assert!(e.contains("2_cat/d.txt") && e.contains("not UTF-8"), "{e}");
}
