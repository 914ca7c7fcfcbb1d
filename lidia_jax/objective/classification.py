"""Query classification loss: softmax focal loss (L_focal, Lin et al. 2017;
PLAN's `multi_cls_focal_loss`) or weighted cross-entropy (Mask2Former)."""

import jax
import jax.numpy as jnp


def class_weights(num_classes, no_object_weight):
    """[K+1] ones with the no-object (last) entry = no_object_weight."""
    return jnp.ones((num_classes + 1,)).at[num_classes].set(no_object_weight)


def classification_loss(logits, labels, weights, kind="focal", gamma=2.0):
    """Weighted mean over queries of the per-query loss.

    loss_q = w[y_q] * (1 - p_q)^gamma * (-log p_q), p_q = softmax(logits_q)[y_q]
    (gamma = 0 or kind="ce" gives cross-entropy), normalised by sum_q w[y_q]:
    torch's `cross_entropy(weight=...)` mean, which Mask2Former uses with the
    no-object weight 0.1. PLAN's focal loss takes a plain mean with no class
    weights; here the no-object weight applies to both losses so that the
    ~40 unmatched queries do not swamp the few matched ones.

    Args:
      logits: [..., Q, K+1] class logits.
      labels: int [..., Q] in 0..K (K = no-object).
      weights: [K+1] class weights.
      kind: "focal" | "ce".
      gamma: focal exponent.

    Returns:
      scalar loss.
    """
    if kind not in ("focal", "ce"):
        raise ValueError(f"config.loss.cls_loss={kind!r}; expected 'focal' or "
                         f"'ce'.")
    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # bf16 -> f32
    logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
    logp_y = jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    per_query = -logp_y
    if kind == "focal":
        per_query = (1.0 - jnp.exp(logp_y)) ** gamma * per_query
    w = weights[labels]
    return jnp.sum(w * per_query) / jnp.maximum(jnp.sum(w), 1e-12)


def target_class_loss(logits, classes, valid):
    """Cross-entropy of per-target logits, averaged over the valid targets (0 with none).

    The auxiliary loss of the mask-pooled class head under the true masks (criterion):
    logits [B, T, K+1], classes int [B, T] in 0..K-1, valid bool [B, T].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    nll = -jnp.take_along_axis(logp, classes[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)
