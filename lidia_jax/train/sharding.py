"""Device mesh and shardings for the train state and the batch.

The mesh axes come from `config.train.mesh_axes`, e.g. `(("data", -1),)` (all devices on one
batch-parallel axis) or `(("data", 2), ("model", 4))`. Parameters are placed by
`config.train.param_sharding`:
  replicated  every parameter on every device (data parallelism; the default);
  fsdp        each array's largest axis divisible by the `data` axis size is split over it
              (fully-sharded data parallelism; optimiser moments follow since the rule is
              shape-based), smaller arrays replicated;
  logical     the flax logical axis names on the parameters, mapped to mesh axes by
              `lidia_jax.model.LOGICAL_AXIS_RULES`.
"""

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Arrays smaller than this stay replicated under fsdp: splitting them costs more than it saves.
_FSDP_MIN_SIZE = 2**14


def make_mesh(mesh_axes, devices=None):
    """Returns a `Mesh` over all (global) devices from `(("name", size), ...)`; -1 = the rest."""
    devices = jax.devices() if devices is None else devices
    names = [name for name, _ in mesh_axes]
    sizes = [size for _, size in mesh_axes]
    known = math.prod(s for s in sizes if s != -1)
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh_axes {tuple(mesh_axes)} give {sizes}, which does not use the "
                         f"{len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(sizes), names)


def check_batch_size(batch_size, mesh):
    """Raises an actionable error unless the global batch splits evenly over the `data` axis."""
    data_size = dict(mesh.shape).get("data", 1)
    if batch_size % data_size:
        raise ValueError(
            f"config.input.batch_size={batch_size} does not split over the mesh's 'data' axis "
            f"of {data_size} devices: set --config.input.batch_size to a multiple of "
            f"{data_size}, or --config.train.mesh_axes to use fewer devices for the batch.")


def batch_sharding(mesh):
    """The leading (batch) axis split over the `data` axis, the rest replicated."""
    return NamedSharding(mesh, P("data"))


def _fsdp_spec(shape, data_size):
    if data_size == 1 or math.prod(shape) < _FSDP_MIN_SIZE:
        return P()
    for axis in np.argsort(shape)[::-1]:
        if shape[axis] % data_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "data"
            return P(*spec)
    return P()


def state_shardings(abstract_boxed_state, mesh, mode, rules=()):
    """Shardings for every leaf of a (possibly logically boxed) abstract state.

    Args:
      abstract_boxed_state: the state as `jax.ShapeDtypeStruct`s, parameters (and the optimiser
        moments that mirror them) still wrapped in flax `Partitioned` boxes.
      mesh: the device mesh.
      mode: "replicated" | "fsdp" | "logical".
      rules: logical axis rules, for mode "logical".
    Returns:
      A pytree of `NamedSharding` with the structure of the UNBOXED state.
    """
    if mode == "logical":
        specs = nn.get_partition_spec(abstract_boxed_state)
        return nn.logical_to_mesh_sharding(specs, mesh, rules)
    unboxed = nn.meta.unbox(abstract_boxed_state)
    if mode == "replicated":
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), unboxed)
    if mode == "fsdp":
        data_size = mesh.shape["data"]
        return jax.tree.map(lambda x: NamedSharding(mesh, _fsdp_spec(x.shape, data_size)),
                            unboxed)
    raise ValueError(f"config.train.param_sharding={mode!r}; expected replicated, fsdp or "
                     "logical")
