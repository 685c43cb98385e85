"""Web image files for `msnet predict`: CIFAR-10 test images written by the encoders a web stack uses.

  python benchmarks/make_web_files.py --out DIR

Four test images of the shared CIFAR-10 copy (cat 0001, ship 0002, horse 0003, truck 0004, as stored at JPEG
q75) written with Pillow's own WebP and AVIF plugins (not msnet's encode path) at quality 3 / 30 / 90 and
lossless WebP, with libjxl (imagecodecs; Pillow has no JPEG XL plugin) at distance 12 / 2 and lossless, an
AVIF carrying EXIF orientation 6 (rotated on display), and suffixes that lie (a WebP named .jpg).
"""

from __future__ import annotations

import argparse
import io
import pathlib
import tarfile

import imagecodecs
import numpy as np
from PIL import Image

_REPO = pathlib.Path(__file__).resolve().parents[1]
NAMES = ("test/cat/0001.jpg", "test/ship/0002.jpg", "test/horse/0003.jpg", "test/truck/0004.jpg")


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", type=pathlib.Path, required=True)
  ap.add_argument("--cifar", type=pathlib.Path, default=_REPO.parent / "shared/data/cifar10/test.tar.gz")
  args = ap.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  with tarfile.open(args.cifar) as tf:
    members = {m.name.removeprefix("./"): m for m in tf if m.isfile()}
    images = {n: Image.open(io.BytesIO(tf.extractfile(members[n]).read())).convert("RGB") for n in NAMES}
  for name, im in images.items():
    stem = "-".join(pathlib.Path(name).with_suffix("").parts[-2:])
    for q in (3, 30, 90):
      im.save(args.out / f"{stem}-webp-q{q}.webp", "WEBP", quality=q, method=4)
      im.save(args.out / f"{stem}-avif-q{q}.avif", "AVIF", quality=q, speed=8, subsampling="4:2:0")
    im.save(args.out / f"{stem}-webp-lossless.webp", "WEBP", lossless=True)
    pixels = np.asarray(im)
    for d in (12, 2):
      (args.out / f"{stem}-jxl-d{d}.jxl").write_bytes(imagecodecs.jpegxl_encode(pixels, distance=d, effort=7))
    (args.out / f"{stem}-jxl-lossless.jxl").write_bytes(imagecodecs.jpegxl_encode(pixels, lossless=True))
  cat = images[NAMES[0]]
  exif = Image.Exif()
  exif[0x0112] = 6
  cat.save(args.out / "cat-0001-avif-q30-orientation6.avif", "AVIF", quality=30, speed=8, exif=exif)
  buffer = io.BytesIO()
  cat.save(buffer, "WEBP", quality=3)
  (args.out / "cat-0001-webp-q3-named.jpg").write_bytes(buffer.getvalue())
  print(f"wrote {len(list(args.out.iterdir()))} files to {args.out}")


if __name__ == "__main__":
  main()
