//! The run files shipped with difftune (presets/*.toml), embedded in the binary; read them with
//! [`crate::settings::compare::preset`].
use crate::error::SettingsError;
use anyhow::Result;

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

/// The run file of preset `name`, as text.
pub fn preset_text(name: &str) -> Result<&'static str> {
    match PRESETS.iter().find(|(n, _)| *n == name) {
        Some((_, text)) => Ok(text),
        None => Err(SettingsError::invalid(
            "--preset",
            format!(
                "unknown preset `{name}` (known: {})",
                PRESETS.map(|(n, _)| n).join(", ")
            ),
        )
        .into()),
    }
}
