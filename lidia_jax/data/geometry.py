"""Image geometry: resampling onto the venous grid, canonical orientation, and the way back.

Conventions. SimpleITK describes an image by size / spacing / origin in index order (x, y, z) and a
3x3 direction matrix whose column `a` is the physical unit vector of index axis `a`. Numpy arrays
from `sitk.GetArrayFromImage` are [D, H, W] == index axes reversed (z, y, x). Everything this module
returns in numpy form uses the array order (z, y, x); the `original` geometry record keeps
SimpleITK's (x, y, z) order, exactly as in the file header, so that it can be restored bit for bit.

The geometry record (a JSON-serialisable dict, stored in meta.json["geometry"]) holds everything
needed to map an array on the preprocessed grid back to the venous input:

  original:   {"size", "spacing", "origin", "direction"}  venous header, SimpleITK (x, y, z) order
  canonical:  {"axes", "flip_axes", "shape", "spacing"}   array transpose + flips, canonical [D,H,W]
  crop_bbox:  [[z0, z1], [y0, y1], [x0, x1]]               body crop in the canonical array
  resampled_shape, target_spacing, separate_z_axis         spacing resampling (z, y, x)
"""

import itertools
from typing import Optional, Sequence

import numpy as np
import scipy.ndimage as ndi
import SimpleITK as sitk

CT_AIR_HU = -1024.0

# nnU-Net: spacing ratio above which an axis is resampled separately, with order 0 across slices.
ANISOTROPY_THRESHOLD = 3.0

# Tolerances for "same grid" (header round-off between phases written by different tools).
_SPACING_RTOL = 1e-4
_ORIGIN_ATOL_FRACTION = 1e-3  # of the smallest spacing
_DIRECTION_ATOL = 1e-4


# ----------------------------------------------------------------------------- grid records


def grid_of(image: sitk.Image) -> dict:
    """The geometry of a 3-D SimpleITK image, in its own (x, y, z) order, as plain lists."""
    return {
        "size": [int(s) for s in image.GetSize()],
        "spacing": [float(s) for s in image.GetSpacing()],
        "origin": [float(o) for o in image.GetOrigin()],
        "direction": [float(d) for d in image.GetDirection()],
    }


def same_grid(a: dict, b: dict) -> bool:
    """Whether two grid records (see `grid_of`) describe the same voxels, up to header round-off."""
    if list(a["size"]) != list(b["size"]):
        return False
    sa, sb = np.asarray(a["spacing"]), np.asarray(b["spacing"])
    if not np.allclose(sa, sb, rtol=_SPACING_RTOL, atol=0.0):
        return False
    tol = _ORIGIN_ATOL_FRACTION * float(min(sa.min(), sb.min()))
    if np.max(np.abs(np.asarray(a["origin"]) - np.asarray(b["origin"]))) > tol:
        return False
    return bool(np.max(np.abs(np.asarray(a["direction"]) - np.asarray(b["direction"])))
                <= _DIRECTION_ATOL)


def describe_grid(g: dict) -> str:
    """A short human-readable grid description for error messages."""
    fmt = lambda v: "(" + ", ".join(f"{x:g}" for x in v) + ")"
    return (f"size {tuple(g['size'])}, spacing {fmt(g['spacing'])}, origin {fmt(g['origin'])}, "
            f"direction {fmt(np.round(g['direction'], 4))}")


def image_from_array(array: np.ndarray, grid: dict) -> sitk.Image:
    """A SimpleITK image holding `array` [D, H, W] with the geometry `grid` (x, y, z order)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    if list(image.GetSize()) != list(grid["size"]):
        raise ValueError(f"array shape {array.shape} does not match the grid size "
                         f"{tuple(grid['size'])} (x, y, z)")
    image.SetSpacing([float(s) for s in grid["spacing"]])
    image.SetOrigin([float(o) for o in grid["origin"]])
    image.SetDirection([float(d) for d in grid["direction"]])
    return image


def reference_image(grid: dict) -> sitk.Image:
    """An empty (uint8) image with geometry `grid`, usable as a sitk.Resample reference."""
    image = sitk.Image([int(s) for s in grid["size"]], sitk.sitkUInt8)
    image.SetSpacing([float(s) for s in grid["spacing"]])
    image.SetOrigin([float(o) for o in grid["origin"]])
    image.SetDirection([float(d) for d in grid["direction"]])
    return image


# ------------------------------------------------------------------- onto the venous grid


def resample_to_reference(image: sitk.Image, reference: sitk.Image, is_label: bool = False,
                          default_value: Optional[float] = None) -> sitk.Image:
    """Resamples `image` onto the grid of `reference` by physical coordinates.

    Linear interpolation for images (default value -1024 HU, air, outside the source field of
    view); nearest neighbour for label maps (default 0). Returns `image` itself when the grids
    already agree, so registered phases are not interpolated at all.
    """
    if same_grid(grid_of(image), grid_of(reference)):
        return image
    if is_label:
        interpolator, default = sitk.sitkNearestNeighbor, 0.0
        pixel_type = image.GetPixelID()
    else:
        interpolator, default = sitk.sitkLinear, CT_AIR_HU
        image = sitk.Cast(image, sitk.sitkFloat32)
        pixel_type = sitk.sitkFloat32
    if default_value is not None:
        default = float(default_value)
    return sitk.Resample(image, reference, sitk.Transform(), interpolator, default, pixel_type)


# ----------------------------------------------------------------- canonical orientation


def canonical_orientation(grid: dict) -> dict:
    """How to reorient an array so that its direction is as close to identity as possible.

    grid: a `grid_of` record. Chooses the permutation of index axes that best aligns each new
    index axis with a physical axis (maximises sum |cos|), then flips the axes that point the
    wrong way. The result is the numpy operation on the [D, H, W] array,
    `np.flip(np.transpose(a, axes), flip_axes)`, with the canonical geometry it produces:
      {"axes": [3], "flip_axes": [...], "shape": [D, H, W], "spacing": [z, y, x],
       "grid": canonical grid record (x, y, z order)}.
    Voxels keep their physical positions: only the indexing changes.
    """
    d = np.asarray(grid["direction"], dtype=np.float64).reshape(3, 3)  # d[r, a]
    size = np.asarray(grid["size"], dtype=np.int64)
    spacing = np.asarray(grid["spacing"], dtype=np.float64)
    # perm[r]: the old index axis that becomes new index axis r (aligned with physical axis r).
    perm = max(itertools.permutations(range(3)),
               key=lambda p: sum(abs(d[r, p[r]]) for r in range(3)))
    sign = np.array([1.0 if d[r, perm[r]] >= 0 else -1.0 for r in range(3)])

    new_dir = np.stack([sign[r] * d[:, perm[r]] for r in range(3)], axis=1)
    origin = np.asarray(grid["origin"], dtype=np.float64).copy()
    for r in range(3):
        if sign[r] < 0:  # the new first voxel is the old last one along this axis
            a = perm[r]
            origin += (size[a] - 1) * spacing[a] * d[:, a]
    new_grid = {
        "size": [int(size[perm[r]]) for r in range(3)],
        "spacing": [float(spacing[perm[r]]) for r in range(3)],
        "origin": [float(o) for o in origin],
        "direction": [float(v) for v in new_dir.reshape(-1)],
    }
    # Array axis k <-> index axis 2 - k.
    axes = [2 - perm[2 - k] for k in range(3)]
    flip_axes = [k for k in range(3) if sign[2 - k] < 0]
    return {
        "axes": axes,
        "flip_axes": flip_axes,
        "shape": new_grid["size"][::-1],
        "spacing": new_grid["spacing"][::-1],
        "grid": new_grid,
    }


def to_canonical(array: np.ndarray, canonical: dict) -> np.ndarray:
    """[D, H, W, ...] array in file order -> canonical order (see `canonical_orientation`)."""
    extra = list(range(3, array.ndim))
    out = np.transpose(array, list(canonical["axes"]) + extra)
    if canonical["flip_axes"]:
        out = np.flip(out, tuple(canonical["flip_axes"]))
    return np.ascontiguousarray(out)


def from_canonical(array: np.ndarray, canonical: dict) -> np.ndarray:
    """Exact inverse of `to_canonical`: canonical [D, H, W, ...] -> file order."""
    if canonical["flip_axes"]:
        array = np.flip(array, tuple(canonical["flip_axes"]))
    extra = list(range(3, array.ndim))
    inverse = list(np.argsort(canonical["axes"])) + extra
    return np.ascontiguousarray(np.transpose(array, inverse))


# ---------------------------------------------------------------- spacing resampling


def resampled_shape(shape: Sequence[int], spacing: Sequence[float],
                    target_spacing: Sequence[float]) -> list:
    """nnU-Net's new shape: round(shape * spacing / target), at least 1 voxel per axis."""
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing)]


def separate_z_axis(spacing: Sequence[float], target_spacing: Sequence[float]) -> Optional[int]:
    """nnU-Net's anisotropy rule: the axis to resample on its own with order 0, or None.

    An axis is treated separately when max / min spacing exceeds 3, first in the original spacing,
    else in the target spacing; the axis is the one with the largest spacing.
    """
    for s in (np.asarray(spacing, float), np.asarray(target_spacing, float)):
        if s.max() / s.min() > ANISOTROPY_THRESHOLD:
            return int(np.argmax(s))
    return None


def resize(array: np.ndarray, new_shape: Sequence[int], order: int,
           separate_axis: Optional[int] = None) -> np.ndarray:
    """Resizes [D, H, W] to `new_shape` keeping the physical extent (pixel-centre mapping).

    Voxel centres map as skimage/nnU-Net do: x_in = (x_out + 0.5) * n_in / n_out - 0.5 (scipy
    `grid_mode=True`), edges replicated. order 0 = nearest (labels), 1 linear, 3 cubic B-spline.
    With `separate_axis` (anisotropic data), the other axes are resampled with `order` first,
    then `separate_axis` with order 0, as nnU-Net does, so that thick slices do not blur or ring.
    """
    new_shape = [int(n) for n in new_shape]
    if list(array.shape) == new_shape:
        return array.copy()
    is_int = not np.issubdtype(array.dtype, np.floating)
    work = array if not is_int or order == 0 else array.astype(np.float32)

    def _zoom(x, shape, o):
        factors = [n / m for n, m in zip(shape, x.shape)]
        if all(f == 1.0 for f in factors):
            return x
        out = ndi.zoom(x, factors, order=o, mode="nearest", grid_mode=True, prefilter=o > 1)
        assert list(out.shape) == list(shape), (out.shape, shape)
        return out

    if separate_axis is None or order == 0:
        out = _zoom(work, new_shape, order)
    else:
        in_plane = list(new_shape)
        in_plane[separate_axis] = array.shape[separate_axis]
        out = _zoom(_zoom(work, in_plane, order), new_shape, 0)
    return out.astype(array.dtype, copy=False) if is_int else out


# --------------------------------------------------------------------------- way back


def restore_array(array: np.ndarray, geometry: dict, order: int = 0) -> np.ndarray:
    """Preprocessed-grid array [D, H, W, ...] -> array [D', H', W', ...] on the venous input's
    index grid (SimpleITK's array order of the venous file).

    Undoes, in reverse order: spacing resampling (order 0 for labels, 1 for probabilities; same
    pixel-centre mapping and separate-z rule as the forward pass), the body crop (outside it: 0),
    canonicalisation. Trailing axes (e.g. classes of [D, H, W, C] probabilities) are carried.
    """
    if array.ndim < 3 or list(array.shape[:3]) != list(geometry["resampled_shape"]):
        raise ValueError(f"array shape {array.shape} does not start with the preprocessed shape "
                         f"{tuple(geometry['resampled_shape'])} recorded in the geometry")
    bbox = geometry["crop_bbox"]
    extra = list(array.shape[3:])
    crop_shape = [hi - lo for lo, hi in bbox] + extra
    separate = geometry.get("separate_z_axis") if order > 0 else None
    restored = resize(array, crop_shape, order, separate)
    full = np.zeros(list(geometry["canonical"]["shape"]) + extra, dtype=restored.dtype)
    full[tuple(slice(lo, hi) for lo, hi in bbox)] = restored
    return from_canonical(full, geometry["canonical"])


def to_original(array: np.ndarray, geometry: dict, is_label: bool = True) -> sitk.Image:
    """Array [D, H, W] on the preprocessed grid -> sitk.Image in the venous input's geometry.

    The returned image has exactly the venous file's size, spacing, origin and direction.
    Labels use nearest neighbour; anything else (probabilities) linear interpolation. For
    [D, H, W, C] arrays use `restore_array` (numpy) instead.
    """
    if array.ndim != 3:
        raise ValueError(f"to_original takes a [D, H, W] array, got shape {array.shape}; use "
                         "restore_array for arrays with channels")
    out = restore_array(array, geometry, order=0 if is_label else 1)
    return image_from_array(out, geometry["original"])
