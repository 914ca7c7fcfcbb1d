"""Input pipeline: patch sampling, targets, augmentation, sharding, determinism, resumption.

A tiny fake cache in the layout of INTERFACES.md is written with numpy; references are plain
numpy loops and closed forms written here.
"""

import json
import math

import grain
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from conftest import load_config
from lidia_jax.data import augment, patches, pipeline

SHAPE = (14, 20, 22)
PATCH = (8, 12, 12)
N_TRAIN = 6


def _write_case(folder, index, rng, lesions, phase_mask=(True, True, True, True)):
    """One fake case: liver box, spherical lesions (one label each), image channels encoding
    NC = case index, A = noise, V = 10 * label, D = a linear ramp."""
    folder.mkdir(parents=True)
    d, h, w = SHAPE
    seg = np.zeros(SHAPE, np.uint8)
    seg[2:12, 3:17, 4:19] = 1
    inst = np.zeros(SHAPE, np.uint16)
    zz, yy, xx = np.indices(SHAPE)
    classes = {}
    for k, (centre, radius, code) in enumerate(lesions, start=1):
        ball = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius**2
        seg[ball] = code
        inst[ball] = k
        classes[str(k)] = int(code)
    image = np.stack([np.full(SHAPE, float(index)), rng.standard_normal(SHAPE),
                      10.0 * seg, 0.1 * zz + 0.2 * yy - 0.05 * xx], -1).astype(np.float32)
    image[..., ~np.asarray(phase_mask)] = 0.0
    np.save(folder / "image.npy", image)
    np.save(folder / "seg.npy", seg)
    np.save(folder / "inst.npy", inst)
    meta = {
        "case": folder.name, "phase_mask": list(phase_mask), "phases": ["NC", "A", "V"],
        "instance_classes": classes, "spacing": [4.0, 3.0, 3.0], "shape": list(SHAPE),
        "geometry": {},
        "fg_locations": {"liver": np.argwhere(seg >= 1).tolist(),
                         "lesion": np.argwhere(seg >= 2).tolist()},
    }
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """<tmp>/cache/<fingerprint>/ with 6 train and 2 val cases."""
    root = tmp_path_factory.mktemp("cache")
    fp = root / "abc123"
    rng = np.random.default_rng(0)
    train, val = [], []
    for i in range(N_TRAIN + 2):
        name = f"case_{i:03d}"
        if i == 1:
            lesions = []  # no lesion: the sampler falls back to the liver
        elif i == 2:
            # Six small lesions: more than the max_instances - 1 = 3 lesion slots of the tests.
            lesions = [((5, 6 + 2 * j, 8 + (j % 2) * 5), 0.9 + 0.35 * j, 2 + j) for j in range(6)]
        else:
            lesions = [((4 + i % 5, 8, 9), 2.0, 2 + i % 8), ((9, 13, 14), 1.5, 2 + (i + 3) % 8)]
        _write_case(fp / name, i, rng, lesions,
                    phase_mask=(True, True, True, i % 2 == 0))  # odd cases: no delayed phase
        (train if i < N_TRAIN else val).append(name)
    plan = {"fingerprint": "abc123", "settings": {},
            "intensity": {"mean": [0] * 4, "std": [1] * 4, "lo": [-1] * 4, "hi": [1] * 4},
            "splits": {"train": train, "val": val, "test": []}, "labels": {}, "skipped": {}}
    (fp / "plan.json").write_text(json.dumps(plan))
    return root


def _config(augment_on=False, batch_size=2, workers=0, fg_prob=0.33):
    c = load_config("smoke")
    c.input.patch_size = PATCH
    c.input.batch_size = batch_size
    c.input.num_workers = workers
    c.input.fg_prob = fg_prob
    c.data.max_instances = 4
    c.input.aug.enabled = augment_on
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- sampling


def test_sample_patch_start_foreground_rate_and_fallback():
    rng = np.random.default_rng(1)
    locs = {"lesion": np.array([[3, 30, 40], [4, 31, 41]]), "liver": np.array([[10, 10, 10]])}
    shape, patch = (20, 64, 64), (8, 16, 16)
    n, p = 4000, 0.33
    kinds = []
    for _ in range(n):
        start, kind = patches.sample_patch_start(shape, patch, locs, p, 0.25, rng)
        kinds.append(kind)
        assert np.all(start >= 0) and np.all(start + patch <= shape)
        if kind == patches.LESION:  # the chosen lesion voxel lies in the patch's central part
            inside = [np.all((v >= start + 2) & (v < start + np.array(patch) - 1)) for v in
                      locs["lesion"]]
            assert any(inside)
    rate = np.mean([k == patches.LESION for k in kinds])
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)
    # No lesion: liver; no foreground at all: random, at the same Bernoulli rate.
    kinds = [patches.sample_patch_start(shape, patch, {"lesion": np.zeros((0, 3)), "liver":
                                                       locs["liver"]}, 1.0, 0.25, rng)[1]
             for _ in range(50)]
    assert set(kinds) == {patches.LIVER}
    kinds = [patches.sample_patch_start(shape, patch, {}, 1.0, 0.25, rng)[1] for _ in range(50)]
    assert set(kinds) == {patches.RANDOM}


@pytest.mark.parametrize("balance", ["voxel", "instance", "class"])
def test_sample_patch_start_lesion_balance(balance):
    """Which lesion a forced-lesion patch is built around, against the closed-form shares.

    A case with one 60-voxel HCC (code 2) and three cysts (code 7) of 10, 5 and 5 voxels:
    voxel -> shares by size; instance -> 1/4 each; class -> HCC 1/2, each cyst 1/6.
    """
    sizes, codes = [60, 10, 5, 5], [2, 7, 7, 7]
    ids = np.repeat(np.arange(1, 5), sizes).astype(np.int32)
    locs = {"lesion": np.stack([np.zeros_like(ids), np.arange(len(ids)), np.zeros_like(ids)], 1),
            "lesion_instance": ids,
            "lesion_class": np.repeat(codes, sizes).astype(np.int32),
            "liver": np.zeros((1, 3), np.int32)}
    rng = np.random.default_rng(5)
    n = 6000
    picks = np.array([patches._pick_lesion_voxel(locs, balance, rng) for _ in range(n)])
    share = np.bincount(ids[picks], minlength=5)[1:] / n
    expected = {"voxel": np.array(sizes) / sum(sizes), "instance": np.full(4, 0.25),
                "class": np.array([1 / 2, 1 / 6, 1 / 6, 1 / 6])}[balance]
    np.testing.assert_allclose(share, expected, atol=4 * math.sqrt(0.25 / n))
    start, kind = patches.sample_patch_start((4, 80, 4), (2, 8, 2), locs, 1.0, 0.0, rng, balance)
    assert kind == patches.LESION
    with pytest.raises(ValueError, match="fg_balance"):
        patches._pick_lesion_voxel(locs, "size", rng)


def test_focus_class_decides_the_lesion_under_cohort_balance():
    """"cohort": the case's focus class when it has it, otherwise as "class"."""
    sizes, codes = [60, 10, 5], [2, 7, 7]
    ids = np.repeat(np.arange(1, 4), sizes).astype(np.int32)
    locs = {"lesion": np.zeros((len(ids), 3), np.int32), "lesion_instance": ids,
            "lesion_class": np.repeat(codes, sizes).astype(np.int32)}
    rng = np.random.default_rng(7)
    picks = [patches._pick_lesion_voxel(locs, "cohort", rng, focus=7) for _ in range(400)]
    assert set(ids[picks]) == {2, 3}
    picks = [patches._pick_lesion_voxel(locs, "cohort", rng, focus=5) for _ in range(400)]
    assert abs(np.mean(ids[picks] == 1) - 0.5) < 0.1  # focus absent: each class half the time


def test_class_balanced_order_draws_every_class_equally_often():
    """Against a plain count: 5 cases, classes {2}, {2, 7}, {7}, {}, {2}; every case at least
    once, every group (2, 7, no lesion) the same number of slots, each slot's focus held by its
    case."""
    classes = [[2], [2, 7], [7], [], [2]]
    order = pipeline.class_balanced_order(classes)
    focus = [f for _, f in order]
    assert focus.count(2) == focus.count(7) == focus.count(None) == 3  # the largest group: 3
    assert {i for i, _ in order} == set(range(5))
    for i, f in order:
        assert (f in classes[i]) if f is not None else not classes[i]


def test_pipeline_class_balance_reads_instances_from_the_cache(cache):
    """CaseSource gives each lesion location its instance id and code; with fg_prob 1 the
    class-balanced pipeline puts a lesion in every patch of a case that has one."""
    case = pipeline.CaseSource(cache, "train")[2]
    lesion = case.fg_locations["lesion"]
    np.testing.assert_array_equal(case.fg_locations["lesion_instance"],
                                  np.asarray(case.inst)[tuple(lesion.T)])
    np.testing.assert_array_equal(case.fg_locations["lesion_class"],
                                  np.asarray(case.seg)[tuple(lesion.T)])
    config = _config(fg_prob=1.0, batch_size=1)
    config.input.fg_balance = "class"
    config.input.fg_jitter = 0.0
    it = pipeline.make_train_iterator(cache, config, process_index=0, process_count=1)
    for batch in _take(it, 2 * N_TRAIN):  # every case but case 1 (no lesion) gives a lesion
        index = int(round(float(batch["image"][0, 0, 0, 0, 0])))  # NC channel = case index
        assert (batch["semantic"] >= 2).any() == (index != 1), index
    config.input.fg_balance = "cohort"  # one epoch of class_balanced_order
    classes = pipeline.case_lesion_classes(cache, pipeline.split_cases(cache, "train"))
    order = pipeline.class_balanced_order(classes)
    assert len(pipeline.make_train_dataset(cache, config, process_index=0, process_count=1)) > 0
    source = pipeline.CaseSource(cache, "train", order=order)
    assert len(source) == len(order)
    for k in range(len(order)):
        assert source[k].focus == order[k][1] and source[k].name == source.names[order[k][0]]
    it = pipeline.make_train_iterator(cache, config, process_index=0, process_count=1)
    for batch in _take(it, len(order)):  # fg_prob 1: a lesion wherever the case has one
        index = int(round(float(batch["image"][0, 0, 0, 0, 0])))
        assert (batch["semantic"] >= 2).any() == (index != 1), index
    config.input.fg_balance = "largest"
    with pytest.raises(ValueError, match="fg_balance"):
        pipeline.make_train_iterator(cache, config, process_index=0, process_count=1)


def test_sample_patch_start_small_volume_is_padded_uniformly():
    rng = np.random.default_rng(2)
    shape, patch = (5, 30, 8), (8, 12, 8)
    starts = np.array([patches.sample_patch_start(shape, patch, {}, 0.0, 0.25, rng)[0]
                       for _ in range(3000)])
    # Axis 0: volume 5 < patch 8 -> starts -3..0 (volume inside the patch); axis 1: 0..18; 2: 0.
    for axis, (lo, hi) in enumerate([(-3, 0), (0, 18), (0, 0)]):
        values, counts = np.unique(starts[:, axis], return_counts=True)
        np.testing.assert_array_equal(values, np.arange(lo, hi + 1))
        expected = len(starts) / (hi - lo + 1)
        assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))


def test_pipeline_lesion_rate_matches_fg_prob(cache):
    """Fraction of patches holding lesion voxels == p + (1 - p) q, q from enumerating all starts."""
    p = 0.33
    config = _config(fg_prob=p, batch_size=1)
    source = pipeline.CaseSource(cache, "train")
    # Reference q per case: share of uniformly drawn starts whose patch holds a lesion voxel.
    q = []
    for i in range(len(source)):
        seg = np.asarray(source[i].seg)
        lo, hi = patches.start_range(SHAPE, PATCH)
        hits = total = 0
        for z in range(lo[0], hi[0] + 1):
            for y in range(lo[1], hi[1] + 1):
                for x in range(lo[2], hi[2] + 1):
                    hits += bool((seg[z:z + PATCH[0], y:y + PATCH[1], x:x + PATCH[2]] >= 2).any())
                    total += 1
        q.append(hits / total)
    n = 80 * N_TRAIN  # 80 epochs: every case equally often
    it = pipeline.make_train_iterator(cache, config, process_index=0, process_count=1, seed=3)
    has_lesion = [bool((next(it)["semantic"] >= 2).any()) for _ in range(n)]
    # Case 1 has no lesion: its foreground draws go to the liver, never to a lesion.
    expected = np.mean([0.0 if i == 1 else p + (1 - p) * q[i] for i in range(N_TRAIN)])
    var = np.mean([0.0 if i == 1 else (p + (1 - p) * q[i]) * (1 - p - (1 - p) * q[i])
                   for i in range(N_TRAIN)])
    assert abs(np.mean(has_lesion) - expected) < 4 * math.sqrt(var / n) + 1e-9


# ----------------------------------------------------------------------------- targets


def _reference_targets(semantic, inst, classes_by_id, t):
    """Plain loops: liver, then instances by size (desc), id (asc), at most t - 1."""
    sizes = {}
    for i in inst.ravel():
        if i:
            sizes[int(i)] = sizes.get(int(i), 0) + 1
    kept = sorted(sizes, key=lambda i: (-sizes[i], i))[:t - 1]
    masks = [semantic >= 1] + [inst == i for i in kept]
    classes = [0] + [classes_by_id[i] - 1 for i in kept]
    return masks, classes


def test_build_targets_matches_reference():
    rng = np.random.default_rng(4)
    semantic = np.zeros((6, 9, 9), np.int32)
    semantic[1:5, 1:8, 1:8] = 1
    inst = np.zeros(semantic.shape, np.uint16)
    classes_by_id = {}
    for k in range(1, 7):  # 6 blobs of different sizes, ids deliberately not in size order
        z, y, x = rng.integers(0, [5, 8, 8])
        size = (7 - k) % 4 + 1
        inst[z:z + 1, y:y + size, x:x + 1] = k
    for k in np.unique(inst)[1:]:
        classes_by_id[int(k)] = int(2 + k % 8)
        semantic[inst == k] = 2 + k % 8
    table = patches.instance_code_table({str(k): v for k, v in classes_by_id.items()}, 6)
    for t in (2, 4, 16):
        masks, classes, valid = patches.build_targets(semantic, inst, table, t)
        assert masks.shape == (t,) + semantic.shape and masks.dtype == bool
        ref_masks, ref_classes = _reference_targets(semantic, inst, classes_by_id, t)
        n = len(ref_masks)
        np.testing.assert_array_equal(valid, np.arange(t) < n)
        np.testing.assert_array_equal(classes, ref_classes + [0] * (t - n))
        for k in range(n):
            np.testing.assert_array_equal(masks[k], ref_masks[k])
        assert not masks[n:].any()


def test_build_targets_missing_class_uses_majority_label_and_empty_patch():
    semantic = np.zeros((3, 4, 4), np.int32)
    inst = np.zeros_like(semantic, np.uint16)
    masks, classes, valid = patches.build_targets(semantic, inst, np.zeros(1, np.int32), 3)
    assert not valid.any() and not masks.any()
    semantic[1, 1, 1:4] = [4, 4, 7]
    inst[1, 1, 1:4] = 5
    masks, classes, valid = patches.build_targets(semantic, inst, np.zeros(1, np.int32), 3)
    np.testing.assert_array_equal(valid, [True, True, False])
    assert classes[1] == 3  # majority code 4 (meta) -> class index 3


def test_batch_layout_and_targets_consistent(cache):
    config = _config(augment_on=True)
    it = pipeline.make_train_iterator(cache, config, process_index=0, process_count=1, seed=0)
    t = config.data.max_instances
    expected = {"image": ((2,) + PATCH + (4,), np.float32), "phase_mask": ((2, 4), bool),
                "semantic": ((2,) + PATCH, np.int32), "masks": ((2, t) + PATCH, bool),
                "classes": ((2, t), np.int32), "valid": ((2, t), bool)}
    seen_lesion = seen_full = False
    for batch in _take(it, 12):
        assert set(batch) == set(expected)
        for key, (shape, dtype) in expected.items():
            assert batch[key].shape == shape and batch[key].dtype == dtype, key
        for b in range(2):
            sem, masks, classes, valid = (batch[k][b] for k in
                                          ("semantic", "masks", "classes", "valid"))
            np.testing.assert_array_equal(masks[0], sem >= 1)
            assert valid[0] == (sem >= 1).any() and classes[0] == 0
            # Each lesion target is one lesion's voxels: a single label, equal to class + 1.
            for k in np.flatnonzero(valid[1:]) + 1:
                labels = np.unique(sem[masks[k]])
                np.testing.assert_array_equal(labels, [classes[k] + 1])
            assert not masks[~valid].any() and not classes[~valid].any()
            assert (masks[1:].sum(0) <= 1).all()  # lesion targets are disjoint
            lesion_voxels = (sem >= 2).sum()
            assert masks[1:][valid[1:]].sum() <= lesion_voxels
            seen_lesion |= valid[1:].any()
            seen_full |= valid.all()
            assert batch["phase_mask"][b, 2]
            assert not batch["image"][b][..., ~batch["phase_mask"][b]].any()
    assert seen_lesion and seen_full


# ------------------------------------------------------------------------ augmentation


def test_extract_identity_equals_crop_with_padding():
    rng = np.random.default_rng(5)
    image = rng.standard_normal((6, 7, 8, 4)).astype(np.float32)
    seg = rng.integers(0, 10, (6, 7, 8)).astype(np.uint8)
    inst = rng.integers(0, 5, (6, 7, 8)).astype(np.uint16)
    mask = np.array([True, True, True, False])
    for start in ([-2, 1, 3], [0, 0, 0], [3, -4, 5]):
        out = augment.extract(image, seg, inst, start, (5, 6, 6), mask, np.eye(3))
        fast = augment.extract(image, seg, inst, start, (5, 6, 6), mask)
        # Reference: explicit loop with zero padding.
        ref_img = np.zeros((5, 6, 6, 4), np.float32)
        ref_seg = np.zeros((5, 6, 6), np.uint8)
        for o in np.ndindex(5, 6, 6):
            v = np.add(start, o)
            if np.all(v >= 0) and np.all(v < image.shape[:3]):
                ref_img[o] = image[tuple(v)] * mask
                ref_seg[o] = seg[tuple(v)]
        for got in (out, fast):
            np.testing.assert_allclose(got[0], ref_img, atol=1e-6)
            np.testing.assert_array_equal(got[1], ref_seg)


def test_extract_rotation_keeps_labels_aligned_and_shifts_one_phase():
    """Image = linear function of position (reproduced exactly by linear interpolation), inst =
    flat voxel index: both must sample the same transformed coordinates."""
    shape = (20, 40, 40)
    zz, yy, xx = np.indices(shape).astype(np.float32)
    f = lambda z, y, x: 0.7 * z + 0.3 * y - 0.2 * x + 5.0
    image = np.stack([f(zz, yy, xx)] * 3 + [np.ones(shape)], -1).astype(np.float32)
    inst = np.arange(np.prod(shape)).reshape(shape).astype(np.uint16)
    seg = (inst % 7).astype(np.uint8)
    angle, zoom = np.deg2rad(13.0), 1.15
    m = np.eye(3)
    m[1:, 1:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    m /= zoom
    shifts = np.zeros((4, 3), int)
    shifts[0] = [1, -1, 1]  # NC misregistered
    mask = np.array([True, True, True, False])  # D absent: must come back as zeros
    patch, start = (6, 10, 12), np.array([7, 15, 14])
    img, seg_p, inst_p = augment.extract(image, seg, inst, start, patch, mask, m, shifts)
    c = (np.array(patch) - 1) / 2
    for o in np.ndindex(*patch):
        s = start + c + m @ (np.array(o) - c)  # independent coordinate computation
        q = np.unravel_index(int(inst_p[o]), shape)
        assert np.all(np.abs(np.array(q) - s) <= 0.5 + 1e-4), (o, q, s)
        assert seg_p[o] == seg[q]
        assert img[o + (2,)] == pytest.approx(f(*s), abs=1e-3)
        assert img[o + (0,)] == pytest.approx(f(*(s + shifts[0])), abs=1e-3)
    assert not img[..., 3].any()


@pytest.mark.parametrize("coupled", [False, True])
def test_extract_matches_scipy_affine_transform_at_case_borders(coupled):
    """Reference: scipy.ndimage.affine_transform per channel on the whole case, zeros outside."""
    rng = np.random.default_rng(8)
    shape = (9, 17, 15)
    image = rng.standard_normal(shape + (4,)).astype(np.float32)
    seg = rng.integers(0, 10, shape).astype(np.uint8)
    inst = rng.integers(0, 300, shape).astype(np.uint16)
    angle, zoom = np.deg2rad(-17.0), 0.87
    m = np.eye(3)
    m[1:, 1:] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    m[1] = -m[1]  # a flip of y as well
    m /= zoom
    if coupled:  # z mixed with y: the general (scipy) path
        m[0, 1] = m[1, 0] = 0.1
    shifts = np.array([[0, 1, -1], [1, 0, 0], [0, 0, 0], [0, 0, 0]])
    mask = np.array([True, True, True, False])
    patch, start = (7, 12, 10), np.array([4, -3, 9])  # beyond the case on several sides
    img, seg_p, inst_p = augment.extract(image, seg, inst, start, patch, mask, m, shifts)
    c = (np.array(patch) - 1) / 2
    offset = start + c - m @ c
    for ch in range(4):
        ref = np.zeros(patch, np.float32) if not mask[ch] else ndimage.affine_transform(
            image[..., ch], m, offset=offset + shifts[ch], output_shape=patch, order=1,
            mode="grid-constant", prefilter=False)
        np.testing.assert_allclose(img[..., ch], ref, atol=1e-5)
    for got, lab in ((seg_p, seg), (inst_p, inst)):
        ref = ndimage.affine_transform(lab, m, offset=offset, output_shape=patch, order=0,
                                       mode="grid-constant")
        np.testing.assert_array_equal(got, ref)
        assert got.dtype == lab.dtype
    assert (seg_p == 0).any() and (img[..., 2] == 0).any()  # the patch does reach outside


def test_flip_axes_mirror_the_patch_exactly():
    """aug.flip_axes: each listed axis is mirrored about the patch centre with probability 1/2,
    and the mirrored read equals np.flip of the plain crop (no interpolation blur)."""
    rng = np.random.default_rng(11)
    image = rng.standard_normal((12, 14, 16, 4)).astype(np.float32)
    seg = rng.integers(0, 10, image.shape[:3]).astype(np.uint8)
    inst = rng.integers(0, 300, image.shape[:3]).astype(np.uint16)
    mask = np.array([True, True, True, True])
    start, patch = np.array([2, 3, 1]), (7, 8, 10)
    plain = augment.extract(image, seg, inst, start, patch, mask)
    aug = lambda flips: ml_collections.ConfigDict(dict(
        rotation_deg=15.0, scale=(0.85, 1.25), rotation_prob=0.0, scale_prob=0.0, flip_axes=flips))
    draws = np.random.default_rng(0)
    assert augment.sample_spatial(draws, aug(())) is None
    counts = np.zeros(3)
    for _ in range(200):
        m = augment.sample_spatial(draws, aug((0, 2)))
        signs = np.ones(3) if m is None else np.diag(m)
        if m is not None:
            np.testing.assert_array_equal(m, np.diag(signs))
        counts += signs < 0
        axes = tuple(int(a) for a in np.flatnonzero(signs < 0))
        got = augment.extract(image, seg, inst, start, patch, mask, m)
        for g, p in zip(got, plain):
            np.testing.assert_array_equal(g, np.flip(p, axes))
    assert counts[1] == 0 and 70 < counts[0] < 130 and 70 < counts[2] < 130


def test_pipeline_augmented_image_and_labels_aligned(cache):
    """Fake V channel = 10 * label: after rotation/scaling labels must still match the image."""
    config = _config(augment_on=True, batch_size=1)
    aug = config.input.aug
    aug.rotation_prob = aug.scale_prob = 1.0
    aug.intensity_prob = aug.gamma_prob = aug.noise_prob = aug.misregistration_prob = 0.0
    it = pipeline.make_train_iterator(cache, config, process_index=0, process_count=1, seed=7)
    agree = []
    for batch in _take(it, 12):
        v = batch["image"][0, ..., 2]
        sem = batch["semantic"][0]
        # Nearest-neighbour labels vs linearly interpolated image: equal except at label borders.
        interior = np.ones_like(sem, bool)
        for axis in range(3):
            for step in (-1, 1):
                interior &= np.roll(sem, step, axis) == sem
        interior[[0, -1]] = interior[:, [0, -1]] = interior[:, :, [0, -1]] = False
        agree.append(np.abs(v - 10 * sem)[interior] < 1e-3)
    agree = np.concatenate(agree)
    assert agree.mean() > 0.97


def test_intensity_augmentation_and_phase_drop_respect_phase_mask():
    rng = np.random.default_rng(6)
    aug = _config(augment_on=True).input.aug
    aug.intensity_prob = aug.gamma_prob = aug.noise_prob = 1.0
    image = rng.standard_normal((4, 5, 6, 4)).astype(np.float32)
    image[..., 1] = 0.0
    mask = np.array([True, False, True, True])
    out = augment.augment_intensity(image.copy(), mask, rng, aug)
    assert not out[..., 1].any()
    assert not np.allclose(out[..., 0], image[..., 0])
    # Gamma keeps the channel's mean and std (nnU-Net's retain_stats).
    g = augment._gamma(image[..., 0], 1.4)
    assert g.mean() == pytest.approx(image[..., 0].mean(), abs=1e-5)
    assert g.std() == pytest.approx(image[..., 0].std(), rel=1e-4)

    dropped, new_mask = augment.drop_phases(image.copy(), mask, rng, 1.0)
    np.testing.assert_array_equal(new_mask, [False, False, True, False])  # V is never dropped
    assert not dropped[..., [0, 1, 3]].any()
    np.testing.assert_array_equal(dropped[..., 2], image[..., 2])
    rates = np.mean([augment.drop_phases(image.copy(), mask, rng, 0.3)[1] for _ in range(2000)], 0)
    assert abs(rates[0] - 0.7) < 0.05 and rates[1] == 0 and rates[2] == 1
    assert abs(rates[3] - 0.7) < 0.05


# -------------------------------------------------- sharding, determinism, resumption


def _case_ids(batches):
    """Fake NC channel = case index (no augmentation, patches inside the case)."""
    return [int(round(float(b["image"][i, 0, 0, 0, 0]))) for b in batches
            for i in range(b["image"].shape[0])]


def test_two_processes_get_disjoint_shards_covering_the_data(cache):
    config = _config(batch_size=2)
    steps = N_TRAIN // 2  # one epoch of the global batch 2
    shards = []
    for p in range(2):
        it = pipeline.make_train_iterator(cache, config, process_index=p, process_count=2, seed=11)
        batches = _take(it, steps)
        assert batches[0]["image"].shape[0] == 1  # local batch = 2 // 2
        shards.append(_case_ids(batches))
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(N_TRAIN))
    # The global stream does not depend on the process count.
    it = pipeline.make_train_iterator(cache, config, process_index=0, process_count=1, seed=11)
    single = _take(it, steps)
    for k in range(steps):
        assert _case_ids([single[k]]) == [shards[0][k], shards[1][k]]
    # A single-process state resumes each of two processes at the same global step.
    state = pipeline.make_train_iterator(cache, config, process_index=0, process_count=1,
                                         seed=11).get_state()
    state["step"] = 1
    for p in range(2):
        it = pipeline.make_train_iterator(cache, config, process_index=p, process_count=2, seed=11)
        it.set_state(state)
        assert _case_ids(_take(it, 2)) == shards[p][1:3]
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_train_iterator(cache, _config(batch_size=3), process_index=0,
                                     process_count=2)


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_seed_determinism_and_state_restore(cache, tmp_path):
    config = _config(augment_on=True)
    make = lambda seed=5: pipeline.make_train_iterator(cache, config, process_index=0,
                                                       process_count=1, seed=seed)
    it = make()
    _take(it, 2)
    state = it.get_state()
    after = _take(it, 4)
    it2 = make()
    it2.set_state(state)
    _assert_same(after, _take(it2, 4))
    _assert_same(_take(make(), 6)[2:], after)  # same seed, same stream
    other = _take(make(seed=6), 6)[2:]
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(after, other))

    # Through orbax, as the trainer saves it.
    import orbax.checkpoint as ocp
    it = make()
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = _take(it, 2)
        fresh = make()
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_same(expected, _take(fresh, 2))


def test_worker_processes_give_the_same_stream_and_state(cache):
    config = _config(augment_on=True)
    make = lambda: pipeline.make_train_iterator(cache, config, process_index=0, process_count=1,
                                                seed=9)
    it0 = make()
    config.input.num_workers = 1
    it1 = make()
    try:
        _assert_same(_take(it0, 2), _take(it1, 2))
    finally:
        it1.close()
    # The state of the in-process iterator resumes a worker-process one exactly.
    state = it0.get_state()
    expected = _take(it0, 2)
    it2 = make()
    try:
        it2.set_state(state)
        _assert_same(expected, _take(it2, 2))
    finally:
        it2.close()


# ------------------------------------------------------------------ cache handling


def test_cache_errors_name_the_file(cache, tmp_path):
    assert pipeline.resolve_cache_dir(cache).name == "abc123"
    assert len(pipeline.CaseSource(cache, "train")) == N_TRAIN
    cases = pipeline.make_eval_cases(cache, "val")
    assert [c.name for c in cases] == ["case_006", "case_007"]
    assert cases[0].image.shape == SHAPE + (4,) and isinstance(cases[0].image, np.memmap)
    with pytest.raises(FileNotFoundError, match="plan.json"):
        pipeline.resolve_cache_dir(tmp_path)
    with pytest.raises(KeyError, match="nope"):
        pipeline.split_cases(cache, "nope")
    bad = tmp_path / "fp"
    (bad / "x").mkdir(parents=True)
    (bad / "plan.json").write_text(json.dumps({"splits": {"train": ["x"]}}))
    with pytest.raises(FileNotFoundError, match=r"x[/\\]meta.json"):
        pipeline.CaseSource(bad, "train")[0]
    (bad / "x" / "meta.json").write_text(json.dumps({"phase_mask": [True] * 4}))
    np.save(bad / "x" / "image.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"image.npy.*\[D, H, W, 4\]"):
        pipeline.CaseSource(bad, "train")[0]
    np.save(bad / "x" / "image.npy", np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(FileNotFoundError, match=r"x[/\\]seg.npy.*needs labels"):
        pipeline.CaseSource(bad, "train")[0]
    unlabelled = pipeline.make_eval_cases(bad, "train")[0]  # inference: labels optional
    assert unlabelled.seg is None and unlabelled.inst is None
