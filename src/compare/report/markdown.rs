//! `report.md`: the study's tables with their notes, the checks, the measurements, plots,
//! sample grids and the setup that produced them.
use super::format::format_seconds;
use super::{Metric, StudyResults};
use crate::compare::machine::MemoryKind;
use anyhow::Result;
use std::fmt::Write;

/// An image of the report: its path relative to the report, and its caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub file: String,
    pub caption: String,
}

impl Figure {
    pub fn new(file: impl Into<String>, caption: impl Into<String>) -> Self {
        Self {
            file: file.into(),
            caption: caption.into(),
        }
    }
}

/// A section of images, when there are any.
fn write_figures(md: &mut String, heading: &str, figures: &[Figure]) -> std::fmt::Result {
    if !figures.is_empty() {
        writeln!(md, "## {heading}\n")?;
        for Figure { file, caption } in figures {
            writeln!(md, "![{caption}]({file})\n")?;
        }
    }
    Ok(())
}

impl StudyResults {
    /// `report.md`, showing `plots` and `grids`.
    pub fn to_markdown(&self, plots: &[Figure], grids: &[Figure]) -> Result<String> {
        let mut md = String::new();
        writeln!(md, "# difftune compare: {}\n", self.name)?;
        writeln!(
            md,
            "Fine-tuning the U-Net with each method on the same data and budget, after \
             Kim, Ahn & Jung, *Comparative Study of Efficient Parameter Tuning Techniques in Diffusion Models*.\n"
        )?;
        self.write_table1(&mut md)?;
        self.write_table2(&mut md)?;
        if !self.checks.is_empty() {
            writeln!(md, "## Checks\n")?;
            for check in &self.checks {
                let mark = if check.passed { "PASS" } else { "FAIL" };
                writeln!(md, "- **{mark}**: {}", check.statement)?;
            }
            md.push('\n');
        }
        self.write_lr_search(&mut md)?;
        self.write_curves(&mut md)?;
        writeln!(md, "## Every run\n")?;
        md.push_str(&self.runs_table());
        writeln!(md, "\n## Measurements (each method's first run)\n")?;
        md.push_str(&self.details_table());
        md.push('\n');
        write_figures(&mut md, "Plots", plots)?;
        write_figures(&mut md, "Samples", grids)?;
        self.write_setup(&mut md)?;
        Ok(md)
    }

    /// Table 1 with its note on uncertainties and the paired differences.
    fn write_table1(&self, md: &mut String) -> Result<()> {
        writeln!(
            md,
            "## Table 1. FID against the {} (lower is better)\n",
            self.reference
        )?;
        md.push_str(&self.table1());
        let runs = match self.runs {
            1 => "**One training run per method: the intervals cover the finite image sets, not the \
                  run-to-run spread** (another seed can move a method by more than its interval; set \
                  `study.runs` to measure it)."
                .to_string(),
            n => format!(
                "Each method's values are the mean over its {n} training runs (seeds `train.seed` to \
                 `train.seed + {}`); the intervals cover the run-to-run spread as well as the finite \
                 image sets.",
                n - 1
            ),
        };
        writeln!(
            md,
            "\nThe first row samples the base model before any fine-tuning, with the same prompts and seeds. \
             {runs} Uncertainties (value ± standard deviation, and the 95% interval): {}. Precision and \
             recall (Kynkäänniemi et al. 2019, k-NN radii on the same features): the share of generated \
             images inside the test images' manifold, and of test images inside the generated images'; \
             their ± is the spread over runs.{}\n",
            self.uncertainty,
            match &self.classifier {
                Some(c) => format!(
                    " Dish as prompted / target style: the shares of generated images that a small \
                     classifier trained on both synthetic domains reads as the prompted dish, and as \
                     the target domain (on the held-out test images of both domains it reads {:.1}% of \
                     the dishes and {:.1}% of the domains right).",
                    100.0 * c.test_class_accuracy,
                    100.0 * c.test_domain_accuracy
                ),
                None => String::new(),
            }
        )?;
        if !self.differences.is_empty() {
            writeln!(
                md,
                "### Which differences are real\n\nPaired by run (run r of one method against run r of the \
                 other: both trained with seed `train.seed + r`) and over the same bootstrap draws: each \
                 method against the base model, then each method against the next in the FID ranking. A \
                 difference whose 95% interval holds zero is **within the uncertainty**: these runs and \
                 images do not establish which of the two is lower.\n"
            )?;
            md.push_str(&self.differences_table());
            md.push('\n');
        }
        Ok(())
    }

    /// Table 2 with its note on what the columns measure.
    fn write_table2(&self, md: &mut String) -> Result<()> {
        writeln!(
            md,
            "## Table 2. Trained parameters and training cost relative to full fine-tuning\n"
        )?;
        md.push_str(&self.table2());
        let kinds: Vec<MemoryKind> = {
            let mut k: Vec<MemoryKind> = self
                .rows
                .iter()
                .filter_map(|r| r.train.as_ref().map(|t| t.memory_kind))
                .collect();
            k.dedup();
            k
        };
        let memory_note = kinds
            .iter()
            .map(|k| k.describe())
            .collect::<Vec<_>>()
            .join("; ");
        let time = match &self.timing {
            Some(t) => format!(
                "Time: the timing pass's median ratio of each method's step time to full fine-tuning's, \
                 measured in one process with the methods taking turns ({} rounds of {} timed steps each \
                 after {} warm-up steps, {} torch thread(s); the ratio is taken within each round, so load \
                 that changes between rounds cancels), with its 95% bootstrap interval (steps resampled \
                 within rounds); 1-minute load average at the rounds' starts: {}. FLOPs per step: counted \
                 from torch's profiler trace of one step (matrix products, convolutions and attention: \
                 the forward pass, the activation gradients and the trained tensors' weight gradients; \
                 element-wise ops not counted), with the share of full fine-tuning's.",
                t.rounds,
                t.steps,
                t.warmup,
                t.threads,
                format_loads(&t.load_average)
            ),
            None => "Time: median step time × steps of each method's first run (no timing pass: \
                     `study.timing.rounds = 0`)."
                .to_string(),
        };
        writeln!(
            md,
            "\n# params: parameters trained, with their share of the U-Net's parameters. {time} Wall time: \
             the training loops' wall time (mean over runs) relative to full fine-tuning's, which load on \
             the machine bends. Peak memory: {memory_note}.\n"
        )?;
        Ok(())
    }

    fn write_lr_search(&self, md: &mut String) -> Result<()> {
        let (Some(search), Some(table)) = (&self.lr_search, self.lr_table()) else {
            return Ok(());
        };
        let steps: Vec<String> = search
            .steps
            .iter()
            .map(|(m, s)| format!("{m} {s}"))
            .collect();
        let score = match search.score {
            Metric::Kid => "KID",
            Metric::Fid => "FID",
        };
        writeln!(
            md,
            "## Learning rates, chosen on held-out training images\n\nEach candidate trained on the \
             training images less the validation split ({}; steps per candidate run: {}), sampled the \
             validation classes' prompts and was scored against the held-out images; the lowest {score} \
             was chosen, and the method's runs above train at it on all the training images. The test \
             split was not read for the choice. A candidate whose {score} interval overlaps the chosen \
             one's is marked a tie: a rerun may choose it instead.\n",
            search.validation,
            steps.join(", ")
        )?;
        md.push_str(&table);
        md.push('\n');
        Ok(())
    }

    fn write_curves(&self, md: &mut String) -> Result<()> {
        if self
            .curves
            .iter()
            .all(|p| self.curves.iter().filter(|q| q.method == p.method).count() < 2)
        {
            return Ok(());
        }
        writeln!(
            md,
            "## FID along the budget\n\nEach method's runs sampled and scored at each of `eval.at_steps` \
             (from their weights there) and at the end, with the base model at step 0 (every method \
             starts from it unchanged): the mean over runs with the hierarchical bootstrap's interval. \
             Time: steps × the method's step time relative to full fine-tuning's, in full fine-tuning \
             steps, so that methods can be compared at equal compute.\n"
        )?;
        md.push_str(&self.curve_table());
        md.push('\n');
        Ok(())
    }

    fn write_setup(&self, md: &mut String) -> Result<()> {
        writeln!(md, "## Setup\n")?;
        writeln!(md, "- Machine: {}", self.machine.describe())?;
        if self.world_size > 1 {
            writeln!(md, "- Processes: {} data-parallel ranks", self.world_size)?;
        }
        writeln!(md, "- Commit: {}", self.git_commit)?;
        writeln!(md, "- FID features: {}", self.fid_features)?;
        writeln!(
            md,
            "- Wall time: {} in all, over {} invocation(s) of `difftune compare` (this one: {}; load \
             averages (1, 5, 15 min) at its start and end: {})\n",
            format_seconds(self.wall_seconds),
            self.invocations,
            format_seconds(self.invocation_seconds),
            self.load_average
                .iter()
                .map(|l| match l {
                    Some([a, b, c]) => format!("{a:.2} {b:.2} {c:.2}"),
                    None => "unknown".into(),
                })
                .collect::<Vec<_>>()
                .join("; ")
        )?;
        writeln!(
            md,
            "Settings (the resolved run file):\n\n```toml\n{}```",
            self.settings_toml
        )?;
        Ok(())
    }
}

/// Load averages as the report lists them.
fn format_loads(loads: &[Option<f64>]) -> String {
    loads
        .iter()
        .map(|l| l.map_or("unknown".into(), |l| format!("{l:.2}")))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::super::example::study;
    use super::*;

    #[test]
    fn markdown_holds_tables_checks_and_setup() {
        let md = study()
            .to_markdown(&[Figure::new("plots/fid.png", "FID")], &[])
            .unwrap();
        for needle in [
            "## Table 1.",
            "## Table 2.",
            "**PASS**",
            "### Which differences are real",
            "| FID | LoRA − Prefix-tuning | 3.11 ± 2.00 | [-0.89, 7.11] | **within the uncertainty** |",
            "| FID | Full fine-tuning − No fine-tuning | -36.67 ± 2.00 | [-40.67, -32.67] | real |",
            "![FID](plots/fid.png)",
            "Commit: abc",
            "```toml\na = 1\n```",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
    }
}
