"""Sliding-window inference over a whole preprocessed volume (nnU-Net style).

A volume [D, H, W, 4] is cut into tiles of the training patch size whose starts are spread evenly
with a step of at most `overlap * patch` (nnU-Net's rule). Tiles are run `tile_batch` at a time
through ONE jitted tile predictor, so the only shape XLA ever sees is
[tile_batch, pz, py, px, 4]: cases of any size reuse one compilation (the last batch is padded
with copies of its first tile; volumes smaller than a tile are zero-padded, which is the value of
an absent phase / the mean after z-scoring).

Each tile's per-voxel probabilities are weighted by a Gaussian importance map (sigma = 1/8 of
the patch, as nnU-Net) and accumulated on the host in float32. The accumulator only spans the
z-slab still reachable by unprocessed tiles (tiles are ordered by z), and finished slices are
divided by the summed weights and written into the output, float16 by default. So a
[300, 512, 512] volume needs the output [D, H, W, 10] float16 (1.5 GiB) plus a slab of about
two tiles' depth in float32, instead of a full-volume float32 accumulator and weight map.
"""

import dataclasses
import itertools
import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

# tiles [B, pz, py, px, 4], phase_mask [B, 4] -> (probs [B, pz, py, px, C], aux [B, A])
TileFn = Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 0.125,
                            min_value: float = 1e-3) -> np.ndarray:
    """Separable Gaussian centred on the tile, max 1: [pz, py, px] float32.

    sigma_a = sigma_scale * patch_a per axis (nnU-Net: 1/8). Values are clipped below at
    `min_value` (> 0) so every voxel of a tile keeps a positive weight and the blended
    normalisation never divides by zero, even for a voxel covered only by tile borders.
    """
    if sigma_scale <= 0:
        raise ValueError(f"gaussian_sigma_scale must be > 0, got {sigma_scale}")
    out = np.ones((), np.float64)
    for p in patch_size:
        centre = (p - 1) / 2.0
        sigma = sigma_scale * p
        g = np.exp(-0.5 * ((np.arange(p) - centre) / sigma) ** 2)
        out = np.multiply.outer(out, g)
    out = out / out.max()
    return np.maximum(out, min_value).astype(np.float32)


def tile_starts_1d(size: int, patch: int, overlap: float) -> list:
    """Evenly spread tile starts along one axis, first at 0 and last at size - patch.

    nnU-Net's rule: the step is at most (1 - overlap) * patch, the number of steps the fewest that
    cover the axis, and the starts are rounded from an even spacing. `size` >= `patch`.
    """
    if size < patch:
        raise ValueError(f"axis of size {size} is smaller than the patch {patch}; pad first")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    max_step = max(1.0, (1.0 - overlap) * patch)
    num = int(math.ceil((size - patch) / max_step)) + 1
    if num == 1:
        return [0]
    step = (size - patch) / (num - 1)
    return [int(round(step * i)) for i in range(num)]


def tile_starts(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> list:
    """All tile starts (z, y, x), ordered by z first (the slab accumulator relies on it)."""
    per_axis = [tile_starts_1d(s, p, overlap) for s, p in zip(shape, patch_size)]
    return list(itertools.product(*per_axis))


@dataclasses.dataclass
class SlidingWindowResult:
    probs: np.ndarray  # [D, H, W, C] blended per-voxel probabilities (out_dtype)
    aux: Optional[np.ndarray]  # [A] max over tiles of the tile predictor's aux output, or None
    num_tiles: int


def _pad_to_patch(volume: np.ndarray, patch_size: Sequence[int]):
    """Zero-pads spatial axes smaller than the patch, centred. Returns (padded, crop slices)."""
    pads, crop = [], []
    for s, p in zip(volume.shape[:3], patch_size):
        extra = max(0, p - s)
        lo = extra // 2
        pads.append((lo, extra - lo))
        crop.append(slice(lo, lo + s))
    if any(sum(p) for p in pads):
        volume = np.pad(volume, pads + [(0, 0)] * (volume.ndim - 3))
    return volume, tuple(crop)


def sliding_window_inference(volume: np.ndarray, phase_mask: np.ndarray, tile_fn: TileFn,
                             patch_size: Sequence[int], tile_batch: int, overlap: float = 0.5,
                             sigma_scale: float = 0.125, out_dtype=np.float16,
                             importance_map: Optional[np.ndarray] = None) -> SlidingWindowResult:
    """Gaussian-blended sliding-window prediction of a whole volume.

    Args:
      volume: [D, H, W, P] float32 preprocessed image (P = 4 phases).
      phase_mask: [P] bool, phases present.
      tile_fn: jitted predictor, tiles [tile_batch, pz, py, px, P] + phase_mask [tile_batch, P]
        -> (probs [tile_batch, pz, py, px, C], aux [tile_batch, A]); aux is reduced by max over
        the real (non-padding) tiles.
      patch_size: (pz, py, px).
      tile_batch: tiles per call (the only batch shape tile_fn sees).
      overlap: fraction of the patch shared by neighbouring tiles (nnU-Net 0.5).
      sigma_scale: Gaussian sigma as a fraction of the patch (nnU-Net 1/8).
      out_dtype: dtype of the returned probabilities (float16 bounds memory on big volumes).
      importance_map: optional [pz, py, px] weights replacing the Gaussian (tests: ones).
    Returns:
      SlidingWindowResult(probs [D, H, W, C], aux [A] or None, num_tiles).
    """
    volume = np.asarray(volume)
    if volume.ndim != 4:
        raise ValueError(f"volume must be [D, H, W, P], got shape {volume.shape}")
    patch_size = tuple(int(p) for p in patch_size)
    volume, crop = _pad_to_patch(volume, patch_size)
    pshape = volume.shape[:3]
    weights = (gaussian_importance_map(patch_size, sigma_scale) if importance_map is None
               else np.asarray(importance_map, np.float32))
    starts = tile_starts(pshape, patch_size, overlap)
    batches = [starts[i:i + tile_batch] for i in range(0, len(starts), tile_batch)]
    pz, py, px = patch_size
    tiled_mask = np.broadcast_to(np.asarray(phase_mask, bool), (tile_batch, volume.shape[-1]))

    def gather(batch):
        tiles = np.stack([volume[z:z + pz, y:y + py, x:x + px] for z, y, x in batch])
        if len(batch) < tile_batch:  # pad the last batch: one compiled shape for all
            tiles = np.concatenate([tiles, np.repeat(tiles[:1], tile_batch - len(batch), 0)])
        return tiles

    # Depth of the live slab: from the first z not yet final to the deepest tile end so far.
    depth = max(b[-1][0] + pz - b[0][0] for b in batches)
    acc = out = wsum = None
    z0 = 0  # volume z of acc[0]
    aux = None
    pending = tile_fn(gather(batches[0]), tiled_mask)
    for b, batch in enumerate(batches):
        current = pending
        if b + 1 < len(batches):  # dispatch the next batch before blocking on this one
            pending = tile_fn(gather(batches[b + 1]), tiled_mask)
        if acc is None:
            num_c = current[0].shape[-1]
            acc = np.zeros((depth, pshape[1], pshape[2], num_c), np.float32)
            # One host buffer for every batch: a fresh 10 MB array per batch costs page faults.
            probs = np.empty(current[0].shape, np.float32)
            wsum = np.zeros((depth, pshape[1], pshape[2]), np.float32)
            out = np.empty(pshape + (num_c,), out_dtype)
        if current[1] is not None:
            tile_aux = np.asarray(current[1], np.float32)[:len(batch)].max(0)
            aux = tile_aux if aux is None else np.maximum(aux, tile_aux)
        np.copyto(probs, np.asarray(current[0]), casting="same_kind")
        probs *= weights[None, ..., None]
        for (z, y, x), p in zip(batch, probs):
            acc[z - z0:z - z0 + pz, y:y + py, x:x + px] += p
            wsum[z - z0:z - z0 + pz, y:y + py, x:x + px] += weights
        done = batches[b + 1][0][0] if b + 1 < len(batches) else pshape[0]
        if done > z0:  # slices before `done` get no more tiles: normalise and flush
            n = done - z0
            np.divide(acc[:n], wsum[:n, ..., None], out=out[z0:done], casting="unsafe")
            acc[:depth - n] = acc[n:]  # numpy copes with the overlapping copy
            wsum[:depth - n] = wsum[n:]
            acc[depth - n:] = 0.0
            wsum[depth - n:] = 0.0
            z0 = done
    return SlidingWindowResult(probs=out[crop], aux=aux, num_tiles=len(starts))
