"""predict / evaluate end to end with the smoke model (random parameters) on tiny files."""

import json
import pathlib

import jax
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import load_config
from lidia_jax.data import preprocessing
from lidia_jax.evaluation import evaluate
from lidia_jax.inference import predict
from lidia_jax.model import build_model

SHAPE = (14, 30, 26)  # z, y, x of the venous file
SPACING = (1.9, 2.3, 3.5)  # x, y, z (ITK order), anisotropic
ORIGIN = (-40.0, 12.5, 230.0)
# A rotation about z by 90 degrees composed with a tilt: non-identity, non-diagonal.
_a = np.deg2rad(20)
DIRECTION = tuple((np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]) @ np.array(
    [[1, 0, 0], [0, np.cos(_a), -np.sin(_a)], [0, np.sin(_a), np.cos(_a)]])).ravel())
CONTRACT_KEYS = {"case", "phases", "patient_probabilities", "malignancy_probability", "lesions"}
LESION_KEYS = {"id", "class", "score", "class_probabilities", "volume_ml", "centroid_mm",
               "max_diameter_mm"}
NAMES = ("HCC", "ICC", "meta", "heman", "FNH", "cyst", "calc", "others")


def _write(arr, path):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION)
    sitk.WriteImage(img, str(path))
    return img


def _make_case(folder, name, seed, channels=(0, 1, 2), label_dir=None):
    rng = np.random.default_rng(seed)
    for ch in channels:
        _write((rng.normal(size=SHAPE) * 40 + 60).astype(np.float32),
               folder / f"{name}_{ch:04d}.nii.gz")
    if label_dir is not None:
        label = np.zeros(SHAPE, np.uint8)
        label[3:11, 6:24, 5:20] = 1
        label[5:8, 10:15, 8:12] = 2
        _write(label, label_dir / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    cfg = load_config("smoke")
    root = tmp_path_factory.mktemp("dataset")
    images, labels = root / "imagesTs", root / "labelsTs"
    images.mkdir()
    labels.mkdir()
    (root / "dataset.json").write_text(json.dumps({
        "name": "t", "channel_names": {"0": "NC", "1": "A", "2": "V", "3": "D"},
        "labels": {n: i for i, n in enumerate(cfg.data.labels)}, "file_ending": ".nii.gz"}))
    _make_case(images, "good", 0, label_dir=labels)  # no delayed phase
    _make_case(images, "bad", 1, label_dir=labels)
    corrupt = images / "bad_0002.nii.gz"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated venous phase
    plan = {"settings": preprocessing.settings_from_config(cfg.preprocess, cfg.data),
            "intensity": {"mean": [60.0] * 4, "std": [40.0] * 4, "lo": [-100.0] * 4,
                          "hi": [250.0] * 4}}
    model = build_model(cfg.model)
    image = np.zeros((1,) + tuple(cfg.input.patch_size) + (4,), np.float32)
    variables = model.init(jax.random.key(0), image, np.ones((1, 4), bool), train=False)
    return cfg, root, plan, model, variables


def _check_outputs(out: pathlib.Path, name: str, venous: pathlib.Path):
    ref = sitk.ReadImage(str(venous))
    for suffix, pixel in (("_seg", sitk.sitkUInt8), ("_instances", sitk.sitkUInt16)):
        img = sitk.ReadImage(str(out / f"{name}{suffix}.nii.gz"))
        assert img.GetSize() == ref.GetSize()
        np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(img.GetDirection(), ref.GetDirection(), atol=1e-6)
        assert img.GetPixelID() == pixel
    report = json.loads((out / f"{name}.json").read_text())
    assert CONTRACT_KEYS <= set(report)
    assert report["case"] == name and report["phases"] == ["NC", "A", "V"]
    assert set(report["patient_probabilities"]) == set(NAMES)
    assert all(0.0 <= p <= 1.0 for p in report["patient_probabilities"].values())
    assert 0.0 <= report["malignancy_probability"] <= 1.0
    inst = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{name}_instances.nii.gz")))
    assert sorted(l["id"] for l in report["lesions"]) == list(range(1, inst.max() + 1))
    for lesion in report["lesions"]:
        assert LESION_KEYS <= set(lesion)
        assert lesion["class"] in NAMES and set(lesion["class_probabilities"]) == set(NAMES)
        vox = int((inst == lesion["id"]).sum())
        assert lesion["volume_ml"] == pytest.approx(vox * np.prod(SPACING) / 1000, rel=1e-6)
    return report


def test_folder_with_a_corrupt_case(setup, tmp_path):
    cfg, root, plan, model, variables = setup
    logs = []
    rc = predict.run_predict(cfg, variables, model, root, tmp_path, plan, log=logs.append)
    assert rc == 1
    _check_outputs(tmp_path, "good", root / "imagesTs" / "good_0002.nii.gz")
    assert not (tmp_path / "bad.json").exists()
    failure = [line for line in logs if "bad" in line and "FAILED" in line]
    assert failure and "bad_0002.nii.gz" in failure[0]
    assert "good" in logs[-1] or "1/2" in logs[-1]


def test_one_case_from_its_phase_files(setup, tmp_path):
    cfg, root, plan, model, variables = setup
    files = [str(root / "imagesTs" / f"good_{c:04d}.nii.gz") for c in range(3)]
    rc = predict.run_predict(cfg, variables, model, files, tmp_path, plan, log=lambda s: None)
    assert rc == 0
    _check_outputs(tmp_path, "good", root / "imagesTs" / "good_0002.nii.gz")


def test_missing_required_phase_is_named(setup, tmp_path):
    cfg, root, plan, model, variables = setup
    files = [str(root / "imagesTs" / f"good_{c:04d}.nii.gz") for c in (0, 2)]  # no arterial
    logs = []
    rc = predict.run_predict(cfg, variables, model, files, tmp_path, plan, log=logs.append)
    assert rc == 1
    assert any("good_0001" in line and "missing" in line for line in logs)


def test_run_evaluate_writes_report(setup, tmp_path):
    cfg, root, plan, model, variables = setup
    summary = evaluate.run_evaluate(cfg, variables, model, root, tmp_path, plan,
                                    log=lambda s: None)
    assert summary["num_cases"] == 1 and "bad" in summary["failed_cases"]
    assert summary["lesion_counts"]["true"] == 1
    for f in ("metrics.json", "report.md", "roc.png", "confusion.png", "overlay_good.png"):
        assert (tmp_path / f).is_file(), f
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["lesion_counts"] == summary["lesion_counts"]
