"""From network outputs on a tile to per-voxel probabilities over the label codes.

Mask2Former head (semantic inference, as Mask2Former / PLAN):
  s_c(v) = sum_q softmax(logits_q)[c] * sigmoid(mask_q(v)),  c = 0..K-1 (no-object dropped),
with the mask logits resized trilinearly from the mask_features grid to the tile before the
sigmoid. Class index 0 is the liver (its target covers liver AND lesions), 1..8 the lesions.

Because the classes are nested (a lesion voxel is also a liver voxel) and there is no background
class, PLAN's plain per-voxel renormalisation of s does not apply as is. We map s to a
distribution over the 10 label codes that sums to 1 per voxel:
  r      = max_c clip(s_c, 0, 1)               P(voxel in the liver incl. lesions)
  t      = min(max_{c>=1} s_c, r)              P(lesion), never above P(liver region)
  p_bg   = 1 - r                               label 0
  p_liv  = r - t                               label 1 (parenchyma)
  p_c    = s_c * t / sum_{c>=1} s_c            labels 2..9 (lesion classes share t pro rata)
so the background is "no class claims the voxel" (1 - the strongest class score) and lesions are
carved out of the liver region, which keeps LiverMax (the max of p_c inside the liver) a
probability in [0, 1]. P(lesion) is the strongest lesion class score, not their sum: with 50
queries, many weak lesion scores would otherwise add up to a confident lesion everywhere the
model is unsure (seen on an undertrained demo model: one "lesion" covering the liver).

Query weighting (config.inference.query_weighting): "none" is the sum above (Mask2Former, PLAN);
"objectness" weights each query's term by its probability of being an object,
  s_c(v) = sum_q (1 - p_q(no object)) softmax(logits_q)[c] sigmoid(mask_q(v)),
which damps the half-sure queries whose overlapping, untrained masks otherwise add up to false
lesions on parenchyma (README, "Query weighting"); a confident query is almost unchanged.

Auxiliary semantic blend (config.inference.aux_semantic_blend = w, with model.aux_semantic):
  p_seg = (1 - w) p + w softmax(aux_seg_logits resized trilinearly to the tile),
an ensemble of the queries' map p with the mask features' own per-voxel map, for the
segmentation only (not in the paper); the tile's probabilities are then [..., 20], p_seg
followed by p, which LiverMax keeps reading (inference/diagnose.py): blended into the patient
scores, the per-voxel map's weak class evidence lowered the test AUCs (README), except for the
classes of config.inference.livermax_blend_classes, lesions of a few mm that the masks' stride-2
grid blurs away and the auxiliary map on the input's grid keeps.

Per-voxel head: softmax of seg_logits over the 10 label codes.
"""

import dataclasses
import functools
import itertools
from typing import Callable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from lidia_jax.model import conv as conv_lib

_EPS = 1e-6


QUERY_WEIGHTINGS = ("none", "objectness")


def check_query_weighting(query_weighting: str):
    """Raises ValueError unless query_weighting is one of QUERY_WEIGHTINGS."""
    if query_weighting not in QUERY_WEIGHTINGS:
        raise ValueError(f"query_weighting {query_weighting!r}; expected one of "
                         f"{QUERY_WEIGHTINGS}")


def check_settings(config):
    """Raises ValueError for config.inference settings of this module that the model or each
    other reject (the trainer calls it before training, not at the first validation)."""
    check_query_weighting(config.inference.get("query_weighting", "none"))
    blend = float(config.inference.get("aux_semantic_blend", 0.0))
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"config.inference.aux_semantic_blend={blend}: expected a weight in "
                         f"[0, 1]")
    if blend > 0 and not (config.model.head == "mask2former"
                          and config.model.get("aux_semantic", False)):
        raise ValueError(f"config.inference.aux_semantic_blend={blend} needs the Mask2Former "
                         f"head's auxiliary semantic map: set config.model.aux_semantic = True "
                         f"(head {config.model.head!r}) or the blend to 0.")
    unknown = set(config.inference.get("livermax_blend_classes", ())) - set(
        tuple(config.data.labels)[2:])
    if unknown:
        raise ValueError(f"config.inference.livermax_blend_classes names {sorted(unknown)}; "
                         f"expected lesion classes of config.data.labels[2:]")


def mask2former_semantic(class_logits, mask_logits, tile_shape: Sequence[int],
                         query_weighting: str = "none"):
    """Mask2Former semantic scores on a tile.

    Args:
      class_logits: [B, Q, K+1] (last = no-object).
      mask_logits: [B, Q, d, h, w] at mask_features resolution.
      tile_shape: (pz, py, px) to resize the masks to.
      query_weighting: "none" or "objectness" (module docstring).
    Returns:
      scores [B, pz, py, px, K] float32, mask_probs [B, Q, pz, py, px] float32.
    """
    check_query_weighting(query_weighting)
    probs = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)
    cls = probs[..., :-1]
    if query_weighting == "objectness":
        cls = cls * (1.0 - probs[..., -1:])
    b, q = mask_logits.shape[:2]
    masks = mask_logits.astype(jnp.float32)
    if tuple(masks.shape[2:]) != tuple(tile_shape):
        # "linear" on 3 spatial axes = trilinear, half-pixel centres (align_corners=False).
        masks = jax.image.resize(masks, (b, q) + tuple(tile_shape), method="linear")
    mask_probs = jax.nn.sigmoid(masks)
    scores = jnp.einsum("bqc,bqdhw->bdhwc", cls, mask_probs)
    return scores, mask_probs


def label_probabilities(scores):
    """Mask2Former class scores [..., K] (0 liver, 1.. lesions) -> [..., K+1] over label codes.

    See the module docstring for the construction; the result is >= 0 and sums to 1.
    """
    s = jnp.clip(scores, 0.0, 1.0)
    region = s.max(axis=-1)
    lesion = s[..., 1:]
    total = lesion.sum(axis=-1)
    t = jnp.minimum(lesion.max(axis=-1), region)
    lesion_p = lesion * (t / jnp.maximum(total, _EPS))[..., None]
    return jnp.concatenate([(1.0 - region)[..., None], (region - t)[..., None], lesion_p],
                           axis=-1)


def query_liver_scores(class_logits, mask_probs, liver_region):
    """Per-tile "query_max" patient evidence: [B, K] max over queries overlapping the liver.

    A query's score for class c is its class probability times the mean mask probability inside
    its binarised mask (Mask2Former instance score); only queries whose binarised mask touches
    the tile's predicted liver region count (0 otherwise).

    Args:
      class_logits: [B, Q, K+1]; mask_probs: [B, Q, pz, py, px]; liver_region: [B, pz, py, px].
    """
    cls = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :-1]
    binary = mask_probs > 0.5
    inside = jnp.sum(mask_probs * binary, axis=(2, 3, 4))
    count = jnp.sum(binary, axis=(2, 3, 4))
    mask_score = inside / jnp.maximum(count, 1)
    touches = jnp.any(binary & liver_region[:, None], axis=(2, 3, 4))
    score = cls * (mask_score * touches)[..., None]
    return score.max(axis=1)


def outputs_to_probs(outputs, head: str, tile_shape: Sequence[int],
                     query_weighting: str = "none", aux_semantic_blend: float = 0.0):
    """Model outputs on tiles -> (probs [B, pz, py, px, 10 or 20], aux [B, K] or None).

    20 channels with aux_semantic_blend > 0: the segmentation's blend, then the queries' map.
    """
    if head == "per_voxel":
        return jax.nn.softmax(outputs["seg_logits"].astype(jnp.float32), axis=-1), None
    if head != "mask2former":
        raise ValueError(f"unknown head {head!r}")
    logits, masks = outputs["logits"][-1], outputs["masks"][-1]
    scores, mask_probs = mask2former_semantic(logits, masks, tile_shape, query_weighting)
    probs = label_probabilities(scores)
    aux = query_liver_scores(logits, mask_probs, probs[..., 0] < 0.5)
    if aux_semantic_blend > 0:
        if "aux_seg_logits" not in outputs:
            raise ValueError("config.inference.aux_semantic_blend > 0 needs the auxiliary "
                             "semantic map: train with config.model.aux_semantic = True.")
        sem = outputs["aux_seg_logits"].astype(jnp.float32)
        sem = jax.image.resize(sem, sem.shape[:1] + tuple(tile_shape) + sem.shape[-1:],
                               method="linear")
        blend = (1.0 - aux_semantic_blend) * probs + aux_semantic_blend * jax.nn.softmax(sem)
        probs = jnp.concatenate([blend, probs], axis=-1)
    return probs, aux


def mirror_combinations(mirror_axes: Sequence[int]):
    """All non-empty subsets of the spatial mirror axes (nnU-Net TTA), as array axes of [B,D,H,W,C]."""
    axes = [int(a) + 1 for a in mirror_axes]
    for a in mirror_axes:
        if int(a) not in (0, 1, 2):
            raise ValueError(f"mirror axes are spatial axes 0 (z), 1 (y), 2 (x); got {a}")
    return [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]


def _predict_tiles(variables, tiles, phase_mask, *, apply_fn, head, tile_shape, mirror_axes,
                   query_weighting, aux_semantic_blend):
    probs_sum, aux_max = None, None
    flips = [()] + mirror_combinations(mirror_axes)
    for axes in flips:
        x = jnp.flip(tiles, axes) if axes else tiles
        probs, aux = outputs_to_probs(apply_fn(variables, x, phase_mask), head, tile_shape,
                                      query_weighting, aux_semantic_blend)
        probs = jnp.flip(probs, axes) if axes else probs
        probs_sum = probs if probs_sum is None else probs_sum + probs
        if aux is not None:
            aux_max = aux if aux_max is None else jnp.maximum(aux_max, aux)
    return probs_sum / len(flips), aux_max


# One jitted function per set of compiler options for the whole process: jit's cache is keyed on
# the static arguments, so every call site that asks for the same model and settings reuses the
# same compilation (e.g. the periodic validation of the training loop).
@functools.lru_cache(maxsize=None)
def _predict_tiles_jit(compiler_options: Tuple[Tuple[str, str], ...] = ()):
    return jax.jit(_predict_tiles, static_argnames=("apply_fn", "head", "tile_shape", "mirror_axes",
                                                   "query_weighting", "aux_semantic_blend"),
                   compiler_options=dict(compiler_options) or None)


def make_tile_predictor(apply_fn: Callable, head: str, tile_shape: Sequence[int],
                        mirror_axes: Sequence[int] = (),
                        compiler_options: Optional[Mapping[str, str]] = None,
                        query_weighting: str = "none",
                        aux_semantic_blend: float = 0.0) -> Callable:
    """A jitted function (variables, tiles, phase_mask) -> (probs, aux), one for all cases.

    apply_fn(variables, image [B, pz, py, px, 4], phase_mask [B, 4]) -> model outputs dict; it
    must be hashable (it is a static argument of jit). Mirroring TTA averages the probabilities
    of the plain and every mirrored pass (each flipped back) and takes the max of the query
    evidence. XLA compiles once per tile batch shape, with `compiler_options` (jax.jit's).
    query_weighting, aux_semantic_blend: the Mask2Former semantic inference's (module
    docstring).
    """
    mirror_combinations(mirror_axes)  # validate early
    check_query_weighting(query_weighting)
    jitted = _predict_tiles_jit(tuple(sorted((compiler_options or {}).items())))
    return functools.partial(jitted, apply_fn=apply_fn, head=head,
                             tile_shape=tuple(int(s) for s in tile_shape),
                             mirror_axes=tuple(int(a) for a in mirror_axes),
                             query_weighting=query_weighting,
                             aux_semantic_blend=float(aux_semantic_blend))


@dataclasses.dataclass(frozen=True)
class _EvalApply:
    """model.apply in eval mode; hashable by the module's configuration (flax modules are)."""

    model: object

    def __call__(self, variables, image, phase_mask):
        return self.model.apply(variables, image, phase_mask, train=False)


def model_tile_predictor(model, config) -> Callable:
    """make_tile_predictor for a flax model built from config.model (eval mode)."""
    check_settings(config)
    return make_tile_predictor(_EvalApply(model), config.model.head, config.input.patch_size,
                               config.inference.mirror_axes,
                               conv_lib.compiler_options(config.model.conv_impl),
                               config.inference.get("query_weighting", "none"),
                               config.inference.get("aux_semantic_blend", 0.0))


def as_variables(params_or_variables):
    """Accepts a params tree or a full variables dict {"params": ...}, or a list of them (an
    ensemble); returns the latter (or a list of the latter)."""
    if isinstance(params_or_variables, (list, tuple)):
        return [as_variables(v) for v in params_or_variables]
    if isinstance(params_or_variables, dict) and "params" in params_or_variables:
        return params_or_variables
    return {"params": params_or_variables}


def bind(tile_predictor: Callable, variables) -> Callable:
    """Closes a tile predictor over variables: (tiles, phase_mask) -> (probs, aux), no retrace.

    variables: one model's, or a list of several models' of the same architecture, an ensemble
    (as nnU-Net averages its folds): their probabilities are averaged and their query evidence
    maxed, as for mirrored passes; one compilation serves all.
    """
    members = list(variables) if isinstance(variables, (list, tuple)) else [variables]
    if len(members) == 1:
        return lambda tiles, phase_mask: tile_predictor(members[0], tiles, phase_mask)

    def ensemble(tiles, phase_mask):
        outputs = [tile_predictor(v, tiles, phase_mask) for v in members]
        probs = sum(p for p, _ in outputs) / len(outputs)
        aux = [a for _, a in outputs if a is not None]
        return probs, (functools.reduce(jnp.maximum, aux) if aux else None)

    return ensemble
