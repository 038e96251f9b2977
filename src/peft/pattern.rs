//! Module-path globs (`*.attn2.to_q`, `*.resnets.*.conv1`) for choosing which layers a method
//! adapts, and "did you mean" suggestions when a pattern matches nothing.
use anyhow::{anyhow, Error};

/// Edit distance between a glob and a text: `*` matches any run of characters (dots included)
/// and `?` any one character at no cost; other characters cost 1 per substitution, insertion or
/// deletion. 0 means the glob matches.
pub fn glob_distance(glob: &str, text: &str) -> usize {
    let pattern: Vec<char> = glob.chars().collect();
    let text: Vec<char> = text.chars().collect();
    // previous[j]: cost of matching the pattern so far against text[..j]
    let mut previous: Vec<usize> = (0..=text.len()).collect();
    for &p in &pattern {
        let mut current = vec![0; text.len() + 1];
        current[0] = if p == '*' {
            previous[0]
        } else {
            previous[0] + 1
        };
        for j in 1..=text.len() {
            current[j] = match p {
                '*' => previous[j].min(current[j - 1]),
                _ => {
                    let substitute = previous[j - 1] + usize::from(p != '?' && p != text[j - 1]);
                    substitute.min(previous[j] + 1).min(current[j - 1] + 1)
                }
            };
        }
        previous = current;
    }
    previous[text.len()]
}

pub fn glob_matches(glob: &str, text: &str) -> bool {
    glob_distance(glob, text) == 0
}

/// The error for a pattern that matches none of `candidates`, naming the closest ones.
pub fn no_match_error(what: &str, pattern: &str, candidates: &[String]) -> Error {
    let mut ranked: Vec<(usize, &String)> = candidates
        .iter()
        .map(|c| (glob_distance(pattern, c), c))
        .collect();
    ranked.sort();
    let closest: Vec<String> = ranked
        .iter()
        .take(5)
        .map(|(_, c)| format!("`{c}`"))
        .collect();
    anyhow!(
        "{what} pattern `{pattern}` matches none of the {} candidate modules; closest: {} \
         (patterns are globs over the whole diffusers path: `*` matches any characters, dots included)",
        candidates.len(),
        closest.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_paths() {
        let path = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_q";
        assert!(glob_matches("*.attn2.to_q", path));
        assert!(glob_matches("down_blocks.?.attentions.*.to_q", path));
        assert!(!glob_matches("*.attn2.to_k", path));
        assert!(!glob_matches("attn2.to_q", path));
        assert_eq!(glob_distance("*.attn2.to_z", path), 1);
        assert_eq!(glob_distance("*.atn2.to_q", path), 1);
    }
}
