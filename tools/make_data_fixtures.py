"""Writes the fixtures of tests/data.rs under tests/fixtures/data/ (about 20 KB in all).

- cmyk.jpg: a CMYK JPEG (Adobe marker) with four known colour quadrants; the Rust image stack
  cannot write CMYK, Pillow can.
- resize_input.png + resize_expected.safetensors: a 47x30 RGB image and the torchvision
  preprocessing of diffusers' train_text_to_image.py (Resize(16, BILINEAR or BICUBIC) of the
  shorter side, CenterCrop(16), ToTensor, Normalize([0.5], [0.5])). torchvision is not in the
  reference stack, so its PIL path is reproduced: new long side int(16 * 47 / 30) = 25, crop
  left int(round((25 - 16) / 2)) = 4 (Python rounds ties to even), PIL Image.resize.
- hf/: a Hugging Face-style parquet dataset (datasets' layout and `huggingface` schema metadata):
  data/train-0000{0,1}-of-00002.parquet (snappy, zstd) and data/validation-00000-of-00001.parquet,
  3 classes, 2 rows per row group, tiny PNG/JPEG images whose colour encodes the class.
- hf_text/: a captioned parquet dataset (`image` as plain binary, `text`), as text-to-image
  datasets on the Hub are.

Usage: source tools/setup.sh && pip install pyarrow==26.0.1 && python tools/make_data_fixtures.py
Pinned: pillow 12.0.0, numpy 2.4.6, pyarrow 26.0.1, safetensors 0.8.0.
"""
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "data"

# Quadrant colours of cmyk.jpg, as CMYK and as the RGB a naive conversion gives.
CMYK_QUADRANTS = [(0, 255, 255, 0), (255, 0, 255, 0), (255, 255, 0, 0), (0, 0, 0, 0)]


def write_cmyk():
    img = Image.new("CMYK", (32, 32))
    for i, colour in enumerate(CMYK_QUADRANTS):
        x, y = (i % 2) * 16, (i // 2) * 16
        img.paste(colour, (x, y, x + 16, y + 16))
    img.save(OUT / "cmyk.jpg", quality=95)


def torchvision_like(img: Image.Image, size: int, resample) -> np.ndarray:
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    resized = img.resize((new_w, new_h), resample)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    cropped = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return np.ascontiguousarray((cropped.transpose(2, 0, 1) - 0.5) / 0.5)


def write_resize():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:30, 0:47].astype(np.float32)
    smooth = np.stack([x / 46, y / 29, 0.5 + 0.5 * np.sin(x / 5) * np.cos(y / 4)], axis=-1)
    noisy = np.clip(smooth + rng.normal(0, 0.05, smooth.shape), 0, 1)
    img = Image.fromarray((noisy * 255).round().astype(np.uint8), "RGB")
    img.save(OUT / "resize_input.png")
    save_file(
        {
            "bilinear": torchvision_like(img, 16, Image.BILINEAR),
            "bicubic": torchvision_like(img, 16, Image.BICUBIC),
        },
        str(OUT / "resize_expected.safetensors"),
    )


HF_CLASSES = ["apple_pie", "baby_back_ribs", "baklava"]
HF_COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def encoded(label: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), HF_COLOURS[label]).save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, labels, compression: str, first_row: int):
    images = [
        {"bytes": encoded(label, "PNG" if i % 2 else "JPEG"), "path": f"{first_row + i}.jpg"}
        for i, label in enumerate(labels)
    ]
    features = {
        "image": {"_type": "Image"},
        "label": {"names": HF_CLASSES, "_type": "ClassLabel"},
    }
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("label", pa.int64()),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    table = pa.Table.from_pylist([{"image": im, "label": lb} for im, lb in zip(images, labels)], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=2, compression=compression)


def write_hf():
    data = OUT / "hf" / "data"
    # Class counts over the train split: 4, 3, 2 (labels ordered so that limits cross shards).
    write_shard(data / "train-00000-of-00002.parquet", [0, 1, 0, 2, 1], "snappy", 0)
    write_shard(data / "train-00001-of-00002.parquet", [0, 0, 1, 2], "zstd", 5)
    write_shard(data / "validation-00000-of-00001.parquet", [2, 1, 0], "snappy", 0)


def write_hf_text():
    rows = [{"image": encoded(i, "PNG"), "text": caption} for i, caption in enumerate(["a red dish", "a green dish", "a blue dish"])]
    path = OUT / "hf_text" / "data" / "train-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("image", pa.binary()), ("text", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    write_cmyk()
    write_resize()
    write_hf()
    write_hf_text()
    print("wrote", sorted(str(p.relative_to(OUT)) for p in OUT.rglob("*") if p.is_file()))
