//! TensorBoard event files: every scalar of `metrics.jsonl` and the validation images, readable by
//! `tensorboard --logdir OUT/tensorboard`.
//!
//! No maintained Rust crate writes event files (`tensorboard-rs` has been inactive since 2022, on
//! protobuf 2), so the format is written here: TFRecord framing (length, masked CRC-32C of the
//! length, payload, masked CRC-32C of the payload) around protobuf `Event` messages encoded with
//! `prost`. Only the fields difftune writes are declared, with TensorFlow's field numbers
//! (`tensorflow/core/util/event.proto`, `tensorflow/core/framework/summary.proto`).
use crate::util::fs::sorted_entries;
use anyhow::{bail, ensure, Context, Result};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const TENSORBOARD_DIR: &str = "tensorboard";

/// `tensorflow.Event`.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(oneof = "EventKind", tags = "3, 5, 7")]
    pub kind: Option<EventKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum EventKind {
    #[prost(string, tag = "3")]
    FileVersion(String),
    #[prost(message, tag = "5")]
    Summary(Summary),
    #[prost(message, tag = "7")]
    SessionLog(SessionLog),
}

/// `tensorflow.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(oneof = "ValueKind", tags = "2, 4")]
    pub value: Option<ValueKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum ValueKind {
    #[prost(float, tag = "2")]
    SimpleValue(f32),
    #[prost(message, tag = "4")]
    Image(Image),
}

/// `tensorflow.Summary.Image`: an encoded (PNG) image.
#[derive(Clone, PartialEq, Message)]
pub struct Image {
    #[prost(int32, tag = "1")]
    pub height: i32,
    #[prost(int32, tag = "2")]
    pub width: i32,
    /// 3: RGB.
    #[prost(int32, tag = "3")]
    pub colorspace: i32,
    #[prost(bytes = "vec", tag = "4")]
    pub encoded_image_string: Vec<u8>,
}

/// `tensorflow.SessionLog`; only `status` is written.
#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `SessionLog.START`: TensorBoard drops the events of its step and later ones written before it
/// (the orphans of an interrupted run), as PyTorch's `SummaryWriter(purge_step=...)` relies on.
const SESSION_START: i32 = 1;

impl Event {
    /// The first event of every file.
    pub fn file_version(wall_time: f64) -> Self {
        Self::new(wall_time, 0, EventKind::FileVersion("brain.Event:2".into()))
    }

    /// Marks a (re)start whose first logged step is `step`: TensorBoard drops the events of steps
    /// from `step` on that earlier files hold.
    pub fn session_start(wall_time: f64, step: usize) -> Self {
        let log = SessionLog {
            status: SESSION_START,
        };
        Self::new(wall_time, step, EventKind::SessionLog(log))
    }

    /// Scalars of one step, one `Summary.Value` each.
    pub fn scalars(wall_time: f64, step: usize, scalars: &[(&str, f64)]) -> Self {
        let value = scalars
            .iter()
            .map(|&(tag, v)| SummaryValue {
                tag: tag.into(),
                value: Some(ValueKind::SimpleValue(v as f32)),
            })
            .collect();
        Self::new(wall_time, step, EventKind::Summary(Summary { value }))
    }

    /// One PNG image of one step.
    pub fn png_image(wall_time: f64, step: usize, tag: &str, png: Vec<u8>) -> Result<Self> {
        let header = png::Decoder::new(std::io::Cursor::new(&png[..]))
            .read_info()
            .with_context(|| format!("reading the PNG header of image {tag}"))?
            .info()
            .clone();
        let image = Image {
            height: header.height as i32,
            width: header.width as i32,
            colorspace: 3,
            encoded_image_string: png,
        };
        let value = vec![SummaryValue {
            tag: tag.into(),
            value: Some(ValueKind::Image(image)),
        }];
        Ok(Self::new(
            wall_time,
            step,
            EventKind::Summary(Summary { value }),
        ))
    }

    fn new(wall_time: f64, step: usize, kind: EventKind) -> Self {
        Self {
            wall_time,
            step: step as i64,
            kind: Some(kind),
        }
    }

    /// The scalars this event carries, as (tag, value).
    pub fn scalar_values(&self) -> Vec<(&str, f32)> {
        match &self.kind {
            Some(EventKind::Summary(summary)) => summary
                .value
                .iter()
                .filter_map(|v| match v.value {
                    Some(ValueKind::SimpleValue(x)) => Some((v.tag.as_str(), x)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// CRC-32C masked as TFRecord stores it, so that a CRC of data holding CRCs stays well mixed.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: `u64` length, masked CRC of the length, payload, masked CRC of the payload.
pub fn encode_record(event: &Event) -> Vec<u8> {
    let payload = event.encode_to_vec();
    let length = (payload.len() as u64).to_le_bytes();
    let mut record = Vec::with_capacity(payload.len() + 16);
    record.extend_from_slice(&length);
    record.extend_from_slice(&masked_crc(&length).to_le_bytes());
    record.extend_from_slice(&payload);
    record.extend_from_slice(&masked_crc(&payload).to_le_bytes());
    record
}

/// Decodes an event file, verifying both CRCs of every record.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut events = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        ensure!(
            rest.len() >= 12,
            "{}: truncated record header",
            path.display()
        );
        let (length, crc) = (&rest[..8], u32::from_le_bytes(rest[8..12].try_into()?));
        ensure!(
            masked_crc(length) == crc,
            "{}: bad length CRC",
            path.display()
        );
        let n = u64::from_le_bytes(length.try_into()?) as usize;
        let Some(record) = rest.get(12..12 + n + 4) else {
            bail!("{}: truncated record", path.display());
        };
        let (payload, crc) = record.split_at(n);
        ensure!(
            masked_crc(payload) == u32::from_le_bytes(crc.try_into()?),
            "{}: bad payload CRC",
            path.display()
        );
        events.push(Event::decode(payload).with_context(|| format!("{}", path.display()))?);
        rest = &rest[12 + n + 4..];
    }
    Ok(events)
}

/// The event files of a run folder's log, in the order TensorBoard reads them (by name).
pub fn event_files(out: &Path) -> Result<Vec<PathBuf>> {
    let mut files = sorted_entries(&out.join(TENSORBOARD_DIR))?;
    files.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().contains("tfevents"))
    });
    Ok(files)
}

/// An open event file of a run: one per (re)start, each beginning with a session start so that
/// steps an interrupted run logged after its last checkpoint are dropped by TensorBoard, as the
/// same steps are dropped from `metrics.jsonl`.
pub struct TensorBoardLog {
    path: PathBuf,
    file: std::fs::File,
}

impl TensorBoardLog {
    /// Starts a new event file under `out/tensorboard/` for a run (re)starting at `resumed_at`.
    pub fn create(out: &Path, resumed_at: usize) -> Result<Self> {
        let dir = out.join(TENSORBOARD_DIR);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let now = wall_time();
        // Names sort by start time, as TensorBoard orders the files of one run.
        let name = format!(
            "events.out.tfevents.{:010}.difftune.{}.{resumed_at}",
            now as u64,
            std::process::id()
        );
        let path = dir.join(name);
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut log = Self { path, file };
        log.write(&Event::file_version(now))?;
        log.write(&Event::session_start(now, resumed_at + 1))?;
        Ok(log)
    }

    /// Logs the scalars of one step.
    pub fn scalars(&mut self, step: usize, scalars: &[(&str, f64)]) -> Result<()> {
        self.write(&Event::scalars(wall_time(), step, scalars))
    }

    /// Logs the PNG files of a folder as images tagged `prefix/NAME`.
    pub fn png_folder(&mut self, step: usize, prefix: &str, dir: &Path) -> Result<()> {
        let mut pngs = sorted_entries(dir)?;
        pngs.retain(|p| p.extension().is_some_and(|e| e == "png"));
        for path in pngs {
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let event = Event::png_image(wall_time(), step, &format!("{prefix}/{stem}"), bytes)?;
            self.write(&event)?;
        }
        Ok(())
    }

    /// Appends one record, unbuffered, so a live `tensorboard` sees every step.
    fn write(&mut self, event: &Event) -> Result<()> {
        self.file
            .write_all(&encode_record(event))
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

fn wall_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
