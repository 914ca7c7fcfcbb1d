"""Masked attention of the 3-D Mask2Former decoder against plain references written here."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidia_jax.model.position import sine_position_3d, split_channels
from lidia_jax.model.transformer_decoder import PredictionHeads, TransformerDecoder, \
    attention_mask, masked_attention


def random_params(module, *args, scale):
    """Plain params of `module` (unboxed from the logical-partitioning boxes), N(0, scale)."""
    abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))
    rng = np.random.default_rng(0)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, jnp.float32), abstract["params"])


def naive_masked_attention(q, k, v, allowed):
    """Loops over batch, head and query; dense softmax with -inf at blocked keys; a row that
    blocks every key is opened (Mask2Former's fix)."""
    b, nq, h, d = q.shape
    out = np.zeros((b, nq, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for qi in range(nq):
                row = allowed[bi, qi] if allowed is not None else np.ones(k.shape[1], bool)
                if not row.any():
                    row = np.ones_like(row)
                scores = np.array([np.dot(q[bi, qi, hi], k[bi, n, hi]) / math.sqrt(d)
                                   if row[n] else -np.inf for n in range(k.shape[1])])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[bi, qi, hi] = sum(w[n] * v[bi, n, hi] for n in range(k.shape[1]))
    return out


def test_masked_attention_matches_naive_loops_including_fully_blocked_rows():
    rng = np.random.default_rng(0)
    b, nq, n, h, d = 2, 5, 7, 3, 4
    q, k, v = (rng.normal(size=(b, s, h, d)).astype(np.float32) for s in (nq, n, n))
    allowed = rng.random((b, nq, n)) < 0.4
    allowed[0, 1] = False  # fully blocked rows
    allowed[1, 4] = False
    allowed[1, 0] = True  # fully open row
    got = np.asarray(masked_attention(q, k, v, jnp.asarray(allowed)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, naive_masked_attention(q, k, v, allowed), atol=1e-5)
    got_open = np.asarray(masked_attention(q, k, v, None))
    np.testing.assert_allclose(got_open, naive_masked_attention(q, k, v, None), atol=1e-5)
    # A fully blocked row equals an unmasked row.
    np.testing.assert_allclose(got[0, 1], got_open[0, 1], atol=1e-6)


def test_masked_attention_gradient_is_finite_with_fully_blocked_rows():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 3, 2, 4)), jnp.float32) for _ in range(3))
    allowed = jnp.zeros((1, 3, 3), bool).at[0, 0, 1].set(True)
    g = jax.grad(lambda q, k, v: jnp.sum(masked_attention(q, k, v, allowed) ** 2),
                 argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(x)).all() for x in g)


def test_attention_mask_threshold_resize_and_open_rows():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 4, 8, 8)).astype(np.float32)
    logits[0, 2] = -5.0  # blocks everything -> opened
    # Same size: attend where sigmoid >= 0.5.
    got = np.asarray(attention_mask(jnp.asarray(logits), (4, 8, 8)))
    want = (1 / (1 + np.exp(-logits.astype(np.float64))) >= 0.5).reshape(2, 3, -1)
    want[~want.any(-1)] = True
    np.testing.assert_array_equal(got, want)
    # Downsampling by exactly 2 per axis with half-pixel centres (torch trilinear,
    # align_corners=False, no antialiasing) samples the centre of each 2x2x2 block = its mean.
    got = np.asarray(attention_mask(jnp.asarray(logits), (2, 4, 4)))
    pooled = logits.reshape(2, 3, 2, 2, 4, 2, 4, 2).mean(axis=(3, 5, 7))
    want = (pooled >= 0).reshape(2, 3, -1)
    want[~want.any(-1)] = True
    np.testing.assert_array_equal(got, want)
    assert got[0, 2].all()


def test_sine_position_3d_matches_formula():
    dim, shape = 16, (2, 3, 4)
    fz, fy, fx = split_channels(dim)
    assert (fz, fy, fx) == (6, 6, 4) and split_channels(64) == (22, 22, 20)
    got = sine_position_3d(shape, dim).reshape(*shape, dim)
    for z in range(shape[0]):
        for y in range(shape[1]):
            for x in range(shape[2]):
                vec = []
                for coord, n, f in ((z, shape[0], fz), (y, shape[1], fy), (x, shape[2], fx)):
                    p = (coord + 1) / (n + 1e-6) * 2 * math.pi
                    for j in range(f):
                        a = p / 10000 ** (2 * (j // 2) / f)
                        vec.append(math.sin(a) if j % 2 == 0 else math.cos(a))
                np.testing.assert_allclose(got[z, y, x], vec, atol=1e-6)
    with pytest.raises(ValueError, match="hidden_dim"):
        split_channels(8)


def test_decoder_with_every_mask_blocked_stays_finite():
    """Mask features and mask embedding set so that every mask logit is < 0 at every layer:
    every query's attention row is blocked, the fix opens it, nothing is NaN (values and
    gradients)."""
    dec = TransformerDecoder(num_queries=3, hidden_dim=16, num_heads=2, ffn_dim=8, dec_layers=2,
                             num_classes=4, mask_dim=4, acl_dim=4)
    ms = [jnp.ones((1, 2, 2, 2, 16)), jnp.ones((1, 4, 4, 4, 16))]
    mf = jnp.ones((1, 8, 8, 8, 4))
    params = random_params(dec, ms, mf, scale=0.3)
    last = params["heads"]["mask_embed_2"]
    params["heads"]["mask_embed_2"] = {"kernel": jnp.zeros_like(last["kernel"]),
                                       "bias": -jnp.ones_like(last["bias"])}
    out = dec.apply({"params": params}, ms, mf)
    assert (np.asarray(out["masks"]) < 0).all()
    for v in out.values():
        assert np.isfinite(np.asarray(v)).all()
    g = jax.grad(lambda p: jnp.sum(dec.apply({"params": p}, ms, mf)["logits"]))(params)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(g))


def test_prediction_heads_match_numpy():
    """LayerNorm -> class Linear; 3-layer mask MLP dotted with mask_features; ACL projection
    (2-layer MLP) L2-normalised: all written out in numpy from the module's params."""
    rng = np.random.default_rng(3)
    heads = PredictionHeads(num_classes=4, mask_dim=3, acl_dim=5)
    q = rng.normal(size=(2, 6, 8)).astype(np.float32)
    mf = rng.normal(size=(2, 2, 3, 4, 3)).astype(np.float32)
    params = random_params(heads, q, mf, scale=0.5)
    logits, masks, embed = heads.apply({"params": params}, q, mf)
    p = jax.tree_util.tree_map(np.asarray, params)
    lin = lambda x, d: x @ d["kernel"] + d["bias"]
    mu, var = q.mean(-1, keepdims=True), q.var(-1, keepdims=True)
    x = (q - mu) / np.sqrt(var + 1e-5) * p["decoder_norm"]["scale"] + p["decoder_norm"]["bias"]
    np.testing.assert_allclose(logits, lin(x, p["class_embed"]), atol=1e-4)
    m = np.maximum(lin(x, p["mask_embed_0"]), 0)
    m = lin(np.maximum(lin(m, p["mask_embed_1"]), 0), p["mask_embed_2"])
    want = np.zeros((2, 6, 2, 3, 4))
    for b in range(2):
        for i in range(6):
            want[b, i] = (mf[b] * m[b, i]).sum(-1)
    np.testing.assert_allclose(masks, want, atol=1e-4)
    z = lin(np.maximum(lin(x, p["acl_proj_0"]), 0), p["acl_proj_1"])
    np.testing.assert_allclose(embed, z / np.linalg.norm(z, axis=-1, keepdims=True), atol=1e-5)
