"""Exact, deterministic image degradations: spec grammar, real codecs, bitstream reading, quality bins.

`apply("blur:1@4+jpeg:10", image, seed=0, index=i)` -> (uint8 HxWx3, info dict); see `spec` for the grammar.
"""

from msnet.degradations.apply import apply, as_rgb_uint8, psnr
from msnet.degradations.bins import BinRule, bin_of, bin_of_bitstream, parse_bin_rule
from msnet.degradations.bitstream import estimate_jpeg_quality
from msnet.degradations.spec import Blur, Clean, Jp2k, Jp2kPsnr, Jpeg, Noise, Op, Spec, parse, spec_slug

__all__ = [
    "apply", "as_rgb_uint8", "psnr",
    "BinRule", "bin_of", "bin_of_bitstream", "parse_bin_rule",
    "estimate_jpeg_quality",
    "Blur", "Clean", "Jp2k", "Jp2kPsnr", "Jpeg", "Noise", "Op", "Spec", "parse", "spec_slug",
]
