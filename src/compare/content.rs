//! The content classifier's stage: for synthetic data, a small classifier of dish and domain
//! ([`ContentClassifier`]) trained once per study on the training images of both synthetic
//! domains and checked on their test images; every sample set's score then says which share of
//! its images shows the prompted dish and which share is in the target's style.
use super::prepare::PreparedData;
use super::report::ClassifierRecord;
use super::stage::Stage;
use super::Study;
use crate::data::{Dataset, DatasetOptions, ImageSource, Split};
use crate::eval::classifier::{ContentClassifier, LabelledImages, TARGET_DOMAIN};
use anyhow::{Context, Result};
use serde_json::json;
use std::time::Instant;

impl Study<'_> {
    /// Trains (or reuses) the classifier on `target` and `source` (on rank 0, which the others
    /// wait for); its classes are the target's, in the target's order.
    pub(super) fn train_classifier(
        &self,
        target: &PreparedData,
        source: &PreparedData,
    ) -> Result<Option<ClassifierRecord>> {
        let Some(settings) = &self.config.eval.classifier else {
            return Ok(None);
        };
        let weights = self.layout.eval().join("classifier.safetensors");
        let key = json!({ "target": target.key, "source": source.key, "settings": settings });
        self.on_main(|| {
            let stage = Stage::Classifier;
            if let Some(done) = self.layout.enter::<ClassifierRecord>(stage, None, &key)? {
                return Ok(Some(done));
            }
            eprintln!("compare: training the content classifier ({} steps)", settings.steps);
            let started = Instant::now();
            let train = labelled(target, source, Split::Train, settings.image_size)?;
            let classes = Dataset::open(&target.path, &DatasetOptions::default())?.classes.len();
            let classifier = ContentClassifier::train(&train, classes, settings)?;
            let test = labelled(target, source, Split::Test, settings.image_size)?;
            let domains = Vec::<i64>::try_from(&test.domains)?;
            let intended = Vec::<i64>::try_from(&test.classes)?;
            let (score, domain_accuracy) =
                classifier.score_loaded(&test.images, &intended, Some(&domains));
            classifier.save(&weights)?;
            let record = ClassifierRecord {
                weights: weights.clone(),
                test_class_accuracy: score.class_accuracy,
                test_domain_accuracy: domain_accuracy.context("the test images' domains are known")?,
                test_images: test.len(),
                training_images: train.len(),
                seconds: started.elapsed().as_secs_f64(),
            };
            eprintln!(
                "compare: content classifier: {:.1}% of the test images' dishes and {:.1}% of their domains right",
                100.0 * record.test_class_accuracy,
                100.0 * record.test_domain_accuracy
            );
            self.layout.finish(stage, &key, &record)?;
            Ok(Some(record))
        })
    }
}

/// The `split` images of both domains, labelled with their class (by name, in the target's
/// order) and domain.
fn labelled(
    target: &PreparedData,
    source: &PreparedData,
    split: Split,
    size: u32,
) -> Result<LabelledImages> {
    let options = DatasetOptions {
        split,
        ..Default::default()
    };
    let target_set = Dataset::open(&target.path, &options)?;
    let source_set = Dataset::open(&source.path, &options)?;
    let mut items: Vec<(ImageSource, i64, i64)> = Vec::new();
    for (set, domain) in [
        (&source_set, 1 - TARGET_DOMAIN),
        (&target_set, TARGET_DOMAIN),
    ] {
        for sample in &set.samples {
            let name = &set.classes[sample.label.context("an unlabelled synthetic image")?].name;
            let class = target_set
                .classes
                .iter()
                .position(|c| &c.name == name)
                .with_context(|| format!("class {name} is not among the target's"))?;
            items.push((sample.image.clone(), class as i64, domain));
        }
    }
    LabelledImages::load(&items, size)
}
