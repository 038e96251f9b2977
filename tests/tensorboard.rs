//! TensorBoard event files against TensorBoard's own writer (tools/make_tensorboard_fixtures.py).
use difftune::train::tensorboard::{encode_record, read_events, Event, EventKind};
use std::path::Path;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tensorboard");

/// The fixture's events, built with difftune's constructors.
fn events() -> Vec<Event> {
    let png = std::fs::read(Path::new(FIXTURES).join("image.png")).unwrap();
    vec![
        Event::file_version(1700000000.25),
        Event::session_start(1700000000.25, 7),
        Event::scalars(
            1700000001.5,
            8,
            &[("train/loss", 0.123456789), ("train/lr", 1e-4)],
        ),
        Event::png_image(1700000002.75, 8, "validation/00", png).unwrap(),
    ]
}

#[test]
fn records_equal_tensorboards_own_writer_byte_for_byte() {
    let reference =
        std::fs::read(Path::new(FIXTURES).join("events.out.tfevents.reference")).unwrap();
    let ours: Vec<u8> = events().iter().flat_map(encode_record).collect();
    assert_eq!(ours, reference);
}

#[test]
fn reader_checks_crcs_and_round_trips() {
    let path = Path::new(FIXTURES).join("events.out.tfevents.reference");
    let read = read_events(&path).unwrap();
    assert_eq!(read, events());
    assert_eq!(
        read[2].scalar_values(),
        vec![("train/loss", 0.123456789f64 as f32), ("train/lr", 1e-4)]
    );
    assert!(matches!(read[1].kind, Some(EventKind::SessionLog(_))));

    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let flipped = dir.path().join("flipped");
    bytes[30] ^= 1;
    std::fs::write(&flipped, &bytes).unwrap();
    let err = read_events(&flipped).unwrap_err().to_string();
    assert!(err.contains("CRC"), "{err}");
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() - 3]).unwrap();
    assert!(read_events(&truncated).is_err());
}
