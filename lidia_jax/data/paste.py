"""Lesion copy-paste augmentation for rare lesion classes (config.input.paste_prob, paste_classes).

A rare, small class is memorised rather than learned: the demo model finds the 9 calcifications of
its 8 training patients and none of the validation or test patients' (README, scripts/
class_probe.py). Pasting the training split's lesions of those classes into other training
patches shows each one in many livers, positions and neighbourhoods, as copy-paste augmentation
does for rare instances in detection (Ghiasi et al., CVPR 2021) and lesion segmentation.

A donor is one lesion's bounding box (plus a margin) cut from a training case: every phase
relative to that case's mean liver value (lesion patterns are defined against the same phase's
liver; contrast timing shifts a patient's values together), its mask and label code. Pasting it
into a patch (after the spatial augmentation, before the intensity one):

  - the place: a random offset at which every donor lesion voxel falls on the patch's liver
    parenchyma (label 1), so a pasted lesion lies inside the liver and touches no other lesion;
  - the values: recipient liver mean + donor value, per phase, blended with a soft mask (the
    lesion mask smoothed by a Gaussian of `sigma` voxels) so the edge has the partial-volume
    blur of a real one (on parenchyma only: neighbouring lesions keep their values); the
    donor must have every phase the patch has;
  - the labels: the lesion's voxels take its label code and a new instance id.

Donors are flipped at random along each axis. Everything is numpy on the input workers; the bank
travels to them with the transform (a few hundred KB for the demo).
"""

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np
import scipy.ndimage as ndi

LIVER_CODE = 1
MARGIN = 1  # voxels of the donor's neighbourhood kept around its lesion (for the soft edge)


@dataclasses.dataclass(frozen=True)
class Donor:
    """One lesion to paste: values [d, h, w, 4] relative to its case's liver mean per phase
    (0 where the phase is absent), mask bool [d, h, w], weight [d, h, w] in [0, 1] (soft mask),
    phase_mask bool [4], code (label code)."""

    values: np.ndarray
    mask: np.ndarray
    weight: np.ndarray
    phase_mask: np.ndarray
    code: int


def liver_reference(image: np.ndarray, liver: np.ndarray) -> Optional[np.ndarray]:
    """Mean of each phase [4] over `liver` (bool, the parenchyma: label 1), or None if empty."""
    if not liver.any():
        return None
    return image[liver].mean(axis=0)


def donors_from_case(image: np.ndarray, seg: np.ndarray, inst: np.ndarray,
                     phase_mask: np.ndarray, code_table: np.ndarray, codes: Sequence[int],
                     sigma: float) -> List[Donor]:
    """The donors of one case: each lesion instance whose label code is in `codes`.

    image [D, H, W, 4], seg [D, H, W] label codes, inst [D, H, W] instance ids, code_table
    (patches.instance_code_table) instance id -> code.
    """
    codes = set(codes)
    wanted = [i for i in range(1, len(code_table)) if int(code_table[i]) in codes]
    if not wanted:
        return []
    ref = liver_reference(np.asarray(image), np.asarray(seg) == LIVER_CODE)
    if ref is None:
        return []
    inst = np.asarray(inst)
    boxes = ndi.find_objects(inst)
    out = []
    for i in wanted:
        if i > len(boxes) or boxes[i - 1] is None:
            continue
        box = tuple(slice(max(s.start - MARGIN, 0), min(s.stop + MARGIN, n))
                    for s, n in zip(boxes[i - 1], inst.shape))
        mask = inst[box] == i
        values = (np.asarray(image[box], np.float32) - ref) * phase_mask
        weight = np.clip(ndi.gaussian_filter(mask.astype(np.float32), sigma), 0.0, 1.0)
        weight = np.maximum(weight, mask)  # the lesion itself is fully replaced
        out.append(Donor(values.astype(np.float32), mask, weight.astype(np.float32),
                         np.asarray(phase_mask, bool), int(code_table[i])))
    return out


def place(mask: np.ndarray, liver: np.ndarray, rng: np.random.Generator,
          tries: int) -> Optional[Tuple[int, int, int]]:
    """A corner at which a lesion's box (mask bool [d, h, w]) fits in the patch (liver bool
    [Pz, Py, Px]) with every lesion voxel on liver, or None."""
    room = np.asarray(liver.shape) - np.asarray(mask.shape)
    if (room < 0).any():
        return None
    # Corners whose box holds liver at the mask's first voxel: sample those instead of blindly.
    anchor = np.argwhere(mask)[0]
    cand = np.argwhere(liver) - anchor
    cand = cand[((cand >= 0) & (cand <= room)).all(axis=1)]
    if not len(cand):
        return None
    for k in rng.choice(len(cand), size=min(tries, len(cand)), replace=False):
        z, y, x = (int(v) for v in cand[k])
        region = liver[z:z + mask.shape[0], y:y + mask.shape[1], x:x + mask.shape[2]]
        if region[mask].all():
            return z, y, x
    return None


def paste(image: np.ndarray, seg: np.ndarray, inst: np.ndarray, phase_mask: np.ndarray,
          code_table: np.ndarray, donor: Donor, rng: np.random.Generator, tries: int = 20):
    """Pastes `donor` into a patch, or returns the inputs unchanged when it fits nowhere.

    Args:
      image: float32 [Pz, Py, Px, 4]; seg: uint8 labels; inst: uint16 instance ids; phase_mask
        bool [4]; code_table: int [K + 1] instance id -> label code.
    Returns:
      (image, seg, inst, code_table), new arrays where anything was pasted.
    """
    if not np.all(donor.phase_mask[phase_mask]):
        return image, seg, inst, code_table
    flips = [a for a in range(3) if rng.random() < 0.5]
    values, mask, weight = (np.flip(a, flips) if flips else a
                            for a in (donor.values, donor.mask, donor.weight))
    liver = seg == LIVER_CODE
    ref = liver_reference(image, liver)
    corner = None if ref is None else place(mask, liver, rng, tries)
    if corner is None:
        return image, seg, inst, code_table
    box = tuple(slice(c, c + n) for c, n in zip(corner, mask.shape))
    image = image.copy()
    w = (weight * liver[box])[..., None]  # the soft edge spares other lesions
    image[box] = (1.0 - w) * image[box] + w * ((ref + values) * phase_mask)
    seg, inst, code_table = add_instance(seg, inst, code_table, box, mask, donor.code)
    return image, seg, inst, code_table


def add_instance(seg: np.ndarray, inst: np.ndarray, code_table: np.ndarray, box: tuple,
                 mask: np.ndarray, code: int):
    """Copies of seg and inst with `mask` (bool, the shape of `box`, a tuple of slices) labelled
    `code` as a new instance, and code_table extended to it."""
    seg, inst = seg.copy(), inst.copy()
    new_id = max(int(inst.max()), len(code_table) - 1) + 1
    seg[box][mask] = code
    inst[box][mask] = new_id
    code_table = np.concatenate([code_table, np.zeros(new_id + 1 - len(code_table), np.int32)])
    code_table[new_id] = code
    return seg, inst, code_table
