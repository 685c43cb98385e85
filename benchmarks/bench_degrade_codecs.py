"""Single-thread degradation throughput: msnet.degradations.apply beside a plain Pillow/NumPy loop.

  python benchmarks/bench_degrade_codecs.py [--reps 5] [--n32 200] [--n224 8] [--avif-speeds 6,7,8,9,10] [--out FILE]

Images: CIFAR-10 test JPEGs decoded to 32x32, and at 224x224 two sets: 7x7 mosaics of CIFAR images
(sharp, busy) and x7 bicubic upsamples (smooth). Every case runs once per round and rounds interleave,
so machine load hits all cases alike; the table gives the median over rounds in images/s per core and
the mean PSNR / bpp reached, so the two columns can be checked to do the same work.

The plain loop: Pillow `save('JPEG', quality=Q, subsampling=2)` + open; Pillow `save('JPEG2000',
quality_mode='rates' | 'dB', irreversible=True, mct=1, no_jp2=True)` + open, with msnet's resolutions and
comment: the same OpenJPEG encode as msnet's (bit-equal with the same libopenjp2 build); NumPy float64 noise;
Pillow `ImageFilter.GaussianBlur` (box-filter approximation of a Gaussian, not the same pixels); Pillow
`save('WEBP', quality=Q, method=4)` and `save('AVIF', quality=Q, speed=msnet's, subsampling='4:2:0')` + open;
JPEG XL has no Pillow plugin, so its plain loop is imagecodecs' `jpegxl_encode(distance=D)` with its defaults.

`--avif-speeds`: AVIF at each libaom speed on the 32x32 set (img/s per core, PSNR, bpp at three qualities),
the measurement `codecs.avif.SPEED` is chosen from.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")  # single-thread numbers, as in a degrade worker

import argparse
import io
import math
import pathlib
import platform
import sys
import tarfile
import time

import imagecodecs
import numpy as np
import PIL
from PIL import Image, ImageFilter

from msnet import degradations as D
from msnet.degradations import codecs
from msnet.degradations.codecs import avif, openjpeg, webp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_results  # noqa: E402

_REPO = pathlib.Path(__file__).resolve().parents[1]
_CIFAR = [_REPO / "msnet/data/embedded/cifar10/test.tar.gz", _REPO.parent / "shared/data/cifar10/test.tar.gz"]
SPECS = ("jpeg:10", "jpeg:90", "jp2k:10", "jp2k:100", "jp2k_psnr:30", "webp:10", "webp:75", "avif:10", "avif:60",
         "jxl:8", "jxl:1", "noise:10", "blur:1@4")
AVIF_QUALITIES = (10, 30, 60)


def load_images(path: pathlib.Path, n32: int, n224: int) -> dict[str, list[np.ndarray]]:
  with tarfile.open(path) as tf:
    files = [tf.extractfile(m).read() for m in tf if m.isfile() and m.name.endswith(".jpg")]
  step = len(files) // max(n32, 49 * n224)
  pool = [np.asarray(Image.open(io.BytesIO(files[i * step])).convert("RGB")) for i in range(max(n32, 49 * n224))]
  mosaics = [np.concatenate([np.concatenate(pool[k * 49 + r * 7:k * 49 + r * 7 + 7], 1) for r in range(7)], 0)
             for k in range(n224)]
  upsampled = [np.asarray(Image.fromarray(pool[k]).resize((224, 224), Image.BICUBIC)) for k in range(n224)]
  return {"32": pool[:n32], "224-mosaic": mosaics, "224-upsampled": upsampled}


def _pil_roundtrip(img: np.ndarray, **save_kw) -> tuple[np.ndarray, int]:
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, **save_kw)
  return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), buf.tell()


def plain(spec: str, img: np.ndarray, index: int) -> tuple[np.ndarray, int | None]:
  """The same degradation written the obvious way with Pillow / NumPy -> (pixels, encoded bytes or None)."""
  op = D.parse(spec).ops[0]
  if isinstance(op, D.Jpeg):
    return _pil_roundtrip(img, format="JPEG", quality=op.quality, subsampling=2)
  if isinstance(op, (D.Jp2k, D.Jp2kPsnr)):
    mode, layer = ("rates", op.ratio) if isinstance(op, D.Jp2k) else ("dB", op.psnr)
    return _pil_roundtrip(img, format="JPEG2000", quality_mode=mode, quality_layers=[layer], irreversible=True,
                          mct=1, no_jp2=True, num_resolutions=openjpeg.num_resolutions(*img.shape[:2]),
                          comment=openjpeg.COMMENT.decode())
  if isinstance(op, D.WebP):
    return _pil_roundtrip(img, format="WEBP", quality=op.quality, method=webp.METHOD)
  if isinstance(op, D.Avif):
    return _pil_roundtrip(img, format="AVIF", quality=op.quality, speed=avif.SPEED, subsampling="4:2:0")
  if isinstance(op, D.Jxl):
    data = imagecodecs.jpegxl_encode(img, distance=op.distance)
    return imagecodecs.jpegxl_decode(data), len(data)
  if isinstance(op, D.Noise):
    rng = np.random.default_rng([0, index])
    return np.clip(np.rint(img + rng.normal(0.0, op.sigma, img.shape)), 0, 255).astype(np.uint8), None
  if isinstance(op, D.Blur):
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=op.sigma))), None
  raise ValueError(spec)


def run_case(impl: str, spec: str, images: list[np.ndarray]) -> tuple[float, float, float | None]:
  """One pass over `images` -> (seconds, mean PSNR, mean bpp or None)."""
  psnrs, bpps = [], []
  t0 = time.perf_counter()
  for i, img in enumerate(images):
    if impl == "msnet":
      out, info = D.apply(spec, img, index=i)
      nbytes = None if info["bpp"] is None else info["bpp"] * img.shape[0] * img.shape[1] / 8
    else:
      out, nbytes = plain(spec, img, i)
    psnrs.append(D.psnr(img, out))
    if nbytes is not None:
      bpps.append(nbytes * 8 / (img.shape[0] * img.shape[1]))
  seconds = time.perf_counter() - t0
  finite = [p for p in psnrs if math.isfinite(p)]
  return seconds, float(np.mean(finite)) if finite else math.inf, float(np.mean(bpps)) if bpps else None


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--reps", type=int, default=5, help="interleaved rounds; the median is reported")
  ap.add_argument("--n32", type=int, default=200, help="32x32 images per round")
  ap.add_argument("--n224", type=int, default=8, help="224x224 images per set and round")
  ap.add_argument("--cifar", type=pathlib.Path, default=next((p for p in _CIFAR if p.exists()), _CIFAR[0]))
  ap.add_argument("--avif-speeds", default="6,7,8,9,10", help="libaom speeds to compare on the 32x32 set")
  ap.add_argument("--out", type=pathlib.Path, default=_REPO / "benchmarks/results/degrade_codecs.json")
  args = ap.parse_args(argv)

  sets = load_images(args.cifar, args.n32, args.n224)
  cases = [(name, spec, impl) for name in sets for spec in SPECS for impl in ("msnet", "plain")]
  times: dict[tuple, list[float]] = {c: [] for c in cases}
  quality: dict[tuple, tuple] = {}
  for name, spec, impl in cases:  # warm-up: imports, caches, first-call costs
    run_case(impl, spec, sets[name][:2])
  for _ in range(args.reps):
    for case in cases:
      seconds, p, bpp = run_case(case[2], case[1], sets[case[0]])
      times[case].append(seconds)
      quality[case] = (p, bpp)

  rows = []
  for name, spec, impl in cases:
    n = len(sets[name])
    rate = n / float(np.median(times[(name, spec, impl)]))
    p, bpp = quality[(name, spec, impl)]
    rows.append(dict(set=name, spec=spec, impl=impl, images=n, img_per_s=rate, mean_psnr=p, mean_bpp=bpp))

  print(f"{'set':<14} {'spec':<13} {'msnet img/s':>12} {'plain img/s':>12} {'speedup':>8}   "
        f"{'PSNR msnet/plain':>17}   {'bpp msnet/plain':>16}")
  for m, q in zip(rows[0::2], rows[1::2]):
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    print(f"{m['set']:<14} {m['spec']:<13} {m['img_per_s']:>12.0f} {q['img_per_s']:>12.0f} "
          f"{m['img_per_s'] / q['img_per_s']:>7.2f}x   {m['mean_psnr']:>8.2f}/{q['mean_psnr']:<8.2f}   "
          f"{fmt(m['mean_bpp']):>7}/{fmt(q['mean_bpp']):<8}")

  speeds = avif_speeds([int(s) for s in args.avif_speeds.split(",") if s], sets["32"], args.reps)
  write_results(args.out, dict(
      reps=args.reps, threads="1 (OPENBLAS/OMP/MKL_NUM_THREADS=1, imagecodecs numthreads=1)",
      machine=dict(platform=platform.platform(), python=platform.python_version(), cpus=os.cpu_count()),
      versions=dict(imagecodecs=imagecodecs.__version__, **codecs.versions(), openjpeg_c_api=openjpeg.version(),
                    pillow=PIL.__version__, numpy=np.__version__),
      rows=rows, avif_speeds=speeds, avif_speed_chosen=avif.SPEED))


def avif_speeds(speeds: list[int], images: list[np.ndarray], reps: int) -> list[dict]:
  """AVIF encode + decode at each libaom speed and a few qualities: the median img/s per core, PSNR, bpp."""
  rows = []
  for q in AVIF_QUALITIES:
    for speed in speeds:
      seconds, psnrs, bpps = [], [], []
      for _ in range(reps):
        psnrs, bpps = [], []
        t0 = time.perf_counter()
        for img in images:
          data = imagecodecs.avif_encode(img, level=q, speed=speed, numthreads=1,
                                         pixelformat=imagecodecs.AVIF.PIXEL_FORMAT.YUV420,
                                         codec=imagecodecs.AVIF.CODEC_CHOICE.AOM)
          psnrs.append(D.psnr(img, avif.decode(data)))
          bpps.append(len(data) * 8 / (img.shape[0] * img.shape[1]))
        seconds.append(time.perf_counter() - t0)
      rows.append(dict(quality=q, speed=speed, img_per_s=len(images) / float(np.median(seconds)),
                       mean_psnr=float(np.mean(psnrs)), mean_bpp=float(np.mean(bpps))))
  print(f"\nAVIF on {len(images)} 32x32 images: {'quality':>7} {'speed':>5} {'img/s':>8} {'PSNR':>6} {'bpp':>6}")
  for r in rows:
    print(f"{'':<33}{r['quality']:>7} {r['speed']:>5} {r['img_per_s']:>8.0f} {r['mean_psnr']:>6.2f} {r['mean_bpp']:>6.2f}")
  return rows


if __name__ == "__main__":
  main()
