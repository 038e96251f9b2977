//! Numbers as the study prints them: parameter counts, shares, sizes, durations and scores.
use super::Uncertainty;

/// Parameter counts as the study prints them: 860M, 1.23M, 0.23M; small models get K.
pub fn format_count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e8 {
        format!("{:.0}M", n / 1e6)
    } else if n >= 1e5 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// A share of the U-Net as the study prints it: 100%, 0.143%, 0.029%; three significant digits
/// at most (12.5%, 1.23%).
pub fn format_share(part: u64, whole: u64) -> String {
    if whole == 0 {
        return "–".into();
    }
    let pct = 100.0 * part as f64 / whole as f64;
    if part == whole {
        "100%".into()
    } else if pct >= 10.0 {
        format!("{pct:.1}%")
    } else if pct >= 1.0 {
        format!("{pct:.2}%")
    } else {
        format!("{pct:.3}%")
    }
}

pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b / (1u64 << 20) as f64)
    }
}

pub fn format_seconds(s: f64) -> String {
    if s >= 3600.0 {
        format!(
            "{:.0} h {:02.0} min",
            (s / 3600.0).floor(),
            (s % 3600.0) / 60.0
        )
    } else if s >= 60.0 {
        format!("{:.0} min {:02.0} s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.1} s")
    }
}

/// `value ± std`, both times `scale`.
pub fn format_estimate(value: f64, uncertainty: &Uncertainty, scale: f64) -> String {
    format!(
        "{} ± {}",
        format_score(value * scale),
        format_score(uncertainty.std * scale)
    )
}

/// `[low, high]`, both times `scale`.
pub fn format_interval(uncertainty: &Uncertainty, scale: f64) -> String {
    format!(
        "[{}, {}]",
        format_score(uncertainty.low * scale),
        format_score(uncertainty.high * scale)
    )
}

/// A ratio as a percentage: 56%.
pub fn format_percent(ratio: f64) -> String {
    format!("{:.0}%", 100.0 * ratio)
}

/// FLOPs with an SI prefix: 1.23 GFLOP.
pub fn format_flops(flops: f64) -> String {
    let (scaled, prefix) = match flops {
        f if f >= 1e12 => (f / 1e12, "T"),
        f if f >= 1e9 => (f / 1e9, "G"),
        f if f >= 1e6 => (f / 1e6, "M"),
        f => (f / 1e3, "k"),
    };
    format!("{scaled:.2} {prefix}FLOP")
}

/// A mean over runs with its uncertainty, three decimals: `0.812 ± 0.021`.
pub fn format_summary(summary: &super::Summary) -> String {
    format!("{:.3} ± {:.3}", summary.value, summary.uncertainty.std)
}

/// FID/KID with two decimals, as the study prints FID; non-finite values spelled out.
pub fn format_score(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_shares_format_like_the_study() {
        assert_eq!(format_count(859_520_964), "860M");
        assert_eq!(format_count(1_229_280), "1.23M");
        assert_eq!(format_count(12_345), "12.3K");
        assert_eq!(format_share(1, 8), "12.5%");
        assert_eq!(format_share(1_229_280, 859_520_964), "0.143%");
        assert_eq!(format_seconds(125.0), "2 min 05 s");
    }
}
