"""nnU-Net-style preprocessing and the on-disk cache, checked against numpy references."""

import json
import os
import pathlib

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import load_config, write_image
from lidia_jax.data import contract
from lidia_jax.data import geometry as geo
from lidia_jax.data import preprocessing as pp

LABELS = {"background": 0, "liver": 1, "HCC": 2, "ICC": 3, "meta": 4, "heman": 5, "FNH": 6,
          "cyst": 7, "calc": 8, "others": 9}
SHAPE = (8, 12, 14)  # [D, H, W]
SPACING = (2.0, 1.5, 3.0)  # SimpleITK (x, y, z)


def _write(path, array, spacing=SPACING, origin=(0.0, 0.0, 0.0), direction=None):
    return write_image(path, array, spacing, origin, direction)


def _case_arrays(seed):
    """A small 'patient': body in air with a table below, liver, one or two lesions."""
    rng = np.random.default_rng(seed)
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:7, 3:9, 3:11] = 1
    lab[3:5, 4:6, 4:6] = 2 + seed % 3
    if seed % 2:
        lab[4:6, 6:8, 8:10] = 7
    phases = []
    for ch in range(4):
        img = np.full(SHAPE, -1000.0, np.float32)
        img[1:8, 2:10, 1:13] = 40.0 + 10 * ch  # body
        img[:, 11, :] = 200.0  # table, not connected to the body
        img[lab == 1] = 60.0 + 30 * ch
        img[lab >= 2] = 30.0 + 50 * ch
        img += rng.normal(scale=15.0, size=SHAPE).astype(np.float32)
        phases.append(img)
    return phases, lab


def make_cohort(root, n_tr=5, n_ts=1, delayed=(True,), direction=None, spacing=SPACING):
    root = pathlib.Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({
        "name": "t", "channel_names": {"0": "NC", "1": "A", "2": "V", "3": "D"},
        "labels": LABELS, "file_ending": ".nii.gz"}))
    names = [("Tr", f"tr{i}") for i in range(n_tr)] + [("Ts", f"ts{i}") for i in range(n_ts)]
    for i, (split, name) in enumerate(names):
        phases, lab = _case_arrays(i)
        for ch, img in enumerate(phases):
            if ch == 3 and not delayed[i % len(delayed)]:
                continue
            _write(root / f"images{split}" / f"{name}_{ch:04d}.nii.gz", img, spacing,
                   direction=direction)
        _write(root / f"labels{split}" / f"{name}.nii.gz", lab, spacing, direction=direction)
    return root


def _cfg(**preprocess):
    c = load_config("smoke")
    c.preprocess.target_spacing = (3.0, 1.5, 2.0)  # == the files' spacing: no resampling
    c.preprocess.num_workers = 0
    c.data.val_fraction = 0.2
    for k, v in preprocess.items():
        setattr(c.preprocess, k, v)
    return c


def _run(root, tmp_path, c, **kw):
    return pp.preprocess_dataset(root, tmp_path / "cache", c.preprocess, c.data,
                                 log=kw.get("log", lambda *_: None))


def test_intensity_stats_and_normalisation_match_numpy(tmp_path):
    root = make_cohort(tmp_path / "ds", delayed=(True, False))
    c = _cfg(crop_to_body=False)
    cache = _run(root, tmp_path, c)
    train, val = pp.split_train_val([f"tr{i}" for i in range(5)], 0.2)
    assert cache.case_names("train") == train and cache.case_names("val") == val
    assert len(val) == 1 and cache.case_names("test") == ["ts0"]

    def read(name, ch):
        path = root / "imagesTr" / f"{name}_{ch:04d}.nii.gz"
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) if path.exists() else None

    stats = cache.intensity
    for ch in range(4):
        values = []
        for name in train:  # training cases only: validation must not leak into the stats
            lab = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / f"{name}.nii.gz")))
            img = read(name, ch)
            if img is not None:
                values.append(img[lab > 0].astype(np.float64))
        v = np.concatenate(values)
        assert stats["count"][ch] == v.size
        np.testing.assert_allclose(stats["mean"][ch], v.mean(), rtol=1e-6)
        np.testing.assert_allclose(stats["std"][ch], v.std(), rtol=1e-6)
        np.testing.assert_allclose([stats["lo"][ch], stats["hi"][ch]],
                                   np.percentile(v, [0.5, 99.5]), rtol=1e-6)

    # The cached image is the clipped, z-scored input (no resampling, no crop here).
    for name in train + val:
        case = cache.load(name)
        image = case["image"]
        assert image.dtype == np.float32 and image.shape == SHAPE + (4,)
        for ch in range(4):
            img = read(name, ch)
            if img is None:
                assert not case["meta"]["phase_mask"][ch] and not np.any(image[..., ch])
                continue
            ref = (np.clip(img, stats["lo"][ch], stats["hi"][ch]) - stats["mean"][ch]) / \
                stats["std"][ch]
            np.testing.assert_allclose(image[..., ch], ref, rtol=1e-5, atol=1e-5)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / f"{name}.nii.gz")))
        np.testing.assert_array_equal(case["seg"], lab)
        assert case["seg"].dtype == np.uint8 and case["inst"].dtype == np.uint16
        meta = case["meta"]
        assert set(meta["instance_classes"].values()) == set(np.unique(lab[lab >= 2]).tolist())
        assert meta["shape"] == list(SHAPE) and meta["spacing"] == [3.0, 1.5, 2.0]
        for kind, lowest in (("liver", 1), ("lesion", 2)):
            locs = np.array(meta["fg_locations"][kind])
            assert len(locs) == (lab >= lowest).sum()
            assert np.all(case["seg"][tuple(locs.T)] >= lowest)


def test_bad_cases_are_reported_skipped_and_recorded(tmp_path):
    root = make_cohort(tmp_path / "ds", n_tr=5)
    (root / "imagesTr" / "tr1_0002.nii.gz").unlink()
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / "tr3.nii.gz")))
    lab[0, 0, 0] = 12
    _write(root / "labelsTr" / "tr3.nii.gz", lab)
    (root / "labelsTr" / "tr4.nii.gz").unlink()
    messages = []
    cache = _run(root, tmp_path, _cfg(), log=messages.append)
    skipped = cache.plan["skipped"]
    assert set(skipped) == {"tr1", "tr3", "tr4"}
    assert "tr1_0002.nii.gz" in skipped["tr1"] and "required phase V" in skipped["tr1"]
    assert "tr3.nii.gz" in skipped["tr3"] and "[12]" in skipped["tr3"]
    assert "labelsTr/tr4.nii.gz" in skipped["tr4"]
    assert sum("SKIPPED" in m for m in messages) == 3
    ok = cache.case_names("train") + cache.case_names("val")
    assert sorted(ok) == ["tr0", "tr2"] and cache.case_names("test") == ["ts0"]
    for name in ok + ["ts0"]:
        assert cache.load(name)["image"].shape[-1] == 4


def test_cache_reused_without_reading_and_invalidated_on_change(tmp_path, monkeypatch):
    root = make_cohort(tmp_path / "ds", n_tr=3, n_ts=0)
    reads = []
    real_read = sitk.ReadImage
    monkeypatch.setattr(sitk, "ReadImage",
                        lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    c = _cfg()
    first = _run(root, tmp_path, c)
    n_first = len(reads)
    assert n_first == 3 * 5  # 4 phases + label per case
    assert first.case_names("test") == []
    plan_mtime = (first.path / "plan.json").stat().st_mtime_ns

    second = _run(root, tmp_path, c)
    assert len(reads) == n_first, "the second call must not read any image"
    assert second.path == first.path
    assert (second.path / "plan.json").stat().st_mtime_ns == plan_mtime

    c.preprocess.body_threshold_hu = -300.0  # a setting changes
    third = _run(root, tmp_path, c)
    assert third.path != first.path and len(reads) == 2 * n_first

    c.data.drop_delayed = True  # so does a data setting
    fourth = _run(root, tmp_path, c)
    assert fourth.path not in (first.path, third.path)
    assert len(reads) == 3 * n_first - 3  # the delayed phase is not even read
    assert all(not np.any(fourth.load(n)["image"][..., 3]) for n in fourth.case_names("train"))
    assert all(fourth.load(n)["meta"]["phase_mask"] == [True, True, True, False]
               for n in fourth.case_names("train"))

    f = root / "imagesTr" / "tr0_0001.nii.gz"  # an input file changes (mtime)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    fifth = _run(root, tmp_path, c)
    assert fifth.path != fourth.path and len(reads) == 4 * n_first - 6
    assert not list((tmp_path / "cache").glob(".*tmp*")), "temporary folders must not remain"


def test_split_is_deterministic():
    names = [f"case_{i:03d}" for i in range(40)]
    train, val = pp.split_train_val(names, 0.15)
    assert len(val) == 6 and sorted(train + val) == names and not set(train) & set(val)
    shuffled = list(np.random.default_rng(0).permutation(names))
    assert pp.split_train_val(shuffled, 0.15) == (train, val)
    # Adding a case moves at most one other case across the boundary.
    _, val2 = pp.split_train_val(names + ["case_new"], 0.15)
    assert len(set(val) - set(val2)) <= 1
    assert pp.split_train_val(names, 0.0) == (names, [])
    assert len(pp.split_train_val(names[:4], 0.1)[1]) == 1  # at least one validation case


def test_body_crop_is_the_largest_component_box():
    rng = np.random.default_rng(0)
    v = np.full((10, 20, 30), -1000.0)
    v[2:9, 3:15, 5:25] = 50 + rng.normal(size=(7, 12, 20))
    v[:, 18, :] = 300.0  # the table
    v[0, 0, 0] = 100.0  # a stray voxel
    assert pp.body_bbox(v, -500.0) == [[2, 9], [3, 15], [5, 25]]
    keep = np.zeros(v.shape, bool)
    keep[5, 16, 2] = True  # a labelled voxel outside the body must stay inside the crop
    assert pp.body_bbox(v, -500.0, keep) == [[2, 9], [3, 17], [2, 25]]
    assert pp.body_bbox(np.full((3, 4, 5), -1000.0), -500.0) == [[0, 3], [0, 4], [0, 5]]


# Index axes permuted and flipped, anisotropic spacing: the hardest header to restore.
OBLIQUE = [0.0, -1.0, 0.0,
           -1.0, 0.0, 0.0,
           0.0, 0.0, 1.0]


@pytest.mark.parametrize("target, exact", [((3.0, 2.0, 1.5), True), ((4.0, 2.5, 2.5), False)])
def test_round_trip_to_original_restores_geometry(tmp_path, target, exact):
    root = make_cohort(tmp_path / "ds", n_tr=2, n_ts=0, direction=OBLIQUE, spacing=SPACING)
    c = _cfg(target_spacing=target, image_order=3)
    cache = _run(root, tmp_path, c)
    venous = sitk.ReadImage(str(root / "imagesTr" / "tr0_0002.nii.gz"))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / "tr0.nii.gz")))
    case = cache.load("tr0")
    geom = case["meta"]["geometry"]
    assert geom["canonical"]["axes"] != [0, 1, 2] and geom["canonical"]["flip_axes"]
    assert geom["crop_bbox"] != [[0, n] for n in geom["canonical"]["shape"]]  # cropped
    out = geo.to_original(np.asarray(case["seg"]), geom)
    assert out.GetSize() == venous.GetSize()
    assert out.GetSpacing() == venous.GetSpacing()
    assert out.GetOrigin() == venous.GetOrigin()
    assert out.GetDirection() == venous.GetDirection()
    restored = sitk.GetArrayFromImage(out)
    if exact:  # same spacing: crop + canonicalisation are undone voxel for voxel
        np.testing.assert_array_equal(restored, label)
    else:
        fg, ref = restored > 0, label > 0
        # Tiny objects (6 voxels across) lose a voxel per side through nearest down + up.
        assert 2 * (fg & ref).sum() / (fg.sum() + ref.sum()) > 0.75
    assert not np.any(restored[label == 0] >= 2)  # lesions never land outside the body


def test_preprocess_case_for_inference_matches_the_cache(tmp_path):
    root = make_cohort(tmp_path / "ds", n_tr=3, n_ts=1, direction=OBLIQUE)
    c = _cfg(target_spacing=(4.0, 2.0, 2.0))
    cache = _run(root, tmp_path, c)
    files = sorted((root / "imagesTs").glob("ts0_*"))
    loaded = contract.load_case(contract.find_case_files(files))
    image, seg, inst, meta = pp.preprocess_case(loaded, cache.plan, c.preprocess)
    cached = cache.load("ts0")
    np.testing.assert_allclose(image, cached["image"], atol=1e-6)
    assert seg is None and inst is None  # loose files come without labels
    assert meta["geometry"] == cached["meta"]["geometry"]
    c.preprocess.target_spacing = (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="target_spacing"):
        pp.preprocess_case(loaded, cache.plan, c.preprocess)


def test_process_pool_gives_the_same_cache(tmp_path):
    root = make_cohort(tmp_path / "ds", n_tr=3, n_ts=1)
    c = _cfg(target_spacing=(4.0, 2.0, 2.5))
    serial = _run(root, tmp_path / "a", c)
    c.preprocess.num_workers = 2
    pooled = _run(root, tmp_path / "b", c)
    assert serial.plan["intensity"] == pooled.plan["intensity"]
    assert serial.plan["splits"] == pooled.plan["splits"]
    for name in ["tr0", "tr1", "tr2", "ts0"]:
        a, b = serial.load(name), pooled.load(name)
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["meta"] == b["meta"]


def test_intensity_stats_from_a_sample_when_the_cohort_is_large(tmp_path, monkeypatch):
    root = make_cohort(tmp_path / "ds", n_tr=4, n_ts=0)
    monkeypatch.setattr(pp, "FG_VOXELS_TOTAL", 300)  # 100 per training case (3 train, 1 val)
    cache = _run(root, tmp_path, _cfg())
    train = cache.case_names("train")
    assert len(train) == 3 and cache.intensity["count"] == [300] * 4
    full = []
    for name in train:
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "labelsTr" / f"{name}.nii.gz")))
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "imagesTr" / f"{name}_0002.nii.gz")))
        full.append(img[lab > 0])
    full = np.concatenate(full)
    assert full.size > 300
    # A uniform sample: its mean within 4 standard errors of the full foreground mean.
    assert abs(cache.intensity["mean"][2] - full.mean()) < 4 * full.std() / np.sqrt(300)
    assert full.min() <= cache.intensity["lo"][2] < cache.intensity["hi"][2] <= full.max()


def test_restore_array_carries_channels_and_drop_delayed_applies_at_inference(tmp_path):
    root = make_cohort(tmp_path / "ds", n_tr=3, n_ts=1, direction=OBLIQUE)
    c = _cfg(target_spacing=(4.0, 2.0, 2.0))
    c.data.drop_delayed = True
    cache = _run(root, tmp_path, c)
    case = cache.load("tr0")
    geom = case["meta"]["geometry"]
    rng = np.random.default_rng(0)
    probs = rng.random(tuple(case["meta"]["shape"]) + (3,)).astype(np.float32)
    restored = geo.restore_array(probs, geom, order=1)
    for k in range(3):
        one = sitk.GetArrayFromImage(geo.to_original(probs[..., k], geom, is_label=False))
        np.testing.assert_allclose(restored[..., k], one, atol=1e-6)
    assert restored.shape == SHAPE + (3,)
    # A new case with a delayed phase, preprocessed with a plan trained without D.
    files = sorted((root / "imagesTs").glob("ts0_*"))
    loaded = contract.load_case(contract.find_case_files(files))
    assert loaded.phase_mask[3]
    image, _, _, meta = pp.preprocess_case(loaded, cache.plan)
    assert meta["phase_mask"] == [True, True, True, False] and not np.any(image[..., 3])


def test_unlabelled_test_cases_and_no_usable_training_case(tmp_path):
    root = make_cohort(tmp_path / "ds", n_tr=2, n_ts=1)
    (root / "labelsTs" / "ts0.nii.gz").unlink()
    cache = _run(root, tmp_path, _cfg())
    test = cache.load("ts0")
    assert test["seg"] is None and test["inst"] is None and not test["meta"]["labelled"]
    assert test["meta"]["fg_locations"] == {"liver": [], "lesion": []}
    assert test["image"].shape[-1] == 4 and np.any(test["image"][..., 2])
    for name in ("tr0", "tr1"):
        (root / "labelsTr" / f"{name}.nii.gz").unlink()
    with pytest.raises(contract.DatasetError, match="no usable training case"):
        _run(root, tmp_path, _cfg())
    assert not list((tmp_path / "cache").glob(".*tmp*"))


def test_fg_locations_keep_every_lesion_when_subsampled(monkeypatch):
    """Above the location cap, each lesion keeps min(size, equal share) voxels (water-filling):
    a 4-voxel lesion next to a 3000-voxel one survives; liver locations stay uniform."""
    monkeypatch.setattr(pp, "MAX_FG_LOCATIONS", 1000)
    seg = np.zeros((20, 40, 40), np.uint8)
    inst = np.zeros_like(seg, np.uint16)
    seg[:, :20, :] = 1
    seg[:15, :20, :10] = 2  # 3000 voxels
    inst[:15, :20, :10] = 1
    seg[18, 30:32, 30:32] = 7  # 4 voxels
    inst[18, 30:32, 30:32] = 2
    seg[10:15, 30:40, 20:40] = 3  # 1000 voxels
    inst[10:15, 30:40, 20:40] = 3
    locs = pp._fg_locations(seg, inst, seed=0)
    lesion = np.array(locs["lesion"])
    ids, counts = np.unique(inst[tuple(lesion.T)], return_counts=True)
    # share: 4 fit, then (1000 - 4) // 2 = 498 for each of the two large lesions.
    np.testing.assert_array_equal(ids, [1, 2, 3])
    np.testing.assert_array_equal(counts, [498, 4, 498])
    assert len(np.unique(lesion, axis=0)) == len(lesion)
    assert np.all(seg[tuple(lesion.T)] >= 2)
    liver = np.array(locs["liver"])
    assert len(liver) == 1000 and np.all(seg[tuple(liver.T)] >= 1)
    # Below the cap every lesion voxel is kept.
    monkeypatch.setattr(pp, "MAX_FG_LOCATIONS", 10_000)
    assert len(pp._fg_locations(seg, inst, seed=0)["lesion"]) == 4004
