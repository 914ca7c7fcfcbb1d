"""Synthetic calcifications drawn into training patches (config.input.synth_calc_prob).

The demo model memorises the few calcifications of its training patients and finds none in new
ones, even when those same lesions are pasted into other patches (README, "Lesion copy-paste for
the rare classes"; scripts/class_probe.py). Calcium is the one lesion whose look is physics alone:
dense before contrast and the same in every phase (250-800 HU), round, a few millimetres
(shared/spec/enhancement_patterns.md). So new ones can be drawn rather than copied, as tumour
synthesis does for liver lesions (Hu et al., CVPR 2023), each of another size, shape, density,
sub-voxel position and place in the liver.

One calcification is an ellipsoid of diameter drawn in `diameter_mm` (axes 0.8-1.25 times it),
its centre anywhere within a voxel, rendered on the patch's grid with its partial volume: each
voxel's covered fraction f (supersampled SUPERSAMPLE times per axis), smoothed by a Gaussian of
BLUR voxels for the source grid's own partial volume and the linear resampling to the cache's
grid. Its values are mixed in HU, as the resampling mixes them, and normalised as the cache was
(preprocessing.normalise: clip to [lo, hi], z-score):

  HU = f * HU_calc + (1 - f) * HU_patch,   HU_patch = image * std + mean

so a calcification saturates the clip where a real one does. It is placed on liver parenchyma
only (paste.place) and changes parenchyma only. Voxels with f >= 0.5, or the most covered one
for the smallest, are labelled calcification, a new instance.
"""

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage as ndi

from lidia_jax.data import paste

SUPERSAMPLE = 4  # sub-samples per voxel and axis for the covered fraction
BLUR = 0.5  # voxels: the Gaussian that stands in for the source grid and the resampling
ELONGATION = (0.8, 1.25)  # each semi-axis is the radius times a factor drawn in this range


def coverage(radii_vox: Sequence[float], offset: Sequence[float],
             supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each voxel inside an axis-aligned ellipsoid.

    Args:
      radii_vox: (rz, ry, rx) semi-axes in voxels.
      offset: (3,) in [0, 1): the centre's position within its voxel.
      supersample: sub-samples per voxel and axis.

    Returns:
      float32 [2 h_z + 1, 2 h_y + 1, 2 h_x + 1] in [0, 1], h = ceil(radii) + 1: voxel i covers
      [i, i + 1) on its axis and the centre lies at h + offset.
    """
    radii = np.asarray(radii_vox, np.float64)
    half = np.ceil(radii).astype(int) + 1  # voxels on each side of the centre's voxel
    axes = []
    for h, o in zip(half, offset):
        # Sub-sample centres of voxels 0..2h, relative to the ellipsoid's centre at h + o.
        positions = (np.arange((2 * h + 1) * supersample) + 0.5) / supersample
        axes.append(positions - (h + o))
    zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
    inside = (zz / radii[0]) ** 2 + (yy / radii[1]) ** 2 + (xx / radii[2]) ** 2 <= 1.0
    n = 2 * half + 1
    frac = inside.reshape(n[0], supersample, n[1], supersample, n[2], supersample).mean(
        axis=(1, 3, 5))
    return frac.astype(np.float32)


def draw(rng: np.random.Generator, spacing_mm: Sequence[float], diameter_mm: Sequence[float],
         hu_range: Sequence[float]) -> Tuple[np.ndarray, np.ndarray, float]:
    """One calcification on a grid of `spacing_mm` (z, y, x).

    Returns:
      (fraction float32 [d, h, w] in [0, 1], blurred with a margin of the blur; mask bool, the same
      shape: the voxels to label; its density in HU).
    """
    diameter = rng.uniform(*diameter_mm)
    radii = 0.5 * diameter * rng.uniform(*ELONGATION, size=3) / np.asarray(spacing_mm)
    frac = coverage(radii, rng.random(3))
    frac = frac[ndi.find_objects((frac > 0).astype(np.int8))[0]]  # the voxels it touches
    mask = frac >= 0.5
    if not mask.any():  # smaller than a voxel: its most covered voxel
        mask = frac == frac.max()
    frac = ndi.gaussian_filter(np.pad(frac, 1), BLUR, mode="constant")
    return frac, np.pad(mask, 1), float(rng.uniform(*hu_range))


def insert(image: np.ndarray, seg: np.ndarray, inst: np.ndarray, phase_mask: np.ndarray,
           code_table: np.ndarray, frac: np.ndarray, mask: np.ndarray, hu: float,
           intensity: Mapping[str, Sequence[float]], code: int, rng: np.random.Generator,
           tries: int = 20):
    """Draws a calcification (draw's outputs) into a patch, or returns the inputs unchanged when
    it fits on no liver.

    Args:
      image: float32 [Pz, Py, Px, 4], normalised with `intensity` (plan["intensity"]: per-phase
        "mean", "std", "lo", "hi" in HU); seg uint8 labels; inst uint16 instance ids; phase_mask
        bool [4]; code_table int [K + 1] instance id -> label code; code: the calcification's
        label code.

    Returns:
      (image, seg, inst, code_table), new arrays where anything was drawn.
    """
    liver = seg == paste.LIVER_CODE
    corner = paste.place(mask, liver, rng, tries)
    if corner is None:
        return image, seg, inst, code_table
    box = tuple(slice(c, c + n) for c, n in zip(corner, mask.shape))
    mean, std, lo, hi = (np.asarray(intensity[k], np.float32) for k in ("mean", "std", "lo", "hi"))
    region = image[box]
    f = frac[..., None]
    mixed = f * hu + (1.0 - f) * (region * std + mean)
    drawn = (np.clip(mixed, lo, hi) - mean) / std * phase_mask
    image = image.copy()
    image[box] = np.where(liver[box][..., None], drawn, region)
    seg, inst, code_table = paste.add_instance(seg, inst, code_table, box, mask, code)
    return image, seg, inst, code_table


def check(config, intensity: Optional[Mapping]) -> float:
    """config.input.synth_calc_prob, checked against what drawing needs; 0 when off."""
    prob = float(config.input.get("synth_calc_prob", 0.0))
    if prob <= 0.0:
        return 0.0
    if "calc" not in config.data.labels:
        raise ValueError("config.input.synth_calc_prob > 0 needs a 'calc' label in "
                         f"config.data.labels={tuple(config.data.labels)}")
    if intensity is None:
        raise ValueError("config.input.synth_calc_prob > 0 needs the cache's intensity "
                         "statistics (plan.json 'intensity').")
    return prob
