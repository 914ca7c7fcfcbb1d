"""Parameter count and forward FLOPs of a model config, without materialising parameters."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def count_params(params) -> int:
    """Number of scalars in a (possibly boxed / ShapeDtypeStruct) parameter tree."""
    return int(sum(np.prod(x.shape, dtype=np.int64)
                   for x in jax.tree_util.tree_leaves(nn.meta.unbox(params))))


def _flops(cost) -> float | None:
    """'flops' from a cost analysis: a dict (jax >= 0.4.3x), a list of dicts (older), or None."""
    if cost is None:
        return None
    if isinstance(cost, (list, tuple)):
        vals = [_flops(c) for c in cost]
        vals = [v for v in vals if v is not None]
        return float(sum(vals)) if vals else None
    try:
        value = cost.get("flops")
    except AttributeError:
        return None
    return None if value is None or value < 0 else float(value)


def forward_flops(fn, *args) -> float:
    """XLA's FLOP count of jax.jit(fn)(*args) (args may be ShapeDtypeStructs).

    Tries the lowered (pre-optimisation) HLO cost analysis first (no compilation), then the
    compiled executable's. Counts a multiply-add as 2 FLOPs; elementwise ops count too.
    """
    lowered = jax.jit(fn).lower(*args)
    flops = None
    try:
        flops = _flops(lowered.cost_analysis())
    except Exception:  # noqa: BLE001 - backend-dependent availability, fall back below
        flops = None
    if flops is None:
        flops = _flops(lowered.compile().cost_analysis())
    if flops is None:
        raise RuntimeError("forward_flops: this jax backend reports no cost analysis")
    return flops


def model_cost(model: nn.Module, patch_size: Sequence[int], batch_size: int = 1) -> dict:
    """{"params": int, "flops": float} of one forward pass of `model` on a
    [batch_size, *patch_size, 4] float32 image (parameters only as shapes: no memory).

    FLOPs are those of the architecture: convolutions are counted with conv_impl "xla" (taps on
    the zero padding are free), whatever implementation the model would run on this backend.
    """
    if hasattr(model, "conv_impl"):
        model = model.clone(conv_impl="xla")
    image = jax.ShapeDtypeStruct((batch_size, *patch_size, 4), jnp.float32)
    phase_mask = jax.ShapeDtypeStruct((batch_size, 4), jnp.bool_)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image.shape),
                                                  jnp.ones(phase_mask.shape, bool)))
    params = nn.meta.unbox(variables)
    flops = forward_flops(lambda v, x, m: model.apply(v, x, m, train=False), params, image,
                          phase_mask)
    return {"params": count_params(params), "flops": flops}
