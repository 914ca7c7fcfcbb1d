"""Metrics against hand-computed answers on a tiny cohort and against scikit-learn."""

import itertools

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lidia_jax.evaluation import metrics
from lidia_jax.evaluation import report
from lidia_jax.evaluation import targets

NAMES = ("HCC", "ICC", "meta", "heman", "FNH", "cyst", "calc", "others")
MALIGNANT = ("HCC", "ICC", "meta")
BENIGN = ("heman", "FNH", "cyst", "calc")


def _mann_whitney(pos, neg):
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


def _line(*segments, n=24):
    """[1, 1, n] instance map from (id, start, stop) segments."""
    out = np.zeros((1, 1, n), np.uint16)
    for i, a, b in segments:
        out[0, 0, a:b] = i
    return out


def _seg(inst, classes):
    seg = np.where(inst > 0, 1, 0).astype(np.uint8)
    for i, code in classes.items():
        seg[inst == i] = code
    return seg


def test_hungarian_prefers_more_matches_over_greedy_iou():
    gt = _line((1, 0, 10), (2, 10, 20))
    pred = _line((1, 2, 14), (2, 0, 2))
    matches = metrics.match_lesions(gt, pred, iou_threshold=0.19)
    assert sorted((g, p) for g, p, _ in matches) == [(1, 2), (2, 1)]
    ious = {(g, p): iou for g, p, iou in matches}
    assert ious[(2, 1)] == pytest.approx(4 / 18)
    assert ious[(1, 2)] == pytest.approx(2 / 10)


def _tiny_cohort(voxel_mm3=None):
    # Case 0: HCC (8 vox) detected as HCC (IoU 0.5), cyst (4 vox) hit with IoU 0.1 (missed),
    # a false-positive meta.
    gt0 = _line((1, 0, 8), (2, 12, 16))
    pred0 = _line((1, 4, 12), (2, 15, 22), (3, 22, 24))
    r0 = metrics.case_record("c0", _seg(gt0, {1: 2, 2: 7}), gt0, {1: 2, 2: 7},
                             _seg(pred0, {1: 2, 2: 7, 3: 4}), pred0, {1: 2, 2: 7, 3: 4},
                             [0.9, 0.1, 0.2, 0, 0, 0.2, 0, 0], 0.8, iou_threshold=0.2,
                             voxel_mm3=voxel_mm3)
    # Case 1: a cyst detected but called FNH.
    gt1 = _line((1, 0, 6))
    pred1 = _line((1, 0, 5))
    r1 = metrics.case_record("c1", _seg(gt1, {1: 7}), gt1, {1: 7}, _seg(pred1, {1: 6}), pred1,
                             {1: 6}, [0.3, 0, 0, 0, 0, 0.5, 0, 0], 0.75, iou_threshold=0.2,
                             voxel_mm3=voxel_mm3)
    # Case 2: HCC + cyst, nothing predicted. Case 3: no lesion, nothing predicted.
    gt2 = _line((1, 0, 4), (2, 10, 12))
    empty = np.zeros_like(gt2)
    r2 = metrics.case_record("c2", _seg(gt2, {1: 2, 2: 7}), gt2, {1: 2, 2: 7}, empty, empty, {},
                             [0.6, 0, 0, 0, 0, 0.1, 0, 0], 0.7, iou_threshold=0.2,
                             voxel_mm3=voxel_mm3)
    r3 = metrics.case_record("c3", empty, empty, {}, empty, empty, {},
                             [0.1, 0, 0, 0, 0, 0.5, 0, 0], 0.99, iou_threshold=0.2,
                             voxel_mm3=voxel_mm3)
    return [r0, r1, r2, r3]


def test_tiny_cohort_hand_computed():
    s = metrics.summarize(_tiny_cohort(), NAMES, MALIGNANT, BENIGN)
    # HCC truth [1, 0, 1, 0], scores [.9, .3, .6, .1] -> 1.0; cyst truth [1, 1, 1, 0],
    # scores [.2, .5, .1, .5] -> pairs (.2|.5) 0, (.5|.5) .5, (.1|.5) 0 -> 1/6.
    assert s["auc"]["HCC"] == pytest.approx(1.0)
    assert s["auc"]["cyst"] == pytest.approx(0.5 / 3)
    assert s["auc"]["ICC"] is None and s["auc"]["FNH"] is None
    assert s["auc8_classes"] == ["HCC", "cyst"]
    assert s["auc8"] == pytest.approx((1.0 + 0.5 / 3) / 2)
    # AUC-2: malignant c0 (.8), c2 (.7) vs benign c1 (.75); c3 (no lesion) left out -> 0.5.
    assert s["auc2"] == pytest.approx(0.5)
    assert s["auc2_patients"] == {"malignant": 2, "benign": 1}
    # Without HCC's patients (c0, c2) no malignant one is left, without cyst's (c0, c1, c2) none.
    assert s["auc2_without"] == {"HCC": None, "cyst": None}
    # Lesions: true 2 + 1 + 2 = 5, predicted 3 + 1 = 4, matched 2 (c0 HCC, c1 cyst->FNH).
    assert s["lesion_counts"] == {"true": 5, "predicted": 4, "matched": 2, "correct_class": 1}
    assert s["lesion_precision"] == pytest.approx(2 / 4)
    assert s["lesion_sensitivity"] == pytest.approx(2 / 5)
    assert s["lesion_accuracy"] == pytest.approx(1 / 2)
    cm = np.array(s["confusion_matrix"])
    i = {n: k for k, n in enumerate(s["confusion_labels"])}
    assert cm[i["HCC"], i["HCC"]] == 1 and cm[i["cyst"], i["FNH"]] == 1
    assert cm[i["cyst"], i["none"]] == 2 and cm[i["HCC"], i["none"]] == 1
    assert cm[i["none"], i["meta"]] == 1 and cm[i["none"], i["cyst"]] == 1
    assert cm.sum() == 7
    # Dice: c0 inter 4 + 1 = 5, |gt| 8 + 4, |pred| 8 + 7 + 2; c1 5, 6, 5; c2 0, 6, 0; c3 none.
    assert s["lesion_dice"] == pytest.approx(2 * 10 / (24 + 22))
    assert s["lesion_dice_per_case"] == pytest.approx(np.mean([10 / 29, 10 / 11, 0.0]))
    assert [row["lesion_dice"] for row in s["per_case"]][3] is None
    # Detected per true class: HCC c0 found, c2 missed; cyst c1 found (called FNH), c0 and c2
    # missed. No voxel volume given: no size table.
    assert s["detection_by_class"]["HCC"] == {"true": 2, "matched": 1, "sensitivity": 0.5}
    assert s["detection_by_class"]["cyst"] == {"true": 3, "matched": 1, "sensitivity": 1 / 3}
    assert s["detection_by_class"]["meta"] == {"true": 0, "matched": 0, "sensitivity": None}
    assert s["detection_by_size_mm"] is None


def test_targets_met_and_missed_on_the_tiny_cohort():
    """The tiny cohort's AUC-8 7/12, AUC-2 0.5, sensitivity 0.4 (a target met at equality) and
    an AUC-2 left undefined (no benign patient) against minimums, in the report too."""
    s = metrics.summarize(_tiny_cohort(), NAMES, MALIGNANT, BENIGN)
    wanted = {"auc8": 0.5, "auc2": 0.9, "lesion_sensitivity": 0.4}
    got = targets.compare(s, wanted)
    assert list(got) == ["auc8", "auc2", "lesion_sensitivity"]
    assert got["auc8"] == {"value": pytest.approx(7 / 12), "target": 0.5, "met": True}
    assert got["auc2"] == {"value": pytest.approx(0.5), "target": 0.9, "met": False}
    assert got["lesion_sensitivity"]["met"]
    assert targets.missed(got) == ["auc2"]
    assert targets.describe(got) == ("targets met: auc8 0.583 >= 0.50, lesion_sensitivity "
                                     "0.400 >= 0.40; missed: auc2 0.500 < 0.90")
    text = report.markdown(dict(s, targets=got))
    assert "**2 of 3 met**; missed: auc2." in text
    assert "| auc2 | 0.500 | >= 0.90 | **no** |" in text
    assert "| auc8 | 0.583 | >= 0.50 | yes |" in text
    assert "## Targets" not in report.markdown(s)

    no_benign = metrics.summarize(_tiny_cohort()[:1], NAMES, MALIGNANT, BENIGN)
    assert np.isnan(no_benign["auc2"])
    got = targets.compare(no_benign, {"auc2": 0.0})
    assert got["auc2"] == {"value": None, "target": 0.0, "met": False}
    assert targets.describe(got) == "missed: auc2 n/a < 0.00"
    with pytest.raises(ValueError, match="unknown metric 'AUC-8'"):
        targets.compare(s, {"AUC-8": 0.9})
    with pytest.raises(ValueError, match="expected a finite number"):
        targets.check_targets({"auc8": float("nan")})


def test_detection_by_size_hand_computed():
    # 100 mm^3 voxels: 8 voxels -> (6 * 800 / pi)^(1/3) = 11.5 mm, 6 -> 10.5, 4 -> 9.1, 2 -> 7.3.
    # Found: c0's HCC (8 voxels) and c1's cyst (6); missed: c0's cyst (4), c2's HCC (4), cyst (2).
    s = metrics.summarize(_tiny_cohort(voxel_mm3=100.0), NAMES, MALIGNANT, BENIGN)
    assert list(s["detection_by_size_mm"]) == ["<10", "10-20", "20-30", "30-50", ">=50"]
    assert s["detection_by_size_mm"]["<10"] == {"true": 3, "matched": 0, "sensitivity": 0.0}
    assert s["detection_by_size_mm"]["10-20"] == {"true": 2, "matched": 2, "sensitivity": 1.0}
    assert s["detection_by_size_mm"][">=50"]["sensitivity"] is None
    assert metrics.equivalent_diameter_mm(4 / 3 * np.pi * 10.0 ** 3) == pytest.approx(20.0)


def test_detection_tables_equal_a_naive_loop():
    rng = np.random.default_rng(3)
    records, truth = [], []
    for case in range(12):
        gt, pred = np.zeros((4, 6, 40), np.uint16), np.zeros((4, 6, 40), np.uint16)
        gt_classes, pred_classes, x = {}, {}, 0
        for i in range(1, rng.integers(1, 4) + 1):
            n = int(rng.integers(1, 10))
            gt[:, :, x:x + n] = i  # 24 n voxels
            gt_classes[i] = int(rng.integers(2, 10))
            if rng.random() < 0.6:  # predicted with a shift: IoU from 1 down to 0
                shift = int(rng.integers(0, n + 1))
                pred[:, :, x + shift:x + shift + n] = i
                pred_classes[i] = int(rng.integers(2, 10))
            x += n + 2
        voxel_mm3 = float(rng.choice([8.0, 80.0, 500.0]))
        r = metrics.case_record(f"c{case}", _seg(gt, gt_classes), gt, gt_classes,
                                _seg(pred, pred_classes), pred, pred_classes, [0.5] * 8, 0.5,
                                iou_threshold=0.2, voxel_mm3=voxel_mm3)
        records.append(r)
        found = {g for g, _, _ in r["matches"]}
        for g, code in gt_classes.items():
            d = (6.0 * np.count_nonzero(gt == g) * voxel_mm3 / np.pi) ** (1.0 / 3.0)
            truth.append((NAMES[code - 2], d, g in found))
    s = metrics.summarize(records, NAMES, MALIGNANT, BENIGN)
    for name in NAMES:
        rows = [f for c, _, f in truth if c == name]
        assert s["detection_by_class"][name]["true"] == len(rows)
        assert s["detection_by_class"][name]["matched"] == sum(rows)
    edges = [0.0, 10.0, 20.0, 30.0, 50.0, np.inf]
    for k, name in enumerate(metrics.size_bin_names()):
        rows = [f for _, d, f in truth if edges[k] <= d < edges[k + 1]]
        assert s["detection_by_size_mm"][name]["true"] == len(rows), name
        assert s["detection_by_size_mm"][name]["matched"] == sum(rows), name
    assert sum(r["true"] for r in s["detection_by_size_mm"].values()) == len(truth)


def test_aucs_equal_sklearn_and_mann_whitney_on_random_scores():
    rng = np.random.default_rng(0)
    truth = rng.random((40, 8)) < 0.3
    truth[:, 6] = False  # absent everywhere
    truth[:, 7] = True  # present everywhere
    scores = np.round(rng.random((40, 8)), 1)  # ties on purpose
    aucs = metrics.patient_aucs(truth, scores)
    for c in range(6):
        assert aucs[c] == pytest.approx(roc_auc_score(truth[:, c], scores[:, c]))
        assert aucs[c] == pytest.approx(_mann_whitney(scores[truth[:, c], c],
                                                      scores[~truth[:, c], c]))
    assert np.isnan(aucs[6]) and np.isnan(aucs[7])


def test_auc2_without_each_class_equals_sklearn_on_the_patients_left():
    """auc2_without[c] against roc_auc_score over the patients holding no lesion of c, each
    patient's malignancy label decided by a naive loop; and its line in the report."""
    rng = np.random.default_rng(1)
    empty = _tiny_cohort()[3]
    records = []
    for k in range(60):
        codes = sorted({int(c) for c in rng.integers(2, 10, size=rng.integers(0, 3))})
        records.append(dict(empty, case=f"p{k}", patient_codes=codes,
                            malignancy_probability=float(np.round(rng.random(), 1))))
    s = metrics.summarize(records, NAMES, MALIGNANT, BENIGN)
    held = sorted({NAMES[c - 2] for r in records for c in r["patient_codes"]}, key=NAMES.index)
    assert list(s["auc2_without"]) == held
    for name in held:
        y, score = [], []
        for r in records:
            classes = [NAMES[c - 2] for c in r["patient_codes"]]
            if name in classes or not classes:
                continue
            if any(c in MALIGNANT for c in classes):
                y.append(1)
            elif all(c in BENIGN for c in classes):
                y.append(0)
            else:
                continue
            score.append(r["malignancy_probability"])
        assert s["auc2_without"][name] == pytest.approx(roc_auc_score(y, score)), name
    fnh = s["auc2_without"]["FNH"]
    assert f"FNH {fnh:.3f}" in report.markdown(s)


def test_shape_mismatch_is_reported():
    a = np.zeros((1, 1, 4), np.uint8)
    with pytest.raises(ValueError, match="c9"):
        metrics.case_record("c9", a, a, {}, np.zeros((1, 1, 5), np.uint8), a, {}, [0] * 8, 0,
                            0.2)
