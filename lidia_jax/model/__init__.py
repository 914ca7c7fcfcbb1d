"""LIDIA network (flax.linen, NDHWC): `build_model(config.model)`."""

from lidia_jax.model.flops import count_params, model_cost
from lidia_jax.model.lidia import LIDIA, build_model
from lidia_jax.model.partitioning import LOGICAL_AXIS_RULES, logical_axis_rules

__all__ = ["LIDIA", "build_model", "count_params", "model_cost", "LOGICAL_AXIS_RULES",
           "logical_axis_rules"]
