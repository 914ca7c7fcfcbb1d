"""Mask2Former's matching cost and the per-sample matcher."""

import jax
import jax.numpy as jnp

from lidia_jax.matching import hungarian
from lidia_jax.objective import points as points_lib


def pairwise_sigmoid_ce(logits, targets):
    """[Q, P] x [T, P] -> [Q, T] mean-over-points BCE of every pair."""
    num_points = logits.shape[-1]
    pos = jax.nn.softplus(-logits)  # -log s(x), the loss where t = 1
    neg = jax.nn.softplus(logits)  # -log(1 - s(x)), where t = 0
    return (pos @ targets.T + neg @ (1.0 - targets).T) / num_points


def pairwise_dice(logits, targets):
    """[Q, P] x [T, P] -> [Q, T] Dice loss (+1 smoothing) of every pair."""
    prob = jax.nn.sigmoid(logits)
    numerator = 2.0 * prob @ targets.T
    denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def matching_cost(class_logits, point_logits, target_classes, target_points,
                  config_loss):
    """C[q, t] = -match_class * p_q(c_t) + match_mask * BCE + match_dice * Dice.

    Args:
      class_logits: [Q, K+1]; point_logits: [Q, P] mask logits at the shared
        points; target_classes: int [T]; target_points: [T, P].
      config_loss: config.loss (match_class, match_mask, match_dice).

    Returns:
      [Q, T] float32 cost.
    """
    dtype = jnp.promote_types(class_logits.dtype, jnp.float32)
    prob = jax.nn.softmax(class_logits.astype(dtype), axis=-1)
    cost_class = -prob[:, target_classes]
    point_logits = point_logits.astype(prob.dtype)
    return (config_loss.match_class * cost_class
            + config_loss.match_mask * pairwise_sigmoid_ce(point_logits,
                                                           target_points)
            + config_loss.match_dice * pairwise_dice(point_logits,
                                                     target_points))


def match(points, class_logits, mask_logits, target_classes, target_masks,
          target_valid, config_loss):
    """Hungarian matching of one sample (no gradient).

    One set of uniform points is shared by all queries and targets, as in
    Mask2Former's matcher.

    Args:
      points: [P, 3] normalised points (uniform in [0, 1]^3,
        P = config.loss.num_points).
      class_logits: [Q, K+1]; mask_logits: [Q, d, h, w];
      target_classes: int [T]; target_masks: bool/float [T, D, H, W];
      target_valid: bool [T].
      config_loss: config.loss.

    Returns:
      int32 [T] query matched to each target (padded targets get leftover
      queries, see `hungarian`).
    """
    class_logits = jax.lax.stop_gradient(class_logits)
    mask_logits = jax.lax.stop_gradient(mask_logits)
    sample = jax.vmap(points_lib.trilinear_sample, in_axes=(0, None))
    cost = matching_cost(class_logits, sample(mask_logits, points),
                         target_classes, sample(target_masks, points),
                         config_loss)
    return hungarian(cost, target_valid)


def area_fractions(masks, grid_shape):
    """bool/float [..., D, H, W] -> float32 [..., d, h, w]: the fraction of each cell of the
    coarser grid (D/d x H/h x W/w voxels; the factors must be whole) that the mask covers."""
    full = masks.shape[-3:]
    if any(n % g for n, g in zip(full, grid_shape)):
        raise ValueError(f"config.loss.match_on='grid' needs the masks' grid {tuple(grid_shape)} "
                         f"to divide the patch {tuple(full)}")
    shape = masks.shape[:-3]
    for n, g in zip(full, grid_shape):
        shape += (g, n // g)
    x = masks.astype(jnp.float32).reshape(shape)
    return x.mean(axis=tuple(range(masks.ndim - 2, x.ndim, 2)))


def match_on_grid(class_logits, mask_logits, target_classes, target_fractions, target_valid,
                  config_loss):
    """Hungarian matching of one sample on every voxel of the masks' grid (no gradient).

    Mask2Former's matcher compares masks on uniform random points. On a 3-D patch they are
    sparse: the demo's 2,048 points over 24 x 48 x 48 voxels put 1.7 points, on average, in a
    46-voxel lesion, and none in 18% of draws, so a small lesion's query is chosen by its class
    alone. The masks' own grid is small enough to use whole (12 x 24 x 24 in the demo), with the
    targets as the fraction of each grid cell they cover.

    Args:
      class_logits: [Q, K+1]; mask_logits: [Q, d, h, w]; target_classes: int [T];
      target_fractions: [T, d, h, w] (area_fractions of the target masks); target_valid: bool [T].
    Returns:
      int32 [T] as `match`.
    """
    class_logits = jax.lax.stop_gradient(class_logits)
    logits = jax.lax.stop_gradient(mask_logits).reshape(mask_logits.shape[0], -1)
    cost = matching_cost(class_logits, logits, target_classes,
                         target_fractions.reshape(target_fractions.shape[0], -1), config_loss)
    return hungarian(cost, target_valid)
