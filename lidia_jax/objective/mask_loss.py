"""L_seg: sigmoid cross-entropy + Dice on sampled points (Mask2Former /
PLAN's `sigmoid_ce_loss` and `dice_loss`), one value per matched mask."""

import jax
import jax.numpy as jnp


def sigmoid_ce(logits, targets):
    """Mean over points of binary CE with logits.

    Args:
      logits: [..., P] mask logits at the points.
      targets: [..., P] target values in [0, 1].

    Returns:
      [...] per-mask loss.
    """
    # softplus(x) - t x == -t log s(x) - (1 - t) log(1 - s(x)), stable.
    return jnp.mean(jax.nn.softplus(logits) - targets * logits, axis=-1)


def dice(logits, targets, smooth=1.0):
    """1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1), s = sigmoid(logits), over
    the points (Mask2Former's +1 smoothing).

    Args:
      logits: [..., P]; targets: [..., P].

    Returns:
      [...] per-mask loss.
    """
    prob = jax.nn.sigmoid(logits)
    numerator = 2.0 * jnp.sum(prob * targets, axis=-1)
    denominator = jnp.sum(prob, axis=-1) + jnp.sum(targets, axis=-1)
    return 1.0 - (numerator + smooth) / (denominator + smooth)


def mask_losses(logits, targets, valid, num_masks):
    """Summed over valid masks and divided by the number of target masks.

    Args:
      logits: [..., T, P] point logits of the matched predictions.
      targets: [..., T, P] point targets.
      valid: bool [..., T].
      num_masks: scalar >= 1, number of valid targets in the (global) batch.

    Returns:
      (ce, dice) scalars.
    """
    w = valid.astype(logits.dtype)
    ce = jnp.sum(sigmoid_ce(logits, targets) * w) / num_masks
    dc = jnp.sum(dice(logits, targets) * w) / num_masks
    return ce, dc
