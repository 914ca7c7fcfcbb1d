"""Synthetic calcifications (data/synthetic_calc.py): the covered fraction against the ellipsoid's
volume and a point-in-ellipsoid loop, drawing into a hand-made patch against a per-voxel loop,
and the pipeline with it on (fake cache of test_pipeline)."""

import math

import numpy as np
import pytest

from conftest import load_config
from lidia_jax.data import pipeline, synthetic_calc
from test_paste import CALC, _patch
from test_pipeline import N_TRAIN, _config, _take, cache  # noqa: F401 (fixture)

INTENSITY = {"mean": [40.0, 70.0, 100.0, 90.0], "std": [30.0, 35.0, 20.0, 35.0],
             "lo": [-90.0, -90.0, 20.0, -80.0], "hi": [130.0, 200.0, 180.0, 160.0]}


@pytest.mark.parametrize("radii, offset", [((1.5, 2.0, 2.5), (0.5, 0.5, 0.5)),
                                           ((0.8, 3.1, 1.7), (0.1, 0.9, 0.35)),
                                           ((0.3, 0.4, 0.35), (0.0, 0.7, 0.2))])
def test_coverage_is_the_ellipsoid_volume_voxel_by_voxel(radii, offset):
    frac = synthetic_calc.coverage(radii, offset, supersample=8)
    half = np.ceil(np.asarray(radii)).astype(int) + 1
    assert frac.shape == tuple(2 * half + 1) and frac.min() >= 0 and frac.max() <= 1
    volume = 4.0 / 3.0 * math.pi * np.prod(radii)
    assert abs(frac.sum() - volume) < 0.05 * volume + 0.02
    # Each voxel against random points in it (Monte Carlo, not the regular sub-grid).
    rng = np.random.default_rng(0)
    centre = half + np.asarray(offset)
    points = rng.random((2000, 3))
    for voxel in np.ndindex(*frac.shape):
        inside = np.sum(((points + voxel - centre) / radii) ** 2, axis=-1) <= 1.0
        assert abs(frac[voxel] - inside.mean()) < 0.06, voxel
    assert (frac[0] == 0).all() and (frac[:, :, -1] == 0).all()  # a voxel of margin


def test_draw_on_the_demo_grid():
    rng = np.random.default_rng(3)
    for _ in range(50):
        frac, mask, hu = synthetic_calc.draw(rng, (5.0, 4.0, 4.0), (6.0, 14.0), (250.0, 800.0))
        assert frac.shape == mask.shape and mask.any() and 250 <= hu <= 800
        assert (frac[mask] > 0.2).all() and frac.max() <= 1.0
        assert not mask[0].any() and not mask[-1].any()  # the blur's margin
        d_max = 14.0 * synthetic_calc.ELONGATION[1] / np.array([5.0, 4.0, 4.0])
        assert (np.asarray(mask.shape) <= np.ceil(d_max) + 4).all()


def test_insert_mixes_in_hu_on_liver_only():
    image, seg, inst, table = _patch(liver_value=(0.3, -0.2, 0.5, 0.1))
    phase_mask = np.array([True, True, True, False])
    image = image * phase_mask
    rng = np.random.default_rng(0)
    frac, mask, hu = synthetic_calc.draw(rng, (5.0, 4.0, 4.0), (8.0, 10.0), (250.0, 800.0))
    for seed in range(5):
        out_image, out_seg, out_inst, out_table = synthetic_calc.insert(
            image, seg, inst, phase_mask, table, frac, mask, hu, INTENSITY, CALC,
            np.random.default_rng(seed))
        drawn = out_inst == 2
        assert drawn.sum() == mask.sum() and (seg[drawn] == 1).all()
        assert (out_seg[drawn] == CALC).all() and out_table[2] == CALC and out_table[1] == 2
        corner = np.argwhere(drawn).min(0) - np.argwhere(mask).min(0)
        for z, y, x in np.ndindex(*seg.shape):  # per voxel, as preprocessing would compute it
            rel = np.array([z, y, x]) - corner
            f = 0.0
            if (rel >= 0).all() and (rel < mask.shape).all():
                f = float(frac[tuple(rel)])
            for p in range(4):
                expected = image[z, y, x, p]
                if f > 0 and seg[z, y, x] == 1 and phase_mask[p]:
                    value_hu = image[z, y, x, p] * INTENSITY["std"][p] + INTENSITY["mean"][p]
                    mixed = f * hu + (1 - f) * value_hu
                    mixed = min(max(mixed, INTENSITY["lo"][p]), INTENSITY["hi"][p])
                    expected = (mixed - INTENSITY["mean"][p]) / INTENSITY["std"][p]
                assert abs(out_image[z, y, x, p] - expected) < 1e-4, (z, y, x, p)
        assert (out_image[..., 3] == 0).all()  # the absent phase stays absent
        np.testing.assert_array_equal(out_seg[~drawn], seg[~drawn])
    # No liver where it fits: unchanged, the same arrays.
    args = (image, np.zeros_like(seg), inst, phase_mask, table)
    out = synthetic_calc.insert(*args, frac, mask, hu, INTENSITY, CALC, rng)
    assert all(a is b for a, b in zip(out, args[:3] + (table,)))


def test_pipeline_draws_calcifications(cache):  # noqa: F811
    config = _config(batch_size=2)
    with pytest.raises(ValueError, match="intensity"):
        config.input.synth_calc_prob = 1.0
        pipeline.SamplePatch(config)
    config.input.synth_calc_mm = (6.0, 10.0)  # the fake cache's 4 x 3 x 3 mm grid
    it = pipeline.make_train_iterator(cache, config, process_index=0, process_count=1)
    batches = _take(it, 3 * N_TRAIN)
    drawn = 0
    for batch in batches:
        for b in range(2):
            image = batch["image"][b]
            # The fake cache's V is 10 x label, so its own calcifications have V = 80; it is
            # normalised with mean 0, std 1 and a clip at 1, so a drawn one (250-800 HU) has 1 in
            # every present phase.
            new = (batch["semantic"][b] == CALC) & (image[..., 2] != 10.0 * CALC)
            present = batch["phase_mask"][b]
            np.testing.assert_allclose(image[new][:, present], 1.0)
            drawn += int(new.any())
    assert drawn > N_TRAIN  # most patches hold one (a few have no room on liver)
    again = _take(pipeline.make_train_iterator(cache, config, process_index=0, process_count=1),
                  3 * N_TRAIN)
    for a, b in zip(batches, again):  # still a pure function of the step
        np.testing.assert_array_equal(a["image"], b["image"])
    demo = load_config("demo,synth_calc=0.2")
    assert demo.input.synth_calc_prob == 0.2 and demo.input.synth_calc_mm == (6.0, 14.0)
    assert demo.inference.livermax_blend_classes == ("calc",)
    paper = load_config("")
    assert paper.input.synth_calc_prob == 0.0 and paper.inference.livermax_blend_classes == ()
