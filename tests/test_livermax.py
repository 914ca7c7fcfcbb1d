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
