"""msnet: master-slave CNNs robust to image degradations (Ghosh et al. 2018), in JAX/Flax."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
  """`msnet.load` and `msnet.Predictor` import JAX on first use, so `import msnet` (the CLI's --help) stays fast."""
  if name in ("load", "Predictor"):
    from msnet import predict  # noqa: PLC0415
    return getattr(predict, name)
  raise AttributeError(f"module 'msnet' has no attribute {name!r}")
