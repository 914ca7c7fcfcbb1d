"""Lesion copy-paste (data/paste.py): donors against a numpy loop, pasting on a hand-made patch,
and the pipeline with paste on (fake cache of test_pipeline)."""

import numpy as np
import pytest

from conftest import load_config
from lidia_jax.data import paste, patches, pipeline
from test_pipeline import N_TRAIN, _config, _take, cache  # noqa: F401 (fixture)

CALC, OTHERS = 8, 9


def _patch(liver_value=(1.0, 2.0, 3.0, 4.0), shape=(10, 12, 12)):
    """A patch of liver (label 1) with a constant value per phase and one HCC lesion (id 1)."""
    image = np.broadcast_to(np.asarray(liver_value, np.float32), shape + (4,)).copy()
    seg = np.ones(shape, np.uint8)
    seg[:, :, :2] = 0  # a strip of background
    inst = np.zeros(shape, np.uint16)
    seg[1:3, 1:3, 4:6], inst[1:3, 1:3, 4:6] = 2, 1
    image[1:3, 1:3, 4:6] += 5.0
    return image, seg, inst, patches.instance_code_table({"1": 2}, 1)


def _donor(delta=(10.0, -3.0, 0.5, 7.0), phase_mask=(True, True, True, True), code=CALC):
    """A 2 x 3 x 2 lesion (asymmetric, so flips matter) in a 4 x 5 x 4 box."""
    mask = np.zeros((4, 5, 4), bool)
    mask[1:3, 1:4, 1:3] = True
    values = mask[..., None] * np.asarray(delta, np.float32)
    values = values * np.asarray(phase_mask)
    weight = np.clip(mask + 0.25 * ~mask, 0.0, 1.0).astype(np.float32)
    return paste.Donor(values.astype(np.float32), mask, weight, np.asarray(phase_mask), code)


def test_paste_puts_the_lesion_on_liver_relative_to_its_mean():
    image, seg, inst, table = _patch()
    donor = _donor()
    for seed in range(8):
        rng = np.random.default_rng(seed)
        out_image, out_seg, out_inst, out_table = paste.paste(image, seg, inst,
                                                              np.ones(4, bool), table, donor, rng)
        pasted = out_inst == 2
        assert pasted.sum() == donor.mask.sum()  # a flipped copy of the whole lesion
        assert (seg[pasted] == 1).all()  # on parenchyma only, away from the lesion and background
        assert (out_seg[pasted] == CALC).all() and out_table[2] == CALC and out_table[1] == 2
        liver_mean = image[seg == 1].mean(axis=0)
        np.testing.assert_allclose(out_image[pasted], np.broadcast_to(
            liver_mean + np.asarray([10.0, -3.0, 0.5, 7.0]), (pasted.sum(), 4)), rtol=1e-6)
        # Outside the donor's box nothing moved; inside but off the lesion, the soft edge blends.
        box = np.argwhere(pasted)
        lo, hi = box.min(0) - 1, box.max(0) + 2  # the mask's box plus the donor's margin
        outside = np.ones(seg.shape, bool)
        outside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
        np.testing.assert_array_equal(out_image[outside], image[outside])
        np.testing.assert_array_equal(out_seg[~pasted], seg[~pasted])
        np.testing.assert_array_equal(out_inst[~pasted], inst[~pasted])
        edge = ~outside & ~pasted
        np.testing.assert_allclose(out_image[edge], image[edge])  # donor's margin is liver: 0
    assert (image[seg == 1] == image[seg == 1][0]).all()  # the inputs are not modified


def test_paste_skips_what_cannot_be_pasted():
    image, seg, inst, table = _patch()
    rng = np.random.default_rng(0)
    no_d = _donor(phase_mask=(True, True, True, False))
    for args in [(image, seg, inst, np.ones(4, bool), table, no_d),  # donor lacks the patch's D
                 (image, np.zeros_like(seg), inst, np.ones(4, bool), table, _donor()),  # no liver
                 (image[:3], seg[:3], inst[:3], np.ones(4, bool), table, _donor())]:  # too small
        out = paste.paste(*args, rng)
        assert all(a is b for a, b in zip(out, args[:3] + (table,)))
    # A patch without D takes a donor with D (its D is dropped with the patch's phase mask).
    phase_mask = np.array([True, True, True, False])
    out_image, _, out_inst, _ = paste.paste(image * phase_mask, seg, inst, phase_mask, table,
                                            _donor(), rng)
    assert (out_inst == 2).any() and (out_image[..., 3] == 0).all()


def test_donors_from_case_against_a_loop():
    rng = np.random.default_rng(1)
    shape = (12, 14, 16)
    image = rng.standard_normal(shape + (4,)).astype(np.float32)
    phase_mask = np.array([True, True, True, False])
    image[..., 3] = 0
    seg = np.zeros(shape, np.uint8)
    seg[1:11, 1:13, 1:15] = 1
    inst = np.zeros(shape, np.uint16)
    for i, (box, code) in enumerate([((slice(2, 4), slice(2, 5), slice(3, 5)), CALC),
                                     ((slice(6, 9), slice(8, 11), slice(9, 13)), 3),
                                     ((slice(0, 2), slice(11, 14), slice(13, 16)), OTHERS)], 1):
        seg[box], inst[box] = code, i
    table = patches.instance_code_table({"1": CALC, "2": 3, "3": OTHERS}, 3)
    donors = paste.donors_from_case(image, seg, inst, phase_mask, table, [CALC, OTHERS], 0.7)
    assert [d.code for d in donors] == [CALC, OTHERS]
    ref = np.array([image[..., p][seg == 1].mean() for p in range(4)])
    for d, i in zip(donors, (1, 3)):
        where = np.argwhere(inst == i)
        lo = np.maximum(where.min(0) - 1, 0)
        hi = np.minimum(where.max(0) + 2, shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        np.testing.assert_array_equal(d.mask, inst[box] == i)
        expected = np.zeros(d.values.shape, np.float32)
        for p in range(3):  # absent D stays 0
            expected[..., p] = image[box][..., p] - ref[p]
        np.testing.assert_allclose(d.values, expected, rtol=1e-5, atol=1e-6)
        assert (d.weight[d.mask] == 1).all() and (d.weight >= 0).all() and (d.weight <= 1).all()
        assert 0 < d.weight[~d.mask].max() < 1  # the soft edge
    assert paste.donors_from_case(image, seg, inst, phase_mask, table, [5], 0.7) == []


def test_pipeline_pastes_rare_lesions(cache):  # noqa: F811
    config = _config(batch_size=2)
    config.input.paste_classes = ("calc", "others")
    groups = pipeline.lesion_donors(cache, "train", config)
    assert groups == []  # paste_prob 0: no donors are read
    config.input.paste_prob = 1.0
    groups = pipeline.lesion_donors(cache, "train", config)
    assert [{d.code for d in g} for g in groups] == [{CALC}, {OTHERS}]
    assert all(len(g) for g in groups)
    it = pipeline.make_train_iterator(cache, config, process_index=0, process_count=1)
    batches = _take(it, 3 * N_TRAIN)
    pasted = 0
    for batch in batches:
        for b in range(2):
            rare = np.isin(batch["semantic"][b], (CALC, OTHERS))
            # The fake cache's V channel is 10 x label; a pasted lesion keeps that relation.
            np.testing.assert_allclose(batch["image"][b, ..., 2][rare],
                                       10.0 * batch["semantic"][b][rare], atol=1e-4)
            targets = batch["classes"][b][batch["valid"][b]]
            pasted += int(np.isin(targets, (CALC - 1, OTHERS - 1)).any())
    assert pasted > N_TRAIN  # most patches now hold a rare lesion (a few cannot take one)
    again = _take(pipeline.make_train_iterator(cache, config, process_index=0, process_count=1),
                  3 * N_TRAIN)
    for a, b in zip(batches, again):  # still a pure function of the step
        np.testing.assert_array_equal(a["image"], b["image"])
    assert load_config("demo,paste=0.5").input.paste_prob == 0.5
    config.input.paste_classes = ("calcification",)
    with pytest.raises(ValueError, match="paste_classes"):
        pipeline.lesion_donors(cache, "train", config)
