"""msnet: master-slave CNNs robust to image degradations (Ghosh et al. 2018), in JAX/Flax."""

__version__ = "0.1.0"
