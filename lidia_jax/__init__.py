"""lidia_jax: LIDIA (MICCAI 2024) liver tumour diagnosis on multi-phase CT, in JAX/Flax."""

__version__ = "0.1.0"
