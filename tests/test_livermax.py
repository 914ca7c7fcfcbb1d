"""LiverMax and the patient-score alternatives against numpy references."""

import jax
import numpy as np
import pytest

from lidia_jax.inference import patient_scores as lm


def _reference(probs, mask):
    out = np.zeros(probs.shape[-1], probs.dtype)
    if mask.any():
        for c in range(probs.shape[-1]):
            out[c] = max(probs[..., c][mask])
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_livermax_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.ones(10), size=(5, 6, 7)).astype(np.float32)
    mask = rng.random((5, 6, 7)) < 0.2
    np.testing.assert_array_equal(np.asarray(lm.livermax(probs, mask)), _reference(probs, mask))


def test_livermax_empty_mask_is_zero_not_nan():
    probs = np.random.default_rng(2).random((3, 4, 5, 10)).astype(np.float32)
    out = np.asarray(lm.livermax(probs, np.zeros((3, 4, 5), bool)))
    np.testing.assert_array_equal(out, np.zeros(10, np.float32))


def test_livermax_under_vmap_with_an_empty_case():
    rng = np.random.default_rng(3)
    probs = rng.random((3, 4, 4, 5, 10)).astype(np.float32)
    masks = rng.random((3, 4, 4, 5)) < 0.3
    masks[1] = False
    out = np.asarray(jax.vmap(lm.livermax)(probs, masks))
    for b in range(3):
        np.testing.assert_array_equal(out[b], _reference(probs[b], masks[b]))
    assert np.all(np.isfinite(out))


def test_livermax_scores_by_slabs_equals_whole_volume():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet(np.ones(10), size=(11, 6, 5)).astype(np.float16)
    mask = rng.random((11, 6, 5)) < 0.3
    mask[:4] = False  # some slabs are empty: they must not lower or NaN the result
    per_class, malig = lm.livermax_scores(probs, mask, malignant_codes=(2, 3, 4), slab=4)
    p32 = probs.astype(np.float32)
    np.testing.assert_allclose(per_class, _reference(p32, mask)[2:], rtol=1e-6)
    assert malig == pytest.approx(max(p32[..., 2:5].sum(-1)[mask]), rel=1e-6)
    assert malig >= per_class[:3].max()


def test_volume_and_query_scores():
    names = ("HCC", "ICC", "meta", "heman", "FNH", "cyst", "calc", "others")
    lesions = [{"class": "HCC", "volume_ml": 2.0}, {"class": "HCC", "volume_ml": 1.0},
               {"class": "cyst", "volume_ml": 0.5}]
    per_class, malig = lm.volume_scores(lesions, names, ("HCC", "ICC", "meta"), 1.5)
    expected = np.zeros(8)
    expected[0], expected[5] = 1 - np.exp(-3.0 / 1.5), 1 - np.exp(-0.5 / 1.5)
    np.testing.assert_allclose(per_class, expected)
    assert malig == pytest.approx(1 - np.exp(-2.0))
    aux = np.linspace(0.1, 0.9, 9)
    per_class, malig = lm.query_max_scores(aux, names, ("HCC", "ICC", "meta"))
    np.testing.assert_allclose(per_class, aux[1:])
    assert malig == pytest.approx(aux[3])
    with pytest.raises(ValueError, match="per_voxel"):
        lm.query_max_scores(None, names, ("HCC",))


def test_diagnose_segments_the_blend_and_scores_the_queries_map():
    """With config.inference.aux_semantic_blend the tiles carry 20 channels: the segmentation
    comes from the first ten (the blend), LiverMax from the last ten (the queries' map)."""
    from conftest import load_config
    from lidia_jax.inference import diagnose

    config = load_config("smoke")
    config.inference.overlap = 0.0
    config.inference.min_lesion_volume_mm3 = 0.0
    shape = tuple(config.input.patch_size)
    seg_map = np.zeros(shape + (10,), np.float32)
    seg_map[..., 1] = 1.0  # all liver, with a 4x4x4 HCC block (code 2)
    seg_map[4:8, 4:8, 4:8] = np.eye(10)[2]
    score_map = np.full(shape + (10,), 0.01, np.float32)
    score_map[..., 1] = 0.91
    score_map[0, 0, 0, 6] = 0.3  # the queries' map: evidence of FNH (code 6), none of HCC

    def tile_fn(tiles, phase_mask):
        b = tiles.shape[0]
        return np.broadcast_to(np.concatenate([seg_map, score_map], -1), (b,) + shape + (20,)), None

    diag = diagnose.diagnose_volume(np.zeros(shape + (4,), np.float32), [True] * 4, tile_fn,
                                    (6.0, 6.0, 6.0), config)
    assert diag.probs.shape == shape + (10,)
    assert [l["label"] for l in diag.lesions] == [2]
    assert (diag.seg == 2).sum() == 64
    expected = np.full(8, 0.01)
    expected[4] = 0.3
    np.testing.assert_allclose(diag.patient_probabilities, expected, atol=1e-3)


def test_diagnose_livermax_blend_classes_read_the_blend():
    """inference.livermax_blend_classes: those classes' LiverMax reads the blend (channels 0-9),
    the others and malignancy keep the queries' map; unknown names are refused."""
    from conftest import load_config
    from lidia_jax.inference import diagnose, semantic

    config = load_config("smoke")
    config.inference.overlap = 0.0
    config.inference.livermax_blend_classes = ("calc",)
    shape = tuple(config.input.patch_size)
    seg_map = np.zeros(shape + (10,), np.float32)
    seg_map[..., 1] = 1.0
    seg_map[1, 2, 3, [1, 8, 2]] = [0.5, 0.3, 0.2]  # calc (code 8) and HCC evidence, not a lesion
    score_map = np.full(shape + (10,), 0.01, np.float32)
    score_map[..., 1] = 0.91
    score_map[2, 2, 2, 2] = 0.4  # the queries' HCC

    def tile_fn(tiles, phase_mask):
        b = tiles.shape[0]
        return np.broadcast_to(np.concatenate([seg_map, score_map], -1), (b,) + shape + (20,)), None

    diag = diagnose.diagnose_volume(np.zeros(shape + (4,), np.float32), [True] * 4, tile_fn,
                                    (6.0, 6.0, 6.0), config)
    assert diag.lesions == []
    expected = np.full(8, 0.01)
    expected[0], expected[6] = 0.4, 0.3
    np.testing.assert_allclose(diag.patient_probabilities, expected, atol=1e-3)
    np.testing.assert_allclose(diag.malignancy_probability, 0.42, atol=1e-3)
    config.inference.livermax_blend_classes = ("calcification",)
    with pytest.raises(ValueError, match="calcification"):
        semantic.check_settings(config)
