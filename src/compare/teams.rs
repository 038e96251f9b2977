//! Teams of ranks in a run-parallel study (`[study] parallel = "run"`, see [`super::ranks`]):
//! every training run of a method whose width (its `ranks` setting, see [`widths`]) is G > 1 is
//! data-parallel over a team of G ranks, a c10d sub-group, while every other unit runs on one
//! rank. A launch's W ranks form W/G teams of consecutive ranks for each such G: within a node
//! whenever G divides the node's ranks, as torchrun and srun number ranks node by node.
//!
//! A wave of training runs starts with the teams ([`Study::train_wave`]): each team's rank 0
//! claims, in order, the wave's runs of its width that no other process holds (see
//! [`super::claim`]), and its ranks train each one together. A team leaves when every run of its
//! width is done or held by another team; its ranks then do the wave's runs of width 1 alone, as
//! cooperating invocations, reusing the teams' finished runs and waiting for those still held.
use super::config::{CompareConfig, ModelSource};
use super::stage::Stage;
use super::training::{rank_share, RunJob};
use super::units::serial;
use super::Study;
use crate::dist::{Launch, ProcessGroup};
use crate::error::SettingsError;
use crate::model::source::ModelFiles;
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use tch::Device;

/// U-Nets from this many parameters (SD v1.x and 2.x have 860M, SDXL 2.6B) are fully fine-tuned
/// data-parallel over a node's GPUs by default.
const LARGE_UNET_PARAMETERS: u64 = 500_000_000;

/// This rank's team of one width.
pub struct Team {
    pub width: usize,
    /// Its first rank in the launch.
    pub first: usize,
    pub group: ProcessGroup,
}

/// Each method's width and this rank's team of every width above 1.
#[derive(Default)]
pub struct Teams {
    widths: BTreeMap<String, usize>,
    /// Widest first.
    teams: Vec<Team>,
}

impl Teams {
    /// No teams: every run on the ranks of the study's own group.
    pub fn none() -> Self {
        Self::default()
    }

    /// Forms this rank's team of every width above 1 in `widths` (by method name), widest first.
    /// Every rank of `group` calls this with the same widths.
    pub fn form(group: &ProcessGroup, widths: BTreeMap<String, usize>) -> Result<Self> {
        let mut distinct: Vec<usize> = widths.values().copied().filter(|&w| w > 1).collect();
        distinct.sort_unstable_by(|a, b| b.cmp(a));
        distinct.dedup();
        let teams = distinct
            .into_iter()
            .map(|width| {
                let index = group.rank() / width;
                let first = index * width;
                let name = format!("team-of-{width}-{index}");
                let group = group.sub_group(first..first + width, &name)?;
                Ok(Team {
                    width,
                    first,
                    group,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { widths, teams })
    }

    /// The team that trains `method`'s runs, when they are data-parallel over several ranks.
    pub fn for_method(&self, method: &str) -> Option<&Team> {
        let width = *self.widths.get(method)?;
        self.teams.iter().find(|t| t.width == width)
    }

    /// The teams, widest first.
    pub fn iter(&self) -> impl Iterator<Item = &Team> {
        self.teams.iter()
    }
}

/// Each method's width in a run-parallel study launched as `launch` on `device`: its `ranks`
/// setting, else [`default_width`]. Refused (a [`SettingsError`]) when the launch's ranks cannot
/// form teams of that width or a team cannot share the method's global batch evenly.
pub fn widths(
    config: &CompareConfig,
    launch: &Launch,
    device: Device,
) -> Result<BTreeMap<String, usize>> {
    let world = launch.world_size;
    let node = launch.local_world_size.unwrap_or(1).clamp(1, world);
    let unet_parameters = match &config.model.source {
        ModelSource::Tiny => 0,
        ModelSource::Pretrained(spec) => ModelFiles::resolve(spec, None)?.unet_parameter_count()?,
    };
    let mut widths = BTreeMap::new();
    for method in &config.methods {
        let train = &method.run.train;
        let global_batch = train.batch_size * train.gradient_accumulation_steps;
        let width = match method.ranks {
            Some(width) => {
                let setting = format!("methods.{}.ranks", method.name());
                if width > world || !world.is_multiple_of(width) {
                    let reason = format!(
                        "{width} ranks a run cannot form teams from the {world} ranks of this \
                         launch: use a divisor of {world}"
                    );
                    return Err(SettingsError::invalid(setting, reason).into());
                }
                rank_share(train.batch_size, train.gradient_accumulation_steps, width)
                    .map_err(|e| SettingsError::invalid(setting, e))?;
                width
            }
            None => {
                let full_of_large = method.run.method.build().trains_every_weight()
                    && unet_parameters >= LARGE_UNET_PARAMETERS;
                default_width(full_of_large, device, node, world, global_batch)
            }
        };
        widths.insert(method.name().to_string(), width);
    }
    Ok(widths)
}

/// A method's width when its `ranks` is not set: full fine-tuning of a large U-Net on GPUs
/// (`full_of_large`) is data-parallel over the node's GPUs (or the most of them that the world
/// and the global batch divide over), which shortens the study's longest runs; everything else
/// runs on one rank, where an all-reduce would cost more than it saves (15-25% of a PEFT step on
/// 2 Gloo ranks) and a rank's own device holds the run.
pub fn default_width(
    full_of_large: bool,
    device: Device,
    node: usize,
    world: usize,
    global_batch: usize,
) -> usize {
    if !full_of_large || !matches!(device, Device::Cuda(_)) {
        return 1;
    }
    (1..=node)
        .rev()
        .find(|&w| world.is_multiple_of(w) && global_batch.is_multiple_of(w))
        .unwrap_or(1)
}

impl<'a> Study<'a> {
    /// The study as `team` does its runs: the team's ranks data-parallel, its rank 0 claiming.
    fn on_team(&self, team: &'a Team) -> Study<'a> {
        Study {
            config: self.config,
            opts: self.opts,
            layout: self.layout.for_group(team.group.is_main()),
            device: self.device,
            settings_toml: self.settings_toml.clone(),
            group: &team.group,
            load_at_start: self.load_at_start,
            teams: self.teams,
        }
    }

    /// Trains a wave of training runs with `train`: first, the runs of a data-parallel method by
    /// this rank's team for it, then every run as one of the cooperating invocations (see the
    /// module documentation). `job_of` gives a unit's method and run. The results are in the
    /// units' order; `None` when interrupted.
    pub(super) fn train_wave<U, T>(
        &self,
        units: &[U],
        job_of: impl Fn(&U) -> (&str, &RunJob),
        mut train: impl FnMut(&Study<'a>, &U) -> Result<Option<T>>,
    ) -> Result<Option<Vec<T>>> {
        for team in self.teams.iter() {
            let study = self.on_team(team);
            let ours = units.iter().filter(|u| {
                let (method, _) = job_of(u);
                self.teams
                    .for_method(method)
                    .is_some_and(|t| t.width == team.width)
            });
            for unit in ours {
                let job = job_of(unit).1;
                let stage = Stage::Run(&job.name);
                // A run that is done is left to the wave's reuse below.
                let take = study.on_main(|| {
                    let done = study.layout.recorded::<Value>(stage, &job.key)?;
                    Ok(done.is_none() && study.layout.try_claim(stage)?)
                })?;
                if !take {
                    continue;
                }
                if study.group.is_main() {
                    let ranks = team.first..team.first + team.width;
                    eprintln!("compare: ranks {ranks:?} train {stage} as a team");
                }
                let trained = train(&study, unit)?;
                study.layout.release(stage);
                if trained.is_none() {
                    return Ok(None);
                }
            }
        }
        serial(units, |unit| train(self, unit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_fine_tuning_of_a_large_u_net_on_gpus_spans_ranks_by_default() {
        let cuda = Device::Cuda(0);
        // 8 GPUs a node, 16 ranks, a global batch of 32: the node's 8.
        assert_eq!(default_width(true, cuda, 8, 16, 32), 8);
        // A global batch of 12 shares over at most 6 of them, 6 does not divide 16: 4.
        assert_eq!(default_width(true, cuda, 8, 16, 12), 4);
        assert_eq!(default_width(false, cuda, 8, 16, 32), 1);
        assert_eq!(default_width(true, Device::Cpu, 8, 16, 32), 1);
        assert_eq!(default_width(true, cuda, 1, 16, 32), 1);
    }
}
