"""Builds the JPEG decoding fixtures under tests/fixtures/jpeg/, for tests/fid_parity.rs and
tests/data.rs: small JPEGs covering what real datasets hold, Pillow's decoded pixels of each, and
pytorch-fid's features and FID of the folder.

Cases (images/*.jpg, odd sizes so that partial MCUs and edge upsampling are exercised):
  s444, s422, s420       RGB at 4:4:4, 4:2:2 and 4:2:0 chroma subsampling (Pillow's encoder)
  progressive            progressive 4:2:0
  restart                baseline 4:2:0 with a restart marker after every MCU
  gray                   one-component (Pillow mode L)
  cmyk                   four-component Adobe CMYK (Pillow's encoder: inverted, transform 0)
  ycck                   four-component Adobe YCCK (libturbojpeg's tjCompress2 from CMYK pixels;
                         needs Debian's libturbojpeg0 for ctypes: apt-get install libturbojpeg0)
  exif_rot6              4:2:0 with an EXIF orientation tag of 6 (rotate 90 degrees clockwise)

Outputs (tests/fixtures/jpeg/):
  images/<case>.jpg           the JPEGs (the FID folder)
  pillow/<case>.png           Image.open(jpg).convert("RGB"), as pytorch-fid reads it (no EXIF
                              rotation), saved losslessly
  pillow/exif_rot6_transposed.png   ImageOps.exif_transpose of the same, as training rotates
  reference.safetensors       pytorch-fid features of images/ for dims 64/192/768/2048 (float32,
                              rows in sorted file-name order) and the FID between images/ and
                              tests/fixtures/fid/b per dims, with the random-weight Inception of
                              tools/make_fid_fixtures.py (conv formula + its BatchNorm fixture)

Usage: source tools/setup.sh && python tools/make_jpeg_fixtures.py
Pinned: pillow 12.0.0 (libjpeg-turbo 3.1.2), pytorch-fid 0.3.0, torch 2.11.0, numpy 2.4.6.
"""
import ctypes
import os
import shutil
import sys

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fid_fixtures as fidfix  # noqa: E402
from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
OUT = os.path.join(ROOT, "jpeg")
FID_B = os.path.join(ROOT, "fid", "b")


def ycck_jpeg(cmyk: np.ndarray) -> bytes:
    """TurboJPEG 2.x compresses TJPF_CMYK pixels as YCCK (jpeg_set_colorspace(JCS_YCCK))."""
    tj = ctypes.CDLL("libturbojpeg.so.0")
    tj.tjInitCompress.restype = ctypes.c_void_p
    handle = ctypes.c_void_p(tj.tjInitCompress())
    h, w, _ = cmyk.shape
    src = np.ascontiguousarray(cmyk, dtype=np.uint8)
    buf = ctypes.POINTER(ctypes.c_ubyte)()
    size = ctypes.c_ulong(0)
    tjpf_cmyk, tjsamp_444 = 11, 0
    rc = tj.tjCompress2(handle, src.ctypes.data_as(ctypes.c_void_p), w, w * 4, h, tjpf_cmyk,
                        ctypes.byref(buf), ctypes.byref(size), tjsamp_444, 90, 0)
    assert rc == 0, "tjCompress2 failed"
    data = ctypes.string_at(buf, size.value)
    tj.tjFree(buf)
    tj.tjDestroy(handle)
    return data


def pattern(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Colour gradients, a stripe and pixel noise: every DCT frequency and both chroma channels
    carry signal, so rounding in the IDCT, upsampling or colour conversion would show."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    img = np.stack([255 * xx / width, 255 * yy / height, 128 + 100 * np.sin(xx / 3 + yy / 5)], -1)
    img += rng.normal(0, 25, size=img.shape)
    return Image.fromarray(np.clip(img, 0, 255).round().astype(np.uint8))


def write_cases(rng: np.random.Generator) -> list:
    os.makedirs(os.path.join(OUT, "images"))
    os.makedirs(os.path.join(OUT, "pillow"))
    rgb = lambda w, h: pattern(rng, w, h)  # noqa: E731
    cases = {
        "s444": (rgb(45, 37), dict(quality=90, subsampling=0)),
        "s422": (rgb(47, 33), dict(quality=90, subsampling=1)),
        "s420": (rgb(53, 41), dict(quality=85, subsampling=2)),
        "progressive": (rgb(61, 45), dict(quality=85, subsampling=2, progressive=True)),
        "restart": (rgb(40, 35), dict(quality=85, subsampling=2, restart_marker_blocks=1)),
        "gray": (rgb(39, 29).convert("L"), dict(quality=90)),
        "cmyk": (rgb(35, 30).convert("CMYK"), dict(quality=90)),
    }
    exif = Image.Exif()
    exif[0x0112] = 6
    cases["exif_rot6"] = (rgb(50, 30), dict(quality=90, subsampling=2, exif=exif.tobytes()))
    for name, (img, opts) in cases.items():
        img.save(os.path.join(OUT, "images", f"{name}.jpg"), **opts)
    # TurboJPEG takes Adobe's inverted CMYK (0 = full ink), as Pillow writes it.
    cmyk = 255 - np.asarray(rgb(36, 28).convert("CMYK"))
    with open(os.path.join(OUT, "images", "ycck.jpg"), "wb") as f:
        f.write(ycck_jpeg(cmyk))
    names = sorted(list(cases) + ["ycck"])
    for name in names:
        path = os.path.join(OUT, "images", f"{name}.jpg")
        with Image.open(path) as im:
            print(f"{name}: mode {im.mode}, {im.size}, adobe_transform {im.info.get('adobe_transform')}")
            im.convert("RGB").save(os.path.join(OUT, "pillow", f"{name}.png"))
            if name == "exif_rot6":
                ImageOps.exif_transpose(im).convert("RGB").save(
                    os.path.join(OUT, "pillow", f"{name}_transposed.png"))
    return [os.path.join(OUT, "images", f"{n}.jpg") for n in names]


def fid_state() -> dict:
    """The Inception of tools/make_fid_fixtures.py: formula convs + its calibrated BatchNorm."""
    state = fidfix.initial_state_dict()
    state.update(load_file(os.path.join(ROOT, "fid", "inception_bn.safetensors")))
    return state


def main() -> None:
    rng = np.random.default_rng(13)
    shutil.rmtree(OUT, ignore_errors=True)
    files = write_cases(rng)
    files_b = sorted(os.path.join(FID_B, f) for f in os.listdir(FID_B))
    state = fid_state()
    ref = {}
    for dims in fidfix.DIMS:
        fa = fidfix.pytorch_fid_features(state, files, dims)
        fb = fidfix.pytorch_fid_features(state, files_b, dims)
        ref[f"features_{dims}"] = torch.from_numpy(fa.astype(np.float32))
        fid = calculate_frechet_distance(*fidfix.stats(fa), *fidfix.stats(fb))
        ref[f"fid_{dims}"] = torch.tensor([float(fid)], dtype=torch.float64)
        print(f"dims {dims}: FID {fid:.6f}")
    save_file(ref, os.path.join(OUT, "reference.safetensors"))


if __name__ == "__main__":
    with torch.no_grad():
        main()
