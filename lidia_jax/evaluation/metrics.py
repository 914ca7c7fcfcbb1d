"""The paper's metrics (Table 1 / 3): patient-wise AUC, lesion-wise detection, pixel-wise Dice.

Evaluation is two steps: `case_record` scores one case (prediction vs truth on one grid) into a
small dict, and `summarize` aggregates the records of a cohort. Definitions:

Patient-wise (one-vs-rest over patients, sklearn's roc_auc_score):
  truth of class c = the case holds at least one lesion of class c; score = the patient
  probability of c. A class absent from every patient, or present in every patient, has no
  AUC: NaN, reported as null and left out of AUC-8 (= the mean over the classes that have one;
  "auc8_classes" names them). AUC-2: malignancy probability of malignant patients (>= 1
  HCC/ICC/meta lesion) against benign ones (>= 1 lesion, all heman/FNH/cyst/calc); patients with
  neither (no lesion, or "others" without a malignant lesion) are left out. "auc2_without"[c]:
  AUC-2 again over the patients who hold no lesion of class c, for each class c some patient
  holds (null where one side is left empty): with a few benign patients, one class's
  ranking can carry AUC-2 (the demo's FNH, README).
Lesion-wise:
  a predicted lesion detects a true one when their voxel IoU >= config.eval.lesion_iou_threshold;
  predictions and truths are matched one-to-one (Hungarian, scipy) maximising first the number
  of matches, then their total IoU. precision = matched / predicted, sensitivity = matched /
  true, classification accuracy = correct class / matched, all pooled over the cohort's lesions.
  Confusion matrix rows = true class, columns = predicted class, plus "none" (a missed true
  lesion: column none; a false-positive prediction: row none).
  Detection by class: per true class, the true lesions and how many were matched (whatever
  class the match was given). Detection by size: the same per bin of equivalent-sphere diameter
  (6 V / pi)^(1/3) of the true lesion, edges SIZE_EDGES_MM, when every record has the voxel
  volume (case_record's voxel_mm3).
Pixel-wise lesion Dice (all lesion classes one foreground, label >= 2):
  HEADLINE "lesion_dice" = global Dice over the voxels of all cases pooled;
  "lesion_dice_per_case" = mean of the per-case Dice over the cases where truth or prediction has
  a lesion (a case empty in both has no Dice and is left out).
"""

from typing import Dict, Mapping, Optional, Sequence

import numpy as np
from scipy import optimize
from sklearn import metrics as sk_metrics

FIRST_LESION_CODE = 2
# Detection-by-size bins, equivalent-sphere diameter in mm: LI-RADS's 10 and 20 mm observation
# sizes, then 30 and 50 mm.
SIZE_EDGES_MM = (10.0, 20.0, 30.0, 50.0)


def equivalent_diameter_mm(volume_mm3):
    """Diameter (mm) of the sphere of the given volume (mm^3): (6 V / pi)^(1/3)."""
    return np.cbrt(6.0 * np.asarray(volume_mm3, float) / np.pi)


def size_bin_names(edges=SIZE_EDGES_MM):
    """["<10", "10-20", ..., ">=50"] for the edges (mm)."""
    fmt = lambda e: f"{e:g}"
    return ([f"<{fmt(edges[0])}"] + [f"{fmt(a)}-{fmt(b)}" for a, b in zip(edges[:-1], edges[1:])]
            + [f">={fmt(edges[-1])}"])


def overlap_matrix(gt_inst: np.ndarray, pred_inst: np.ndarray):
    """Voxel counts: intersections [G+1, P+1] (row/col 0 = background), sizes of each id."""
    g_max, p_max = int(gt_inst.max(initial=0)), int(pred_inst.max(initial=0))
    joint = gt_inst.astype(np.int64) * (p_max + 1) + pred_inst.astype(np.int64)
    inter = np.bincount(joint.ravel(), minlength=(g_max + 1) * (p_max + 1))
    return inter.reshape(g_max + 1, p_max + 1)


def match_lesions(gt_inst: np.ndarray, pred_inst: np.ndarray, iou_threshold: float):
    """One-to-one matches between true and predicted lesions.

    Args:
      gt_inst, pred_inst: [D, H, W] int instance ids (0 = none) on the same grid.
      iou_threshold: minimal IoU for a pair to count as a detection.
    Returns:
      list of (gt_id, pred_id, iou) for the matched pairs, ids as in the maps.
    """
    inter = overlap_matrix(gt_inst, pred_inst)
    g_size, p_size = inter.sum(1), inter.sum(0)
    gt_ids = np.flatnonzero(g_size[1:]) + 1
    pred_ids = np.flatnonzero(p_size[1:]) + 1
    if len(gt_ids) == 0 or len(pred_ids) == 0:
        return []
    i = inter[np.ix_(gt_ids, pred_ids)].astype(float)
    iou = i / (g_size[gt_ids, None] + p_size[None, pred_ids] - i)
    eligible = iou >= iou_threshold
    # Weight L + IoU with L > any possible match count: more matches always win, then IoU.
    big = min(len(gt_ids), len(pred_ids)) + 1
    rows, cols = optimize.linear_sum_assignment(np.where(eligible, big + iou, 0.0), maximize=True)
    return [(int(gt_ids[r]), int(pred_ids[c]), float(iou[r, c]))
            for r, c in zip(rows, cols) if eligible[r, c]]


def case_record(case: str, gt_seg: np.ndarray, gt_inst: np.ndarray,
                gt_classes: Mapping[int, int], pred_seg: np.ndarray, pred_inst: np.ndarray,
                pred_classes: Mapping[int, int], patient_probabilities: Sequence[float],
                malignancy_probability: float, iou_threshold: float,
                patient_codes: Optional[Sequence[int]] = None,
                voxel_mm3: Optional[float] = None) -> dict:
    """Scores one case. Label maps on one grid; *_classes: {instance id: lesion label code}.

    patient_probabilities: [8] for the lesion codes 2..9; patient_codes: the lesion codes the
    patient truly holds (default: the values of gt_classes); voxel_mm3: the grid's voxel volume,
    for the true lesions' diameters (detection by size; None: no diameters).
    """
    if gt_seg.shape != pred_seg.shape:
        raise ValueError(f"{case}: prediction shape {pred_seg.shape} differs from the truth "
                         f"{gt_seg.shape}")
    gt_fg, pred_fg = gt_seg >= FIRST_LESION_CODE, pred_seg >= FIRST_LESION_CODE
    matches = match_lesions(gt_inst, pred_inst, iou_threshold)
    ids, sizes = np.unique(gt_inst, return_counts=True)
    gt_voxels = {int(i): int(n) for i, n in zip(ids, sizes) if i > 0 and int(i) in gt_classes}
    gt_ids = list(gt_voxels)
    pred_ids = [int(i) for i in np.unique(pred_inst) if i > 0 and int(i) in pred_classes]
    codes = sorted(set(gt_classes.values())) if patient_codes is None else sorted(patient_codes)
    extra = {}
    if voxel_mm3 is not None:
        extra["gt_diameters_mm"] = {i: float(equivalent_diameter_mm(n * voxel_mm3))
                                    for i, n in gt_voxels.items()}
    return {
        "case": case,
        "patient_codes": [int(c) for c in codes],
        "patient_probabilities": [float(p) for p in patient_probabilities],
        "malignancy_probability": float(malignancy_probability),
        "dice_intersection": int(np.count_nonzero(gt_fg & pred_fg)),
        "dice_gt": int(np.count_nonzero(gt_fg)),
        "dice_pred": int(np.count_nonzero(pred_fg)),
        "gt_lesions": {i: int(gt_classes[i]) for i in gt_ids},
        "pred_lesions": {i: int(pred_classes[i]) for i in pred_ids},
        "matches": [(g, p, iou) for g, p, iou in matches if g in gt_classes and p in pred_classes],
        **extra,
    }


def _nan_to_none(x):
    return None if x is None or not np.isfinite(x) else float(x)


def _detection(true: int, matched: int) -> dict:
    return {"true": true, "matched": matched,
            "sensitivity": matched / true if true else None}


def patient_aucs(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC per class over patients: truth [N, C] bool, scores [N, C] -> [C], NaN if undefined."""
    out = np.full(truth.shape[1], np.nan)
    for c in range(truth.shape[1]):
        if 0 < truth[:, c].sum() < len(truth):
            out[c] = sk_metrics.roc_auc_score(truth[:, c], scores[:, c])
    return out


def malignancy_auc(codes: Sequence[set], scores: Sequence[float], malignant_codes: set,
                   benign_codes: set):
    """AUC-2 (module docstring) from each patient's lesion codes and malignancy probability.

    Returns (auc or NaN, labels, scores) over the patients it counts: 1 malignant, 0 benign.
    """
    y, s = [], []
    for cs, score in zip(codes, scores):
        if cs & malignant_codes:
            y.append(1)
        elif cs and cs <= benign_codes:
            y.append(0)
        else:
            continue
        s.append(score)
    auc = float(sk_metrics.roc_auc_score(y, s)) if 0 < sum(y) < len(y) else float("nan")
    return auc, y, s


def summarize(records: Sequence[dict], lesion_names: Sequence[str],
              malignant: Sequence[str], benign: Sequence[str]) -> dict:
    """Cohort metrics from case records (see the module docstring for every definition).

    Returns a JSON-ready dict: scalars at the top level (auc8, auc2, lesion_precision,
    lesion_sensitivity, lesion_accuracy, lesion_dice, lesion_dice_per_case, num_cases) and
    details (auc per class, counts, confusion matrix, per-case rows).
    """
    names = list(lesion_names)
    code_of = {n: FIRST_LESION_CODE + i for i, n in enumerate(names)}
    malignant_codes = {code_of[n] for n in malignant}
    benign_codes = {code_of[n] for n in benign}
    n = len(records)
    truth = np.zeros((n, len(names)), bool)
    scores = np.zeros((n, len(names)))
    for k, r in enumerate(records):
        for code in r["patient_codes"]:
            truth[k, code - FIRST_LESION_CODE] = True
        scores[k] = r["patient_probabilities"]
    aucs = patient_aucs(truth, scores)
    defined = [names[c] for c in range(len(names)) if np.isfinite(aucs[c])]
    auc8 = float(np.nanmean(aucs)) if defined else float("nan")

    codes = [set(r["patient_codes"]) for r in records]
    malignancy = [r["malignancy_probability"] for r in records]
    auc2, mal_y, mal_s = malignancy_auc(codes, malignancy, malignant_codes, benign_codes)
    auc2_without = {}
    for c in np.flatnonzero(truth.any(0)):
        keep = np.flatnonzero(~truth[:, c])
        auc2_without[names[c]] = _nan_to_none(malignancy_auc(
            [codes[k] for k in keep], [malignancy[k] for k in keep], malignant_codes,
            benign_codes)[0])

    # Lesion-wise: pooled counts and the confusion matrix (index len(names) = "none").
    none = len(names)
    confusion = np.zeros((none + 1, none + 1), np.int64)
    num_gt = num_pred = num_matched = num_correct = 0
    inter = gt_vox = pred_vox = 0
    per_case_dice = []
    rows = []
    # Detection by size: [bins] true and detected lesions, when every record has diameters.
    sized = bool(records) and all("gt_diameters_mm" in r for r in records)
    size_true = np.zeros(len(SIZE_EDGES_MM) + 1, np.int64)
    size_found = np.zeros_like(size_true)
    for r in records:
        gt, pred = r["gt_lesions"], r["pred_lesions"]
        matched_gt = {g for g, _, _ in r["matches"]}
        matched_pred = {p for _, p, _ in r["matches"]}
        for g, p, _ in r["matches"]:
            confusion[gt[g] - FIRST_LESION_CODE, pred[p] - FIRST_LESION_CODE] += 1
            num_correct += int(gt[g] == pred[p])
        for g in set(gt) - matched_gt:
            confusion[gt[g] - FIRST_LESION_CODE, none] += 1
        for g, d in (r["gt_diameters_mm"].items() if sized else ()):
            b = int(np.searchsorted(SIZE_EDGES_MM, d, side="right"))
            size_true[b] += 1
            size_found[b] += int(g in matched_gt)
        for p in set(pred) - matched_pred:
            confusion[none, pred[p] - FIRST_LESION_CODE] += 1
        num_gt += len(gt)
        num_pred += len(pred)
        num_matched += len(r["matches"])
        inter += r["dice_intersection"]
        gt_vox += r["dice_gt"]
        pred_vox += r["dice_pred"]
        denom = r["dice_gt"] + r["dice_pred"]
        dice = 2.0 * r["dice_intersection"] / denom if denom else float("nan")
        if denom:
            per_case_dice.append(dice)
        rows.append({"case": r["case"], "lesion_dice": _nan_to_none(dice),
                     "true_lesions": len(gt), "predicted_lesions": len(pred),
                     "matched": len(r["matches"]),
                     "true_classes": [names[c - FIRST_LESION_CODE] for c in r["patient_codes"]],
                     "patient_probabilities": dict(zip(names, r["patient_probabilities"])),
                     "malignancy_probability": r["malignancy_probability"]})

    ratio = lambda a, b: a / b if b else float("nan")
    by_class = {names[c]: _detection(int(confusion[c].sum()), int(confusion[c, :none].sum()))
                for c in range(len(names))}
    by_size = ({name: _detection(int(t), int(f))
                for name, t, f in zip(size_bin_names(), size_true, size_found)} if sized else None)
    return {
        "num_cases": n,
        "auc8": auc8,
        "auc2": auc2,
        "lesion_precision": ratio(num_matched, num_pred),
        "lesion_sensitivity": ratio(num_matched, num_gt),
        "lesion_accuracy": ratio(num_correct, num_matched),
        "lesion_dice": ratio(2.0 * inter, gt_vox + pred_vox),
        "lesion_dice_per_case": float(np.mean(per_case_dice)) if per_case_dice else float("nan"),
        "auc": {names[c]: _nan_to_none(aucs[c]) for c in range(len(names))},
        "auc8_classes": defined,
        "auc2_patients": {"malignant": int(sum(mal_y)), "benign": int(len(mal_y) - sum(mal_y))},
        "auc2_without": auc2_without,
        "patients_per_class": {names[c]: int(truth[:, c].sum()) for c in range(len(names))},
        "lesion_counts": {"true": num_gt, "predicted": num_pred, "matched": num_matched,
                          "correct_class": num_correct},
        "detection_by_class": by_class,
        "detection_by_size_mm": by_size,
        "confusion_labels": names + ["none"],
        "confusion_matrix": confusion.tolist(),
        "per_case": rows,
        "roc_data": {"truth": truth.astype(int).tolist(), "scores": scores.tolist(),
                     "malignant_truth": mal_y, "malignant_scores": mal_s},
    }


def scalar_metrics(summary: Dict) -> Dict[str, float]:
    """The top-level scalars of a summary (what the training loop logs)."""
    return {k: float(v) for k, v in summary.items()
            if isinstance(v, (int, float, np.floating, np.integer))}
