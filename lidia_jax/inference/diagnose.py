"""One preprocessed case -> probabilities, post-processed lesions and the patient-level diagnosis.

Shared by `predict` (files out, original geometry) and `evaluation.evaluate` (metrics, either
in the original geometry or directly on the preprocessed grid for periodic validation).
"""

import dataclasses
import time
from typing import Callable, Optional, Sequence

import numpy as np

from lidia_jax.inference import lesion_forest
from lidia_jax.inference import patient_scores
from lidia_jax.inference import postprocess as postprocess_lib
from lidia_jax.inference import sliding_window


@dataclasses.dataclass
class Diagnosis:
    probs: np.ndarray  # [D, H, W, 10] per-voxel probabilities over label codes (float16)
    seg: np.ndarray  # [D, H, W] uint8 post-processed label codes (preprocessed grid)
    instances: np.ndarray  # [D, H, W] uint16 lesion ids 1..K (preprocessed grid)
    lesions: list  # postprocess dicts, "label" = lesion code
    patient_probabilities: np.ndarray  # [8] lesion classes HCC..others
    malignancy_probability: float
    seconds: dict  # wall time of the stages


def label_names(config) -> tuple:
    return tuple(config.data.labels)


def lesion_names(config) -> tuple:
    return tuple(config.data.labels)[2:]


def argmax_labels(probs: np.ndarray, slab: int = 16) -> np.ndarray:
    """[D, H, W, C] -> uint8 [D, H, W] argmax, slab by slab (np.argmax alone returns int64:
    8 bytes a voxel, 0.6 GiB for a 300 x 512 x 512 volume)."""
    out = np.empty(probs.shape[:3], np.uint8)
    for z in range(0, probs.shape[0], slab):
        out[z:z + slab] = np.argmax(probs[z:z + slab], axis=-1)
    return out


def min_lesion_volumes(config) -> np.ndarray:
    """[8] minimum volume (mm^3) per lesion class: config.inference.min_lesion_volume_mm3,
    except the classes named in config.inference.min_lesion_volume_by_class."""
    by_class = dict(config.inference.get("min_lesion_volume_by_class", {}))
    names = lesion_names(config)
    unknown = sorted(set(by_class) - set(names))
    if unknown:
        raise ValueError(f"config.inference.min_lesion_volume_by_class: unknown classes {unknown}; "
                         f"lesion classes are {names}")
    return np.array([float(by_class.get(n, config.inference.min_lesion_volume_mm3))
                     for n in names])


def diagnose_volume(image: np.ndarray, phase_mask: Sequence[bool], tile_fn: Callable,
                    spacing: Sequence[float], config, forest=None) -> Diagnosis:
    """Sliding window + post-processing + patient score for one preprocessed case.

    Args:
      image: [D, H, W, 4] float32 normalised volume (cache image.npy / preprocess_case).
      phase_mask: [4] bool.
      tile_fn: bound tile predictor (semantic.bind(model_tile_predictor(...), variables)).
      spacing: (z, y, x) mm of the preprocessed grid.
      config: the full config (input.patch_size, inference.*, data.labels / malignant).
      forest: a lesion_forest.LesionForest (lesion_forest.load) or None: it names the
        post-processed lesions and enters the patient scores (config.inference.
        lesion_forest_weight; see inference/lesion_forest.py).
    """
    inf = config.inference
    t0 = time.perf_counter()
    res = sliding_window.sliding_window_inference(
        np.asarray(image, np.float32), np.asarray(phase_mask, bool), tile_fn,
        config.input.patch_size, inf.tile_batch, inf.overlap, inf.gaussian_sigma_scale,
        out_dtype=np.dtype(inf.get("probs_dtype", "float16")))
    t1 = time.perf_counter()
    names = label_names(config)
    # With inference.aux_semantic_blend the tiles carry the segmentation's blended map, then the
    # queries' own map for LiverMax (inference/semantic.py), except for the classes of
    # inference.livermax_blend_classes; otherwise one map serves both.
    probs, score_probs = res.probs[..., :len(names)], res.probs[..., -len(names):]
    labels = argmax_labels(probs)
    pp = postprocess_lib.postprocess(labels, probs, spacing, min_lesion_volumes(config),
                                     inf.max_liver_distance_mm)
    del labels
    t2 = time.perf_counter()
    lesion = lesion_names(config)
    malignant = tuple(config.data.malignant)
    method = inf.patient_score
    if method == "livermax":
        liver, malignant_codes = pp.seg >= 1, tuple(names.index(n) for n in malignant)
        per_class, malignancy = patient_scores.livermax_scores(score_probs, liver,
                                                               malignant_codes)
        from_blend = [lesion.index(n) for n in inf.get("livermax_blend_classes", ())]
        if from_blend:
            per_class[from_blend] = patient_scores.livermax_scores(
                probs, liver, malignant_codes)[0][from_blend]
    elif method == "volume":
        voxel_ml = float(np.prod(spacing)) / 1000.0
        lesions = [{"class": names[l["label"]], "volume_ml": l["voxels"] * voxel_ml}
                   for l in pp.lesions]
        per_class, malignancy = patient_scores.volume_scores(lesions, lesion, malignant,
                                                             inf.volume_scale_ml)
    elif method == "query_max":
        per_class, malignancy = patient_scores.query_max_scores(res.aux, lesion, malignant)
    else:
        raise ValueError(f"config.inference.patient_score={method!r}; expected livermax, "
                         "volume or query_max")
    seg, lesions = pp.seg, pp.lesions
    if forest is not None:
        seg, lesions, per_class, malignancy = _forest_opinion(
            forest, image, seg, pp.instances, lesions, per_class, malignancy,
            tuple(lesion.index(n) for n in malignant), inf.lesion_forest_weight)
    t3 = time.perf_counter()
    return Diagnosis(probs=probs, seg=seg, instances=pp.instances, lesions=lesions,
                     patient_probabilities=np.asarray(per_class, float),
                     malignancy_probability=float(malignancy),
                     seconds={"sliding_window": t1 - t0, "postprocess": t2 - t1,
                              "patient_score": t3 - t2, "tiles": res.num_tiles})


def _forest_opinion(forest, image, seg, instances, lesions, per_class, malignancy,
                    malignant_columns: Sequence[int], weight: float):
    """The lesion forest's classes for the post-processed lesions, and the patient scores blended
    with its lesion-wise maxima (inference/lesion_forest.py). Returns (seg, lesions, per_class,
    malignancy); seg is relabelled lesion by lesion, instances are unchanged."""
    ids, _, features = lesion_forest.lesion_features(np.asarray(image), seg, instances)
    prob = forest.probabilities(features)  # [L, 8]
    lesions, by_id = [dict(l) for l in lesions], dict(zip(ids.tolist(), prob))
    code_of = np.zeros(int(instances.max(initial=0)) + 1, seg.dtype)  # instance id -> label code
    for lesion in lesions:
        p = by_id[lesion["id"]]
        code_of[lesion["id"]] = lesion_forest.FIRST_LESION_CODE + int(p.argmax())
        lesion.update(label=int(code_of[lesion["id"]]), class_probabilities=p,
                      score=float(p.max()))
    # Post-processing gave each instance's voxels one code: relabel them all in one pass.
    seg = np.where(instances > 0, code_of[instances], seg)
    forest_max = prob.max(0) if len(prob) else np.zeros(len(per_class))
    forest_malignancy = float(prob[:, list(malignant_columns)].sum(1).max()) if len(prob) else 0.0
    return (seg, lesions, weight * forest_max + (1.0 - weight) * np.asarray(per_class, float),
            weight * forest_malignancy + (1.0 - weight) * float(malignancy))


def instance_classes(lesions: Sequence[dict]) -> dict:
    """{lesion id: label code} of post-processed lesions."""
    return {int(l["id"]): int(l["label"]) for l in lesions}


def lesion_report(lesion: dict, measures: Optional[dict], names: Sequence[str]) -> dict:
    """One entry of CASE.json["lesions"] (data contract)."""
    lesion_cls = list(names)[2:]
    out = {"id": int(lesion["id"]), "class": names[lesion["label"]],
           "score": round(float(lesion["score"]), 6),
           "class_probabilities": {n: round(float(p), 6)
                                   for n, p in zip(lesion_cls, lesion["class_probabilities"])}}
    if measures is not None:
        out.update({"volume_ml": round(measures["volume_ml"], 6),
                    "centroid_mm": [round(float(c), 4) for c in measures["centroid_mm"]],
                    "max_diameter_mm": round(measures["max_diameter_mm"], 4)})
    return out
