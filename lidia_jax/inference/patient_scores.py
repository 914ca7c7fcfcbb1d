"""Patient-level diagnosis from pixel-level predictions (paper section 2.2, "LiverMax").

LiverMax: the probability that the patient has a lesion of type c is the maximum, over the voxels
inside the predicted liver (liver + lesions), of the per-voxel softmax probability of c.

Malignancy: the per-voxel probability that a voxel is malignant is p_HCC + p_ICC + p_meta (the
classes are mutually exclusive per voxel); the patient's malignancy probability is LiverMax of
that sum. It is >= the max of the three class LiverMax values and <= 1.

Ablations (config.inference.patient_score):
  "volume"    (Zhu et al., the paper's [24]): predicted lesion volume v_c (ml) per class after
              post-processing, mapped to [0, 1) by 1 - exp(-v_c / v0), v0 =
              config.inference.volume_scale_ml (monotone, so AUC only sees the volume ranking);
              malignancy from the summed malignant volume.
  "query_max" the max over Mask2Former queries whose binarised mask touches the liver of
              class probability x mean mask probability (sliding-window aux output);
              malignancy = max over the malignant classes.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def livermax(probs, liver_mask):
    """Per-channel max of probs over the liver: [D, H, W, C], [D, H, W] bool -> [C].

    An empty liver mask gives 0.0 for every channel (no liver found = no evidence of a lesion),
    never NaN or -inf. Because probabilities are >= 0, this also makes LiverMax of a volume equal
    the max of LiverMax over any split of it into slabs. Works under vmap (batch axis first).
    """
    masked = jnp.where(liver_mask[..., None], probs, -jnp.inf)
    peak = masked.max(axis=(0, 1, 2))
    return jnp.where(jnp.any(liver_mask), peak, 0.0).astype(probs.dtype)


def _malignancy_channels(probs, malignant_codes: Sequence[int]):
    """[..., C] -> [..., C - 2 + 1]: lesion channels (codes 2..) then their malignant sum."""
    lesion = probs[..., 2:]
    malignant = sum(probs[..., c] for c in malignant_codes)
    return jnp.concatenate([lesion, malignant[..., None]], axis=-1)


@functools.partial(jax.jit, static_argnames="malignant_codes")
def _slab_livermax(probs, liver_mask, malignant_codes):
    return livermax(_malignancy_channels(probs.astype(jnp.float32), malignant_codes), liver_mask)


def livermax_scores(probs: np.ndarray, liver_mask: np.ndarray, malignant_codes: Sequence[int],
                    slab: int = 32):
    """LiverMax of a whole (possibly huge, float16) volume, computed slab by slab along z.

    Args:
      probs: [D, H, W, 10] probabilities over label codes; liver_mask: [D, H, W] bool.
      malignant_codes: label codes of the malignant classes (2, 3, 4).
      slab: z-slices per jitted call (the last slab is padded with an empty mask: one shape).
    Returns:
      (per_class [8] float, malignancy float): lesion classes HCC..others, then malignancy.
    """
    depth = probs.shape[0]
    slab = max(1, min(slab, depth))
    best = None
    for z in range(0, depth, slab):
        p = np.asarray(probs[z:z + slab])
        m = np.asarray(liver_mask[z:z + slab], bool)
        if p.shape[0] < slab:
            pad = slab - p.shape[0]
            p = np.pad(p, ((0, pad), (0, 0), (0, 0), (0, 0)))
            m = np.pad(m, ((0, pad), (0, 0), (0, 0)))
        v = np.asarray(_slab_livermax(p, m, tuple(int(c) for c in malignant_codes)))
        best = v if best is None else np.maximum(best, v)
    return best[:-1].astype(float), float(best[-1])


def volume_scores(lesions: Sequence[dict], lesion_names: Sequence[str],
                  malignant: Sequence[str], volume_scale_ml: float):
    """"volume" patient score from post-processed lesions ({"class": name, "volume_ml": v})."""
    volume = {name: 0.0 for name in lesion_names}
    for lesion in lesions:
        volume[lesion["class"]] += float(lesion["volume_ml"])
    per_class = np.array([1.0 - np.exp(-volume[n] / volume_scale_ml) for n in lesion_names])
    malignant_volume = sum(volume[n] for n in malignant)
    return per_class, float(1.0 - np.exp(-malignant_volume / volume_scale_ml))


def query_max_scores(aux: np.ndarray, lesion_names: Sequence[str], malignant: Sequence[str]):
    """"query_max" patient score from the sliding-window aux output [K] (0 liver, 1.. lesions)."""
    if aux is None:
        raise ValueError("patient_score='query_max' needs the mask2former head (query scores); "
                         "the per_voxel head has no queries")
    per_class = np.asarray(aux, float)[1:1 + len(lesion_names)]
    index = {n: i for i, n in enumerate(lesion_names)}
    return per_class, float(max(per_class[index[n]] for n in malignant))
