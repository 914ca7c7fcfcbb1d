"""Optimiser: AdamW (LIDIA, Mask2Former) or nnU-Net's SGD with Nesterov momentum, with gradient
clipping and a warmup + decay schedule, optionally an exponential moving average of the weights
for inference, and optionally wrapped in sharpness-aware minimisation (SAM, Foret et al. 2021),
which LIDIA uses for its final model (paper section 2, Table 3)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def make_schedule(optim_cfg, num_steps):
    """Learning-rate schedule: linear warmup to optim_cfg.lr over
    optim_cfg.warmup_steps, then
      poly:     lr * (1 - s / S)^0.9 (nnU-Net), S = num_steps - warmup,
      cosine:   cosine decay to 0 over S,
      constant: lr.
    """
    lr = float(optim_cfg.lr)
    warmup = int(optim_cfg.warmup_steps)
    decay_steps = max(int(num_steps) - warmup, 1)
    name = optim_cfg.schedule
    if name == "poly":
        decay = optax.polynomial_schedule(lr, 0.0, 0.9, decay_steps)
    elif name == "cosine":
        decay = optax.cosine_decay_schedule(lr, decay_steps)
    elif name == "constant":
        decay = optax.constant_schedule(lr)
    else:
        raise ValueError(f"config.optim.schedule={name!r}; expected 'poly', "
                         f"'cosine' or 'constant'.")
    if warmup <= 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


class EmaParamsState(NamedTuple):
    """State of `ema_params`: count int32 [], ema_params a float32 copy of the params' tree."""
    count: jax.Array
    ema_params: Any


def ema_params(decay):
    """An exponential moving average of the weights, for inference (Polyak averaging; not in the
    paper): the last transformation of the chain, so `params + updates` are the new weights.

    ema <- d ema + (1 - d) (params + updates), d = min(decay, (1 + t) / (10 + t)) at step t (the
    warm-up of TensorFlow's ExponentialMovingAverage, so the first steps do not keep the initial
    weights). The updates pass unchanged: training is the same with or without it. Kept in the
    optimiser's state, so a checkpoint without it restores as before when it is off.
    """
    def init_fn(params):
        return EmaParamsState(count=jnp.zeros((), jnp.int32),
                              ema_params=jax.tree.map(lambda p: jnp.array(p, jnp.float32), params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("ema_params needs update(updates, state, params).")
        t = state.count.astype(jnp.float32)
        d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        ema = jax.tree.map(lambda e, p, u: d * e + (1.0 - d) * (p + u).astype(jnp.float32),
                           state.ema_params, params, updates)
        return updates, EmaParamsState(count=state.count + 1, ema_params=ema)

    return optax.GradientTransformation(init_fn, update_fn)


def find_ema_params(opt_state):
    """The EMA weights in an optimiser state (`ema_params`), or None when it has none.

    Takes the live state (an EmaParamsState among optax's tuples) or one restored from a
    checkpoint without a target, where each NamedTuple is a dict of its fields.
    """
    if isinstance(opt_state, EmaParamsState):
        return opt_state.ema_params
    if isinstance(opt_state, dict):
        if set(opt_state) == set(EmaParamsState._fields):
            return opt_state["ema_params"]
        children = opt_state.values()
    elif isinstance(opt_state, (tuple, list)):
        children = opt_state
    else:
        return None
    for child in children:
        found = find_ema_params(child)
        if found is not None:
            return found
    return None


def sam(base, rho, eps=1e-12):
    """SAM around `base`: g_sam = grad L(w + rho g / (||g|| + eps)), then the
    base update with g_sam at the unperturbed w.

    Unlike optax.contrib.sam (whose `normalize` divides by ||g|| without an
    epsilon, NaN on a zero gradient, and which needs two outer steps per
    update in its default mode), both passes happen in one `update` call.

    `update(grads, state, params, *, grad_fn)`: grads are the clean gradients
    (the train step's forward pass also yields its metrics and memory bank);
    grad_fn(params) -> gradients at `params` (pytree like grads) is called once
    at the perturbed weights.
    """
    def init_fn(params):
        return base.init(params)

    def update_fn(grads, state, params=None, *, grad_fn=None, **extra_args):
        del extra_args
        if params is None or grad_fn is None:
            raise ValueError("SAM (config.optim.sam=True) needs "
                             "update(grads, state, params, grad_fn=...) with "
                             "grad_fn(params) -> grads.")
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
                            for g in jax.tree.leaves(grads)))
        scale = rho / (norm + eps)
        perturbed = jax.tree.map(
            lambda p, g: p + (scale * g).astype(p.dtype), params, grads)
        sam_grads = grad_fn(perturbed)
        return base.update(sam_grads, state, params)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def make_optimizer(optim_cfg, num_steps):
    """Builds the optimiser from config.optim.

    Base: chain(clip_by_global_norm(grad_clip), adamw(schedule, weight_decay)) for name
    "adamw"; for "sgd" (nnU-Net: lr 1e-2, momentum 0.99, weight decay 3e-5, clip 12)
    chain(clip, add_decayed_weights(weight_decay), sgd(schedule, momentum, nesterov=True)),
    the decay added to the gradient as torch.optim.SGD does. With optim_cfg.sam the base is
    wrapped in `sam` with rho = optim_cfg.sam_rho (clipping then applies to the SAM gradient).
    With optim_cfg.ema_decay > 0 the base chain ends with `ema_params(ema_decay)`.
    Either way the call is `update(grads, state, params, grad_fn=grad_fn)`;
    without SAM grad_fn is ignored.

    Args:
      optim_cfg: config.optim.
      num_steps: total training steps (for the schedule).

    Returns:
      optax.GradientTransformationExtraArgs.
    """
    if optim_cfg.name not in ("adamw", "sgd"):
        raise ValueError(f"config.optim.name={optim_cfg.name!r}; expected 'adamw' or 'sgd'.")
    parts = []
    if optim_cfg.grad_clip and optim_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.grad_clip)))
    schedule = make_schedule(optim_cfg, num_steps)
    if optim_cfg.name == "adamw":
        parts.append(optax.adamw(schedule, eps=float(optim_cfg.get("eps", 1e-8)),
                                 weight_decay=float(optim_cfg.weight_decay)))
    else:
        parts += [optax.add_decayed_weights(float(optim_cfg.weight_decay)),
                  optax.sgd(schedule, momentum=float(optim_cfg.get("momentum", 0.99)),
                            nesterov=True)]
    ema_decay = float(optim_cfg.get("ema_decay", 0.0))
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"config.optim.ema_decay={ema_decay}; expected 0 (off) <= decay < 1.")
    if ema_decay > 0:
        parts.append(ema_params(ema_decay))
    base = optax.chain(*parts)
    if optim_cfg.sam:
        return sam(base, float(optim_cfg.sam_rho))
    return optax.with_extra_args_support(base)
