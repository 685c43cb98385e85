"""A CIFAR-10-C-style external set made with Pillow and NumPy only (no msnet code), for `msnet evaluate --external`.

The first `--per-class` test images of each class of the shared CIFAR-10 copy (sorted file names), stored as
CIFAR-10-C stores its corruptions: `<corruption>.npy`, uint8 [5 * n, 32, 32, 3], severities 1-5 in order,
and `labels.npy` [5 * n]. Corruptions: `jpeg_compression` at CIFAR-10-C's qualities (80, 65, 58, 50, 40),
`jpeg_compression_imagenet_c` at ImageNet-C's (25, 18, 15, 10, 7) and `gaussian_noise` at CIFAR-10-C's
sigmas (0.04, 0.06, 0.08, 0.09, 0.10 of the 0-1 range, seeded). Pixels only: no bitstream reaches msnet.

  python benchmarks/make_cifar10c_like.py --out /tmp/c10c [--per-class 200]
  msnet evaluate --workdir=W --external=/tmp/c10c --layout=cifar10-c --name=cifar10c-pillow-2k
"""

from __future__ import annotations

import argparse
import io
import pathlib
import tarfile

import numpy as np
import PIL.Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SOURCE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "test.tar.gz"


def _jpeg(images: np.ndarray, quality: int) -> np.ndarray:
  out = []
  for im in images:
    buf = io.BytesIO()
    PIL.Image.fromarray(im).save(buf, "JPEG", quality=quality)
    out.append(np.asarray(PIL.Image.open(buf)))
  return np.stack(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, required=True)
  parser.add_argument("--per-class", type=int, default=200)
  parser.add_argument("--source", type=pathlib.Path, default=SOURCE, help="CIFAR-10 test.tar.gz (test/<class>/*.jpg)")
  args = parser.parse_args()
  images, labels, taken = [], [], dict.fromkeys(CLASSES, 0)
  with tarfile.open(args.source) as tar:
    members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
    for m in members:
      cls = m.name.split("/")[1]
      if taken[cls] < args.per_class:
        taken[cls] += 1
        images.append(np.asarray(PIL.Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
        labels.append(CLASSES.index(cls))
  x = np.stack(images)
  rng = np.random.default_rng(0)
  sets = {
      "jpeg_compression": [_jpeg(x, q) for q in (80, 65, 58, 50, 40)],
      "jpeg_compression_imagenet_c": [_jpeg(x, q) for q in (25, 18, 15, 10, 7)],
      "gaussian_noise": [(np.clip(x / 255.0 + rng.normal(0.0, s, x.shape), 0.0, 1.0) * 255.0).round().astype(np.uint8)
                         for s in (0.04, 0.06, 0.08, 0.09, 0.10)],
  }
  args.out.mkdir(parents=True, exist_ok=True)
  for name, severities in sets.items():
    np.save(args.out / f"{name}.npy", np.concatenate(severities))
  np.save(args.out / "labels.npy", np.tile(np.asarray(labels), 5))
  print(f"{len(x)} images x 5 severities x {len(sets)} corruptions -> {args.out}")


if __name__ == "__main__":
  main()
