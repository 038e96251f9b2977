"""Builds the TensorBoard fixture under tests/fixtures/tensorboard/, for tests/tensorboard.rs: an
event file written by TensorBoard's own record writer and protobuf classes, holding the events
difftune writes (file version, session start, a step's scalars, a PNG image summary) with fixed
wall times, so the Rust writer can be compared byte for byte.

Also, given a difftune run folder, checks that TensorBoard's own loader reads its event files and
prints the scalars it finds per tag (a manual check of a real run's log):
  python tools/make_tensorboard_fixtures.py --check runs/NAME

Usage: source tools/setup.sh && python tools/make_tensorboard_fixtures.py
Pinned: tensorboard 2.21.0 (tools/requirements.txt).
"""
import argparse
import pathlib
import struct
import zlib

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tensorboard"


def tiny_png() -> bytes:
    """A 3x2 RGB PNG, built by hand so the fixture does not depend on an encoder's choices."""
    raw = b"".join(b"\x00" + bytes(range(9 * y, 9 * y + 9)) for y in range(2))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 3, 2, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def write_fixture() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    png = tiny_png()
    (OUT / "image.png").write_bytes(png)
    events = [
        event_pb2.Event(wall_time=1700000000.25, file_version="brain.Event:2"),
        event_pb2.Event(wall_time=1700000000.25, step=7,
                        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)),
        event_pb2.Event(wall_time=1700000001.5, step=8, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag="train/loss", simple_value=0.123456789),
            summary_pb2.Summary.Value(tag="train/lr", simple_value=1e-4),
        ])),
        event_pb2.Event(wall_time=1700000002.75, step=8, summary=summary_pb2.Summary(value=[
            summary_pb2.Summary.Value(tag="validation/00", image=summary_pb2.Summary.Image(
                height=2, width=3, colorspace=3, encoded_image_string=png)),
        ])),
    ]
    with open(OUT / "events.out.tfevents.reference", "wb") as f:
        writer = RecordWriter(f)
        for event in events:
            writer.write(event.SerializeToString())
        writer.flush()


def check_run(run: pathlib.Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        print(f"{tag}: {len(steps)} values, steps {steps[0]}..{steps[-1]}")
    for tag in acc.Tags()["images"]:
        print(f"{tag}: {len(acc.Images(tag))} images")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", type=pathlib.Path, help="a difftune run folder to read")
    args = parser.parse_args()
    if args.check:
        check_run(args.check)
    else:
        write_fixture()
