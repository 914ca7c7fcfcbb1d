"""LIDIA network (flax.linen, NDHWC).

  model = build_model(config.model)                       # lidia.LIDIA
  variables = model.init(rng, image, phase_mask)          # params in logical-partitioning boxes
  params = nn.meta.unbox(variables)["params"]             # plain arrays
  out = model.apply({"params": params}, image, phase_mask, train=True)

Modules: fusion (ifm | early | hemis | convlstm), encoder (nnU-Net PlainConvUNet stages),
pixel_decoder (FPN), transformer_decoder (3-D masked attention, heads), unet_decoder (per-voxel
head), position (3-D sine encoding), layers (conv block, instance norm), partitioning (logical
axis rules), flops (parameter count, XLA FLOPs).
"""

from lidia_jax.model.flops import count_params, model_cost
from lidia_jax.model.lidia import LIDIA, build_model
from lidia_jax.model.partitioning import LOGICAL_AXIS_RULES, logical_axis_rules

__all__ = ["LIDIA", "build_model", "count_params", "model_cost", "LOGICAL_AXIS_RULES",
           "logical_axis_rules"]
