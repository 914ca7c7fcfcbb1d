"""3-D sine positional encoding (DETR / Mask2Former's PositionEmbeddingSine, extended to z/y/x
as in PLAN: the channels are split over the three axes, e.g. 22 / 22 / 20 of 64)."""

import math
from typing import Sequence, Tuple

import numpy as np


def split_channels(dim: int) -> Tuple[int, int, int]:
    """Channels per axis (z, y, x): 2 * ceil(dim / 6) for z and y, the rest (even) for x."""
    fz = 2 * math.ceil(dim / 6)
    fx = dim - 2 * fz
    if dim % 2 or fx <= 0:
        raise ValueError(f"config.model.hidden_dim={dim}: the 3-D sine encoding needs an even "
                         f"hidden_dim >= 10 (sin/cos pairs over z, y and x)")
    return fz, fz, fx


def _axis_encoding(n: int, num_feats: int, temperature: float, scale: float) -> np.ndarray:
    """[n, num_feats]: interleaved sin/cos of (i + 1) / n * scale over geometric frequencies."""
    pos = np.arange(1, n + 1, dtype=np.float64) / (n + 1e-6) * scale
    dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats)
    ang = pos[:, None] / dim_t[None, :]
    out = np.empty_like(ang)
    out[:, 0::2] = np.sin(ang[:, 0::2])
    out[:, 1::2] = np.cos(ang[:, 1::2])
    return out


def sine_position_3d(shape: Sequence[int], dim: int, temperature: float = 10000.0,
                     scale: float = 2 * math.pi) -> np.ndarray:
    """Positional encoding of a [d, h, w] grid: float32 [d * h * w, dim], row-major (z, y, x).

    Channels are concat(enc_z, enc_y, enc_x) with split_channels(dim). Coordinates are
    normalised to (0, scale] per axis, so maps of different sizes share the same range. A
    constant of the shape (numpy), folded into the compiled program.
    """
    d, h, w = shape
    fz, fy, fx = split_channels(dim)
    ez = _axis_encoding(d, fz, temperature, scale)
    ey = _axis_encoding(h, fy, temperature, scale)
    ex = _axis_encoding(w, fx, temperature, scale)
    grid = np.concatenate([
        np.broadcast_to(ez[:, None, None, :], (d, h, w, fz)),
        np.broadcast_to(ey[None, :, None, :], (d, h, w, fy)),
        np.broadcast_to(ex[None, None, :, :], (d, h, w, fx)),
    ], axis=-1)
    return grid.reshape(d * h * w, dim).astype(np.float32)
