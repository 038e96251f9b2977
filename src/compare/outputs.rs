//! What a finished comparison writes: results.json, results.csv, the plots, the sample grids and
//! report.md.
use super::grid::{compose, read_rgb, write_png, GridRow};
use super::plots::study::{fid_curves, lr_search};
use super::plots::{fid_vs_params, loss_curves, train_time, LossCurve};
use super::report::{Figure, StudyResults};
use super::runner::{REPORT_MD, RESULTS_CSV, RESULTS_JSON};
use super::training::TrainedRun;
use super::sampling::SampleItem;
use super::Study;
use crate::data::Dataset;
use crate::util::fs::{write_atomic_str, write_json};
use anyhow::{Context, Result};

impl Study<'_> {
    /// Writes every output of the finished study.
    pub(super) fn write_outputs(
        &self,
        results: &StudyResults,
        runs: &[TrainedRun],
        plan: &[SampleItem],
        test: &Dataset,
    ) -> Result<()> {
        let root = &self.layout.root;
        write_json(&root.join(RESULTS_JSON), results)?;
        write_atomic_str(&root.join(RESULTS_CSV), &results.to_csv())?;
        let plots = self.write_plots(results, runs)?;
        let grids = self.write_grids(results, plan, test)?;
        let markdown = results.to_markdown(&plots, &grids)?;
        write_atomic_str(&root.join(REPORT_MD), &markdown)
    }

    fn write_plots(&self, results: &StudyResults, runs: &[TrainedRun]) -> Result<Vec<Figure>> {
        let root = &self.layout.root;
        let fid = Figure::new(
            "plots/fid_vs_params.png",
            "FID against trainable parameters",
        );
        fid_vs_params(results, &root.join(&fid.file))?;
        let time = Figure::new(
            "plots/train_time.png",
            "Step time relative to full fine-tuning",
        );
        train_time(results, &root.join(&time.file))?;
        let mut figures = vec![fid, time];
        if results.lr_search.is_some() {
            let search = Figure::new(
                "plots/lr_search.png",
                "Learning rates on the validation split",
            );
            lr_search(results, &root.join(&search.file))?;
            figures.push(search);
        }
        if !results.curves.is_empty() {
            let curves = Figure::new("plots/fid_curves.png", "FID along the budget");
            fid_curves(results, &root.join(&curves.file))?;
            figures.push(curves);
        }
        let mut curves = Vec::new();
        for TrainedRun { method, record, .. } in runs.iter().filter(|r| r.run == 0) {
            let index = results
                .rows
                .iter()
                .position(|r| r.method == method.name())
                .unwrap_or(0);
            curves.push(LossCurve {
                method: method.name().to_string(),
                label: method.label(),
                index,
                points: super::training::loss_points(&record.adapter)?,
            });
        }
        let loss = Figure::new(
            "plots/loss_curves.png",
            "Training loss (each method's first run)",
        );
        loss_curves(&curves, &root.join(&loss.file))?;
        figures.push(loss);
        Ok(figures)
    }

    /// A grid per row (classes by seeds), and one comparing every row (classes by rows, first
    /// seed), led by a real test image of each class.
    fn write_grids(
        &self,
        results: &StudyResults,
        plan: &[SampleItem],
        test: &Dataset,
    ) -> Result<Vec<Figure>> {
        let s = &self.config.sample;
        let selection =
            GridSelection::of(plan, s.grid_classes, s.per_class.min(s.grid_seeds.max(1)));
        let tile = self.config.sample_resolution().clamp(96, 256);
        let mut grids = vec![Figure::new(
            "grids/comparison.png",
            format!("Every method, seed {}", s.seed),
        )];
        let mut comparison = vec![GridRow {
            label: "target (real test image)".into(),
            tiles: real_tiles(test, &selection.classes)?,
        }];
        for row in &results.rows {
            let rows = selection.rows(plan, test, &self.layout.samples(&row.method))?;
            let titles: Vec<String> = selection
                .seeds
                .iter()
                .map(|s| format!("seed {s}"))
                .collect();
            let grid = Figure::new(
                format!("grids/{}.png", row.method),
                format!("{}: seeds side by side", row.label),
            );
            write_png(
                &compose(&rows, &titles, tile)?,
                &self.layout.root.join(&grid.file),
            )?;
            grids.push(grid);
            comparison.push(GridRow {
                label: row.label.clone(),
                tiles: rows
                    .iter()
                    .filter_map(|r| r.tiles.first().cloned())
                    .collect(),
            });
        }
        let titles: Vec<String> = selection
            .classes
            .iter()
            .map(|&c| test.classes[c].label.clone())
            .collect();
        let path = self.layout.root.join(&grids[0].file);
        write_png(&compose(&comparison, &titles, tile)?, &path)?;
        Ok(grids)
    }
}

/// The classes and seeds the grids show: the plan's first ones.
struct GridSelection {
    classes: Vec<usize>,
    seeds: Vec<u64>,
}

impl GridSelection {
    fn of(plan: &[SampleItem], classes: usize, seeds: usize) -> Self {
        let mut chosen: Vec<usize> = plan.iter().map(|item| item.class).collect();
        chosen.dedup();
        chosen.truncate(classes.max(1));
        Self {
            classes: chosen,
            seeds: plan.iter().map(|item| item.seed).take(seeds).collect(),
        }
    }

    /// One grid row per chosen class, from the row's samples in `dir`.
    fn rows(
        &self,
        plan: &[SampleItem],
        test: &Dataset,
        dir: &std::path::Path,
    ) -> Result<Vec<GridRow>> {
        self.classes
            .iter()
            .map(|&class| {
                let tiles = plan
                    .iter()
                    .filter(|item| item.class == class && self.seeds.contains(&item.seed))
                    .map(|item| read_rgb(&dir.join(&item.file)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(GridRow {
                    label: test.classes[class].label.clone(),
                    tiles,
                })
            })
            .collect()
    }
}

/// The first test image of each class, for the comparison grid's top row.
fn real_tiles(test: &Dataset, classes: &[usize]) -> Result<Vec<image::RgbImage>> {
    classes
        .iter()
        .map(|&class| {
            let sample = test
                .samples
                .iter()
                .find(|s| s.label == Some(class))
                .with_context(|| {
                    format!(
                        "the test split has no image of class {}",
                        test.classes[class].name
                    )
                })?;
            let rgb = crate::data::images::decode_rgb(
                &sample.image,
                crate::data::images::Alpha::Drop,
                &crate::data::images::DecodeOptions::default(),
            )?;
            Ok(image::DynamicImage::ImageRgb32F(rgb).to_rgb8())
        })
        .collect()
}
