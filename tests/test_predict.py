"""predict / evaluate end to end with the smoke model (random parameters) on tiny files."""

import json
import pathlib

from flax import linen as nn
import jax
import jax.numpy as jnp
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
    # Random parameters of the right shapes without compiling the init graph (minutes on a busy
    # CPU): fan-in-scaled normals for weights, ones for norm scales, zeros for biases.
    shapes = jax.eval_shape(
        lambda rng: model.init(rng, image, np.ones((1, 4), bool), train=False), jax.random.key(0))
    rng = np.random.default_rng(0)

    def random_leaf(path, leaf):
        name = str(path[-1])
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.normal(size=leaf.shape) / np.sqrt(fan_in)).astype(leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(random_leaf, shapes)
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
    assert sum(r["true"] for r in summary["detection_by_size_mm"].values()) == 1
    for f in ("metrics.json", "report.md", "roc.png", "confusion.png", "overlay_good.png"):
        assert (tmp_path / f).is_file(), f
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["lesion_counts"] == summary["lesion_counts"]


def _toy_tile_predictor(variables, tiles, phase_mask):
    """Thresholds the normalised venous channel: < -0.75 background, < 1 liver, else HCC."""
    v = tiles[..., 2]
    code = jnp.where(v < -0.75, 0, jnp.where(v < 1.0, 1, 2))
    return jax.nn.one_hot(code, 10) * 0.9 + 0.01, None


def test_geometry_round_trip_with_a_toy_predictor(setup, tmp_path):
    """A bright block comes back where it was, in mm, through canonicalisation and resampling."""
    cfg, _, plan, model, variables = setup
    folder = tmp_path / "in"
    folder.mkdir()
    venous = np.zeros(SHAPE, np.float32)  # 0 HU: normalised -1.5, background for the toy
    venous[2:12, 4:26, 4:22] = 60.0  # liver: normalised 0
    venous[4:10, 8:20, 8:18] = 150.0  # lesion: normalised 2.25
    for ch in range(3):
        ref = _write(venous, folder / f"toy_{ch:04d}.nii.gz")
    rc = predict.run_predict(cfg, variables, model, folder, tmp_path / "out", plan,
                             log=lambda s: None, tile_predictor=_toy_tile_predictor)
    assert rc == 0
    report = _check_outputs(tmp_path / "out", "toy", folder / "toy_0002.nii.gz")
    assert len(report["lesions"]) == 1
    lesion = report["lesions"][0]
    assert lesion["class"] == "HCC" and lesion["score"] == pytest.approx(0.91, abs=1e-3)
    zyx = np.argwhere(venous == 150.0)
    pts = np.array([ref.TransformIndexToPhysicalPoint([int(x), int(y), int(z)])
                    for z, y, x in zyx])
    # Tolerances: one 6 mm voxel of the smoke grid (the lesion goes there and back).
    np.testing.assert_allclose(lesion["centroid_mm"], pts.mean(0), atol=6.0)
    assert lesion["volume_ml"] == pytest.approx(len(zyx) * np.prod(SPACING) / 1000, rel=0.5)
    assert lesion["max_diameter_mm"] == pytest.approx(
        max(np.linalg.norm(pts - p, axis=1).max() for p in pts[::7]), abs=12.0)


def test_the_lesion_forest_names_the_written_lesions(setup, tmp_path):
    """With a lesion forest (inference/lesion_forest.py) the written lesion, its voxels in
    CASE_seg and the patient probabilities carry the forest's opinion."""
    cfg, _, plan, model, variables = setup
    cfg = cfg.copy_and_resolve_references()
    cfg.inference.lesion_forest_weight = 1.0
    folder = tmp_path / "in"
    folder.mkdir()
    venous = np.zeros(SHAPE, np.float32)
    venous[2:12, 4:26, 4:22] = 60.0
    venous[4:10, 8:20, 8:18] = 150.0  # the toy predictor's HCC
    for ch in range(3):
        _write(venous, folder / f"toy_{ch:04d}.nii.gz")

    class CystForest:
        def probabilities(self, features):
            return np.tile(np.eye(8)[5] * 0.8 + 0.025, (len(features), 1))

    rc = predict.run_predict(cfg, variables, model, folder, tmp_path / "out", plan,
                             log=lambda s: None, tile_predictor=_toy_tile_predictor,
                             forest=CystForest())
    assert rc == 0
    report = _check_outputs(tmp_path / "out", "toy", folder / "toy_0002.nii.gz")
    assert [l["class"] for l in report["lesions"]] == ["cyst"]
    assert report["lesions"][0]["score"] == pytest.approx(0.825)
    assert report["patient_probabilities"]["cyst"] == pytest.approx(0.825)
    assert report["patient_probabilities"]["HCC"] == pytest.approx(0.025)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "toy_seg.nii.gz")))
    assert (seg == 7).any() and not (seg == 2).any()


class _FakeCache:
    """The two methods evaluate_cache uses, over in-memory preprocessed cases."""

    def __init__(self, cases):
        self.cases = cases

    def load(self, case):
        return self.cases[case]


def test_evaluate_cache_on_the_preprocessed_grid(setup, tmp_path):
    cfg, _, _, model, variables = setup
    shape = (10, 20, 24)
    image = np.full(shape + (4,), -1.5, np.float32)
    image[..., 3] = 0.0  # delayed phase absent
    image[2:8, 3:17, 4:20, :3] = 0.0
    image[3:6, 5:9, 6:10, :3] = 2.25  # a lesion the toy predictor calls HCC
    seg = np.zeros(shape, np.uint8)
    seg[2:8, 3:17, 4:20] = 1
    seg[3:6, 5:9, 6:10] = 2  # exactly the toy's lesion
    seg[5:7, 12:15, 14:18] = 7  # a cyst the toy misses
    inst = np.zeros(shape, np.uint16)
    inst[seg == 2], inst[seg == 7] = 1, 2
    meta = {"phase_mask": [True, True, True, False], "spacing": [6.0, 6.0, 6.0],
            "instance_classes": {"1": 2, "2": 7}, "patient_classes": [2, 7]}
    cache = _FakeCache({
        "a": {"image": image, "seg": seg, "inst": inst, "meta": meta},
        "b": {"image": np.full(shape + (4,), -1.5, np.float32), "seg": np.zeros_like(seg),
              "inst": np.zeros_like(inst), "meta": dict(meta, instance_classes={},
                                                        patient_classes=[])},
        "unlabelled": {"image": image, "seg": None, "inst": None, "meta": meta}})
    summary = evaluate.evaluate_cache(model, variables["params"], cache,
                                      ["a", "b", "unlabelled"], cfg, report_dir=tmp_path,
                                      log=lambda s: None, tile_predictor=_toy_tile_predictor)
    assert summary["num_cases"] == 2
    assert summary["lesion_counts"] == {"true": 2, "predicted": 1, "matched": 1,
                                        "correct_class": 1}
    assert summary["lesion_dice"] == pytest.approx(2 * 48 / ((48 + 24) + 48))  # HCC 3x4x4, cyst 2x3x4
    assert summary["auc"]["HCC"] == pytest.approx(1.0)  # LiverMax 0.91 vs 0.01
    # 216 mm^3 voxels: HCC 48 -> 27.0 mm, cyst 24 -> 21.5 mm (equivalent-sphere diameters).
    assert summary["detection_by_size_mm"]["20-30"] == {"true": 2, "matched": 1,
                                                        "sensitivity": 0.5}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "overlay_a.png").is_file()
    assert "| 20-30 | 2 | 1 | 0.500 |" in (tmp_path / "report.md").read_text()
    # The smoke config's target, lesion Dice >= 0.7: met (0.8), in the report and metrics.json.
    assert summary["targets"] == {"lesion_dice": {"value": pytest.approx(0.8), "target": 0.7,
                                                  "met": True}}
    assert "**1 of 1 met**." in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "metrics.json").read_text())["targets"]["lesion_dice"]["met"]


def _trained_workdir(path, params, plan, model_section):
    """A workdir as training leaves it, for inference: a checkpoint, plan.json, config.json."""
    from lidia_jax.train import checkpoint as ckpt

    manager = ckpt.make_manager(path, keep=1, asynchronous=False)
    ckpt.save(manager, 7, {"params": params})
    manager.wait_until_finished()
    manager.close()
    (path / "plan.json").write_text(json.dumps(plan))
    (path / "config.json").write_text(json.dumps({"model": model_section}))
    return path


def test_an_ensemble_of_trained_workdirs(setup, tmp_path):
    """--ensemble: load_models restores every workdir's weights under the first one's plan and
    refuses a member trained with another preprocessing or model, naming it; an ensemble of a
    model with itself predicts what the model alone does (the averaging: test_sliding_window)."""
    cfg, root, plan, model, variables = setup
    section = cfg.model.to_dict()
    params = nn.meta.unbox(variables["params"])  # as training saves them
    halved = jax.tree.map(lambda x: x * 0.5, params)
    a = _trained_workdir(tmp_path / "a", params, plan, section)
    b = _trained_workdir(tmp_path / "b", halved, plan, section)
    logs = []
    got_plan, members = predict.load_models(cfg, [a, b], logs.append)
    assert got_plan == plan and len(members) == 2
    for got, want in zip(jax.tree.leaves(members[1]), jax.tree.leaves(halved)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert logs == [f"using the {cfg.inference.checkpoint} checkpoint (step 7) of {w}"
                    for w in (a, b)]

    other_plan = json.loads(json.dumps(plan))
    other_plan["intensity"]["mean"][2] += 1.0
    bad_plan = _trained_workdir(tmp_path / "bad_plan", params, other_plan, section)
    bad_model = _trained_workdir(tmp_path / "bad_model", params, plan,
                                 dict(section, fusion="early"))
    bad_shape = _trained_workdir(tmp_path / "bad_shape", jax.tree.map(
        lambda x: np.zeros(np.shape(x)[:-1] + (np.shape(x)[-1] + 1,), x.dtype)
        if np.ndim(x) else x, params), plan, section)
    for bad, what in ((bad_plan, "trained with another preprocessing (intensity"),
                      (bad_model, "trained with another model"),
                      (bad_shape, "trained with another model")):
        logs = []
        assert evaluate.evaluate_from_workdir(cfg, a, root, tmp_path / "x", logs.append,
                                              ensemble=[bad]) == {}
        assert logs[-1].startswith(f"ERROR {bad}: {what}"), logs[-1]
        assert predict.predict_from_workdir(cfg, a, root, tmp_path / "y", logs.append,
                                            ensemble=[bad]) == 1

    single = evaluate.run_evaluate(cfg, variables, model, root, tmp_path / "single", plan,
                                   log=lambda s: None)
    logs = []
    twice = evaluate.evaluate_from_workdir(cfg, a, root, tmp_path / "twice", logs.append,
                                           ensemble=[a])
    assert twice and twice["num_cases"] == single["num_cases"] == 1, logs
    for got, want in zip(twice["per_case"], single["per_case"]):
        assert got["patient_probabilities"] == pytest.approx(want["patient_probabilities"],
                                                             abs=1e-5)
        assert got["predicted_lesions"] == want["predicted_lesions"]
