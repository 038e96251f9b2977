//! The science of a study's `results.json`: what must not depend on how the study was spread
//! over processes (every score, loss and chosen learning rate).
use serde_json::Value;
use std::path::Path;

/// `results.json` without what may differ between processes: timings, memory, the machine, the
/// commit, the wall clock and the paths.
pub fn science(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    let mut results: Value = serde_json::from_str(&text).unwrap();
    let top = results.as_object_mut().unwrap();
    for key in [
        "git_commit",
        "machine",
        "timing",
        "load_average",
        "wall_seconds",
        "invocations",
        "invocation_seconds",
    ] {
        top.remove(key);
    }
    if let Some(classifier) = top["classifier"].as_object_mut() {
        classifier.remove("weights");
        classifier.remove("seconds");
    }
    // A point's cost in full fine-tuning steps is measured in time.
    for point in top["curves"].as_array_mut().unwrap() {
        point.as_object_mut().unwrap().remove("full_steps");
    }
    for row in top["rows"].as_array_mut().unwrap() {
        row.as_object_mut().unwrap().remove("sample_seconds");
        keep_loss(&mut row["train"]);
        for run in row["runs"].as_array_mut().unwrap() {
            keep_loss(&mut run["train"]);
        }
    }
    results
}

/// A run's measures less its times and memory.
fn keep_loss(train: &mut Value) {
    if let Some(train) = train.as_object_mut() {
        train.retain(|key, _| key == "steps" || key == "final_loss");
    }
}
