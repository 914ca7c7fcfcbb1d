"""Sliding-window inference against plain numpy references on toy predictors."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidia_jax.inference import semantic
from lidia_jax.inference import sliding_window as sw

PATCH = (4, 6, 8)
NUM_C = 10


def _toy_probs(tiles):
    """Depends on the tile content AND the position inside the tile, so blending matters."""
    pz, py, px = tiles.shape[1:4]
    pos = (jnp.arange(pz)[:, None, None] * 0.3 + jnp.arange(py)[None, :, None] * 0.2
           - jnp.arange(px)[None, None, :] * 0.1)
    c = jnp.arange(NUM_C, dtype=jnp.float32)
    logits = (tiles[..., :1] * (c - 4.0) * 0.5 + tiles[..., 1:2] * jnp.cos(c)
              + pos[None, ..., None] * jnp.sin(c))
    return jax.nn.softmax(logits, axis=-1)


@jax.jit
def _toy_tile_fn(tiles, phase_mask):
    aux = tiles.mean(axis=(1, 2, 3)) * phase_mask  # [B, 4]
    return _toy_probs(tiles), aux


def _toy_numpy(tile):
    return np.asarray(_toy_probs(jnp.asarray(tile[None])))[0]


def _reference_starts(size, patch, overlap):
    # nnU-Net: fewest steps of at most (1 - overlap) * patch covering the axis, evenly spread.
    n = math.ceil((size - patch) / ((1 - overlap) * patch)) + 1
    if n == 1:
        return [0]
    return [round(i * (size - patch) / (n - 1)) for i in range(n)]


def _reference_gaussian(patch, scale):
    grids = np.meshgrid(*[np.arange(p) for p in patch], indexing="ij")
    g = np.exp(-sum((x - (p - 1) / 2) ** 2 / (2 * (scale * p) ** 2) for x, p in zip(grids, patch)))
    g = g / g.max()
    return np.maximum(g, 1e-3)


def test_gaussian_matches_formula_and_is_positive():
    g = sw.gaussian_importance_map(PATCH, 0.125)
    np.testing.assert_allclose(g, _reference_gaussian(PATCH, 0.125), rtol=1e-6)
    assert g.min() > 0 and g.max() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        sw.gaussian_importance_map(PATCH, 0.0)


def test_tile_starts_cover_and_match_reference():
    for size, patch in [(8, 8), (9, 8), (20, 8), (33, 6), (100, 32)]:
        starts = sw.tile_starts_1d(size, patch, 0.5)
        assert starts == _reference_starts(size, patch, 0.5)
        assert starts[0] == 0 and starts[-1] == size - patch
        assert max(np.diff(starts), default=0) <= patch // 2
    with pytest.raises(ValueError):
        sw.tile_starts_1d(5, 8, 0.5)


def test_single_tile_equals_direct_prediction():
    rng = np.random.default_rng(0)
    volume = rng.normal(size=PATCH + (4,)).astype(np.float32)
    phase_mask = np.array([1, 1, 1, 0], bool)
    res = sw.sliding_window_inference(volume, phase_mask, _toy_tile_fn, PATCH, tile_batch=3,
                                      out_dtype=np.float32)
    assert res.num_tiles == 1
    np.testing.assert_allclose(res.probs, _toy_numpy(volume), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.aux, volume.mean(axis=(0, 1, 2)) * phase_mask, rtol=1e-5)


def test_volume_smaller_than_tile_is_padded_and_cropped():
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(3, 6, 5, 4)).astype(np.float32)
    res = sw.sliding_window_inference(volume, np.ones(4, bool), _toy_tile_fn, PATCH,
                                      tile_batch=1, out_dtype=np.float32)
    padded = np.zeros(PATCH + (4,), np.float32)
    padded[0:3, 0:6, 1:6] = volume  # centred: (4-3)//2 = 0, (8-5)//2 = 1
    np.testing.assert_allclose(res.probs, _toy_numpy(padded)[0:3, 0:6, 1:6], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("tile_batch", [1, 3, 4])
def test_gaussian_blending_matches_numpy_loop(tile_batch):
    rng = np.random.default_rng(2)
    shape = (11, 13, 17)
    volume = rng.normal(size=shape + (4,)).astype(np.float32)
    res = sw.sliding_window_inference(volume, np.ones(4, bool), _toy_tile_fn, PATCH,
                                      tile_batch=tile_batch, overlap=0.5, out_dtype=np.float32)
    g = _reference_gaussian(PATCH, 0.125)
    acc = np.zeros(shape + (NUM_C,))
    wsum = np.zeros(shape)
    aux = np.full(4, -np.inf)
    starts = [_reference_starts(s, p, 0.5) for s, p in zip(shape, PATCH)]
    for z, y, x in itertools.product(*starts):
        tile = volume[z:z + PATCH[0], y:y + PATCH[1], x:x + PATCH[2]]
        acc[z:z + PATCH[0], y:y + PATCH[1], x:x + PATCH[2]] += _toy_numpy(tile) * g[..., None]
        wsum[z:z + PATCH[0], y:y + PATCH[1], x:x + PATCH[2]] += g
        aux = np.maximum(aux, tile.mean(axis=(0, 1, 2)))
    expected = acc / wsum[..., None]
    assert res.num_tiles == np.prod([len(s) for s in starts])
    np.testing.assert_allclose(res.probs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.aux, aux, rtol=1e-5)
    np.testing.assert_allclose(res.probs.sum(-1), 1.0, atol=1e-5)


def test_float16_output_close_to_float32():
    rng = np.random.default_rng(3)
    volume = rng.normal(size=(9, 10, 12, 4)).astype(np.float32)
    r32 = sw.sliding_window_inference(volume, np.ones(4, bool), _toy_tile_fn, PATCH, 2,
                                      out_dtype=np.float32)
    r16 = sw.sliding_window_inference(volume, np.ones(4, bool), _toy_tile_fn, PATCH, 2)
    assert r16.probs.dtype == np.float16
    np.testing.assert_allclose(r16.probs.astype(np.float32), r32.probs, atol=1e-3)


def _toy_model(trace_counter):
    def apply_fn(variables, image, phase_mask):
        trace_counter.append(image.shape)  # runs at trace time only
        logits = jnp.einsum("bdhwp,pc->bdhwc", image, variables["w"])
        return {"seg_logits": logits + variables["pos"][None]}
    return apply_fn


def test_one_compilation_for_cases_of_different_sizes_and_mirroring_average():
    traces = []
    rng = np.random.default_rng(4)
    variables = {"w": jnp.asarray(rng.normal(size=(4, NUM_C)), jnp.float32),
                 "pos": jnp.asarray(rng.normal(size=PATCH + (NUM_C,)), jnp.float32)}
    predictor = semantic.make_tile_predictor(_toy_model(traces), "per_voxel", PATCH,
                                             mirror_axes=(0, 2))
    fn = semantic.bind(predictor, variables)
    for shape in [(5, 6, 8), (9, 14, 11), (4, 7, 20)]:
        volume = rng.normal(size=shape + (4,)).astype(np.float32)
        sw.sliding_window_inference(volume, np.ones(4, bool), fn, PATCH, tile_batch=2)
    assert len(traces) == 4  # one trace (plain + 3 mirrored passes), whatever the case size

    # Mirroring TTA = mean over flips of softmax(flip-back(model(flip(x)))), in numpy.
    tiles = rng.normal(size=(2,) + PATCH + (4,)).astype(np.float32)
    probs, aux = fn(tiles, np.ones((2, 4), bool))
    assert aux is None
    w, pos = np.asarray(variables["w"]), np.asarray(variables["pos"])
    expected = 0
    flips = [(), (1,), (3,), (1, 3)]
    for axes in flips:
        x = np.flip(tiles, axes) if axes else tiles
        logits = x @ w + pos[None]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
        expected = expected + (np.flip(p, axes) if axes else p)
    np.testing.assert_allclose(np.asarray(probs), expected / len(flips), rtol=1e-5, atol=1e-6)


def test_an_ensemble_averages_its_members_with_one_compilation():
    """semantic.bind over a list of variables: the mean of the members' probabilities (numpy
    softmax per member), the max of their auxiliary evidence, one trace for all members; a
    one-member list is the member itself."""
    traces = []
    rng = np.random.default_rng(6)
    members = [{"w": jnp.asarray(rng.normal(size=(4, NUM_C)), jnp.float32),
                "pos": jnp.asarray(rng.normal(size=PATCH + (NUM_C,)), jnp.float32)}
               for _ in range(3)]
    toy = _toy_model(traces)

    def predictor(variables, tiles, phase_mask):
        probs = jax.nn.softmax(toy(variables, tiles, phase_mask)["seg_logits"], -1)
        return probs, jnp.tile(variables["w"][:1, :3], (tiles.shape[0], 1))

    jitted = jax.jit(predictor)
    tiles = rng.normal(size=(2,) + PATCH + (4,)).astype(np.float32)
    mask = np.ones((2, 4), bool)
    probs, aux = semantic.bind(jitted, members)(tiles, mask)
    assert len(traces) == 1  # one trace for every member
    expected = 0
    for v in members:
        logits = tiles @ np.asarray(v["w"]) + np.asarray(v["pos"])[None]
        p = np.exp(logits - logits.max(-1, keepdims=True))
        expected = expected + p / p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(probs), expected / 3, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(aux), np.max([np.tile(np.asarray(v["w"])[:1, :3], (2, 1)) for v in members],
                                0))
    single, _ = semantic.bind(jitted, members[:1])(tiles, mask)
    alone, _ = semantic.bind(jitted, members[0])(tiles, mask)
    np.testing.assert_array_equal(np.asarray(single), np.asarray(alone))


def _resize_linear_np(x, axis, size):
    """Half-pixel-centre linear resize along one axis (PyTorch align_corners=False), clamped."""
    n = x.shape[axis]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = src - lo
    shape = [1] * x.ndim
    shape[axis] = size
    return (np.take(x, lo, axis) * (1 - frac.reshape(shape))
            + np.take(x, hi, axis) * frac.reshape(shape))


@pytest.mark.parametrize("weighting", ["none", "objectness"])
def test_mask2former_semantic_matches_numpy(weighting):
    rng = np.random.default_rng(5)
    b, q, k = 2, 5, 9
    logits = rng.normal(size=(b, q, k + 1)).astype(np.float32)
    masks = rng.normal(size=(b, q, 2, 3, 4)).astype(np.float32) * 3
    tile = (4, 6, 8)
    scores, mask_probs = semantic.mask2former_semantic(jnp.asarray(logits), jnp.asarray(masks),
                                                       tile, weighting)
    up = masks
    for axis, size in zip((2, 3, 4), tile):
        up = _resize_linear_np(up, axis, size)
    cls = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    weights = cls[..., :-1]
    if weighting == "objectness":  # a naive loop over queries: term times 1 - P(no object)
        weights = np.stack([[cls[i, j, :-1] * (1 - cls[i, j, -1]) for j in range(q)]
                            for i in range(b)])
    expected = np.einsum("bqc,bqdhw->bdhwc", weights, 1 / (1 + np.exp(-up)))
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mask_probs), 1 / (1 + np.exp(-up)), rtol=1e-4,
                               atol=1e-5)


def test_objectness_weighting_silences_half_sure_queries_only():
    """Two queries split P(meta) with P(no object) 0.5 and add up to a confident lesion under the
    plain sum; with objectness weighting they count half. A sure query is barely changed."""
    k = 9
    meta = 3  # query class index of "meta" (0 is the liver)
    logits = np.full((1, 3, k + 1), -20.0, np.float32)
    logits[0, :2, meta] = logits[0, :2, k] = 0.0  # P(meta) = P(no object) = 0.5
    logits[0, 2, 0] = 20.0  # a sure liver query
    masks = np.full((1, 3, 1, 1, 1), 20.0, np.float32)  # every mask covers the voxel
    plain, _ = semantic.mask2former_semantic(jnp.asarray(logits), jnp.asarray(masks), (1, 1, 1))
    weighted, _ = semantic.mask2former_semantic(jnp.asarray(logits), jnp.asarray(masks),
                                                (1, 1, 1), "objectness")
    np.testing.assert_allclose(float(plain[0, 0, 0, 0, meta]), 1.0, atol=1e-4)
    np.testing.assert_allclose(float(weighted[0, 0, 0, 0, meta]), 0.5, atol=1e-4)
    np.testing.assert_allclose(float(weighted[0, 0, 0, 0, 0]), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="query_weighting"):
        semantic.mask2former_semantic(jnp.asarray(logits), jnp.asarray(masks), (1, 1, 1), "max")


def test_aux_semantic_blend_mixes_the_per_voxel_map():
    """aux_semantic_blend w: channels 0-9 are (1 - w) x the queries' label probabilities + w x
    the softmax of the auxiliary logits resized trilinearly to the tile (numpy), a simplex per
    voxel; channels 10-19 the queries' own, for LiverMax. Without the auxiliary output a blend
    is an actionable error."""
    rng = np.random.default_rng(7)
    b, q, k = 1, 4, 9
    tile = (4, 6, 8)
    outputs = {"logits": jnp.asarray(rng.normal(size=(1, b, q, k + 1)), jnp.float32),
               "masks": jnp.asarray(rng.normal(size=(1, b, q, 2, 3, 4)) * 3, jnp.float32),
               "aux_seg_logits": jnp.asarray(rng.normal(size=(b, 2, 3, 4, 10)), jnp.float32)}
    plain, _ = semantic.outputs_to_probs(outputs, "mask2former", tile)
    blended, _ = semantic.outputs_to_probs(outputs, "mask2former", tile, "none", 0.25)
    up = np.asarray(outputs["aux_seg_logits"])
    for axis, size in zip((1, 2, 3), tile):
        up = _resize_linear_np(up, axis, size)
    soft = np.exp(up) / np.exp(up).sum(-1, keepdims=True)
    assert plain.shape[-1] == 10 and blended.shape[-1] == 20
    np.testing.assert_allclose(np.asarray(blended[..., :10]),
                               0.75 * np.asarray(plain) + 0.25 * soft, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(blended[..., :10]).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(blended[..., 10:]), np.asarray(plain))
    del outputs["aux_seg_logits"]
    with pytest.raises(ValueError, match="model.aux_semantic"):
        semantic.outputs_to_probs(outputs, "mask2former", tile, "none", 0.25)
    # The trainer's and model_tile_predictor's early check of the config.
    from conftest import load_config
    cfg = load_config("smoke")
    cfg.inference.aux_semantic_blend = 0.25
    with pytest.raises(ValueError, match="model.aux_semantic = True"):
        semantic.check_settings(cfg)
    cfg.model.aux_semantic = True
    semantic.check_settings(cfg)
    cfg.inference.aux_semantic_blend = 1.5
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        semantic.check_settings(cfg)


def test_label_probabilities_hand_values_and_simplex():
    s = np.zeros((4, 9), np.float32)
    s[0] = 0.0  # nothing claims the voxel: background
    s[1, 0] = 0.9  # liver only
    s[2, [0, 1]] = [1.0, 0.6]  # liver + HCC: lesion carved out of the liver region
    s[3, [0, 1, 6]] = [0.5, 0.9, 0.6]  # two lesion classes over-claim: share r = 0.9 pro rata
    p = np.asarray(semantic.label_probabilities(jnp.asarray(s)))
    np.testing.assert_allclose(p[0], np.eye(10)[0], atol=1e-6)
    np.testing.assert_allclose(p[1, :2], [0.1, 0.9], atol=1e-6)
    np.testing.assert_allclose(p[2, :3], [0.0, 0.4, 0.6], atol=1e-6)
    np.testing.assert_allclose(p[3, [0, 1, 2, 7]], [0.1, 0.0, 0.9 * 0.9 / 1.5, 0.9 * 0.6 / 1.5],
                               atol=1e-6)
    # Many weak lesion scores do not add up to a lesion: P(lesion) is the strongest one.
    weak = np.full((1, 9), 0.15, np.float32)
    weak[0, 0] = 0.8
    pw = np.asarray(semantic.label_probabilities(jnp.asarray(weak)))[0]
    np.testing.assert_allclose(pw[:2], [0.2, 0.65], atol=1e-6)
    np.testing.assert_allclose(pw[2:], np.full(8, 0.15 / 8), atol=1e-6)
    assert pw.argmax() == 1
    rand = np.random.default_rng(6).uniform(0, 1.5, size=(100, 9)).astype(np.float32)
    pr = np.asarray(semantic.label_probabilities(jnp.asarray(rand)))
    assert pr.min() >= 0
    np.testing.assert_allclose(pr.sum(-1), 1.0, atol=1e-5)


def test_query_liver_scores_numpy():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(1, 3, 10)).astype(np.float32)
    mask_probs = np.zeros((1, 3, 2, 2, 2), np.float32)
    mask_probs[0, 0, 0, 0, :] = [0.9, 0.7]  # touches the liver voxel (0,0,0)
    mask_probs[0, 1, 1, 1, 1] = 0.8  # outside the liver
    liver = np.zeros((1, 2, 2, 2), bool)
    liver[0, 0, 0, 0] = True
    out = np.asarray(semantic.query_liver_scores(jnp.asarray(logits), jnp.asarray(mask_probs),
                                                 jnp.asarray(liver)))
    cls = np.exp(logits[0]) / np.exp(logits[0]).sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0], cls[0, :9] * 0.8, rtol=1e-5)


def test_model_tile_predictor_shares_one_compilation_across_calls():
    """Periodic validation rebuilds the predictor each time: jit's cache must still hit."""
    import flax.linen as nn

    from conftest import load_config

    traces = []

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, image, phase_mask, train=False):
            traces.append(image.shape)
            return {"seg_logits": nn.Dense(NUM_C)(image * phase_mask[:, None, None, None])}

    cfg = load_config("smoke,head=per_voxel")
    patch = tuple(cfg.input.patch_size)
    x = np.ones((cfg.inference.tile_batch,) + patch + (4,), np.float32)
    mask = np.ones((cfg.inference.tile_batch, 4), bool)
    variables = Tiny().init(jax.random.key(0), x, mask)
    first = semantic.bind(semantic.model_tile_predictor(Tiny(), cfg), variables)(x, mask)
    n = len(traces)
    second = semantic.bind(semantic.model_tile_predictor(Tiny(), cfg), variables)(x, mask)
    assert len(traces) == n  # no retrace for an equal model and the same settings
    np.testing.assert_array_equal(np.asarray(first[0]), np.asarray(second[0]))
