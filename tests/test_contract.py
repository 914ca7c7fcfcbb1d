"""The data contract: dataset.json, case files, and every validation error naming its file."""

import json
import pathlib

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import write_image
from lidia_jax.data import contract

LABELS = {"background": 0, "liver": 1, "HCC": 2, "ICC": 3, "meta": 4, "heman": 5, "FNH": 6,
          "cyst": 7, "calc": 8, "others": 9}
SHAPE = (6, 10, 12)  # [D, H, W]
SPACING = (1.5, 1.0, 2.5)  # SimpleITK (x, y, z)


def _write(path, array, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None):
    return write_image(path, array, spacing, origin, direction)


def _label():
    lab = np.zeros(SHAPE, np.uint8)
    lab[1:5, 2:8, 2:10] = 1
    lab[2:4, 3:5, 3:5] = 2  # one HCC
    lab[2:4, 3:5, 7:9] = 2  # a second, separate HCC
    lab[3, 6, 5] = 7  # a one-voxel cyst
    return lab


def make_dataset(root, cases=("c0", "c1", "c2"), ending=".nii.gz", delayed=True,
                 split="Tr"):
    root = pathlib.Path(root)
    (root / "dataset.json").write_text(json.dumps({
        "name": "t", "channel_names": {"0": "NC", "1": "A", "2": "V", "3": "D"},
        "labels": LABELS, "file_ending": ending}))
    rng = np.random.default_rng(0)
    for name in cases:
        for ch in range(4 if delayed else 3):
            arr = (rng.normal(size=SHAPE) * 20 + 50 * ch).astype(np.float32)
            _write(root / f"images{split}" / f"{name}_{ch:04d}{ending}", arr)
        _write(root / f"labels{split}" / f"{name}{ending}", _label())
    return root


def test_read_dataset_lists_cases_and_optional_files(tmp_path):
    root = make_dataset(tmp_path, delayed=False)
    _write(root / "imagesTr" / "c0_0003.nii.gz", np.zeros(SHAPE, np.float32))
    (root / "imagesTr" / ".DS_Store").write_text("junk")
    ds = contract.read_dataset(root)
    assert [c.name for c in ds.cases["Tr"]] == ["c0", "c1", "c2"] and ds.cases["Ts"] == []
    assert ds.labels == LABELS and ds.file_ending == ".nii.gz"
    c0, c1 = ds.cases["Tr"][:2]
    assert c0.phases["D"] == root / "imagesTr" / "c0_0003.nii.gz"
    assert c1.phases["D"] is None and c1.phases["V"] == root / "imagesTr" / "c1_0002.nii.gz"
    assert c1.label == root / "labelsTr" / "c1.nii.gz" and c1.instance is None


@pytest.mark.parametrize("content, fragment", [
    (None, "dataset.json is missing"),
    ("{not json", "not valid JSON"),
    ('{"labels": {"background": 0}, "file_ending": ".nii.gz"}', "channel_names"),
    ('{"labels": {"background": 1}, "channel_names": {"2": "V"}, "file_ending": ".nii.gz"}',
     "background"),
    ('{"labels": {"background": 0, "x": 12}, "channel_names": {"2": "V"}, '
     '"file_ending": ".nii.gz"}', "outside 0..9"),
    ('{"labels": {"background": 0}, "channel_names": {"0": "NC"}, "file_ending": ".nii.gz"}',
     '"V"'),
    ('{"labels": {"background": 0}, "channel_names": {"2": "V"}, "file_ending": ".nii.gz"}',
     "channel 0000 is not declared"),
])
def test_dataset_errors_name_the_file(tmp_path, content, fragment):
    root = make_dataset(tmp_path, cases=("c0",))
    if content is None:
        (root / "dataset.json").unlink()
    else:
        (root / "dataset.json").write_text(content)
    with pytest.raises(contract.DatasetError) as e:
        contract.read_dataset(root)
    assert fragment in str(e.value)
    assert e.value.file.endswith(("dataset.json", "c0_0000.nii.gz"))


def _load(root, name, **kw):
    ds = contract.read_dataset(root)
    case = next(c for c in ds.cases["Tr"] if c.name == name)
    return contract.load_case(case, ds, **kw)


def _break(root, kind):
    """Makes case c1 of `root` bad in one way; returns the file the error must name."""
    tr = root / "imagesTr"
    if kind == "missing NC":
        (tr / "c1_0000.nii.gz").unlink()
        return tr / "c1_0000.nii.gz"
    if kind == "missing V":
        (tr / "c1_0002.nii.gz").unlink()
        return tr / "c1_0002.nii.gz"
    if kind == "label grid":
        return _write(root / "labelsTr" / "c1.nii.gz", _label(), spacing=(1.5, 1.0, 3.0))
    if kind == "label values":
        lab = _label()
        lab[0, 0, 0] = 10
        return _write(root / "labelsTr" / "c1.nii.gz", lab)
    if kind == "2-D":
        return _write(tr / "c1_0001.nii.gz", np.zeros((10, 12), np.float32))
    if kind == "4-D":
        img = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros(SHAPE, np.float32))] * 2)
        sitk.WriteImage(img, str(tr / "c1_0001.nii.gz"))
        return tr / "c1_0001.nii.gz"
    if kind == "NaN":
        arr = np.zeros(SHAPE, np.float32)
        arr[2, 3, 4] = np.nan
        return _write(tr / "c1_0003.nii.gz", arr)
    if kind == "inf":
        arr = np.zeros(SHAPE, np.float32)
        arr[2, 3, 4] = np.inf
        return _write(tr / "c1_0000.nii.gz", arr)
    if kind == "truncated":
        path = tr / "c1_0002.nii.gz"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    if kind == "garbage":
        path = tr / "c1_0001.nii.gz"
        path.write_bytes(b"this is not an image")
        return path
    if kind == "instance grid":
        return _write(root / "instancesTr" / "c1.nii.gz", np.zeros(SHAPE, np.uint16),
                      origin=(5.0, 0.0, 0.0))
    raise ValueError(kind)


BAD_KINDS = ["missing NC", "missing V", "label grid", "label values", "2-D", "4-D", "NaN", "inf",
             "truncated", "garbage", "instance grid"]
FRAGMENTS = {"missing NC": "required phase NC", "missing V": "required phase V",
             "label grid": "label grid differs", "label values": "[10]", "2-D": "3-D",
             "4-D": "4-D", "NaN": "NaN or inf", "inf": "NaN or inf",
             "truncated": "cannot read", "garbage": "cannot read",
             "instance grid": "instance grid differs"}


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_case_errors_name_the_file_and_the_rest_is_still_read(tmp_path, kind):
    root = make_dataset(tmp_path)
    bad_file = _break(root, kind)
    with pytest.raises(contract.CaseError) as e:
        _load(root, "c1")
    assert e.value.file == str(bad_file), str(e.value)
    assert str(bad_file) in str(e.value) and FRAGMENTS[kind] in e.value.message, str(e.value)
    # The other cases of the cohort are unaffected.
    for name in ("c0", "c2"):
        assert _load(root, name).phase_mask.tolist() == [True, True, True, True]


def test_missing_phases_allowed_and_delayed_dropped(tmp_path):
    root = make_dataset(tmp_path)
    (root / "imagesTr" / "c1_0000.nii.gz").unlink()
    case = _load(root, "c1", allow_missing_phases=True)
    assert case.phase_mask.tolist() == [False, True, True, True] and case.images["NC"] is None
    assert case.phases == ["A", "V", "D"]
    case = _load(root, "c0", drop_delayed=True)
    assert case.phase_mask.tolist() == [True, True, True, False] and case.images["D"] is None
    (root / "imagesTr" / "c2_0003.nii.gz").unlink()  # a missing delayed phase is normal
    assert _load(root, "c2").phase_mask.tolist() == [True, True, True, False]


def test_loaded_arrays_match_the_files(tmp_path):
    root = make_dataset(tmp_path)
    case = _load(root, "c0")
    for ch, phase in enumerate(contract.PHASES):
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "imagesTr" / f"c0_{ch:04d}.nii.gz")))
        np.testing.assert_array_equal(case.images[phase], ref)
        assert case.images[phase].dtype == np.float32
    np.testing.assert_array_equal(case.label, _label())
    assert case.spacing == [2.5, 1.0, 1.5]
    assert case.original["size"] == [12, 10, 6]


def test_connected_components_become_instances(tmp_path):
    root = make_dataset(tmp_path)
    case = _load(root, "c0")
    inst, lab = case.instances, case.label
    assert inst.dtype == np.uint16 and inst.max() == 3
    assert sorted(case.instance_classes.values()) == [2, 2, 7]
    # Each instance is exactly one of the three blobs written by _label().
    blobs = [(slice(2, 4), slice(3, 5), slice(3, 5)), (slice(2, 4), slice(3, 5), slice(7, 9)),
             (3, 6, 5)]
    ids = {int(np.unique(inst[b])[0]) for b in blobs}
    assert ids == {1, 2, 3}
    assert np.array_equal(inst > 0, lab >= 2)


def test_instance_classes_is_the_majority_lesion_code():
    rng = np.random.default_rng(0)
    inst = rng.integers(0, 5, size=(4, 5, 6)).astype(np.uint16)
    lab = rng.integers(0, 10, size=(4, 5, 6)).astype(np.uint8)
    lab[inst == 4] = 1  # instance 4 has no lesion voxel: left out
    out = contract.instance_classes(inst, lab)
    expected = {}
    for i in range(1, 5):
        codes = [int(c) for c in lab[inst == i] if c >= 2]
        if codes:
            counts = [codes.count(c) for c in range(10)]
            expected[i] = counts.index(max(counts))
    assert out == expected and 4 not in out


def test_instance_file_is_used(tmp_path):
    root = make_dataset(tmp_path)
    inst = np.zeros(SHAPE, np.uint16)
    inst[2:4, 3:5, 3:9] = 5  # the two HCC blobs declared as one lesion (id 5)
    inst[3, 6, 5] = 1
    _write(root / "instancesTr" / "c0.nii.gz", inst)
    case = _load(root, "c0")
    assert case.instance_classes == {1: 7, 5: 2}
    # Voxels between the blobs are liver: instance 5 keeps them (only lesion codes vote).
    assert case.instances[2, 3, 6] == 5
    # A lesion the instance file forgets becomes an instance of its own.
    inst[3, 6, 5] = 0
    _write(root / "instancesTr" / "c0.nii.gz", inst)
    case = _load(root, "c0")
    assert case.instance_classes == {5: 2, 6: 7} and case.instances[3, 6, 5] == 6


@pytest.mark.parametrize("ending", [".nii", ".mha", ".nrrd"])
def test_other_file_endings(tmp_path, ending):
    root = make_dataset(tmp_path, cases=("c0",), ending=ending)
    case = _load(root, "c0")
    assert case.phase_mask.all() and case.label.shape == SHAPE


def test_phase_on_another_grid_is_resampled_onto_venous(tmp_path):
    root = make_dataset(tmp_path, cases=("c0",))
    # Arterial phase with half the spacing and the same field of view, value = 4 * x (mm) + 1.
    fine = (0.75, 0.5, 1.25)
    xs = np.arange(24) * 0.75
    arr = np.broadcast_to(4 * xs[None, None, :] + 1, (12, 20, 24)).astype(np.float32)
    _write(root / "imagesTr" / "c0_0001.nii.gz", np.ascontiguousarray(arr), spacing=fine)
    case = _load(root, "c0")
    assert case.images["A"].shape == SHAPE
    vx = np.arange(12) * 1.5
    np.testing.assert_allclose(case.images["A"], np.broadcast_to(4 * vx + 1, SHAPE), atol=1e-4)


def test_canonical_orientation_applied_to_all_arrays(tmp_path):
    root = make_dataset(tmp_path, cases=("c0",))
    flipped = [-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0]
    origin = ((SHAPE[2] - 1) * SPACING[0], 0.0, 0.0)  # same voxels, x index reversed
    for f in sorted((root / "imagesTr").iterdir()) + [root / "labelsTr" / "c0.nii.gz"]:
        img = sitk.ReadImage(str(f))
        _write(f, sitk.GetArrayFromImage(img)[:, :, ::-1].copy(), origin=origin,
               direction=flipped)
    case = _load(root, "c0")
    np.testing.assert_array_equal(case.label, _label())
    assert case.canonical["flip_axes"] == [2]
    assert case.original["direction"] == flipped


def test_find_case_files(tmp_path):
    root = make_dataset(tmp_path, cases=("c0",), delayed=False)
    files = sorted((root / "imagesTr").iterdir())
    case = contract.find_case_files(files)
    assert case.name == "c0" and case.phases["D"] is None
    assert case.phases["A"] == root / "imagesTr" / "c0_0001.nii.gz"
    loaded = contract.load_case(case)
    assert loaded.label is None and loaded.phase_mask.tolist() == [True, True, True, False]
    by_phase = contract.find_case_files({"V": files[2], "A": files[1]})
    assert by_phase.name == "c0" and by_phase.phases["NC"] is None
    with pytest.raises(contract.CaseError, match="required phase NC"):
        contract.load_case(by_phase)
    with pytest.raises(contract.CaseError, match="belongs to case"):
        other = _write(tmp_path / "x" / "c9_0003.nii.gz", np.zeros(SHAPE, np.float32))
        contract.find_case_files(files + [other])
    with pytest.raises(contract.CaseError, match="CASE_000c"):
        contract.find_case_files([tmp_path / "venous.nii.gz"])


@pytest.mark.parametrize("ending", [".nii", ".nii.gz"])
def test_truncated_integer_nifti_is_caught(tmp_path, ending):
    # ITK zero-fills a truncated NIfTI without an error: the contract must not.
    path = _write(tmp_path / f"c_0002{ending}", np.ones((20, 30, 40), np.int16))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    case = contract.find_case_files({"V": path})
    with pytest.raises(contract.CaseError, match="truncated") as e:
        contract.load_case(case, allow_missing_phases=True)
    assert e.value.file == str(path)
    assert contract.check_nifti_data(_write(tmp_path / f"ok{ending}",
                                            np.ones((2, 3, 4), np.int16))) is None
