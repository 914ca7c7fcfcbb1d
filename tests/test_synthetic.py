"""Tests of the synthetic cohort: data contract, determinism, orientation, acquisition effects,
and the enhancement table of shared/spec/enhancement_patterns.md in the generated voxels.

The expected attenuations are written out here from the spec, independently of the generator's
own tables.
"""

import collections
import json
import pathlib

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from lidia_jax.data import synthetic

PHASES = ("NC", "A", "V", "D")
CONTRACT_LABELS = {"background": 0, "liver": 1, "HCC": 2, "ICC": 3, "meta": 4, "heman": 5,
                   "FNH": 6, "cyst": 7, "calc": 8, "others": 9}

# shared/spec/enhancement_patterns.md, typed in by hand. "L+20": liver of the same phase + 20.
SPEC_LIVER = (55, 75, 110, 95)
SPEC_LESION = {
    ("HCC", "tumour"): (45, 115, 90, 78),
    ("HCC", "capsule"): (45, 70, "L+20", "L+20"),
    ("HCC", "necrosis"): (30, 30, 30, 30),
    ("ICC", "rim"): (40, 90, 100, 100),
    ("ICC", "centre"): (40, 55, 78, 105),
    ("meta", "rim"): (40, 85, 100, 90),
    ("meta", "centre"): (40, 45, 60, 65),
    ("meta/neuroendocrine", "tumour"): (40, 120, 110, 95),
    ("heman", "nodules"): (40, 240, 165, 120),
    ("heman", "filling"): (40, 40, 165, 120),
    ("heman", "centre"): (40, 40, 50, 120),
    ("heman/flash", "tumour"): (40, 240, 165, 120),
    ("FNH", "tumour"): (52, 145, 112, 96),
    ("FNH", "scar"): (45, 45, 70, 115),
    ("cyst", "fluid"): (8, 8, 8, 8),
    ("others/abscess", "centre"): (20, 20, 20, 20),
    ("others/abscess", "rim"): (45, 90, 100, 95),
    ("others/abscess", "halo"): (45, 60, 85, 85),
    ("others/adenoma", "tumour"): (50, 120, 110, 90),
    ("others/adenoma", "fat"): (-20, -20, -20, -20),
    ("others/adenoma", "blood"): (70, 70, 70, 70),
    ("others/AML", "fat"): (-60, -60, -60, -60),
    ("others/AML", "vessels"): (40, 150, 120, 100),
    ("others/lymphoma", "tumour"): (45, 55, 70, 70),
    ("others/cystadenoma", "fluid"): (15, 15, 15, 15),
    ("others/cystadenoma", "septa"): (40, 70, 100, 95),
}

N_TABLE_CASES = 40  # smoke cases generated in memory for the table checks (~0.15 s each)
LESION_CLASSES = ("HCC", "ICC", "meta", "heman", "FNH", "cyst", "calc", "others")


def _key(record):
    cls, sub = record["cls"], record["subtype"]
    return cls if sub is None else f"{cls}/{sub}"


def _timed(values, timing):
    """Contrast timing: A and V enhancement over NC scale together by `timing`."""
    v = np.asarray(values, np.float64)
    v[1:3] = v[0] + timing * (v[1:3] - v[0])
    return v


def _expected(key, comp, timing):
    vals = [SPEC_LIVER[p] + 20 if v == "L+20" else v
            for p, v in enumerate(SPEC_LESION[(key, comp)])]
    return _timed(vals, timing)


@pytest.fixture(scope="module")
def table_cases():
    # Main diagnosis cycled over the classes, so that every class is present (5 patients each).
    return [synthetic.generate_case(7, i, "smoke", keep_clean=True,
                                    main_class=LESION_CLASSES[i % len(LESION_CLASSES)])
            for i in range(N_TABLE_CASES)]


@pytest.fixture(scope="module")
def compartment_stats(table_cases):
    """{(key, comp): list of (voxels, mean HU [4], expected [4], liver mean HU [4])}."""
    stats = collections.defaultdict(list)
    for case in table_cases:
        hu, tissue = case.clean["hu"], case.clean["tissue"]
        liver_id = next(r["id"] for r in case.clean["tissues"] if r["name"] == "liver")
        liver = hu[:, tissue == liver_id].astype(np.float64).mean(axis=1)
        for rec in case.clean["tissues"]:
            if rec["kind"] != "lesion":
                continue
            m = tissue == rec["id"]
            n = int(m.sum())
            assert n > 0, f"{case.name}: tissue record {rec['name']} has no voxel"
            mean = hu[:, m].astype(np.float64).mean(axis=1)
            if rec["cls"] == "calc":
                exp = np.full(4, np.nan)
            else:
                exp = _expected(_key(rec), rec["compartment"], case.info["timing_factor"])
            stats[(_key(rec), rec["compartment"])].append((n, mean, exp, liver))
    return stats


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "DATASET"
    return synthetic.make_cohort(out, cases=6, seed=3, size="smoke", test_fraction=0.34)


def _summary(root):
    return json.loads((pathlib.Path(root) / "summary.json").read_text())["cases"]


def _read(path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def _grid(img):
    return (img.GetSize(), np.round(img.GetSpacing(), 5), np.round(img.GetOrigin(), 4),
            np.round(img.GetDirection(), 6))


def _same_grid(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_grid(a), _grid(b)))


def _physical(img, idx_zyx):
    """Physical (x, y, z) mm of array indices [N, 3] (z, y, x), from the header alone."""
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    ijk = np.asarray(idx_zyx, np.float64)[:, ::-1] * np.asarray(img.GetSpacing())
    return np.asarray(img.GetOrigin()) + ijk @ d.T


# ----------------------------------------------------------------------------- contract


def test_layout_and_dataset_json(cohort):
    ds = json.loads((cohort / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "NC", "1": "A", "2": "V", "3": "D"}
    assert ds["labels"] == CONTRACT_LABELS
    assert ds["file_ending"] == ".nii.gz"
    assert isinstance(ds["name"], str) and ds["name"]
    summary = _summary(cohort)
    assert sorted(summary) == [f"syn_{i:04d}" for i in range(6)]
    splits = collections.Counter(info["split"] for info in summary.values())
    assert splits == {"Tr": 4, "Ts": 2}  # round(6 * 0.34) held out
    assert (ds["numTraining"], ds["numTest"]) == (4, 2)
    without_d = 0
    for name, info in summary.items():
        s = info["split"]
        for ch, phase in enumerate(PHASES):
            f = cohort / f"images{s}" / f"{name}_{ch:04d}.nii.gz"
            assert f.exists() == (phase in info["phases"]), f
        assert (cohort / f"labels{s}" / f"{name}.nii.gz").exists()
        assert (cohort / f"instances{s}" / f"{name}.nii.gz").exists()
        without_d += "D" not in info["phases"]
        assert {"NC", "A", "V"} <= set(info["phases"])
    assert 1 <= without_d <= 3  # a third of the studies lack the delayed phase
    # Nothing else in the folders (no stale files from another cohort).
    n_files = sum(1 for f in cohort.rglob("*.nii.gz"))
    assert n_files == sum(len(i["phases"]) + 2 for i in summary.values())


def test_labels_instances_on_venous_grid(cohort):
    summary = _summary(cohort)
    oriented = regridded = 0
    for name, info in summary.items():
        s = info["split"]
        v, _ = _read(cohort / f"images{s}" / f"{name}_0002.nii.gz")
        lab_img, lab = _read(cohort / f"labels{s}" / f"{name}.nii.gz")
        ins_img, ins = _read(cohort / f"instances{s}" / f"{name}.nii.gz")
        assert v.GetPixelID() == sitk.sitkInt16
        assert _same_grid(lab_img, v) and _same_grid(ins_img, v), name
        assert lab.min() >= 0 and lab.max() <= 9
        # Instances 1..K, each exactly the lesion voxels of one class.
        ids = np.unique(ins[ins > 0])
        assert np.array_equal(ids, np.arange(1, len(ids) + 1)), (name, ids)
        assert len(ids) == len(info["lesions"]) and 1 <= len(ids) <= 8
        assert np.array_equal(ins > 0, lab >= 2), name
        for les in info["lesions"]:
            codes = np.unique(lab[ins == les["instance"]])
            assert codes.tolist() == [CONTRACT_LABELS[les["cls"]]], (name, les, codes)
            assert les["voxels"] == int((ins == les["instance"]).sum())
        # Lesions lie inside the liver: most of their outer surface borders liver (or another
        # lesion; a subcapsular lesion may reach the liver surface over part of it), and liver
        # + lesions form one organ.
        liver = lab >= 1
        borders = []
        for i in ids:
            m = ins == i
            shell = ndimage.binary_dilation(m) & ~m
            borders.append(liver[shell].mean())
        assert min(borders) > 0.4 and np.mean(borders) > 0.7, (name, borders)
        comp, n = ndimage.label(liver)
        sizes = np.bincount(comp.ravel())[1:]
        assert sizes.max() > 0.9 * liver.sum(), name
        # Other phases: same grid as V, unless this case has a phase on another grid.
        for ch, phase in enumerate(PHASES):
            if phase not in info["phases"] or phase == "V":
                continue
            img = sitk.ReadImage(str(cohort / f"images{s}" / f"{name}_{ch:04d}.nii.gz"))
            assert img.GetPixelID() == sitk.sitkInt16
            if phase == info["regridded_phase"]:
                assert not _same_grid(img, v), (name, phase)
                regridded += 1
            else:
                assert _same_grid(img, v), (name, phase)
        oriented += info["orientation"] != "identity"
        if info["orientation"] != "identity":
            assert not np.allclose(np.asarray(v.GetDirection()).reshape(3, 3), np.eye(3))
    assert oriented >= 2 and regridded >= 1


def test_anatomy_orientation_from_headers(cohort):
    """Liver on the patient's right, spine posterior, whatever the stored axis order."""
    for name, info in _summary(cohort).items():
        s = info["split"]
        v, hu = _read(cohort / f"images{s}" / f"{name}_0002.nii.gz")
        _, lab = _read(cohort / f"labels{s}" / f"{name}.nii.gz")
        liver = _physical(v, np.argwhere(lab >= 1)).mean(axis=0)
        bone = _physical(v, np.argwhere(ndimage.binary_opening(hu > 200))).mean(axis=0)
        body = _physical(v, np.argwhere(hu > -500)).mean(axis=0)
        # LPS: x grows toward the patient's left, y toward posterior.
        assert liver[0] < body[0] - 20, (name, info["orientation"], liver, body)
        assert bone[1] > liver[1] + 20, (name, info["orientation"], bone, liver)


def test_canonicalising_restores_the_generated_anatomy(cohort):
    summary = _summary(cohort)
    for name, info in summary.items():
        s = info["split"]
        case = synthetic.generate_case(3, info["index"], "smoke", keep_clean=True)
        lab = sitk.DICOMOrient(sitk.ReadImage(str(cohort / f"labels{s}" / f"{name}.nii.gz")),
                               "LPS")
        ins = sitk.DICOMOrient(
            sitk.ReadImage(str(cohort / f"instances{s}" / f"{name}.nii.gz")), "LPS")
        assert np.allclose(np.asarray(lab.GetDirection()).reshape(3, 3), np.eye(3))
        assert np.array_equal(sitk.GetArrayFromImage(lab), case.clean["label"]), name
        assert np.array_equal(sitk.GetArrayFromImage(ins), case.clean["instances"]), name
        assert np.allclose(lab.GetSpacing()[::-1], case.clean["spacing"])


# ----------------------------------------------------------------------------- determinism


def test_deterministic_and_independent_of_workers(cohort, tmp_path):
    again = synthetic.make_cohort(tmp_path / "again", cases=6, seed=3, size="smoke",
                                  test_fraction=0.34, workers=2)
    files = sorted(p.relative_to(cohort) for p in cohort.rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(again) for p in again.rglob("*.nii.gz"))
    for rel in files:
        a, b = sitk.ReadImage(str(cohort / rel)), sitk.ReadImage(str(again / rel))
        assert _same_grid(a, b), rel
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)), rel
    other = synthetic.generate_case(4, 0, "smoke")
    same = synthetic.generate_case(3, 0, "smoke")
    assert not np.array_equal(sitk.GetArrayFromImage(other.images["V"]),
                              sitk.GetArrayFromImage(same.images["V"]))


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="huge"):
        synthetic.make_cohort(tmp_path, cases=2, seed=0, size="huge")
    with pytest.raises(ValueError, match="test_fraction"):
        synthetic.make_cohort(tmp_path, cases=2, seed=0, size="smoke", test_fraction=1.0)


# ----------------------------------------------------------------------------- intensities


def test_every_class_is_generated(table_cases):
    for i, case in enumerate(table_cases):
        classes = [l["cls"] for l in case.info["lesions"]]
        assert LESION_CLASSES[i % 8] in classes, (case.name, classes)
        assert 1 <= len(classes) <= 8
        assert case.info["lesion_classes"] == sorted(set(classes), key=LESION_CLASSES.index)


def test_prevalence_is_imbalanced_like_real_cohorts():
    """Lesion-level frequencies of the natural draw: cysts and HCC common, ICC/FNH/others rare,
    metastases several per patient."""
    rng = np.random.default_rng(0)
    draws = [synthetic._draw_lesions(rng, "demo") for _ in range(3000)]
    classes = collections.Counter(l["cls"] for d in draws for l in d)
    total = sum(classes.values())
    for common in ("cyst", "HCC"):
        assert classes[common] / total > 0.15, classes
        for rare in ("ICC", "FNH", "others", "calc"):
            assert classes[common] > 2 * classes[rare], classes
    for rare in ("ICC", "FNH", "others", "calc"):
        assert 0.02 < classes[rare] / total < 0.1, classes
    per_patient = collections.defaultdict(list)
    for d in draws:
        for cls, n in collections.Counter(l["cls"] for l in d).items():
            per_patient[cls].append(n)
    assert np.mean(per_patient["meta"]) > 2 * np.mean(per_patient["FNH"])
    assert all(1 <= len(d) <= 8 for d in draws)


def test_lesion_hu_follow_the_table(compartment_stats):
    """Voxel means of each class compartment, over all lesions, within 15 HU of the spec."""
    seen = set()
    for (key, comp), rows in compartment_stats.items():
        n = np.array([r[0] for r in rows], np.float64)
        mean = (n[:, None] * np.stack([r[1] for r in rows])).sum(0) / n.sum()
        if key == "calc":
            assert np.all((mean > 250) & (mean < 800)), mean
            assert np.ptp(mean) < 1e-3  # same density in every phase
            seen.add(key)
            continue
        exp = (n[:, None] * np.stack([r[2] for r in rows])).sum(0) / n.sum()
        assert np.all(np.abs(mean - exp) <= 15), (key, comp, mean.round(), exp.round())
        # Each lesion on its own, within the stated variability (tens of HU).
        for _, m, e, _ in rows:
            assert np.all(np.abs(m - e) <= 30), (key, comp, m.round(), e.round())
        seen.add(key.split("/")[0])
    assert seen == set(CONTRACT_LABELS) - {"background", "liver"}


def test_background_anatomy_follows_the_table(table_cases):
    spec = {"liver": SPEC_LIVER, "aorta": (40, 280, 165, 120), "vein": (40, 110, 180, 125),
            "spleen": (48, 120, 120, 100), "kidney_cortex": (33, 180, 180, 150),
            "muscle": (52, 62, 68, 65), "fat": (-100,) * 4, "bone": (250,) * 4,
            "air": (-1000,) * 4}
    for case in table_cases[:8]:
        hu, tissue = case.clean["hu"], case.clean["tissue"]
        for rec in case.clean["tissues"]:
            if rec["name"] not in spec or not (tissue == rec["id"]).any():
                continue
            mean = hu[:, tissue == rec["id"]].astype(np.float64).mean(axis=1)
            exp = _timed(spec[rec["name"]], case.info["timing_factor"])
            tol = 40 if rec["name"] == "bone" else 15  # bone: trabecular texture
            assert np.all(np.abs(mean - exp) <= tol), (rec["name"], mean.round(), exp)
    timing = [c.info["timing_factor"] for c in table_cases]
    assert 0.85 <= min(timing) and max(timing) <= 1.15 and np.ptp(timing) > 0.1


def _class_mean(stats, key, comp):
    """Voxel-weighted mean HU [4] and mean liver HU [4] over all lesions of (key, comp)."""
    rows = stats[(key, comp)]
    assert rows, f"no {key}/{comp} lesion in the table cohort"
    n = np.array([r[0] for r in rows], np.float64)
    mean = (n[:, None] * np.stack([r[1] for r in rows])).sum(0) / n.sum()
    liver = (n[:, None] * np.stack([r[3] for r in rows])).sum(0) / n.sum()
    return mean, liver


def test_what_each_phase_decides(compartment_stats):
    """The phase signatures of the spec, as contrasts with the liver of the same phase."""
    nc, a, v, d = range(4)
    hcc, liver = _class_mean(compartment_stats, "HCC", "tumour")
    assert hcc[a] > liver[a] + 20 and hcc[v] < liver[v] - 10 and hcc[d] < liver[d] - 8
    cap, liver_c = _class_mean(compartment_stats, "HCC", "capsule")
    assert cap[v] > liver_c[v] + 10 and cap[d] > liver_c[d] + 10  # capsule: V and D only
    icc, liver_i = _class_mean(compartment_stats, "ICC", "centre")
    icc_rim, _ = _class_mean(compartment_stats, "ICC", "rim")
    meta, liver_m = _class_mean(compartment_stats, "meta", "centre")
    # ICC versus metastasis: both hypo centres in V; only ICC's centre enhances in D.
    assert icc[v] < liver_i[v] - 15 and meta[v] < liver_m[v] - 30
    assert icc[d] > liver_i[d] and meta[d] < liver_m[d] - 15
    assert (icc[d] - meta[d]) > 2 * abs(icc[v] - meta[v])
    assert icc_rim[a] > icc[a] + 20
    net, liver_n = _class_mean(compartment_stats, "meta/neuroendocrine", "tumour")
    assert net[a] > liver_n[a] + 25
    nod, liver_h = _class_mean(compartment_stats, "heman", "nodules")
    centre, _ = _class_mean(compartment_stats, "heman", "centre")
    fill, _ = _class_mean(compartment_stats, "heman", "filling")
    assert nod[a] > liver_h[a] + 100 and centre[a] < liver_h[a] - 20
    assert fill[v] > liver_h[v] + 30 and fill[a] < liver_h[a]  # grows inward in V
    assert centre[d] > liver_h[d] + 10  # fill-in only in D
    fnh, liver_f = _class_mean(compartment_stats, "FNH", "tumour")
    scar, _ = _class_mean(compartment_stats, "FNH", "scar")
    assert fnh[a] > liver_f[a] + 40 and abs(fnh[v] - liver_f[v]) < 15
    assert scar[a] < fnh[a] - 60 and scar[d] > fnh[d] + 10  # the scar enhances late
    cyst, _ = _class_mean(compartment_stats, "cyst", "fluid")
    assert np.all(cyst < 30) and np.ptp(cyst) < 1e-3
    calc, liver_k = _class_mean(compartment_stats, "calc", "calcium")
    assert calc[nc] > liver_k[nc] + 150


def test_heman_flash_fill_and_small_lesions():
    """Hemangiomas under 15 mm flash-fill: one compartment at 240/165/120 in A/V/D."""
    grid = synthetic._Grid((20, 40, 40), (2.0, 1.5, 1.5), (-30.0, -30.0, -20.0))
    tissue = np.full(grid.shape, synthetic._ANATOMY_IDS["liver"], np.uint8)
    rng = np.random.default_rng(0)
    placed = [dict(cls="heman", subtype=None, diameter_mm=12.0, centre=np.array([-10., 0, 0])),
              dict(cls="heman", subtype=None, diameter_mm=24.0, centre=np.array([12., 0, 0]))]
    lesions = synthetic._render_lesions(rng, placed, tissue, grid)
    assert [l["subtype"] for l in lesions] == ["flash", None]
    assert list(lesions[0]["compartment_ids"]) == ["tumour"]
    assert set(lesions[1]["compartment_ids"]) == {"nodules", "filling", "centre"}
    lut, records = synthetic._hu_tables(rng, lesions, timing=1.0)
    flash = lut[:, lesions[0]["compartment_ids"]["tumour"]]
    assert np.all(np.abs(flash - np.array([40, 240, 165, 120])) <= 16)
    # No overlap: every lesion voxel belongs to exactly one lesion, as painted.
    ids = [set(l["compartment_ids"].values()) for l in lesions]
    assert not ids[0] & ids[1] and (tissue >= synthetic._LESION_BASE).sum() > 0


# ----------------------------------------------------------------------------- acquisition


def test_noise_misregistration_and_parenchyma_in_files(cohort):
    """Files = clean phases + blur + 1-2 voxel shift (not V) + correlated 8-20 HU noise."""
    summary = _summary(cohort)
    checked = 0
    pooled, pairs = [], []
    for name, info in summary.items():
        if info["regrid"] is not None:
            continue
        s = info["split"]
        case = synthetic.generate_case(3, info["index"], "smoke", keep_clean=True)
        clean, label = case.clean["hu"], case.clean["label"]
        core = ndimage.binary_erosion(label == 1, structure=np.ones((3, 5, 5)))
        assert 8 <= info["noise_std"] <= 20
        for ch, phase in enumerate(PHASES):
            if phase not in info["phases"]:
                continue
            img = sitk.DICOMOrient(
                sitk.ReadImage(str(cohort / f"images{s}" / f"{name}_{ch:04d}.nii.gz")), "LPS")
            arr = sitk.GetArrayFromImage(img).astype(np.float64)
            shift = np.asarray(info["misregistration_vox"][phase])
            if phase == "V":
                assert np.all(shift == 0)
            else:
                assert 1.0 <= np.hypot(shift[1], shift[2]) <= 2.0 and abs(shift[0]) <= 0.5
            aligned = ndimage.shift(clean[ch].astype(np.float64), shift, order=1,
                                    mode="nearest")
            body = ndimage.binary_erosion(clean[2] > -500, iterations=2)
            err_aligned = np.abs(arr - aligned)[body].mean()
            err_raw = np.abs(arr - clean[ch])[body].mean()
            if phase != "V":  # the recorded shift explains the misregistration
                assert err_aligned < err_raw, (name, phase, err_aligned, err_raw)
            resid = (arr - aligned)[core]
            pooled.append(resid)
            assert 0.7 * info["noise_std"] < resid.std() < 1.5 * info["noise_std"] + 4
            # Spatially correlated: neighbours along x share much of their noise.
            r = arr - aligned
            pair = core[:, :, 1:] & core[:, :, :-1]
            pairs.append(np.stack([r[:, :, 1:][pair], r[:, :, :-1][pair]]))
            # Liver parenchyma per phase: median over the eroded liver, near the table.
            exp = _timed(SPEC_LIVER, info["timing_factor"])[ch]
            assert abs(np.median(arr[core]) - exp) < 15, (name, phase, np.median(arr[core]))
        checked += 1
    assert checked >= 3
    # Noise is zero-mean (a single small liver core holds too few independent samples).
    pooled = np.concatenate(pooled)
    assert abs(pooled.mean()) < 3, pooled.mean()
    # Lag-1 correlation: ~0.45 for a 0.6-voxel noise grain, ~0 for white noise.
    pairs = np.concatenate(pairs, axis=1)
    rho = np.corrcoef(pairs[0], pairs[1])[0, 1]
    assert rho > 0.3, rho


# ----------------------------------------------------------------------------- sizes and CLI


def test_demo_size_case():
    case = synthetic.generate_case(0, 1, "demo")
    info = case.info
    d, h, w = info["canonical_shape"]
    sz, sy, sx = info["canonical_spacing"]
    assert 48 <= d <= 60 and 100 <= min(h, w) and max(h, w) <= 128
    assert 4.0 <= sz <= 5.0 and 2.5 <= sy == sx <= 3.5
    for les in info["lesions"]:
        lo, hi = (6, 12) if les["cls"] == "calc" else (6, 60)
        assert lo <= les["diameter_mm"] <= hi, les
    assert all(img.GetPixelID() == sitk.sitkInt16 for img in case.images.values())


def test_script_writes_a_cohort(tmp_path, capsys):
    import importlib.util
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "make_synthetic_cohort.py"
    spec = importlib.util.spec_from_file_location("make_synthetic_cohort", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path / "ds"), "--cases", "3", "--seed", "1", "--size",
                 "smoke", "--test-fraction", "0.34"])
    out = capsys.readouterr().out
    assert "wrote 3 cases" in out and "disk:" in out
    summary = _summary(tmp_path / "ds")
    assert sum(i["split"] == "Ts" for i in summary.values()) == 1
