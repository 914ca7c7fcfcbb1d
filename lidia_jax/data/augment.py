"""CT-appropriate data augmentation of a training patch (numpy, runs in grain workers).

Spatial: rotation about z only (CT is acquired axially; in-plane spacing is isotropic) and
isotropic scaling, applied while the patch is read from the whole case, so corners are filled with
real anatomy wherever the case extends beyond the patch (nnU-Net does the same by cropping a larger
region first). No left-right flip by default: the liver lies on the patient's right, and a flipped
abdomen is not a plausible input. Images are interpolated linearly, labels by nearest neighbour,
through the same coordinates, so they stay aligned.

Intensity (nnU-Net's brightness, contrast, gamma and noise transforms, on z-scored values): per
phase channel and only where the phase is present, so absent phases stay exactly zero.

Multi-phase specific: a random integer shift per non-venous phase imitates residual misregistration
(the phases are registered to the venous one, which carries the labels, so V is never shifted), and
random phase dropping (HeMIS-style, NC/A/D, never V) teaches the fusion to cope with missing phases.

Channel order is (NC, A, V, D); arrays are [D, H, W, 4] images and [D, H, W] labels.
"""

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from lidia_jax.data import patches

VENOUS = 2  # channel index of the venous phase, the reference grid


def _get(aug: Mapping, key: str, default):
    """Config field with a default, so older configs without the newer fields still work."""
    return aug[key] if key in aug else default


def sample_spatial(rng: np.random.Generator, aug: Mapping) -> Optional[np.ndarray]:
    """Draws the spatial transform of one patch.

    Args:
      rng: per-record generator.
      aug: config.input.aug (rotation_deg, scale, flip_axes, rotation_prob, scale_prob).

    Returns:
      float64 [3, 3] matrix M mapping an output offset from the patch centre (z, y, x voxels) to
      the input offset (input = centre + M @ offset), or None for the identity. A zoom factor s > 1
      enlarges the anatomy (M is divided by s).
    """
    # Every draw is always made, so the stream layout does not depend on earlier outcomes.
    do_rot = rng.random() < _get(aug, "rotation_prob", 0.2)
    angle = np.deg2rad(rng.uniform(-1.0, 1.0) * float(aug.rotation_deg))
    do_scale = rng.random() < _get(aug, "scale_prob", 0.2)
    lo, hi = aug.scale
    zoom = rng.uniform(lo, hi)
    flips = rng.random(3) < 0.5
    m = np.eye(3)
    changed = False
    if do_rot and angle != 0.0:
        c, s = np.cos(angle), np.sin(angle)
        m[1:, 1:] = [[c, -s], [s, c]]  # rotation in the (y, x) plane: about the z axis
        changed = True
    if do_scale and zoom != 1.0:
        m = m / zoom
        changed = True
    for axis in tuple(aug.flip_axes):
        if flips[int(axis)]:
            m[int(axis)] = -m[int(axis)]
            changed = True
    return m if changed else None


def sample_channel_shifts(rng: np.random.Generator, phase_mask: np.ndarray,
                          aug: Mapping) -> Optional[np.ndarray]:
    """Random misregistration: int [4, 3] voxel shift per phase channel (V and absent phases 0).

    Each present non-venous phase is shifted, with probability aug.misregistration_prob, by an
    integer offset drawn uniformly from [-m, m] per axis, m = aug.misregistration_vox. None: none.
    """
    m = int(_get(aug, "misregistration_vox", 0))
    shifted = rng.random(4) < _get(aug, "misregistration_prob", 0.2)
    offsets = rng.integers(-m, m + 1, size=(4, 3)) if m > 0 else np.zeros((4, 3), np.int64)
    shifted &= np.asarray(phase_mask, bool)
    shifted[VENOUS] = False
    offsets[~shifted] = 0
    return offsets if offsets.any() else None


def extract(
    image: np.ndarray,
    seg: Optional[np.ndarray],
    inst: Optional[np.ndarray],
    start: Sequence[int],
    patch_size: Sequence[int],
    phase_mask: np.ndarray,
    matrix: Optional[np.ndarray] = None,
    channel_shifts: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """Reads one (possibly transformed) patch from a case; outside the case: image 0, labels 0.

    Output voxel o (patch coordinates) samples the case at
        start + c + M @ (o - c) + shift[channel],   c = (patch_size - 1) / 2,
    so with M = None and no shift this is exactly `case[start : start + patch_size]`, which is then
    done by slicing (no interpolation). Otherwise images are interpolated trilinearly and labels by
    nearest neighbour, with zeros outside the case (scipy.ndimage.affine_transform, order 1 / 0,
    mode "grid-constant"). Only the bounding block of the sampled coordinates is read, so the
    arrays may be memory maps.

    Args:
      image: float [D, H, W, 4]; seg: uint8 [D, H, W] or None; inst: uint16 [D, H, W] or None.
      start: int [3] patch lower corner (may be negative or beyond the case: padding).
      patch_size: (Pz, Py, Px).
      phase_mask: bool [4]; absent channels are returned as zeros without being read.
      matrix: float [3, 3] from sample_spatial, or None.
      channel_shifts: int [4, 3] from sample_channel_shifts, or None. Labels follow the venous grid
        and are never shifted.

    Returns:
      image float32 [Pz, Py, Px, 4], seg uint8 [Pz, Py, Px] (or None), inst uint16 (or None).
    """
    start = np.asarray(start, np.int64)
    patch_size = tuple(int(p) for p in patch_size)
    phase_mask = np.asarray(phase_mask, bool)
    shifts = np.zeros((4, 3), np.int64) if channel_shifts is None else np.asarray(channel_shifts)

    if matrix is None:
        out = np.zeros(patch_size + (4,), np.float32)
        if not shifts.any():
            out[...] = patches.crop(image, start, patch_size)
        else:
            for ch in np.flatnonzero(phase_mask):
                # Slice the channel before cropping: only that phase's block is read.
                out[..., ch] = patches.crop(image[..., ch], start + shifts[ch], patch_size)
        out[..., ~phase_mask] = 0.0
        seg_p = None if seg is None else patches.crop(seg, start, patch_size)
        inst_p = None if inst is None else patches.crop(inst, start, patch_size)
        return out, seg_p, inst_p

    # input = M @ o + offset, offset = start + c - M @ c (+ channel shift).
    matrix = np.asarray(matrix, np.float64)
    centre = (np.asarray(patch_size, np.float64) - 1.0) / 2.0
    offset = start + centre - matrix @ centre
    if not (matrix[0, 1:].any() or matrix[1:, 0].any()):
        # z decoupled from (y, x) (rotation about z, scaling, flips): trilinear interpolation
        # factorises into linear in z then bilinear in (y, x), done with numpy gathers.
        return _extract_separable(image, seg, inst, matrix, offset, patch_size, phase_mask,
                                  shifts)
    # General matrix: scipy computes the coordinates on the fly.
    corners = np.array(list(np.ndindex(2, 2, 2)), np.float64) * (np.asarray(patch_size) - 1)
    reach = corners @ matrix.T + offset  # extremes of a linear map lie at the corners
    # Bounding block of every coordinate any channel samples, with a one-voxel margin so linear
    # interpolation inside the case never sees the block edge (only the true case border).
    used = shifts[phase_mask] if phase_mask.any() else np.zeros((1, 3), np.int64)
    cmin = reach.min(axis=0) + used.min(axis=0)
    cmax = reach.max(axis=0) + used.max(axis=0)
    shape = np.asarray(image.shape[:3])
    lo = np.clip(np.floor(cmin).astype(np.int64) - 1, 0, shape)
    hi = np.clip(np.ceil(cmax).astype(np.int64) + 2, 0, shape)
    inside = bool((hi > lo).all())
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    offset = offset - lo

    out = np.zeros(patch_size + (4,), np.float32)
    if inside:
        for ch in np.flatnonzero(phase_mask):
            block = np.ascontiguousarray(image[box + (int(ch),)], dtype=np.float32)
            ndimage.affine_transform(block, matrix, offset=offset + shifts[ch],
                                     output_shape=patch_size, output=out[..., ch], order=1,
                                     mode="grid-constant", cval=0.0, prefilter=False)

    def nearest(labels):
        if labels is None:
            return None
        if not inside:
            return np.zeros(patch_size, labels.dtype)
        block = np.ascontiguousarray(labels[box])
        return ndimage.affine_transform(block, matrix, offset=offset, output_shape=patch_size,
                                        order=0, mode="grid-constant", cval=0)

    return out, nearest(seg), nearest(inst)


def _extract_separable(image, seg, inst, matrix, offset, patch_size, phase_mask, shifts):
    """extract() for a matrix with z decoupled from (y, x); the same values as scipy's
    affine_transform(order=1 for images, 0 for labels, mode="grid-constant"), 2-3x faster.

    Sample coordinates: z = offset_z + M_zz o_z, (y, x) = M_yx (o_y, o_x) + offset_yx, the same
    (y, x) grid for every output slice, so one set of indices and weights serves all slices and
    channels; integer channel shifts only move the indices.
    """
    pz, py, px = patch_size
    sz = offset[0] + matrix[0, 0] * np.arange(pz, dtype=np.float64)  # [Pz]
    grid = np.stack(np.meshgrid(np.arange(py, dtype=np.float64), np.arange(px, dtype=np.float64),
                                indexing="ij"))  # [2, Py, Px]
    syx = np.einsum("ij,jyx->iyx", matrix[1:, 1:], grid) + offset[1:, None, None]  # [2, Py, Px]
    fz, fyx = np.floor(sz), np.floor(syx)

    present = np.flatnonzero(phase_mask)
    used = np.concatenate([shifts[present], np.zeros((1, 3), np.int64)])  # labels: no shift
    lo = np.array([fz.min(), fyx[0].min(), fyx[1].min()]).astype(np.int64) + used.min(axis=0)
    hi = np.array([fz.max(), fyx[0].max(), fyx[1].max()]).astype(np.int64) + used.max(axis=0) + 2
    size = tuple(hi - lo)  # every index below lies in [0, size): out-of-case voxels read as 0

    iz = (fz - lo[0]).astype(np.intp)
    iy = (fyx[0] - lo[1]).astype(np.intp)
    ix = (fyx[1] - lo[2]).astype(np.intp)
    wz = (sz - fz).astype(np.float32)[:, None]  # [Pz, 1]
    wy, wx = (syx - fyx).astype(np.float32).reshape(2, -1)  # [Py * Px]
    corner_w = ((1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx)
    row = size[2]

    out = np.zeros(patch_size + (4,), np.float32)
    if present.size:
        block = patches.crop(image, lo, size)  # [bz, by, bx, 4], zeros outside the case
        for ch in present:
            dz, dy, dx = (int(d) for d in shifts[ch])
            v = np.ascontiguousarray(block[..., ch]).reshape(size[0], -1)  # [bz, by * bx]
            flat = ((iy + dy) * row + (ix + dx)).ravel()  # [Py * Px]
            # Bilinear in (y, x) at the two z planes each output slice needs, then linear in z.
            acc = v[:, flat] * corner_w[0]  # [bz, Py * Px]
            for w, idx in zip(corner_w[1:], (flat + 1, flat + row, flat + row + 1)):
                acc += v[:, idx] * w
            res = acc[iz + dz] * (1 - wz) + acc[iz + dz + 1] * wz  # [Pz, Py * Px]
            out[..., ch] = res.reshape(pz, py, px)

    def nearest(labels):
        if labels is None:
            return None
        block = patches.crop(labels, lo, size)
        lz = (np.floor(sz + 0.5) - lo[0]).astype(np.intp)
        lyx = np.floor(syx + 0.5).astype(np.intp) - lo[1:, None, None]
        return block[lz][:, lyx[0], lyx[1]]

    return out, nearest(seg), nearest(inst)


def _gamma(x: np.ndarray, gamma: float) -> np.ndarray:
    """nnU-Net's gamma on arbitrary-range values: min-max to [0, 1], power, back; keeps mean/std."""
    mean, std = x.mean(), x.std()
    xmin, rng = x.min(), x.max() - x.min()
    y = np.power((x - xmin) / (rng + 1e-7), gamma) * rng + xmin
    return (y - y.mean()) / (y.std() + 1e-8) * std + mean


def augment_intensity(image: np.ndarray, phase_mask: np.ndarray, rng: np.random.Generator,
                      aug: Mapping) -> np.ndarray:
    """Brightness/contrast, gamma and Gaussian noise per present phase channel, in place.

    Each present channel independently: with prob intensity_prob x * U(1 +- intensity_scale) +
    U(+- intensity_shift); with prob gamma_prob, gamma from aug.gamma (half of the draws below 1,
    as nnU-Net); with prob noise_prob, + N(0, sigma^2), sigma ~ U(0, noise_std).

    Args:
      image: float32 [D, H, W, 4] (modified in place and returned).
      phase_mask: bool [4].
    """
    g_lo, g_hi = aug.gamma
    for ch in np.flatnonzero(np.asarray(phase_mask, bool)):
        x = image[..., ch]
        if rng.random() < _get(aug, "intensity_prob", 0.15):
            scale = 1.0 + rng.uniform(-1.0, 1.0) * aug.intensity_scale
            shift = rng.uniform(-1.0, 1.0) * aug.intensity_shift
            x = x * np.float32(scale) + np.float32(shift)
        if rng.random() < _get(aug, "gamma_prob", 0.3):
            if g_lo < 1.0 and rng.random() < 0.5:
                gamma = rng.uniform(g_lo, 1.0)
            else:
                gamma = rng.uniform(max(g_lo, 1.0), max(g_hi, 1.0))
            x = _gamma(x, gamma)
        if rng.random() < _get(aug, "noise_prob", 0.1):
            sigma = rng.uniform(0.0, aug.noise_std)
            x = x + rng.standard_normal(x.shape, np.float32) * np.float32(sigma)
        image[..., ch] = x
    return image


def drop_phases(image: np.ndarray, phase_mask: np.ndarray, rng: np.random.Generator,
                prob: float) -> Tuple[np.ndarray, np.ndarray]:
    """Drops each present NC/A/D phase with probability `prob` (never V): zeroed, mask False.

    Args:
      image: float32 [D, H, W, 4] (modified in place); phase_mask: bool [4].

    Returns:
      (image, new phase_mask bool [4]).
    """
    drop = rng.random(4) < prob
    drop[VENOUS] = False
    drop &= np.asarray(phase_mask, bool)
    if drop.any():
        image[..., drop] = 0.0
    return image, np.asarray(phase_mask, bool) & ~drop
