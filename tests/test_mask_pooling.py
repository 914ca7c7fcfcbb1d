"""Mask-pooled intensity class logits (model/mask_pooling.py) against naive numpy loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage as ndi

from conftest import load_config
from lidia_jax.model import build_model
from lidia_jax.model import mask_pooling


def _naive_from_weights(w, liver, image, phase_mask):
    """One query, one phase at a time, scipy's minimum filter for the soft core.
    w [B, Q, d, h, w] in [0, 1], liver [B, d, h, w]."""
    b, q = w.shape[:2]
    p = image.shape[-1]
    out = np.zeros((b, q, 4 * p + 1 + p))
    for i in range(b):
        for j in range(q):
            core = ndi.minimum_filter(w[i, j], size=3, mode="nearest")
            rim = np.maximum(w[i, j] - core, 0.0)
            for c in range(p):
                x = image[i, ..., c].astype(np.float64)
                mean_of = lambda weights, v=x: (weights * v).sum() / max(weights.sum(), 1e-3)
                ref = mean_of(liver[i])
                mean = mean_of(w[i, j])
                std = np.sqrt(max(mean_of(w[i, j], x * x) - mean ** 2, 0.0))
                values = [mean - ref, mean_of(core) - ref, mean_of(rim) - ref, std]
                for k, v in enumerate(values):
                    out[i, j, k * p + c] = v * phase_mask[i, c]
            out[i, j, 4 * p] = np.log1p(w[i, j].sum())
            out[i, j, 4 * p + 1:] = phase_mask[i]
    return out


def _naive_statistics(mask_logits, class_logits, image, phase_mask, sharpness=1):
    """The liver: the queries' masks weighted by their softmax liver probability; the lesion
    statistics weigh each voxel by the mask probability to the power `sharpness`."""
    w = 1.0 / (1.0 + np.exp(-mask_logits.astype(np.float64)))
    e = np.exp(class_logits - class_logits.max(-1, keepdims=True))
    liver_prob = (e / e.sum(-1, keepdims=True))[..., 0]
    liver = np.einsum("bq,bqdhw->bdhw", liver_prob, w)
    return _naive_from_weights(w ** sharpness, liver, image, phase_mask)


@pytest.mark.parametrize("sharpness", [1, 4])
def test_pooled_statistics_match_a_naive_loop(sharpness):
    """The liver reference keeps the plain mask probabilities whatever the power."""
    rng = np.random.default_rng(0)
    b, q, size, p = 2, 3, (4, 5, 6), 4
    mask_logits = rng.normal(0, 3, (b, q) + size).astype(np.float32)
    class_logits = rng.normal(0, 2, (b, q, 10)).astype(np.float32)
    image = rng.normal(0, 1, (b,) + size + (p,)).astype(np.float32)
    phase_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    image[0, ..., 3] = 0.0  # absent phases are zero in the cache
    args = (jnp.asarray(mask_logits), jnp.asarray(class_logits), jnp.asarray(image),
            jnp.asarray(phase_mask))
    got = np.asarray(mask_pooling.pooled_statistics(*args, sharpness=sharpness))
    want = _naive_statistics(mask_logits, class_logits, image, phase_mask, sharpness)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.all(got[0, :, [3, 7, 11, 15]] == 0.0)  # D absent: no statistic
    if sharpness != 1:
        plain = np.asarray(mask_pooling.pooled_statistics(*args))
        assert np.abs(got - plain).max() > 0.1  # the power changes the statistics


def test_masks_are_resized_to_the_grid_of_the_statistics():
    """Masks on a coarser grid than the image: trilinearly resized (as the semantic map's) first."""
    rng = np.random.default_rng(4)
    mask_logits = rng.normal(0, 3, (1, 2, 2, 3, 3)).astype(np.float32)
    class_logits = rng.normal(0, 2, (1, 2, 10)).astype(np.float32)
    image = rng.normal(0, 1, (1, 4, 6, 6, 4)).astype(np.float32)
    phase_mask = np.ones((1, 4), bool)
    fine = np.asarray(jax.image.resize(jnp.asarray(mask_logits), (1, 2, 4, 6, 6), "linear"))
    got = mask_pooling.pooled_statistics(jnp.asarray(mask_logits), jnp.asarray(class_logits),
                                         jnp.asarray(image), jnp.asarray(phase_mask))
    want = _naive_statistics(fine, class_logits, image, phase_mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_target_statistics_pool_the_true_masks_and_take_the_true_liver():
    """Ground-truth masks on the input's grid: their area fraction per block of the statistics'
    grid are the weights; the liver is the valid targets of class 0 (a padded one is ignored)."""
    rng = np.random.default_rng(5)
    b, t, fine, coarse = 2, 4, (4, 6, 6), (2, 3, 3)
    masks = rng.random((b, t) + fine) < 0.4
    classes = np.array([[0, 3, 5, 0], [2, 0, 0, 7]])
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool)  # [0, 3] is a padded "liver"
    image = rng.normal(0, 1, (b,) + coarse + (4,)).astype(np.float32)
    phase_mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], bool)
    got = mask_pooling.target_statistics(jnp.asarray(masks), jnp.asarray(classes),
                                         jnp.asarray(valid), jnp.asarray(image),
                                         jnp.asarray(phase_mask))
    w = masks.reshape(b, t, 2, 2, 3, 2, 3, 2).mean(axis=(3, 5, 7))
    liver = np.stack([sum(w[i, j] for j in range(t) if valid[i, j] and classes[i, j] == 0)
                      for i in range(b)])
    want = _naive_from_weights(w, liver, image, phase_mask)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_pool_image_averages_blocks():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(1, 4, 6, 8, 2)).astype(np.float32)
    got = np.asarray(mask_pooling.pool_image(jnp.asarray(image), (2, 3, 2)))
    want = np.zeros((1, 2, 3, 2, 2))
    for z, y, x in np.ndindex(2, 3, 2):
        want[0, z, y, x] = image[0, 2 * z:2 * z + 2, 2 * y:2 * y + 2, 4 * x:4 * x + 4].mean(
            axis=(0, 1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_statistics_pass_no_gradient_to_the_model_outputs():
    rng = np.random.default_rng(2)
    masks = jnp.asarray(rng.normal(size=(1, 2, 3, 3, 3)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(1, 2, 10)), jnp.float32)
    image = jnp.asarray(rng.normal(size=(1, 3, 3, 3, 4)), jnp.float32)
    phases = jnp.ones((1, 4), bool)
    f = lambda m, l: mask_pooling.pooled_statistics(m, l, image, phases).sum()
    gm, gl = jax.grad(f, argnums=(0, 1))(masks, logits)
    assert not np.any(np.asarray(gm)) and not np.any(np.asarray(gl))


def test_model_with_pooled_logits_starts_as_mask2former_and_learns_from_them():
    """Zero-initialised last layer: same outputs as without the head at init; the class loss
    reaches the head's parameters."""
    config = load_config("smoke")
    shape = (2, 8, 16, 16, 4)
    rng = np.random.default_rng(3)
    image = jnp.asarray(rng.normal(size=shape), jnp.float32)
    phase_mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    config.model.pooled_intensity = True
    pooled = build_model(config.model)
    params = jax.jit(pooled.init)(jax.random.PRNGKey(0), image, phase_mask)["params"]
    config.model.pooled_intensity = False
    plain = build_model(config.model)
    plain_params = dict(params)
    plain_params["transformer_decoder"] = {
        k: v for k, v in params["transformer_decoder"].items() if k != "pooled_intensity"}
    masks = jnp.asarray(rng.random((2, 3) + shape[1:4]) < 0.3)
    targets = {"masks": masks, "classes": jnp.asarray([[0, 2, 4], [0, 1, 0]]),
               "valid": jnp.asarray([[1, 1, 1], [1, 1, 0]], bool)}
    a = jax.jit(pooled.apply)({"params": params}, image, phase_mask, targets=targets)
    b = jax.jit(plain.apply)({"params": plain_params}, image, phase_mask)
    for key in ("logits", "masks", "embed"):
        np.testing.assert_allclose(np.asarray(a[key]), np.asarray(b[key]), rtol=1e-6, atol=1e-6)
    assert "target_logits" not in b  # the plain model ignores targets
    assert "pooled_logits" not in b
    # The head's own term of every layer's logits: zero at init.
    assert a["pooled_logits"].shape == a["logits"].shape
    assert not np.any(np.asarray(a["pooled_logits"]))
    # Under the true masks: the head alone, zero at init.
    assert a["target_logits"].shape == (2, 3, config.model.num_classes + 1)
    assert not np.any(np.asarray(a["target_logits"]))

    def target_loss(p):
        logits = pooled.apply({"params": p}, image, phase_mask, targets=targets)["target_logits"]
        return -jax.nn.log_softmax(logits, axis=-1)[..., 2].mean()

    grads = jax.jit(jax.grad(target_loss))(params)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        in_head = "pooled_intensity" in jax.tree_util.keystr(path)
        assert in_head or not np.any(np.asarray(g)), path  # the true masks teach the head only
    assert np.any(np.asarray(grads["transformer_decoder"]["pooled_intensity"]["pool_logits"]
                             ["bias"]))

    def class_loss(p):
        logits = pooled.apply({"params": p}, image, phase_mask)["logits"]
        return -jax.nn.log_softmax(logits, axis=-1)[..., 2].mean()

    grads = jax.jit(jax.grad(class_loss))(params)
    head = jax.tree.leaves(grads["transformer_decoder"]["pooled_intensity"]["pool_logits"])
    assert all(np.any(np.asarray(g)) for g in head)


def _randomise_pooled_head(params, rng):
    """Gives the pooled head's zero-initialised last layer random weights (a trained-looking
    head), in place."""
    head = params["transformer_decoder"]["pooled_intensity"]
    head["pool_logits"] = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), head["pool_logits"])


def test_config_sharpness_reaches_the_pooled_head():
    """config.model.pooled_intensity_sharpness changes the pooled logits of a non-zero head and
    leaves the masks alone."""
    config = load_config("smoke")
    config.model.pooled_intensity = True
    rng = np.random.default_rng(7)
    image = jnp.asarray(rng.normal(size=(1, 8, 16, 16, 4)), jnp.float32)
    phase_mask = jnp.ones((1, 4), bool)
    model = build_model(config.model)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), image, phase_mask)["params"]
    _randomise_pooled_head(params, rng)
    config.model.pooled_intensity_sharpness = 4
    sharp = build_model(config.model)
    a = jax.jit(model.apply)({"params": params}, image, phase_mask)
    b = jax.jit(sharp.apply)({"params": params}, image, phase_mask)
    np.testing.assert_array_equal(np.asarray(a["masks"]), np.asarray(b["masks"]))
    assert np.abs(np.asarray(a["pooled_logits"] - b["pooled_logits"])).max() > 1e-3


def test_pooled_logits_are_the_heads_term_of_the_logits():
    """With a trained-looking head (non-zero last layer), logits - pooled_logits are the plain
    Mask2Former logits of the same parameters without the head, at every layer."""
    config = load_config("smoke")
    shape = (1, 8, 16, 16, 4)
    rng = np.random.default_rng(4)
    image = jnp.asarray(rng.normal(size=shape), jnp.float32)
    phase_mask = jnp.asarray([[1, 1, 1, 1]], bool)
    config.model.pooled_intensity = True
    pooled = build_model(config.model)
    params = jax.jit(pooled.init)(jax.random.PRNGKey(0), image, phase_mask)["params"]
    _randomise_pooled_head(params, rng)
    config.model.pooled_intensity = False
    plain_params = dict(params)
    plain_params["transformer_decoder"] = {
        k: v for k, v in params["transformer_decoder"].items() if k != "pooled_intensity"}
    a = jax.jit(pooled.apply)({"params": params}, image, phase_mask)
    b = jax.jit(build_model(config.model).apply)({"params": plain_params}, image, phase_mask)
    assert np.abs(np.asarray(a["pooled_logits"])).min() > 0
    np.testing.assert_allclose(np.asarray(a["logits"] - a["pooled_logits"]),
                               np.asarray(b["logits"]), rtol=1e-5, atol=1e-5)
