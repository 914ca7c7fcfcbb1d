"""Post-processing and lesion measurements on hand-built label maps."""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from lidia_jax.inference import postprocess as pp

SPACING = (2.0, 1.0, 0.5)  # (z, y, x) mm, anisotropic


def _one_hot(labels, p=0.8):
    probs = np.full(labels.shape + (10,), (1 - p) / 9, np.float32)
    np.put_along_axis(probs, labels[..., None].astype(int), p, axis=-1)
    return probs


def _scene():
    labels = np.zeros((10, 20, 40), np.uint8)
    labels[2:8, 4:16, 5:30] = 1  # liver (largest region component)
    labels[3:6, 6:10, 8:16] = 2  # HCC inside: 3*4*8 = 96 voxels = 96 mm^3
    labels[4:6, 12:14, 20:22] = 7  # cyst inside but tiny: 8 voxels = 8 mm^3 < 25 -> liver
    labels[3:7, 6:9, 24:30] = 4  # meta inside: 4*3*6 = 72 voxels = 72 mm^3
    labels[0:2, 0:3, 34:40] = 5  # heman outside the liver, far away -> background
    labels[5:7, 5:8, 31:36] = 6  # FNH outside, 30 mm^3, 1 mm from the liver -> kept
    labels[0:2, 17:20, 0:4] = 1  # a stray liver blob -> background
    return labels


def test_postprocess_rules():
    labels = _scene()
    probs = _one_hot(labels)
    res = pp.postprocess(labels, probs, SPACING, min_lesion_volume_mm3=25.0,
                         max_liver_distance_mm=3.0)
    # Kept lesions numbered by decreasing volume: HCC (96 vox), meta (72), FNH (2*3*5 = 30 vox).
    assert [l["label"] for l in res.lesions] == [2, 4, 6]
    assert [l["id"] for l in res.lesions] == [1, 2, 3]
    assert [l["voxels"] for l in res.lesions] == [96, 72, 30]
    np.testing.assert_array_equal(res.instances == 1, labels == 2)
    np.testing.assert_array_equal(res.instances == 2, labels == 4)
    np.testing.assert_array_equal(res.instances == 3, labels == 6)
    assert res.seg[4, 12, 20] == 1  # small cyst became liver
    assert not res.seg[0:2, 0:3, 34:40].any()  # far lesion dropped to background
    assert not res.seg[0:2, 17:20, 0:4].any()  # stray liver blob removed
    expected_seg = labels.copy()
    expected_seg[labels == 7] = 1
    expected_seg[labels == 5] = 0
    expected_seg[0:2, 17:20, 0:4] = 0
    np.testing.assert_array_equal(res.seg, expected_seg)
    assert res.instances.dtype == np.uint16 and res.seg.dtype == np.uint8
    hcc = res.lesions[0]
    assert hcc["score"] == pytest.approx(0.8)
    np.testing.assert_allclose(hcc["class_probabilities"], [0.8] + [0.2 / 9] * 7, rtol=1e-5)


def test_distance_threshold_in_mm_uses_spacing():
    labels = _scene()
    # With a 0.4 mm threshold the FNH (gap of one 0.5 mm voxel in x: 1 mm centre to centre) goes.
    res = pp.postprocess(labels, _one_hot(labels), SPACING, 25.0, max_liver_distance_mm=0.4)
    assert [l["label"] for l in res.lesions] == [2, 4]
    res = pp.postprocess(labels, _one_hot(labels), SPACING, 25.0, max_liver_distance_mm=1.0)
    assert [l["label"] for l in res.lesions] == [2, 4, 6]


def test_one_class_per_lesion_by_highest_mean_probability():
    labels = np.zeros((6, 6, 6), np.uint8)
    labels[1:5, 1:5, 1:5] = 1
    labels[2:4, 2:4, 2:3] = 2  # 8 voxels HCC
    labels[2:4, 2:4, 3:4] = 3  # 8 voxels ICC, touching: one lesion
    probs = _one_hot(labels, p=0.5)
    probs[labels == 3, 3] = 0.9  # ICC voxels very confident -> ICC wins on the mean
    res = pp.postprocess(labels, probs, (1, 1, 1), 0.0, 3.0)
    assert len(res.lesions) == 1 and res.lesions[0]["label"] == 3
    assert set(np.unique(res.seg[res.instances == 1])) == {3}
    means = [probs[labels >= 2][:, c].mean() for c in range(2, 10)]
    np.testing.assert_allclose(res.lesions[0]["class_probabilities"], means, rtol=1e-5)


def test_empty_prediction():
    res = pp.postprocess(np.zeros((3, 3, 3), np.uint8), _one_hot(np.zeros((3, 3, 3))),
                         (1, 1, 1), 25.0, 3.0)
    assert res.lesions == [] and not res.seg.any()


def _rotation():
    a, b = np.deg2rad(30), np.deg2rad(-20)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


def test_measurements_against_sitk_and_brute_force():
    inst = np.zeros((7, 9, 11), np.uint16)
    inst[1:4, 2:6, 3:9] = 1
    inst[5, 7, 9] = 2  # a single voxel
    inst[4:7, 0:3, 0:2] = 3
    inst[5, 1, 1] = 0  # a hole: interior voxels don't matter, surface still defines the diameter
    image = sitk.GetImageFromArray(inst.astype(np.int16))
    image.SetSpacing((0.7, 1.1, 2.5))  # (x, y, z)
    image.SetOrigin((-12.0, 30.5, 100.0))
    image.SetDirection(tuple(_rotation().ravel()))
    geom = pp.geometry_of(image)
    out = pp.measure_lesions(inst, geom)
    assert sorted(out) == [1, 2, 3]
    for i in (1, 2, 3):
        zyx = np.argwhere(inst == i)
        pts = np.array([image.TransformContinuousIndexToPhysicalPoint(
            [float(x), float(y), float(z)]) for z, y, x in zyx])
        assert out[i]["voxels"] == len(zyx)
        assert out[i]["volume_ml"] == pytest.approx(len(zyx) * 0.7 * 1.1 * 2.5 / 1000)
        np.testing.assert_allclose(out[i]["centroid_mm"], pts.mean(0), atol=1e-9)
        brute = max((np.linalg.norm(p - q) for p, q in itertools.combinations(pts, 2)),
                    default=0.0)
        assert out[i]["max_diameter_mm"] == pytest.approx(brute)


def test_max_diameter_of_a_large_ball_uses_the_hull():
    zz, yy, xx = np.mgrid[:21, :21, :21]
    inst = (((zz - 10) ** 2 + (yy - 10) ** 2 + (xx - 10) ** 2) <= 100).astype(np.uint16)
    geom = {"spacing": (1.0, 1.0, 1.0), "origin": (0, 0, 0), "direction": tuple(np.eye(3).ravel())}
    out = pp.measure_lesions(inst, geom)
    assert out[1]["max_diameter_mm"] == pytest.approx(20.0)  # poles (10, 10, 0)-(10, 10, 20)


def test_minimum_volume_per_class():
    """A per-class minimum applies to the class the lesion takes: a small calcification stays
    while a meta of the same size goes."""
    labels = np.zeros((8, 8, 16), np.uint8)
    labels[1:7, 1:7, 1:15] = 1
    labels[2:4, 2:4, 2:4] = 8  # calc, 8 voxels
    labels[2:4, 2:4, 10:12] = 4  # meta, 8 voxels
    minimum = np.full(8, 20.0)
    minimum[8 - 2] = 5.0
    res = pp.postprocess(labels, _one_hot(labels), (1, 1, 1), minimum, 3.0)
    assert [l["label"] for l in res.lesions] == [8]
    assert res.seg[3, 3, 11] == 1  # the meta became liver
    res = pp.postprocess(labels, _one_hot(labels), (1, 1, 1), 5.0, 3.0)
    assert sorted(l["label"] for l in res.lesions) == [4, 8]


def test_min_lesion_volumes_from_the_config():
    from conftest import load_config
    from lidia_jax.inference import diagnose

    config = load_config("demo")
    volumes = diagnose.min_lesion_volumes(config)
    assert volumes.tolist() == [500.0] * 6 + [100.0, 500.0]  # HCC..cyst, calc, others
    config.inference.min_lesion_volume_by_class = {"calcification": 1.0}
    with pytest.raises(ValueError, match="calcification"):
        diagnose.min_lesion_volumes(config)


@pytest.mark.parametrize("section, field, value, message", [
    ("inference", "min_lesion_volume_by_class", {"calcification": 1.0}, "calcification"),
    ("inference", "query_weighting", "objectnes", "objectnes"),
    ("eval", "targets", {"dice": 0.7}, "unknown metric 'dice'")])
def test_training_rejects_bad_inference_settings_before_any_work(tmp_path, section, field, value,
                                                                 message):
    """A misspelt class in min_lesion_volume_by_class, an unknown query weighting or target
    metric stops training at once, not at the first validation: nothing is generated or
    written."""
    from conftest import load_config
    from lidia_jax.train import trainer

    config = load_config("smoke")
    config[section][field] = value
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(config, tmp_path / "run", log=lambda *_: None)
    assert list((tmp_path / "run").iterdir()) == []
