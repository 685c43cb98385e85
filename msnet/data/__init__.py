"""Sources, offline pre-degradation into ArrayRecord shards, and Grain loaders.

Only `open_shards` is imported here: the degrade workers import this package and must not pull in
JAX or Grain (`msnet.data.loader` does).
"""

from msnet.data.shards import open_shards

__all__ = ["open_shards"]
