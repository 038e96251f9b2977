//! Hugging Face datasets stored as parquet shards, such as the Hub's Food101
//! (`data/train-00000-of-00008.parquet`, `data/validation-00000-of-00003.parquet`).
//!
//! Columns: `image`, a struct `{bytes: binary, path: string}` (or plain binary), and either a
//! class `label` (an integer; captions from the prompt template) or a caption column (`text` by
//! default, taken as is). Class names come from `DatasetOptions::classes_file` when given, else
//! from the `huggingface` schema metadata that `datasets` embeds (`info.features.label.names`).
//!
//! Splits: a shard belongs to the split its file name starts with (`train-…`) or a folder on its
//! path is named after (`train/0000.parquet`); the test split is `test`, or `validation` when a
//! dataset has no `test` shards (as the Hub's Food101). Shards are read in path order.
//!
//! The encoded image bytes are kept in memory (they exist nowhere else); rows beyond
//! `limit_per_class` are skipped before their image column is read.
use super::food101::read_classes_file;
use super::prompts::human_label;
use super::{Class, Dataset, DatasetOptions, ImageSource, Layout, PerClassLimit, Sample, Split};
use ::parquet::file::reader::{FileReader, SerializedFileReader};
use ::parquet::record::{Field, Row};
use ::parquet::schema::types::Type;
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const IMAGE_COLUMN: &str = "image";
const LABEL_COLUMN: &str = "label";
/// Schema metadata key under which `datasets` stores its features as JSON.
const HF_METADATA_KEY: &str = "huggingface";

/// `*.parquet` files in `path` and up to two folder levels below, sorted by path.
fn parquet_files(path: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
        for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry
                .with_context(|| format!("listing {}", dir.display()))?
                .path();
            if path.is_dir() {
                if depth > 0 {
                    walk(&path, depth - 1, out)?;
                }
            } else if path.extension().is_some_and(|e| e == "parquet") {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(path, 2, &mut files)?;
    files.sort();
    Ok(files)
}

pub fn has_parquet_files(path: &Path) -> Result<bool> {
    Ok(!parquet_files(path)?.is_empty())
}

/// Whether the shard at `relative` (to the dataset root) belongs to the split named `name`.
fn in_split(relative: &Path, name: &str) -> bool {
    let stem = relative.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let stem_split = stem.split(['-', '_', '.']).next().unwrap_or("");
    stem_split == name
        || relative
            .parent()
            .is_some_and(|dir| dir.iter().any(|c| c == name))
}

fn split_files(root: &Path, split: Split) -> Result<Vec<PathBuf>> {
    let files = parquet_files(root)?;
    let names: &[&str] = match split {
        Split::Train => &["train"],
        Split::Test => &["test", "validation"],
    };
    for name in names {
        let chosen: Vec<PathBuf> = files
            .iter()
            .filter(|f| in_split(f.strip_prefix(root).unwrap_or(f), name))
            .cloned()
            .collect();
        if !chosen.is_empty() {
            return Ok(chosen);
        }
    }
    let found: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    bail!("no parquet shard for the {split} split (looked for {names:?} in file and folder names) among: {found:?}")
}

fn open(path: &Path) -> Result<SerializedFileReader<std::fs::File>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    SerializedFileReader::new(file)
        .with_context(|| format!("{} is not a valid parquet file", path.display()))
}

/// Class names from the `datasets` features in the schema metadata, if present.
fn embedded_class_names(
    reader: &SerializedFileReader<std::fs::File>,
    path: &Path,
) -> Result<Option<Vec<String>>> {
    let Some(entry) = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|kv| kv.key == HF_METADATA_KEY))
    else {
        return Ok(None);
    };
    let json: serde_json::Value = serde_json::from_str(entry.value.as_deref().unwrap_or(""))
        .with_context(|| {
            format!(
                "{}: the {HF_METADATA_KEY:?} schema metadata is not JSON",
                path.display()
            )
        })?;
    let features = json
        .pointer("/info/features")
        .or_else(|| json.get("features"));
    let Some(names) = features.and_then(|f| f.pointer("/label/names")) else {
        return Ok(None);
    };
    let names = names
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|n| n.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            anyhow!(
                "{}: features.label.names is not a list of strings",
                path.display()
            )
        })?;
    Ok(Some(names))
}

/// A projection of the file schema onto the named top-level columns.
fn projection(reader: &SerializedFileReader<std::fs::File>, columns: &[&str]) -> Result<Type> {
    let root = reader.metadata().file_metadata().schema();
    let fields = root
        .get_fields()
        .iter()
        .filter(|f| columns.contains(&f.name()))
        .cloned()
        .collect();
    Ok(Type::group_type_builder(root.name())
        .with_fields(fields)
        .build()?)
}

fn column<'a>(row: &'a Row, name: &str) -> Option<&'a Field> {
    row.get_column_iter()
        .find(|(n, _)| n.as_str() == name)
        .map(|(_, f)| f)
}

fn field_to_label(field: &Field) -> Option<i64> {
    match *field {
        Field::Byte(v) => Some(v.into()),
        Field::Short(v) => Some(v.into()),
        Field::Int(v) => Some(v.into()),
        Field::Long(v) => Some(v),
        Field::UByte(v) => Some(v.into()),
        Field::UShort(v) => Some(v.into()),
        Field::UInt(v) => Some(v.into()),
        Field::ULong(v) => i64::try_from(v).ok(),
        _ => None,
    }
}

/// The encoded image bytes of an `image` cell: a `{bytes, path}` struct or plain binary.
fn image_bytes(field: &Field) -> Option<&[u8]> {
    match field {
        Field::Bytes(b) => Some(b.data()),
        Field::Group(group) => match column(group, "bytes") {
            Some(Field::Bytes(b)) => Some(b.data()),
            _ => None,
        },
        _ => None,
    }
}

/// What a shard's rows give besides the image.
enum Annotation {
    Label(usize),
    Caption(String),
}

impl Annotation {
    fn label(&self) -> Option<usize> {
        match self {
            Annotation::Label(l) => Some(*l),
            Annotation::Caption(_) => None,
        }
    }
}

/// Where a shard's rows get their annotation: an integer class label, or a caption column.
enum AnnotationColumn {
    Label,
    Caption(String),
}

/// What is read of one shard: the annotation column first (to apply the per-class limit), then
/// the image column of the admitted rows only.
struct Shard {
    path: PathBuf,
    reader: SerializedFileReader<std::fs::File>,
    annotation: AnnotationColumn,
    annotation_projection: Type,
    image_projection: Type,
}

impl Shard {
    /// Opens a shard and checks its columns; learns the class names from it when labelled and
    /// none are known yet.
    fn open(path: &Path, opts: &DatasetOptions, classes: &mut Option<Vec<Class>>) -> Result<Self> {
        let reader = open(path)?;
        let schema = reader.metadata().file_metadata().schema();
        let has = |name: &str| schema.get_fields().iter().any(|f| f.name() == name);
        if !has(IMAGE_COLUMN) {
            bail!("{} has no {IMAGE_COLUMN:?} column", path.display());
        }
        let caption_column = opts.caption_column.as_str();
        let annotation = match (has(caption_column), has(LABEL_COLUMN)) {
            (true, _) => AnnotationColumn::Caption(caption_column.to_string()),
            (false, true) => AnnotationColumn::Label,
            (false, false) => bail!(
                "{} has neither a {LABEL_COLUMN:?} nor a {caption_column:?} column",
                path.display()
            ),
        };
        if matches!(annotation, AnnotationColumn::Label) && classes.is_none() {
            *classes = Some(embedded_classes(&reader, path)?);
        }
        let annotation_name = match &annotation {
            AnnotationColumn::Label => LABEL_COLUMN,
            AnnotationColumn::Caption(name) => name.as_str(),
        };
        Ok(Self {
            path: path.to_path_buf(),
            annotation_projection: projection(&reader, &[annotation_name])?,
            image_projection: projection(&reader, &[IMAGE_COLUMN])?,
            reader,
            annotation,
        })
    }

    /// One row's annotation; `classes` is set when the shard is labelled.
    fn annotation(
        &self,
        row: &Row,
        classes: &[Class],
        at: &dyn Fn() -> String,
    ) -> Result<Annotation> {
        match &self.annotation {
            AnnotationColumn::Label => {
                let label = column(row, LABEL_COLUMN)
                    .and_then(field_to_label)
                    .ok_or_else(|| anyhow!("{}: {LABEL_COLUMN:?} is not an integer", at()))?;
                let label = usize::try_from(label)
                    .ok()
                    .filter(|&l| l < classes.len())
                    .ok_or_else(|| {
                        anyhow!("{}: label {label} is not in 0..{}", at(), classes.len())
                    })?;
                Ok(Annotation::Label(label))
            }
            AnnotationColumn::Caption(name) => match column(row, name) {
                Some(Field::Str(s)) => Ok(Annotation::Caption(s.clone())),
                _ => bail!("{}: {name:?} is not a string", at()),
            },
        }
    }

    /// The rows of row group `group` (its first row is `first_row` of the shard) that the
    /// per-class limit admits, by offset in the group, with their annotations.
    fn admitted(
        &self,
        group: &dyn ::parquet::file::reader::RowGroupReader,
        first_row: usize,
        classes: &[Class],
        limit: &mut PerClassLimit,
    ) -> Result<Vec<(usize, Annotation)>> {
        let mut admitted = Vec::new();
        let rows = group.get_row_iter(Some(self.annotation_projection.clone()))?;
        for (offset, row) in rows.enumerate() {
            let at = || format!("{} row {}", self.path.display(), first_row + offset);
            let annotation = self.annotation(&row.with_context(at)?, classes, &at)?;
            if limit.admit(annotation.label()) {
                admitted.push((offset, annotation));
            }
        }
        Ok(admitted)
    }

    /// The samples of the `admitted` rows of a row group: their image bytes and captions.
    fn samples(
        &self,
        group: &dyn ::parquet::file::reader::RowGroupReader,
        first_row: usize,
        admitted: Vec<(usize, Annotation)>,
        classes: &[Class],
        opts: &DatasetOptions,
    ) -> Result<Vec<Sample>> {
        let stem = self
            .path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("shard");
        let mut wanted = admitted.into_iter().peekable();
        let mut samples = Vec::new();
        let rows = group.get_row_iter(Some(self.image_projection.clone()))?;
        for (offset, row) in rows.enumerate() {
            if wanted.peek().is_none() {
                break;
            }
            let Some((_, annotation)) = wanted.next_if(|(o, _)| *o == offset) else {
                continue;
            };
            let row_index = first_row + offset;
            let origin = format!("{} row {row_index}", self.path.display());
            let row = row.with_context(|| origin.clone())?;
            let bytes = column(&row, IMAGE_COLUMN)
                .and_then(image_bytes)
                .ok_or_else(|| anyhow!("{origin}: no encoded image bytes in {IMAGE_COLUMN:?}"))?;
            let (caption, label) = match annotation {
                Annotation::Label(l) => (opts.prompt.render(&classes[l].label), Some(l)),
                Annotation::Caption(c) => (c, None),
            };
            samples.push(Sample {
                image: ImageSource::Encoded {
                    bytes: Arc::from(bytes),
                    origin,
                },
                caption,
                label,
                id: format!("{stem}/{row_index}"),
                repeats: 1,
            });
        }
        Ok(samples)
    }
}

/// The class names `datasets` embeds in a labelled shard.
fn embedded_classes(
    reader: &SerializedFileReader<std::fs::File>,
    path: &Path,
) -> Result<Vec<Class>> {
    let names = embedded_class_names(reader, path)?.ok_or_else(|| {
        anyhow!(
            "{} embeds no class names (huggingface features.label.names); pass a classes file",
            path.display()
        )
    })?;
    Ok(names
        .iter()
        .map(|n| Class {
            name: n.clone(),
            label: human_label(n),
        })
        .collect())
}

pub fn load(root: &Path, opts: &DatasetOptions) -> Result<Dataset> {
    let mut classes: Option<Vec<Class>> = match &opts.classes_file {
        Some(path) => Some(read_classes_file(path)?),
        None => None,
    };
    let mut limit = PerClassLimit::new(opts.limit_per_class);
    let mut samples = Vec::new();
    for path in &split_files(root, opts.split)? {
        let shard = Shard::open(path, opts, &mut classes)?;
        let known = classes.as_deref().unwrap_or_default();
        let mut first_row = 0usize;
        for group_index in 0..shard.reader.num_row_groups() {
            let group = shard.reader.get_row_group(group_index)?;
            let admitted = shard.admitted(group.as_ref(), first_row, known, &mut limit)?;
            if !admitted.is_empty() {
                samples.extend(shard.samples(group.as_ref(), first_row, admitted, known, opts)?);
            }
            first_row += usize::try_from(group.metadata().num_rows()).unwrap_or(0);
        }
    }
    Ok(Dataset {
        layout: Layout::Parquet,
        root: root.to_path_buf(),
        split: opts.split,
        classes: classes.unwrap_or_default(),
        samples,
        skipped: Vec::new(),
    })
}
