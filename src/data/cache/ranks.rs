//! A multi-rank build's per-rank manifests: a rank other than 0 lists the shards it encoded in
//! `manifest.rank-N.json`, which rank 0 merges into the manifest after a barrier.
use super::manifest::{Manifest, Shard, SkippedImage};
use anyhow::{Context, Result};
use std::path::Path;

/// The manifest of the shards rank `rank` (not 0) encoded in a multi-rank build.
pub(super) fn rank_part_file(rank: usize) -> String {
    format!("manifest.rank-{rank}.json")
}

/// Removes the rank manifests of a multi-rank build.
pub(super) fn remove_rank_parts(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("manifest.rank-") && name.ends_with(".json") {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Adds the shards (and their skipped images) that rank `rank` listed in its manifest to
/// `manifest`; returns how many it added.
pub(super) fn merge_rank_part(manifest: &mut Manifest, dir: &Path, rank: usize) -> Result<usize> {
    let path = dir.join(rank_part_file(rank));
    let part: Manifest = crate::util::fs::read_json(&path)
        .with_context(|| format!("reading rank {rank}'s shards"))?;
    let known: Vec<usize> = manifest.shards.iter().map(|s| s.first).collect();
    let new: Vec<Shard> = part
        .shards
        .into_iter()
        .filter(|s| !known.contains(&s.first))
        .collect();
    let ids: Vec<&str> = manifest.skipped.iter().map(|s| s.id.as_str()).collect();
    let skipped: Vec<SkippedImage> = part
        .skipped
        .into_iter()
        .filter(|s| !ids.contains(&s.id.as_str()))
        .collect();
    manifest.skipped.extend(skipped);
    let added = new.len();
    manifest.shards.extend(new);
    manifest.shards.sort_by_key(|s| s.first);
    Ok(added)
}
