//! `report.md`: the study's tables with their notes, the checks, the measurements, plots,
//! sample grids and the setup that produced them.
use super::format::format_seconds;
use super::StudyResults;
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
        writeln!(md, "## Measurements\n")?;
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
        writeln!(
            md,
            "\nThe first row samples the base model before any fine-tuning, with the same prompts and seeds. \
             Uncertainties (value ± standard deviation, and the 95% interval): {}.\n",
            self.uncertainty
        )?;
        if !self.differences.is_empty() {
            writeln!(
                md,
                "### Which differences are real\n\nPaired over the same bootstrap draws: each method against \
                 the base model, then each method against the next in the FID ranking. A difference whose \
                 95% interval holds zero is **within the uncertainty**: these images do not establish which \
                 of the two is lower.\n"
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
            "## Table 2. Trained parameters and training time relative to full fine-tuning\n"
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
        writeln!(
            md,
            "\n# params: parameters trained, with their share of the U-Net's parameters. Time: median step \
             time × steps, which load on the machine barely moves; wall time: the training loop's wall time \
             (both relative to full fine-tuning's). Peak memory: {memory_note}.\n"
        )?;
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
            "- Wall time: {} in all, over {} invocation(s) of `difftune compare` (this one: {})\n",
            format_seconds(self.wall_seconds),
            self.invocations,
            format_seconds(self.invocation_seconds)
        )?;
        writeln!(
            md,
            "Settings (the resolved run file):\n\n```toml\n{}```",
            self.settings_toml
        )?;
        Ok(())
    }
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
