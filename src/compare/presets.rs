//! The run files shipped with difftune (presets/*.toml), embedded in the binary.
use super::config::CompareConfig;
use anyhow::{bail, Context, Result};

/// Name and text of every preset.
pub const PRESETS: [(&str, &str); 3] = [
    ("tiny", include_str!("../../presets/tiny.toml")),
    ("tiny-all", include_str!("../../presets/tiny-all.toml")),
    (
        "sd14-food101",
        include_str!("../../presets/sd14-food101.toml"),
    ),
];

/// The preset `difftune compare` runs when given no run file.
pub const DEFAULT_PRESET: &str = "tiny";

/// The run file of preset `name`.
pub fn preset(name: &str) -> Result<CompareConfig> {
    let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name) else {
        bail!(
            "unknown preset `{name}` (known: {})",
            PRESETS.map(|(n, _)| n).join(", ")
        );
    };
    CompareConfig::from_toml(text).with_context(|| format!("preset `{name}`"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_names_itself() {
        for (name, _) in PRESETS {
            assert_eq!(preset(name).unwrap().name, name);
        }
        assert!(preset("sd15").is_err());
    }

    /// tiny-all is the tiny preset with every registered method.
    #[test]
    fn tiny_all_names_every_method_and_otherwise_is_tiny() {
        let (tiny, all) = (preset("tiny").unwrap(), preset("tiny-all").unwrap());
        let names: Vec<&str> = all.methods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, crate::peft::method_names().collect::<Vec<_>>());
        assert_eq!(all.methods[..tiny.methods.len()], tiny.methods[..]);
        assert_eq!(
            (all.train, all.pretrain, all.eval.must_improve),
            (tiny.train, tiny.pretrain, tiny.eval.must_improve)
        );
    }

    #[test]
    fn the_study_preset_has_the_study_settings() {
        let c = preset("sd14-food101").unwrap();
        assert_eq!(
            (c.train.steps, c.train.learning_rate, c.train.resolution),
            (10_000, 1e-5, 512)
        );
        let names: Vec<&str> = c.methods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["full", "adapter", "lora", "prefix", "bitfit"]);
        assert!(c.pretrain.is_none());
    }
}
