"""Patch sampling (nnU-Net / PLAN foreground oversampling) and Mask2Former targets.

Spatial tuples are (z, y, x); volumes are [D, H, W] (labels) or [D, H, W, 4] (images).

Sampling rule (PLAN's `dataset_loading_v2.py`, a per-sample Bernoulli instead of nnU-Net's
"last third of the batch", which with batch 2 would force foreground half of the time):
with probability `fg_prob` the patch is centred on a random lesion voxel (falling back to a
liver voxel when the case has no lesion, then to a random patch), otherwise its position is
uniform. The centre is jittered so lesions are not always exactly in the middle of a patch.
"""

from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

# Kinds of patch the sampler can draw (returned for logging and tests).
RANDOM, LESION, LIVER = "random", "lesion", "liver"


def start_range(shape: Sequence[int], patch_size: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Allowed patch starts per axis, inclusive: [lo, hi], lo = min(0, S - P), hi = max(0, S - P).

    Where the volume is at least as large as the patch, the patch stays inside (nnU-Net v2 pads only
    where needed); where it is smaller, the volume stays inside the patch and the rest is padding.
    """
    shape = np.asarray(shape, np.int64)
    patch = np.asarray(patch_size, np.int64)
    return np.minimum(0, shape - patch), np.maximum(0, shape - patch)


BALANCES = ("voxel", "instance", "class", "cohort")


def check_balance(balance: str) -> str:
    """Returns `balance` (config.input.fg_balance) if it is one of BALANCES, else raises."""
    if balance not in BALANCES:
        raise ValueError(f"config.input.fg_balance={balance!r}; expected one of {BALANCES}")
    return balance


def _pick_lesion_voxel(fg_locations: Mapping[str, np.ndarray], balance: str,
                       rng: np.random.Generator, focus: Optional[int] = None) -> int:
    """Index into fg_locations["lesion"] of the voxel a lesion-centred patch is built around.

    balance "voxel": uniform over lesion voxels (large lesions dominate); "instance": a lesion
    uniformly, then one of its voxels; "class": a lesion class present in the case uniformly,
    then a lesion of that class, then a voxel; "cohort": as "class", but the class is `focus`
    (the class the case was drawn for, pipeline.class_balanced_order) when the case has it.
    Needs "lesion_instance" / "lesion_class" (int [N], instance id and label code per location)
    for all but "voxel".
    """
    if check_balance(balance) == "voxel":
        return int(rng.integers(len(fg_locations[LESION])))
    ids = np.asarray(fg_locations["lesion_instance"])
    if balance in ("class", "cohort"):
        codes = np.asarray(fg_locations["lesion_class"])
        present = np.unique(codes)
        chosen = present[rng.integers(len(present))]  # drawn always: the same stream layout
        if balance == "cohort" and focus is not None and focus in present:
            chosen = focus
        ids = np.where(codes == chosen, ids, -1)
    instances = np.unique(ids[ids >= 0])
    candidates = np.flatnonzero(ids == instances[rng.integers(len(instances))])
    return int(candidates[rng.integers(len(candidates))])


def sample_patch_start(
    shape: Sequence[int],
    patch_size: Sequence[int],
    fg_locations: Mapping[str, np.ndarray],
    fg_prob: float,
    jitter: float,
    rng: np.random.Generator,
    balance: str = "voxel",
    focus: Optional[int] = None,
) -> Tuple[np.ndarray, str]:
    """Draws the lower corner of one training patch.

    Args:
      shape: (D, H, W) of the case.
      patch_size: (Pz, Py, Px).
      fg_locations: {"lesion": int [N, 3], "liver": int [M, 3]} voxel coordinates (meta.json),
        plus "lesion_instance" and "lesion_class" int [N] where `balance` is not "voxel".
      fg_prob: probability of a foreground-centred patch (config.input.fg_prob).
      jitter: the centre is moved by up to `jitter * patch_size` voxels per axis (uniform), so a
        forced lesion voxel lies in the central part of the patch, not always at its centre.
      rng: per-record generator (grain random_map), for determinism.
      balance: how the lesion voxel is chosen (config.input.fg_balance, _pick_lesion_voxel).
      focus: label code of the lesion class to centre on ("cohort" balance), or None.

    Returns:
      (start int64 [3], kind) with kind in {"random", "lesion", "liver"}; "random" is returned when
      a foreground draw found no foreground in the case.
    """
    lo, hi = start_range(shape, patch_size)
    patch = np.asarray(patch_size, np.int64)
    # The Bernoulli is drawn first and always, so the random stream has the same layout for every
    # case (a case without foreground does not shift the draws of the other decisions).
    force_fg = rng.random() < fg_prob
    if force_fg:
        for kind in (LESION, LIVER):
            locs = fg_locations.get(kind)
            if locs is not None and len(locs):
                pick = (_pick_lesion_voxel(fg_locations, balance, rng, focus) if kind == LESION
                        else rng.integers(len(locs)))
                voxel = np.asarray(locs[pick], np.int64)
                max_shift = np.floor(jitter * patch).astype(np.int64)
                shift = rng.integers(-max_shift, max_shift + 1)
                start = voxel - patch // 2 + shift
                return np.clip(start, lo, hi), kind
    return rng.integers(lo, hi + 1), RANDOM


def crop(volume: np.ndarray, start: Sequence[int], patch_size: Sequence[int],
         fill=0) -> np.ndarray:
    """Cuts `volume[start : start + patch_size]` over the first three axes, padding with `fill`.

    Reads only the overlapping block, so `volume` may be a memory map. Trailing axes (channels) are
    kept. Returns a new contiguous array of shape patch_size + volume.shape[3:].
    """
    out = np.full(tuple(patch_size) + volume.shape[3:], fill, dtype=volume.dtype)
    src, dst = [], []
    for s, p, n in zip(start, patch_size, volume.shape[:3]):
        a, b = max(int(s), 0), min(int(s) + int(p), n)
        if b <= a:  # patch entirely outside this axis: all padding
            return out
        src.append(slice(a, b))
        dst.append(slice(a - int(s), b - int(s)))
    out[tuple(dst)] = volume[tuple(src)]
    return out


def instance_code_table(instance_classes: Mapping[str, int], max_id: int) -> np.ndarray:
    """meta.json "instance_classes" {"1": code, ...} -> int32 [max_id + 1] lookup (0 unknown)."""
    table = np.zeros(max(int(max_id), 0) + 1, np.int32)
    for key, code in instance_classes.items():
        i = int(key)
        if 0 < i <= max_id:
            table[i] = int(code)
    return table


def build_targets(
    semantic: np.ndarray,
    instances: np.ndarray,
    code_table: np.ndarray,
    max_instances: int,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask2Former targets of one patch.

    Target 0 is the liver (semantic >= 1: parenchyma and lesions, as PLAN's organ target), then one
    target per lesion instance present in the patch, class index = label code - 1 (1..8). When the
    patch holds more than max_instances - 1 lesions the largest ones (most voxels in the patch) are
    kept: small fragments cut by the patch border are the least informative targets. Lesions are
    ordered by decreasing size (ties: smaller id first); the order is irrelevant to the Hungarian
    matching but makes the output deterministic.

    An instance whose class is missing from meta.json takes the most frequent lesion label under its
    voxels; an instance with no lesion label at all (inconsistent cache) is skipped.

    Args:
      semantic: int [D, H, W] label codes 0..9.
      instances: int [D, H, W] lesion instance ids 0..K.
      code_table: int [K' + 1] instance id -> label code (instance_code_table).
      max_instances: T (config.data.max_instances).

    Returns:
      masks bool [T, D, H, W], classes int32 [T], valid bool [T]; invalid slots are all-False with
      class 0.
    """
    shape = semantic.shape
    masks = np.zeros((max_instances,) + shape, bool)
    classes = np.zeros(max_instances, np.int32)
    valid = np.zeros(max_instances, bool)
    masks[0] = semantic >= 1
    valid[0] = masks[0].any()

    inst = instances.ravel()
    counts = np.bincount(inst, minlength=1)
    counts[0] = 0
    ids = np.flatnonzero(counts)
    if ids.size == 0 or max_instances < 2:
        return masks, classes, valid
    order = np.lexsort((ids, -counts[ids]))  # size descending, then id ascending
    slot = 1
    for i in ids[order]:
        if slot >= max_instances:
            break
        mask = instances == i
        code = int(code_table[i]) if i < len(code_table) else 0
        if code < 2:
            labels = semantic[mask]
            labels = labels[labels >= 2]
            if labels.size == 0:
                continue
            code = int(np.bincount(labels).argmax())
        masks[slot] = mask
        classes[slot] = code - 1
        valid[slot] = True
        slot += 1
    return masks, classes, valid


def fg_locations_from_meta(meta: Mapping, path: Optional[str] = None) -> dict:
    """meta["fg_locations"] -> {"lesion": int32 [N, 3], "liver": int32 [M, 3]} (N = 0 if absent)."""
    out = {}
    locs = meta.get("fg_locations", {}) or {}
    for kind in (LESION, LIVER):
        arr = np.asarray(locs.get(kind) or [], np.int32)
        if arr.size == 0:
            arr = np.zeros((0, 3), np.int32)
        if arr.ndim != 2 or arr.shape[1] != 3:
            raise ValueError(f"{path or 'meta.json'}: fg_locations[{kind!r}] must be a list of "
                             f"[z, y, x] triples, got shape {arr.shape}")
        out[kind] = arr
    return out
