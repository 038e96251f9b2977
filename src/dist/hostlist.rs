//! SLURM's compressed host lists (`node[01-04,07],gpu3`), expanded as `scontrol show hostnames`
//! does: ranges keep the zero padding of their start, bracket groups may repeat in a name.
use anyhow::{bail, Context, Result};

/// Every host of a SLURM host list, in order.
pub fn expand(list: &str) -> Result<Vec<String>> {
    let mut hosts = Vec::new();
    for entry in split_top_level(list)? {
        hosts.extend(expand_entry(entry).with_context(|| format!("host list `{list}`"))?);
    }
    if hosts.is_empty() {
        bail!("host list `{list}` names no host");
    }
    Ok(hosts)
}

/// The first host of a SLURM host list (the one SLURM jobs use as the rendezvous address).
pub fn first_host(list: &str) -> Result<String> {
    Ok(expand(list)?.swap_remove(0))
}

/// Splits at the commas that are outside brackets.
fn split_top_level(list: &str) -> Result<Vec<&str>> {
    let mut entries = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' if depth == 0 => bail!("host list `{list}`: `]` without `[`"),
            ']' => depth -= 1,
            ',' if depth == 0 => {
                entries.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        bail!("host list `{list}`: unclosed `[`");
    }
    entries.push(&list[start..]);
    Ok(entries
        .into_iter()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect())
}

/// Expands one entry such as `rack[1-2]-node[01-03]` (the first bracket group, then the rest).
fn expand_entry(entry: &str) -> Result<Vec<String>> {
    let Some(open) = entry.find('[') else {
        return Ok(vec![entry.to_string()]);
    };
    let close = open + entry[open..].find(']').context("unclosed `[`")?;
    let (prefix, ranges, rest) = (&entry[..open], &entry[open + 1..close], &entry[close + 1..]);
    let suffixes = expand_entry(rest)?;
    let mut hosts = Vec::new();
    for item in ranges.split(',') {
        for index in expand_range(item.trim())? {
            hosts.extend(suffixes.iter().map(|s| format!("{prefix}{index}{s}")));
        }
    }
    Ok(hosts)
}

/// `07` → [`07`]; `01-04` → [`01`, `02`, `03`, `04`] (padded to the start's width).
fn expand_range(item: &str) -> Result<Vec<String>> {
    let parse = |s: &str| -> Result<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            bail!("`{item}` is not a number or a range of numbers");
        }
        Ok(s.parse()?)
    };
    let Some((lo, hi)) = item.split_once('-') else {
        parse(item)?;
        return Ok(vec![item.to_string()]);
    };
    let (first, last) = (parse(lo)?, parse(hi)?);
    if last < first {
        bail!("range `{item}` runs backwards");
    }
    let width = lo.len();
    Ok((first..=last).map(|i| format!("{i:0width$}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_ranges_with_padding_and_single_numbers() {
        assert_eq!(
            expand("node[01-04,07]").unwrap(),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(expand("n[8-11]").unwrap(), ["n8", "n9", "n10", "n11"]);
        assert_eq!(
            expand("n[098-101]").unwrap(),
            ["n098", "n099", "n100", "n101"]
        );
    }

    #[test]
    fn expands_several_entries_and_groups() {
        assert_eq!(
            expand("gpu3,node[1-2],login").unwrap(),
            ["gpu3", "node1", "node2", "login"]
        );
        assert_eq!(
            expand("rack[1-2]-n[0-1]").unwrap(),
            ["rack1-n0", "rack1-n1", "rack2-n0", "rack2-n1"]
        );
        assert_eq!(first_host("node[07,01-04]").unwrap(), "node07");
        assert_eq!(
            first_host("single-host.example.org").unwrap(),
            "single-host.example.org"
        );
    }

    #[test]
    fn rejects_malformed_lists() {
        for bad in ["node[1-", "node]1[", "node[a-b]", "node[4-1]", "", "node[]"] {
            assert!(expand(bad).is_err(), "`{bad}` should be refused");
        }
    }
}
