//! The learning-rate search (`[study.lr_search]`, a method's `lr_candidates`): for each method
//! with candidates, one run per candidate on the training images less the validation split (see
//! [`super::split`]), for `steps` steps; each samples the validation classes' prompts and is scored
//! against the held-out images; the candidate with the lowest score (KID by default: unbiased
//! at the validation split's small size, where FID is biased and noisy) is the method's rate for
//! its final runs. A method without candidates keeps its configured rate.
use super::config::{MethodEntry, SelectionScore};
use super::prepare::{BaseModel, PreparedData};
use super::report::{LrCandidate, LrChoice, LrSearchResults, Metric};
use super::sampling::{plan_for, SampleJob};
use super::score::{Score, Scorer};
use super::stage::Stage;
use super::training::{RunJob, RunRecord};
use super::units::{serial, RunId, RunKind, SetId};
use super::Study;
use crate::data::{Dataset, DatasetOptions, Split};
use crate::error::Diverged;
use anyhow::{Context, Result};
use serde_json::json;

/// The learning rate each method's final runs train at (in method order), and the search that
/// chose them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LearningRates {
    pub rates: Vec<f64>,
    pub search: Option<LrSearchResults>,
}

/// A candidate's run and its validation samples.
struct CandidateUnit<'a> {
    method: &'a MethodEntry,
    learning_rate: f64,
    run: RunJob,
}

impl Study<'_> {
    /// Each method's learning rate; see the module documentation. `None` when interrupted.
    pub(super) fn choose_learning_rates(
        &self,
        base: &BaseModel,
        target: &PreparedData,
        scorer: &Scorer,
    ) -> Result<Option<LearningRates>> {
        let configured: Vec<f64> = self
            .config
            .methods
            .iter()
            .map(|m| m.run.train.learning_rate)
            .collect();
        if !self.config.searches_learning_rates() {
            return Ok(Some(LearningRates {
                rates: configured,
                search: None,
            }));
        }
        let split = self.prepare_validation_split(target)?;
        let units = self.candidate_units(base, &split)?;
        if self.group.is_main() {
            eprintln!(
                "compare: choosing learning rates: {} candidate runs",
                units.len()
            );
        }
        let trained = self.train_wave(
            &units,
            |unit| (unit.method.name(), &unit.run),
            |study, unit| study.train_candidate(unit),
        )?;
        let Some(trained) = trained else {
            return Ok(None);
        };
        let validation = Dataset::open(
            &split.path,
            &DatasetOptions {
                split: Split::Test,
                ..Default::default()
            },
        )?;
        let search = &self.config.study.lr_search;
        let plan = plan_for(
            self.config,
            &validation,
            validation.classes.len(),
            search.samples_per_class(),
        )?;
        let samples_key = json!({
            "base": base.identity,
            "sample": self.config.sample,
            "resolution": self.config.sample_resolution(),
            "plan": plan,
        });
        // A candidate that diverged has nothing to sample.
        let jobs: Vec<SampleJob> = units
            .iter()
            .zip(&trained)
            .filter_map(|(unit, record)| {
                Some(SampleJob {
                    set: candidate_set(unit).name(),
                    adapter: Some(record.as_ref()?.adapter.clone()),
                    key: json!({ "samples": samples_key, "run": unit.run.key }),
                })
            })
            .collect();
        let Some(_) = serial(&jobs, |job| self.sample_row(job, &base.files, &plan))? else {
            return Ok(None);
        };
        let reference_key = format!("{}|{}|validation", scorer.identity, split.key);
        let reference = scorer.reference(
            &validation,
            &self.layout.eval().join("validation-features.safetensors"),
            &reference_key,
            self.group,
        )?;
        // Units like the others: cooperating processes score different candidates.
        let scored = serial(&jobs, |job| {
            let key =
                json!({ "samples": job.key, "scores": scorer.key(), "reference": reference_key });
            let paths = self.sample_paths(&job.set, &plan);
            let score = self.score_set(&job.set, &key, scorer, reference.as_ref(), &paths, None)?;
            Ok(Some(score))
        })?;
        let Some(scored) = scored else {
            return Ok(None);
        };
        // Each candidate's score, in unit order: none for one that diverged.
        let mut scored = scored.into_iter().flatten();
        let scores: Vec<Option<Score>> = trained
            .iter()
            .map(|record| record.as_ref().and_then(|_| scored.next()))
            .collect();
        // Rank 0 alone has the scores; every rank trains the final runs at its choice.
        let rates = self.on_main(|| self.choose(&units, &scores, configured.clone(), &split))?;
        Ok(Some(rates))
    }

    /// The candidate runs of every method that searches, in method order.
    fn candidate_units(
        &self,
        base: &BaseModel,
        split: &PreparedData,
    ) -> Result<Vec<CandidateUnit<'_>>> {
        let search = &self.config.study.lr_search;
        let mut units = Vec::new();
        for method in &self.config.methods {
            for &learning_rate in method.lr_candidates(search) {
                let id = RunId {
                    method: method.name().to_string(),
                    kind: RunKind::Candidate(learning_rate),
                };
                let mut config = method.run.clone();
                config.train.learning_rate = learning_rate;
                if search.steps > 0 {
                    config.train.steps = search.steps;
                }
                let key =
                    json!({ "base": base.identity, "data": split.key, "run": config.to_toml()? });
                units.push(CandidateUnit {
                    method,
                    learning_rate,
                    run: RunJob {
                        name: id.name(),
                        model: base.spec.clone(),
                        data: split.path.clone(),
                        config,
                        at_steps: Vec::new(),
                        key,
                    },
                });
            }
        }
        Ok(units)
    }

    /// Each method's lowest-scoring candidate (the configured rate for methods without); an
    /// error when all of a method's candidates diverged.
    fn choose(
        &self,
        units: &[CandidateUnit],
        scores: &[Option<Score>],
        mut rates: Vec<f64>,
        split: &PreparedData,
    ) -> Result<LearningRates> {
        let search = &self.config.study.lr_search;
        let by = |score: &Score| match search.score {
            SelectionScore::Kid => score.kid.value,
            SelectionScore::Fid => score.fid.value,
        };
        let mut methods = Vec::new();
        for (index, method) in self.config.methods.iter().enumerate() {
            let candidates: Vec<(&CandidateUnit, Option<&Score>)> = units
                .iter()
                .zip(scores)
                .filter(|(u, _)| u.method.name() == method.name())
                .map(|(u, s)| (u, s.as_ref()))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let scored: Vec<(f64, Option<f64>)> = candidates
                .iter()
                .map(|(u, s)| (u.learning_rate, s.map(by)))
                .collect();
            let chosen = lowest(&scored).with_context(|| {
                format!(
                    "every learning-rate candidate of {} diverged: give it lower candidates",
                    method.name()
                )
            })?;
            rates[index] = chosen;
            methods.push(LrChoice {
                method: method.name().to_string(),
                candidates: candidates
                    .iter()
                    .map(|(u, s)| LrCandidate {
                        learning_rate: u.learning_rate,
                        fid: s.map(|s| (&s.fid).into()),
                        kid: s.map(|s| (&s.kid).into()),
                    })
                    .collect(),
                chosen,
            });
        }
        let steps = units
            .iter()
            .map(|u| (u.method.name().to_string(), u.run.config.train.steps))
            .fold(Vec::<(String, usize)>::new(), |mut all, s| {
                if !all.contains(&s) {
                    all.push(s);
                }
                all
            });
        Ok(LearningRates {
            rates,
            search: Some(LrSearchResults {
                score: match search.score {
                    SelectionScore::Kid => Metric::Kid,
                    SelectionScore::Fid => Metric::Fid,
                },
                validation: split.description.clone(),
                steps,
                methods,
            }),
        })
    }

    /// Trains (or reuses) a candidate's run: `Some(None)` when it diverged (a non-finite loss or
    /// gradient norm), which is recorded so that a rerun does not train it again; `None` when
    /// interrupted.
    fn train_candidate(&self, unit: &CandidateUnit) -> Result<Option<Option<RunRecord>>> {
        let stage = Stage::Diverged(&unit.run.name);
        let diverged: Option<usize> =
            self.on_main(|| self.layout.recorded(stage, &unit.run.key))?;
        if let Some(step) = diverged {
            if self.group.is_main() {
                eprintln!("compare: {} diverged at step {step} before", unit.run.name);
            }
            return Ok(Some(None));
        }
        match self.train_run(unit.run.clone()) {
            Ok(trained) => Ok(trained.map(Some)),
            Err(e) => {
                let Some(diverged) = e.downcast_ref::<Diverged>() else {
                    return Err(e);
                };
                if self.group.is_main() {
                    eprintln!(
                        "compare: {} diverged, not a candidate: {e:#}",
                        unit.run.name
                    );
                    self.layout.finish(stage, &unit.run.key, &diverged.step)?;
                }
                Ok(Some(None))
            }
        }
    }

    /// Scores (or reuses the score of) the sample set `set` against `reference`: `None` on the
    /// ranks other than 0.
    pub(super) fn score_set(
        &self,
        set: &str,
        key: &serde_json::Value,
        scorer: &Scorer,
        reference: Option<&super::score::Reference>,
        paths: &[std::path::PathBuf],
        content: Option<super::score::Content>,
    ) -> Result<Option<Score>> {
        let stage = Stage::Score(set);
        let done: Option<Score> = self.on_main(|| self.layout.enter(stage, None, key))?;
        if let Some(score) = done {
            return Ok(self.group.is_main().then_some(score));
        }
        let score = scorer
            .score(reference, paths, self.group, content)
            .with_context(|| format!("scoring {set}"))?;
        if let Some(score) = &score {
            self.layout.finish(stage, key, score)?;
        }
        Ok(score)
    }
}

/// The learning rate of the lowest-scoring candidate among `(learning rate, score)`, leaving out
/// those that diverged (no score); `None` when all did.
fn lowest(candidates: &[(f64, Option<f64>)]) -> Option<f64> {
    candidates
        .iter()
        .filter_map(|&(rate, score)| Some((rate, score?)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(rate, _)| rate)
}

/// The validation samples of a candidate's run.
fn candidate_set(unit: &CandidateUnit) -> SetId {
    SetId {
        run: Some(RunId {
            method: unit.method.name().to_string(),
            kind: RunKind::Candidate(unit.learning_rate),
        }),
        step: None,
    }
}

#[cfg(test)]
mod tests {
    use super::lowest;

    #[test]
    fn the_lowest_score_wins_and_a_diverged_candidate_never_does() {
        assert_eq!(lowest(&[(1e-3, Some(0.2)), (3e-3, Some(0.1))]), Some(3e-3));
        // The highest rate diverged: it has no score, however the others scored.
        assert_eq!(
            lowest(&[(1e-3, Some(0.2)), (3e-3, Some(0.3)), (1e-2, None)]),
            Some(1e-3)
        );
        assert_eq!(lowest(&[(1e-2, None), (3e-2, None)]), None);
    }
}
