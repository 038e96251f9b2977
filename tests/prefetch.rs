//! The background batch loader: what it hands over equals what a direct read gives (in order,
//! across epochs and after a jump as on resume), and a loader that fails or panics ends the run
//! with an error that says so instead of hanging.
use anyhow::{bail, Result};
use difftune::data::cache::{build, CacheSettings};
use difftune::data::synthetic::{generate_food101_like, SyntheticSpec};
use difftune::model::source::ModelFiles;
use difftune::train::batches::Batches;
use difftune::train::config::RunConfig;
use difftune::train::prefetch::{prefetched_batches, Prefetcher};
use difftune::train::step::{Objective, StepInputs};
use std::sync::Arc;
use tch::{Device, Tensor};

/// A loader of `index * 10` that fails at `fails_at` and panics at `panics_at`, counting its
/// calls in its state.
fn counting_loader(fails_at: usize, panics_at: usize) -> Prefetcher<usize, usize> {
    Prefetcher::new(
        0,
        Arc::new(move |calls: &mut usize, index| -> Result<usize> {
            *calls += 1;
            if index == fails_at {
                bail!("sample {index} is unreadable");
            }
            assert!(index != panics_at, "shard of sample {index} vanished");
            Ok(index * 10)
        }),
    )
}

#[test]
fn items_come_in_order_whether_prefetched_or_not() {
    let mut loader = counting_loader(usize::MAX, usize::MAX);
    assert_eq!(loader.take(0).unwrap(), 0);
    loader.start(1).unwrap();
    assert_eq!(loader.take(1).unwrap(), 10);
    // A jump (a resumed run) drops the background item and loads the one asked for.
    loader.start(2).unwrap();
    assert_eq!(loader.take(7).unwrap(), 70);
    assert_eq!(*loader.get_mut().unwrap(), 4);
}

#[test]
fn a_loader_error_is_the_error_of_take() {
    let mut loader = counting_loader(3, usize::MAX);
    loader.start(3).unwrap();
    let err = format!("{:#}", loader.take(3).unwrap_err());
    assert!(err.contains("loading batch 3 in the background"), "{err}");
    assert!(err.contains("sample 3 is unreadable"), "{err}");
    // The loader itself survives an error.
    assert_eq!(loader.take(4).unwrap(), 40);
}

#[test]
fn a_loader_panic_is_an_error_not_a_hang() {
    let mut loader = counting_loader(usize::MAX, 5);
    loader.start(5).unwrap();
    let err = format!("{:#}", loader.take(5).unwrap_err());
    assert!(err.contains("panicked loading batch 5"), "{err}");
    assert!(err.contains("shard of sample 5 vanished"), "{err}");
    // Its state went with the thread: every later call says so.
    let err = format!("{:#}", loader.take(6).unwrap_err());
    assert!(err.contains("batch loader is gone"), "{err}");
    assert!(loader.start(6).is_err());
}

fn assert_same(a: &StepInputs, b: &StepInputs, what: &str) {
    let same = |x: &Tensor, y: &Tensor| x.size() == y.size() && x.equal(y);
    assert!(same(&a.latents, &b.latents), "{what}: latents differ");
    assert!(
        same(&a.conditioning.context, &b.conditioning.context),
        "{what}: context differs"
    );
    assert!(same(&a.noise, &b.noise), "{what}: noise differs");
    assert!(same(&a.timesteps, &b.timesteps), "{what}: timesteps differ");
}

/// The tiny model's cache of 12 images, read in batches of 5 (an epoch boundary inside the 3rd
/// batch), directly and through the background loader as the trainer uses it.
#[test]
fn prefetched_batches_equal_direct_reads() {
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    difftune::model::tiny::write_tiny_model(&model, 0, &difftune::data::synthetic::captions())
        .unwrap();
    let data = dir.path().join("data");
    let spec = SyntheticSpec {
        classes: 3,
        train_per_class: 4,
        test_per_class: 1,
        resolution: 64,
        ..Default::default()
    };
    generate_food101_like(&data, &spec).unwrap();
    let files = ModelFiles::resolve(&model.display().to_string(), None).unwrap();
    let settings = CacheSettings {
        resolution: 64,
        shard_size: 8,
        batch_size: 4,
        ..CacheSettings::default()
    };
    let cache = dir.path().join("cache");
    build(&files, &data, &settings, &cache).unwrap();
    let config = RunConfig::for_method("lora").unwrap();
    let scheduler = difftune::model::pipeline::load_scheduler_config(&files).unwrap();
    let objective = Objective::new(&scheduler, &config.train).unwrap();

    let open = || Batches::open(&cache, 7, (5, 0, 1), 0.18215).unwrap();
    let mut direct = open();
    let mut prefetched = prefetched_batches(open(), Device::Cpu);
    // In order, as the trainer reads them, then a jump back as a resumed run makes.
    for index in [0, 1, 2, 3, 4, 1, 2] {
        let expected = direct.read(index).unwrap();
        let expected = direct
            .seeded_inputs(expected, &objective, Device::Cpu)
            .unwrap();
        let batch = prefetched.take(index).unwrap();
        let got = prefetched
            .get_mut()
            .unwrap()
            .seeded_inputs(batch, &objective, Device::Cpu)
            .unwrap();
        prefetched.start(index + 1).unwrap();
        assert_same(&expected, &got, &format!("batch {index}"));
    }
}
