"""Bipartite matching of predictions to targets (pure JAX, jittable)."""

from lidia_jax.matching.hungarian import hungarian

__all__ = ["hungarian"]
