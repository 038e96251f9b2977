//! The crate's layering, read from its source: every `crate::`, `super::` and `self::` path in
//! `src/` (comments left out) is an arrow from the file that writes it to the module it names.
//! - The top-level modules form layers ([`LAYERS`]): a module uses only modules of lower layers,
//!   so no arrow runs back up (e.g. `model` and `data` use nothing of `train`, `eval`, `bench`,
//!   `compare`; `train` nothing of `bench`, `compare`).
//! - Inside each module, its files and folders form no circle (`a.rs` uses `b.rs` and `b.rs`
//!   uses `a.rs`, directly or through others). A folder's `mod.rs` is the folder itself, and
//!   items reached through it (`super::Study`) are not counted: only paths that name a file or
//!   folder are.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules from the bottom up; each may use only those of the layers below it.
const LAYERS: &[&[&str]] = &[
    // `error` holds the typed errors every layer raises.
    &["util", "error"],
    &["schedulers", "dist"],
    &["model"],
    &["data", "peft"],
    &["sample"],
    &["train", "eval"],
    &["compare"],
    // `bench` reports the machine and its memory with `compare::machine`.
    &["bench"],
    // The settings layer resolves run files and `--set` pairs into the typed settings of `train`
    // and `compare`, checked before any work; only the command line reads it.
    &["settings"],
    &["cli"],
];

/// A module path (`["compare", "prepare"]`), as its file declares it.
type ModulePath = Vec<String>;

struct SourceFile {
    path: PathBuf,
    module: ModulePath,
    /// The file's lines with their comments cut off.
    code: Vec<String>,
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `path` from the repository's root, as messages show it.
fn relative(path: &Path) -> &Path {
    path.strip_prefix(env!("CARGO_MANIFEST_DIR"))
        .unwrap_or(path)
}

/// Every `.rs` file under `src/` with the module it is (`mod.rs`: its folder's).
fn source_files() -> Vec<SourceFile> {
    let mut files = Vec::new();
    let mut pending = vec![src()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path.strip_prefix(src()).unwrap().with_extension("");
                let mut module: ModulePath = relative
                    .iter()
                    .map(|part| part.to_string_lossy().into_owned())
                    .collect();
                if matches!(module.as_slice(), [name] if name == "lib" || name == "main")
                    || module.last().is_some_and(|name| name == "mod")
                {
                    module.pop();
                }
                let code = std::fs::read_to_string(&path)
                    .unwrap()
                    .lines()
                    .map(|line| line.split("//").next().unwrap().to_string())
                    .collect();
                files.push(SourceFile { path, module, code });
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The leading identifier of `text` and the rest.
fn ident(text: &str) -> (&str, &str) {
    let end = text.find(|c| !is_ident(c)).unwrap_or(text.len());
    text.split_at(end)
}

/// The first identifier of each item of the `{...}` group `text` starts with (nested groups are
/// left to their first identifier's path).
fn group_heads(text: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let (mut depth, mut expect_head) = (0, true);
    for (at, c) in text.char_indices() {
        match c {
            '{' => {
                depth += 1;
                expect_head = depth == 1;
            }
            '}' if depth == 1 => break,
            '}' => depth -= 1,
            ',' if depth == 1 => expect_head = true,
            c if expect_head && is_ident(c) => {
                heads.push(ident(&text[at..]).0.to_string());
                expect_head = false;
            }
            _ => {}
        }
    }
    heads
}

/// The absolute module paths a line names from `module` (`crate::a::b`, `super::c`,
/// `self::d`, with `crate::{e, f::g}` groups as one path per item).
fn paths_in(line: &str, module: &[String]) -> Vec<ModulePath> {
    let mut found = Vec::new();
    for (at, _) in line.match_indices("::") {
        let (before, mut rest) = line.split_at(at);
        let root = before
            .rfind(|c| !is_ident(c))
            .map_or(before, |i| &before[i + 1..]);
        let preceded_by_path = before[..before.len() - root.len()].ends_with("::");
        let mut base: ModulePath = match root {
            "crate" if !preceded_by_path => Vec::new(),
            "self" if !preceded_by_path => module.to_vec(),
            "super" if !preceded_by_path => module[..module.len().saturating_sub(1)].to_vec(),
            _ => continue,
        };
        rest = &rest[2..];
        while let Some(after) = rest.strip_prefix("super::") {
            base.pop();
            rest = after;
        }
        if rest.starts_with('{') {
            found.extend(group_heads(rest).into_iter().map(|head| {
                let mut path = base.clone();
                path.push(head);
                path
            }));
            continue;
        }
        let mut path = base;
        loop {
            let (name, after) = ident(rest);
            if name.is_empty() {
                break;
            }
            path.push(name.to_string());
            match after.strip_prefix("::") {
                Some(next) if !next.starts_with('{') => rest = next,
                _ => break,
            }
        }
        if !path.is_empty() {
            found.push(path);
        }
    }
    found
}

/// An arrow between two children of one module (the crate root's are the top-level modules).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Arrow {
    parent: ModulePath,
    from: String,
    to: String,
    /// Where it is written, for messages: `src/…:line`.
    at: String,
}

/// Every arrow of the crate: a path written in a file under child `from` of a module that names
/// another child `to` of it.
fn arrows(files: &[SourceFile]) -> Vec<Arrow> {
    let modules: BTreeSet<ModulePath> = files
        .iter()
        .flat_map(|f| (1..=f.module.len()).map(|n| f.module[..n].to_vec()))
        .collect();
    let mut arrows = Vec::new();
    for file in files {
        for (number, line) in file.code.iter().enumerate() {
            for path in paths_in(line, &file.module) {
                let common = file
                    .module
                    .iter()
                    .zip(&path)
                    .take_while(|(a, b)| a == b)
                    .count();
                let names_a_sibling = common < file.module.len()
                    && common < path.len()
                    && modules.contains(&path[..=common]);
                if !names_a_sibling {
                    continue;
                }
                arrows.push(Arrow {
                    parent: path[..common].to_vec(),
                    from: file.module[common].clone(),
                    to: path[common].clone(),
                    at: format!("{}:{}", relative(&file.path).display(), number + 1),
                });
            }
        }
    }
    arrows
}

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The circles among each module's children: groups of two or more that reach each other, as
/// sorted `parent/child` names.
fn circles(arrows: &[Arrow]) -> BTreeSet<Vec<String>> {
    let mut graphs: BTreeMap<&ModulePath, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for arrow in arrows.iter().filter(|a| !a.parent.is_empty()) {
        graphs
            .entry(&arrow.parent)
            .or_default()
            .entry(&arrow.from)
            .or_default()
            .insert(&arrow.to);
    }
    let mut found = BTreeSet::new();
    for (parent, graph) in &graphs {
        let reach = |start: &str| {
            let mut seen = BTreeSet::new();
            let mut pending = vec![start];
            while let Some(node) = pending.pop() {
                for &next in graph.get(node).into_iter().flatten() {
                    if seen.insert(next) {
                        pending.push(next);
                    }
                }
            }
            seen
        };
        let reached: BTreeMap<&str, BTreeSet<&str>> =
            graph.keys().map(|&node| (node, reach(node))).collect();
        for (&node, reach) in &reached {
            let circle: Vec<String> = reach
                .iter()
                .filter(|&&other| reached.get(other).is_some_and(|r| r.contains(node)))
                .map(|other| format!("{}/{other}", parent.join("/")))
                .collect();
            if circle.len() > 1 {
                found.insert(circle);
            }
        }
    }
    found
}

#[test]
fn every_top_level_module_has_a_layer() {
    let files = source_files();
    let top: BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.module.first())
        .map(String::as_str)
        .collect();
    let missing: Vec<&&str> = top.iter().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        missing.is_empty(),
        "put {missing:?} into LAYERS (tests/layers.rs)"
    );
}

#[test]
fn no_arrow_runs_back_up() {
    let files = source_files();
    let upward: Vec<String> = arrows(&files)
        .into_iter()
        .filter(|a| a.parent.is_empty())
        .filter(|a| layer_of(&a.to) >= layer_of(&a.from))
        .map(|a| format!("{}: {} uses {}", a.at, a.from, a.to))
        .collect();
    assert!(
        upward.is_empty(),
        "arrows to a module of the same or a higher layer (see LAYERS):\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_circle_between_a_modules_files() {
    let arrows = arrows(&source_files());
    let found: Vec<String> = circles(&arrows)
        .iter()
        .map(|circle| {
            let parent = circle[0].rsplit_once('/').unwrap().0;
            let members: BTreeSet<&str> = circle
                .iter()
                .map(|m| m.rsplit_once('/').unwrap().1)
                .collect();
            let lines: Vec<String> = arrows
                .iter()
                .filter(|a| a.parent.join("/") == parent)
                .filter(|a| members.contains(a.from.as_str()) && members.contains(a.to.as_str()))
                .map(|a| format!("  {}: {} uses {}", a.at, a.from, a.to))
                .collect();
            format!("{}:\n{}", circle.join(" <-> "), lines.join("\n"))
        })
        .collect();
    assert!(
        found.is_empty(),
        "circles between files:\n{}",
        found.join("\n")
    );
}

#[test]
fn paths_are_read_as_rust_resolves_them() {
    let module: ModulePath = vec!["compare".into(), "prepare".into()];
    let read = |line: &str| paths_in(line, &module);
    let path = |parts: &[&str]| -> ModulePath { parts.iter().map(|s| s.to_string()).collect() };
    assert_eq!(
        read("use crate::model::source::ModelFiles;"),
        [path(&["model", "source", "ModelFiles"])]
    );
    assert_eq!(
        read("use super::training::{RunJob, RunRecord};"),
        [path(&["compare", "training"])]
    );
    assert_eq!(read("super::super::eval::kid(a)"), [path(&["eval", "kid"])]);
    assert_eq!(
        read("use crate::{data::synthetic, eval};"),
        [path(&["data"]), path(&["eval"])]
    );
    assert_eq!(
        read("self::stage::Stage"),
        [path(&["compare", "prepare", "stage", "Stage"])]
    );
    assert!(read("difftune::crate_like::x(); std::fmt::Debug; a::super::b").is_empty());
}

#[test]
fn an_arrow_back_up_and_a_circle_are_found() {
    let file = |path: &str, line: &str| SourceFile {
        path: path.into(),
        module: path
            .trim_end_matches(".rs")
            .split('/')
            .map(String::from)
            .collect(),
        code: vec![line.to_string()],
    };
    let files = [
        file("model/a.rs", "use crate::train::x;"),
        file("model/b.rs", "use super::a::y;"),
        file("train/x.rs", "use crate::model::b::z;"),
        file("model/c.rs", "use super::b::w;"),
        file("model/d.rs", "use super::c::v;"),
        file("model/e.rs", "use super::a::u;"),
    ];
    let found = arrows(&files);
    let up: Vec<(&str, &str)> = found
        .iter()
        .filter(|a| a.parent.is_empty() && layer_of(&a.to) >= layer_of(&a.from))
        .map(|a| (a.from.as_str(), a.to.as_str()))
        .collect();
    assert_eq!(up, [("model", "train")]);
    let with_circle = [
        file("model/a.rs", "use super::c::v;"),
        file("model/b.rs", "use super::a::y;"),
        file("model/c.rs", "use super::b::w;"),
        file("model/d.rs", "use super::c::v;"),
    ];
    let expected: Vec<String> = ["model/a", "model/b", "model/c"].map(String::from).into();
    assert_eq!(circles(&arrows(&with_circle)), BTreeSet::from([expected]));
    assert!(circles(&found).is_empty());
}
