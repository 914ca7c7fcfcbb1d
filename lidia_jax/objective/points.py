"""Point sampling for the mask losses (PointRend / Mask2Former, PLAN's
foreground-enhanced variant), in 3-D, with fixed shapes.

Coordinate convention (used everywhere in lidia_jax.objective): a point is
(z, y, x) in [0, 1]^3, normalised with align_corners=True, i.e. coordinate c on
an axis of size S sits at voxel index c * (S - 1). Corner voxels of arrays of
different resolutions therefore coincide, which is how one point addresses both
the low-resolution mask logits [d, h, w] and the full-resolution target
[D, H, W]. PLAN normalises its foreground voxel indices by (shape - 1) the same
way, so foreground points land exactly on target voxel centres.
"""

import jax
import jax.numpy as jnp


def trilinear_sample(volume, points):
    """Trilinear interpolation of `volume` at normalised points.

    Args:
      volume: [d, h, w] (any real dtype; bool is cast to float32).
      points: [P, 3] (z, y, x) in [0, 1] (align_corners=True, clamped to the
        border outside [0, 1]).

    Returns:
      [P] interpolated values, differentiable w.r.t. `volume`.
    """
    if volume.dtype == jnp.bool_:
        volume = volume.astype(jnp.float32)
    shape = volume.shape
    idx0, frac = [], []
    for axis in range(3):
        size = shape[axis]
        pos = jnp.clip(points[:, axis], 0.0, 1.0) * (size - 1)
        # Lower corner in [0, size - 2] so that the upper corner exists; an
        # axis of size 1 uses the same voxel twice.
        lo = jnp.clip(jnp.floor(pos), 0, max(size - 2, 0)).astype(jnp.int32)
        idx0.append(lo)
        frac.append(jnp.clip(pos - lo, 0.0, 1.0).astype(volume.dtype))
    flat = volume.reshape(-1)
    strides = (shape[1] * shape[2], shape[2], 1)
    out = 0.0
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                offs = (dz, dy, dx)
                index = 0
                weight = 1.0
                for axis in range(3):
                    step = offs[axis] if shape[axis] > 1 else 0
                    index = index + (idx0[axis] + step) * strides[axis]
                    weight = weight * (frac[axis] if offs[axis]
                                       else 1.0 - frac[axis])
                out = out + weight * flat[index]
    return out


def uncertain_points(noise, logits, num_points, oversample_ratio,
                     importance_ratio):
    """PointRend importance sampling (Mask2Former's
    `get_uncertain_point_coords_with_randomness`).

    Takes C = max(int(oversample_ratio * P), P) uniform candidates, keeps the
    int(importance_ratio * P) with the largest uncertainty -|logit| (computed
    on the interpolated logit, not on voxels), and fills up with uniform points.

    Args:
      noise: [C + P - int(importance_ratio * P), 3] U[0, 1) numbers (see
        `num_uncertain_noise`); one draw for everything keeps the number of
        PRNG calls, and so the compile time, small.
      logits: [d, h, w] mask logits of one prediction.
      num_points: total P.

    Returns:
      [P, 3] points (no gradient).
    """
    logits = jax.lax.stop_gradient(logits)
    num_candidates, num_uncertain = _uncertain_split(num_points,
                                                     oversample_ratio,
                                                     importance_ratio)
    candidates = noise[:num_candidates]
    uncertainty = -jnp.abs(trilinear_sample(logits, candidates))
    _, top = jax.lax.top_k(uncertainty, num_uncertain)
    uniform = noise[num_candidates:]
    return jnp.concatenate([candidates[top], uniform], axis=0)


def _uncertain_split(num_points, oversample_ratio, importance_ratio):
    num_candidates = max(int(oversample_ratio * num_points), num_points)
    num_uncertain = min(int(importance_ratio * num_points), num_points)
    return num_candidates, num_uncertain


def num_uncertain_noise(num_points, oversample_ratio, importance_ratio):
    """Rows of `noise` that `uncertain_points` needs."""
    num_candidates, num_uncertain = _uncertain_split(num_points,
                                                     oversample_ratio,
                                                     importance_ratio)
    return num_candidates + num_points - num_uncertain


def foreground_cumsum(mask):
    """[D, H, W] bool -> int32 [D*H*W] running count of foreground voxels in
    raster order (precomputed once per target, reused by every layer)."""
    # associative_scan: ~7x faster than jnp.cumsum's reduce-window lowering on
    # CPU for 10^5-10^6 voxels, and as good on accelerators.
    return jax.lax.associative_scan(jnp.add, mask.reshape(-1).astype(jnp.int32))


def foreground_points(noise, cumsum, shape):
    """Points on the target's own foreground voxels (PLAN's foreground-enhanced
    sampling), fixed shape.

    PLAN takes a random subset (without replacement) of the foreground voxels
    and tops up with uniform random points when the mask has fewer voxels than
    the P points wanted. Here: with F foreground voxels (ranks 0..F-1 in raster
    order)
      F >= P: stratified draw, slot k takes a uniformly random rank in
              [floor(k F / P), floor((k + 1) F / P)): P distinct voxels
              spread over the whole mask;
      F <  P: slots k < F take every foreground voxel once, the rest are
              uniform random points (also the empty-mask case).
    Each rank is located with a binary search in the running count.

    Args:
      noise: [P, 4] U[0, 1) numbers (column 0: u_k, columns 1-3: top-up).
      cumsum: int32 [D*H*W] from `foreground_cumsum`.
      shape: (D, H, W) of the target.

    Returns:
      [P, 3] points, normalised by (shape - 1).
    """
    num_points = noise.shape[0]
    count = cumsum[-1]
    slots = jnp.arange(num_points, dtype=jnp.int32)

    # Integer stratum starts floor(k F / P) = k q + (k r) // P (q, r = divmod(F,
    # P)) never overflow int32, and for F >= P they strictly increase, so the
    # strata [start_k, start_{k+1}) are disjoint and non-empty.
    def start(k):
        return k * (count // num_points) + (k * (count % num_points)) // num_points

    lo, hi = start(slots), start(slots + 1)
    stratified = lo + jnp.floor(noise[:, 0] * (hi - lo)).astype(jnp.int32)
    stratified = jnp.minimum(stratified, hi - 1)
    rank = jnp.where(count >= num_points, stratified, slots)
    rank = jnp.clip(rank, 0, jnp.maximum(count - 1, 0))
    # First flat index whose running count exceeds `rank`.
    flat = jnp.searchsorted(cumsum, rank + 1, side="left")
    flat = jnp.clip(flat, 0, cumsum.shape[0] - 1)
    zyx = jnp.stack(jnp.unravel_index(flat, shape), axis=-1)
    denom = jnp.maximum(jnp.asarray(shape, jnp.float32) - 1.0, 1.0)
    on_voxels = zyx.astype(jnp.float32) / denom
    return jnp.where((slots < count)[:, None], on_voxels, noise[:, 1:])


def _loss_split(config_loss):
    num_points = int(config_loss.num_points)
    num_fg = min(int(config_loss.fg_point_ratio * num_points), num_points)
    return num_points, num_fg


def num_loss_noise(config_loss):
    """Length of the flat U[0, 1) vector `loss_points` consumes per mask."""
    num_points, num_fg = _loss_split(config_loss)
    rest = num_points - num_fg
    n = 4 * num_fg
    if rest:
        n += 3 * num_uncertain_noise(rest, config_loss.oversample_ratio,
                                     config_loss.importance_ratio)
    return n


def loss_points(noise, logits, fg_cumsum, target_shape, config_loss):
    """All points of one matched mask for L_seg.

    P = num_points, split as: n_fg = int(fg_point_ratio * P) foreground points,
    then the remaining R = P - n_fg by importance sampling (oversample_ratio,
    importance_ratio of R uncertain, the rest uniform). PLAN adds its
    foreground points on top of a full importance sample (so its P grows);
    here P stays exactly num_points.

    Args:
      noise: [num_loss_noise(config_loss)] U[0, 1) numbers.
      logits: [d, h, w] predicted mask logits of the matched query.
      fg_cumsum: int32 [D*H*W] running foreground count of the target.
      target_shape: (D, H, W).
      config_loss: config.loss.

    Returns:
      [P, 3] points.
    """
    num_points, num_fg = _loss_split(config_loss)
    parts = []
    if num_fg:
        parts.append(foreground_points(noise[:4 * num_fg].reshape(num_fg, 4),
                                       fg_cumsum, target_shape))
    if num_points - num_fg:
        parts.append(uncertain_points(noise[4 * num_fg:].reshape(-1, 3),
                                      logits, num_points - num_fg,
                                      config_loss.oversample_ratio,
                                      config_loss.importance_ratio))
    return jnp.concatenate(parts, axis=0)
