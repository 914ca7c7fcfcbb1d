"""The lesion forest (inference/lesion_forest.py): features, fit, storage, and its opinion in
diagnose_volume."""

import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from conftest import load_config
from lidia_jax.inference import diagnose, lesion_forest


def _naive_features(image, seg, inst):
    """The module docstring's features, one full-volume mask per lesion."""
    ref = image[seg == 1].mean(0)
    rows = []
    for i in sorted(set(np.unique(inst)) - {0}):
        m = inst == i
        core = ndi.binary_erosion(m)
        core = core if core.any() else m
        rim = m & ~core if (m & ~core).any() else m
        v = image[m]
        core_mean, rim_mean = image[core].mean(0) - ref, image[rim].mean(0) - ref
        rows.append(np.concatenate([
            v.mean(0) - ref, v.std(0), np.percentile(v, 10, axis=0) - ref,
            np.percentile(v, 90, axis=0) - ref, core_mean, rim_mean, [np.log(m.sum())],
            [core_mean[p + 1] - core_mean[p] for p in range(image.shape[-1] - 1)],
            [rim_mean[p + 1] - rim_mean[p] for p in range(image.shape[-1] - 1)],
            rim_mean - core_mean]))
    return np.asarray(rows)


def _volume(rng):
    shape = (9, 12, 11)
    image = rng.normal(size=shape + (4,)).astype(np.float32)
    seg = np.ones(shape, np.uint8)
    inst = np.zeros(shape, np.uint16)
    inst[0:4, 0:5, 0:4] = 1  # touches the volume's border
    inst[5:9, 6:12, 5:11] = 3  # ids need not be consecutive
    inst[4, 1, 8] = 4  # one voxel: no core
    seg[inst == 1], seg[inst == 3], seg[inst == 4] = 2, 7, 8
    seg[0, 0, 0] = 5  # a minority voxel of another class inside lesion 1
    return image, seg, inst


def test_features_equal_a_naive_loop():
    image, seg, inst = _volume(np.random.default_rng(0))
    ids, codes, x = lesion_forest.lesion_features(image, seg, inst)
    assert ids.tolist() == [1, 3, 4] and codes.tolist() == [2, 7, 8]
    assert x.shape == (3, 9 * 4 - 1) and lesion_forest.feature_width(4) == 35
    np.testing.assert_allclose(x, _naive_features(image, seg, inst), rtol=1e-5, atol=1e-5)
    empty = lesion_forest.lesion_features(image, seg, np.zeros_like(inst))
    assert empty[2].shape == (0, 35)


def test_features_by_hand():
    """Mean / std / percentiles / core / rim per phase minus the liver mean, log volume, the core's
    and the rim's phase-to-phase changes, rim minus core."""
    rng = np.random.default_rng(0)
    image = rng.normal(size=(6, 7, 8, 3)).astype(np.float32)
    seg = np.ones((6, 7, 8), np.uint8)
    inst = np.zeros((6, 7, 8), np.uint16)
    seg[1:4, 1:4, 1:4], inst[1:4, 1:4, 1:4] = 5, 3  # a 27-voxel cube: core = its centre voxel
    seg[4, 5, 6], inst[4, 5, 6] = 7, 8  # one voxel: no erosion core, rim = itself
    ids, codes, x = lesion_forest.lesion_features(image, seg, inst)
    assert ids.tolist() == [3, 8] and codes.tolist() == [5, 7] and x.shape == (2, 9 * 3 - 1)
    liver = image[seg == 1].mean(0)
    cube = image[1:4, 1:4, 1:4].reshape(-1, 3)
    centre = image[2, 2, 2]
    shell = np.array([image[z, y, w] for z in range(1, 4) for y in range(1, 4)
                      for w in range(1, 4) if (z, y, w) != (2, 2, 2)])
    c, r = centre - liver, shell.mean(0) - liver
    expected = np.concatenate([cube.mean(0) - liver, cube.std(0),
                               np.percentile(cube, 10, axis=0) - liver,
                               np.percentile(cube, 90, axis=0) - liver, c, r, [np.log(27)],
                               [c[1] - c[0], c[2] - c[1]], [r[1] - r[0], r[2] - r[1]], r - c])
    np.testing.assert_allclose(x[0], expected, rtol=1e-5, atol=1e-5)
    one = image[4, 5, 6]
    np.testing.assert_allclose(x[1, :3], one - liver, atol=1e-6)
    np.testing.assert_allclose(x[1, 12:18], np.concatenate([one - liver] * 2), atol=1e-6)
    np.testing.assert_allclose(x[1, 23:], 0.0, atol=1e-6)  # core = rim = the voxel itself
    np.testing.assert_allclose(x[1, 19:21], np.diff(one - liver), atol=1e-6)


def test_fit_maps_its_classes_to_the_lesion_columns():
    rng = np.random.default_rng(1)
    codes = np.repeat([2, 5, 7], 20)  # HCC, heman, cyst; the five others never seen
    x = rng.normal(size=(60, 35)) + codes[:, None]
    forest = lesion_forest.fit(x, codes, num_classes=8, trees=20, seed=0)
    prob = forest.probabilities(x[[0, 25, 59]])
    assert prob.shape == (3, 8)
    np.testing.assert_allclose(prob.sum(1), 1.0)
    assert (prob[:, [1, 2, 4, 6, 7]] == 0).all()
    assert prob.argmax(1).tolist() == [0, 3, 5]
    assert forest.probabilities(np.zeros((0, 35))).shape == (0, 8)
    with pytest.raises(ValueError, match="at least two"):
        lesion_forest.fit(x[:20], codes[:20], num_classes=8, trees=5, seed=0)


def test_load_refits_from_the_stored_training_set(tmp_path):
    config = load_config("smoke")
    assert lesion_forest.load(config, tmp_path) is None  # the option is off
    config.inference.lesion_forest = True
    config.inference.lesion_forest_trees = 10
    rng = np.random.default_rng(2)
    codes = np.repeat([3, 4], 15)
    x = rng.normal(size=(30, 35)) + codes[:, None]
    lesion_forest.save(tmp_path, x, codes)
    logs = []
    forest = lesion_forest.load(config, tmp_path, logs.append)
    direct = lesion_forest.fit(x, codes, 8, 10, config.seed)
    np.testing.assert_array_equal(forest.probabilities(x), direct.probabilities(x))
    assert logs == ["lesion forest: 30 training lesions, 10 trees"]
    # One class only: no forest, and the log says why.
    lesion_forest.save(tmp_path, x[:15], codes[:15])
    logs = []
    assert lesion_forest.load(config, tmp_path, logs.append) is None
    assert "hold 1 class(es)" in logs[0]
    # No stored set and no cache to make it from: an error that names both.
    other = tmp_path / "old_run"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"data": {"cache_dir": str(tmp_path / "gone")}}))
    (other / "plan.json").write_text(json.dumps({"fingerprint": "abc"}))
    with pytest.raises(FileNotFoundError, match="lesion_forest.npz: missing, and the cache"):
        lesion_forest.load(config, other)
    # A file of an earlier version's 25 features: remade from the run's cache...
    lesion_forest.save(other, x[:, :25], codes)
    with pytest.raises(FileNotFoundError, match="features of an earlier version .*the cache"):
        lesion_forest.load(config, other)
    image, seg, inst = _volume(np.random.default_rng(3))
    cache = tmp_path / "gone" / "abc"
    (cache / "case_a").mkdir(parents=True)
    (cache / "plan.json").write_text(json.dumps({"splits": {"train": ["case_a"], "val": []}}))
    (cache / "case_a" / "meta.json").write_text("{}")
    for name, a in (("image", image), ("seg", seg), ("inst", inst)):
        np.save(cache / "case_a" / f"{name}.npy", a)
    logs = []
    forest = lesion_forest.load(config, other, logs.append)
    stored = np.load(other / "lesion_forest.npz")
    np.testing.assert_allclose(stored["features"], _naive_features(image, seg, inst), atol=1e-5)
    assert stored["codes"].tolist() == [2, 7, 8] and forest is not None
    assert "earlier version" in logs[0] and "training set written from" in logs[0]


class _Forest:
    """A stand-in LesionForest: the same probabilities for every lesion."""

    def __init__(self, p):
        self.p = np.asarray(p, float)

    def probabilities(self, features):
        return np.tile(self.p, (len(features), 1))


def test_diagnose_takes_the_forests_classes_and_blends_the_patient_scores():
    """The forest renames each lesion (seg relabelled, probabilities and score its own); the
    patient scores are w * its lesion maxima + (1 - w) * LiverMax, malignancy likewise."""
    config = load_config("smoke")
    config.inference.overlap = 0.0
    config.inference.min_lesion_volume_mm3 = 0.0
    config.inference.lesion_forest_weight = 0.25
    shape = tuple(config.input.patch_size)
    probs = np.zeros(shape + (10,), np.float32)
    probs[..., 1] = 1.0  # liver, with a 4x4x4 HCC block (code 2) of probability 0.9
    probs[4:8, 4:8, 4:8] = 0.0
    probs[4:8, 4:8, 4:8, 2], probs[4:8, 4:8, 4:8, 1] = 0.9, 0.1

    def tile_fn(tiles, phase_mask):
        return np.broadcast_to(probs, (tiles.shape[0],) + probs.shape), None

    image = np.random.default_rng(3).normal(size=shape + (4,)).astype(np.float32)
    args = (image, [True] * 4, tile_fn, (6.0, 6.0, 6.0), config)
    plain = diagnose.diagnose_volume(*args)
    p = np.array([0.1, 0.05, 0.05, 0.0, 0.0, 0.7, 0.1, 0.0])  # the forest: a cyst
    diag = diagnose.diagnose_volume(*args, forest=_Forest(p))
    assert [l["label"] for l in plain.lesions] == [2] and [l["label"] for l in diag.lesions] == [7]
    np.testing.assert_array_equal(diag.seg == 7, plain.seg == 2)
    np.testing.assert_array_equal(diag.instances, plain.instances)
    np.testing.assert_allclose(diag.lesions[0]["class_probabilities"], p)
    assert diag.lesions[0]["score"] == pytest.approx(0.7)
    np.testing.assert_allclose(diag.patient_probabilities,
                               0.25 * p + 0.75 * plain.patient_probabilities, rtol=1e-6)
    assert diag.malignancy_probability == pytest.approx(
        0.25 * 0.2 + 0.75 * plain.malignancy_probability)
