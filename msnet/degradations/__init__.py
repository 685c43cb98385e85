"""Exact, deterministic image degradations: spec grammar, real codecs, bitstream reading, quality bins.

`apply("blur:1@4+jpeg:10", image, seed=0, index=i)` -> (uint8 HxWx3, info dict); see `spec` for the grammar.
"""

from msnet.degradations import codecs
from msnet.degradations.apply import apply, as_rgb_uint8, psnr
from msnet.degradations.bins import BinRule, bin_of, bin_of_bitstream, parse_bin_rule
from msnet.degradations.bitstream import estimate_jpeg_quality
from msnet.degradations import bins
from msnet.degradations.spec import (Avif, Blur, Clean, Jp2k, Jp2kPsnr, Jpeg, Jxl, Noise, Op, Resize, Shift, Spec, WebP,
                                     parse, spec_slug)

# Bumped whenever `apply` gives other pixels for the same spec, so that `msnet degrade` redoes shards
# written before (their fingerprints include it). 2: `jp2k:R` by OpenJPEG's rate allocation in one
# encode, no longer a search over the PSNR level.
PIXELS_VERSION = 2

__all__ = [
    "PIXELS_VERSION", "codecs",
    "apply", "as_rgb_uint8", "psnr",
    "BinRule", "bin_of", "bin_of_bitstream", "parse_bin_rule",
    "estimate_jpeg_quality",
    "Avif", "Blur", "Clean", "Jp2k", "Jp2kPsnr", "Jpeg", "Jxl", "Noise", "Op", "Resize", "Shift", "Spec", "WebP", "parse",
    "spec_slug", "bins",
]
