"""Logical axis names of the parameters and their mapping to mesh axes.

Every kernel is created with `nn.with_logical_partitioning`, so `model.init` returns
`nn.LogicallyPartitioned` boxes. How to use them:

  variables = model.init(rng, image, phase_mask)            # boxed leaves
  logical = nn.get_partition_spec(variables)                # PartitionSpec of logical names
  shardings = nn.logical_to_mesh_sharding(logical, mesh, LOGICAL_AXIS_RULES)
  params = nn.meta.unbox(variables)["params"]               # plain arrays (what optax sees)
  model.apply({"params": params}, image, phase_mask)        # apply accepts boxed or plain

(`nn.meta.unbox` also unwraps a jax.eval_shape of init into plain ShapeDtypeStructs.) Leaves
without a box (e.g. conv biases created inside conv.Conv) get PartitionSpec() = replicated.

Logical axes:
  conv_in, conv_out   3-D conv kernels [kz, ky, kx, conv_in, conv_out]
  embed               transformer width (hidden_dim)
  qkv                 attention projections' output/input width
  mlp                 FFN / MLP hidden width
  classes, mask, acl  head outputs (K+1 logits, mask_dim, acl_dim)
  pooled              mask-pooled intensity statistics (model/mask_pooling.py)
  queries             the learnable query tables
  norm                normalisation scales/biases
"""

from typing import Tuple

import jax

_REPLICATED = (
    ("conv_in", None), ("conv_out", None), ("embed", None), ("qkv", None), ("mlp", None),
    ("classes", None), ("mask", None), ("acl", None), ("queries", None), ("norm", None),
    ("pooled", None),
)

# FSDP (ZeRO-3 style): shard the largest dimension of every big kernel over the "data" mesh
# axis; small vectors stay replicated. jit requires the mesh's "data" size to divide every
# sharded dimension (channel counts are powers of two times base_features in every config).
_FSDP = (
    ("conv_in", None), ("conv_out", "data"), ("embed", None), ("qkv", "data"), ("mlp", "data"),
    ("classes", None), ("mask", None), ("acl", None), ("queries", None), ("norm", None),
    ("pooled", None),
)

# The rules table the train step maps logical names with (param_sharding "logical"): FSDP.
LOGICAL_AXIS_RULES = _FSDP

_BY_MODE = {"replicated": _REPLICATED, "fsdp": _FSDP, "logical": _FSDP}


def logical_axis_rules(param_sharding: str = "logical") -> Tuple[Tuple[str, str | None], ...]:
    """Rules for `nn.logical_to_mesh_sharding` by config.train.param_sharding: "replicated"
    maps every logical axis to None; "fsdp" / "logical" give LOGICAL_AXIS_RULES."""
    if param_sharding not in _BY_MODE:
        raise ValueError(f"config.train.param_sharding={param_sharding!r}: expected one of "
                         f"{sorted(_BY_MODE)}")
    return _BY_MODE[param_sharding]


def batch_split_in_type(x):
    """The mesh axis that x's leading (batch) axis is split over in its type, or None.

    Only sharding in types (an Explicit mesh axis) shows here; on Auto meshes (the trainer's)
    the partitioner decides and this is None.
    """
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", ())
    return spec[0] if len(spec) else None
