"""LIDIA network: shapes, phase-mask handling under one compilation, IFM Eq. (2), references.

Parameters come from `random_params` (eval_shape of init + numpy draws): tracing init is cheap,
compiling it is not on a busy 2-core CPU, and none of these tests depend on the initialiser.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import load_config
from lidia_jax.model import LOGICAL_AXIS_RULES, build_model, count_params, \
    logical_axis_rules, model_cost
from lidia_jax.model.encoder import Encoder
from lidia_jax.model.flops import forward_flops
from lidia_jax.model.fusion import FUSIONS, build_fusion
from lidia_jax.model.layers import ContextBlock, ConvNormAct, TransposedConvUp

PATCH = (8, 16, 16)  # divisible by the smoke strides' product (4, 4, 4)
FUSION_NAMES = sorted(FUSIONS)
D_ABSENT = np.array([True, True, True, False])


def random_params(module, *args, seed=0):
    """Plain float32 params of `module` for inputs `args`: kernels N(0, 1/fan_in), the rest
    N(0, 0.1) (norm scales around 1)."""
    abstract = nn.meta.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = getattr(path[-1], "key", "")
        if len(s.shape) >= 2:
            return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])),
                               jnp.float32)
        base = 1.0 if name == "scale" else 0.0
        return jnp.asarray(base + 0.1 * rng.normal(size=s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def smoke_model(**fields):
    """The smoke config's model; conv_impl "xla" unless given (compiles fastest on the CPU; the
    implementations are equal, see tests of conv.py), the CPU default "auto" is run in the
    bfloat16 test."""
    cfg = load_config("smoke")
    fields.setdefault("conv_impl", "xla")
    for k, v in fields.items():
        setattr(cfg.model, k, v)
    return build_model(cfg.model)


def inputs(batch, seed=0, shape=PATCH):
    x = jax.random.normal(jax.random.PRNGKey(seed), (batch, *shape, 4), jnp.float32)
    return x, jnp.ones((batch, 4), bool)


# ------------------------------------------------------------------------- shapes and dtypes

@pytest.mark.parametrize("head", ["mask2former", "per_voxel"])
@pytest.mark.parametrize("fusion", FUSION_NAMES)
def test_output_shapes_and_dtypes(fusion, head):
    cfg = load_config(f"smoke,fusion={fusion},head={head}").model
    model = build_model(cfg)
    x, pm = inputs(2)
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, pm)[0])
    if head == "mask2former":
        # smoke: mask_stride_stage 0 -> full patch resolution.
        q, k, l1 = cfg.num_queries, cfg.num_classes, cfg.dec_layers + 1
        assert out["logits"].shape == (l1, 2, q, k + 1)
        assert out["masks"].shape == (l1, 2, q, *PATCH)
        assert out["embed"].shape == (l1, 2, q, cfg.acl_dim)
    else:
        assert out["seg_logits"].shape == (2, *PATCH, 10)
        assert [o.shape for o in out["seg_logits_ds"]] == [(2, 4, 8, 8, 10)]
    assert all(o.dtype == jnp.float32 for o in jax.tree_util.tree_leaves(out))


def test_demo_and_paper_mask_resolution():
    """mask_features at encoder stage mask_stride_stage (1: half resolution in the demo)."""
    cfg = load_config("demo").model
    model = build_model(cfg)
    x, pm = inputs(1, shape=(16, 32, 32))
    out = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, pm)[0])
    assert out["masks"].shape == (cfg.dec_layers + 1, 1, cfg.num_queries, 8, 16, 16)


def test_aux_semantic_map_on_the_mask_grid():
    """model.aux_semantic adds [B, d, h, w, 10] label-code logits on the mask features' grid,
    a linear map of them; without it there is no such output."""
    cfg = load_config("demo").model
    cfg.aux_semantic = False
    x, pm = inputs(1, shape=(16, 32, 32))
    out = jax.eval_shape(lambda: build_model(cfg).init_with_output(
        jax.random.PRNGKey(0), x, pm)[0])
    assert "aux_seg_logits" not in out
    cfg.aux_semantic = True
    cfg.aux_semantic_stage = -1
    model = build_model(cfg)
    out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.PRNGKey(0), x, pm))
    assert out["aux_seg_logits"].shape == (1, 8, 16, 16, 10)
    assert out["aux_seg_logits"].dtype == jnp.float32
    kernel = variables["params"]["aux_semantic"]["kernel"]
    assert kernel.names == ("mask", "classes")  # partitioned like the other heads' kernels
    assert nn.meta.unbox(kernel).shape == (cfg.mask_dim, 10)


def test_aux_semantic_map_on_the_input_grid():
    """model.aux_semantic_stage = 0 puts the map on the input's grid: the mask features
    upsampled trilinearly (scipy's zoom, order 1, half-voxel centres), plus the stage-0 skip's
    1x1x1 conv -> instance norm, LeakyReLU, then the linear map; a stage coarser than the
    masks' is an actionable error."""
    import scipy.ndimage

    cfg = load_config("demo").model
    cfg.aux_semantic = True
    cfg.aux_semantic_stage = 0
    model = build_model(cfg)
    x, pm = inputs(1, shape=(16, 32, 32))
    variables = model.init(jax.random.PRNGKey(0), x, pm)
    out, state = model.apply(variables, x, pm, capture_intermediates=True)
    assert out["aux_seg_logits"].shape == (1, 16, 32, 32, 10)
    inter = state["intermediates"]
    skip0 = np.asarray(inter["encoder"]["__call__"][0][0], np.float64)
    mask_features = np.asarray(inter["pixel_decoder"]["__call__"][0][1], np.float64)
    params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                    nn.meta.unbox(variables["params"]))
    lat = params["aux_semantic_lateral_0"]
    conv = skip0 @ lat["conv"]["kernel"][0, 0, 0] + lat["conv"]["bias"]
    mean = conv.mean((1, 2, 3), keepdims=True)
    var = conv.var((1, 2, 3), keepdims=True)
    lateral = (conv - mean) / np.sqrt(var + 1e-5) * lat["norm"]["scale"] + lat["norm"]["bias"]
    up = scipy.ndimage.zoom(mask_features, (1, 2, 2, 2, 1), order=1, grid_mode=True,
                            mode="nearest")
    y = up + lateral
    y = np.where(y > 0, y, 0.01 * y)
    want = y @ params["aux_semantic"]["kernel"] + params["aux_semantic"]["bias"]
    np.testing.assert_allclose(out["aux_seg_logits"], want, rtol=1e-4, atol=1e-4)

    for bad in (2, -2):  # coarser than the masks', or below -1
        cfg.aux_semantic_stage = bad
        with pytest.raises(ValueError, match=f"aux_semantic_stage={bad}"):
            jax.eval_shape(build_model(cfg).init, jax.random.PRNGKey(0), x, pm)


def test_bad_inputs_raise_actionable_errors():
    model = smoke_model()
    x, pm = inputs(1)
    with pytest.raises(ValueError, match="patch_size"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 6, 16, 16, 4)), pm)
    with pytest.raises(ValueError, match=r"\[B, D, H, W, 4\]"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), x[..., :3], pm)
    with pytest.raises(ValueError, match="config.model.fusion"):
        smoke_model(fusion="late")


# --------------------------------------------------- layers against numpy references

def _np_conv_same(x, w, b):
    """x [D, H, W, C], w [k, k, k, C, O] odd cube kernel, stride 1, zero 'same' padding."""
    k = w.shape[0]
    p = k // 2
    xp = np.pad(x, ((p, p), (p, p), (p, p), (0, 0)))
    out = np.zeros(x.shape[:3] + (w.shape[-1],))
    for z in range(x.shape[0]):
        for y in range(x.shape[1]):
            for xx in range(x.shape[2]):
                out[z, y, xx] = np.einsum("abcd,abcdo->o", xp[z:z + k, y:y + k, xx:xx + k], w)
    return out + b


def test_conv_norm_act_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 2)).astype(np.float32)
    block = ConvNormAct(3, (3, 3, 3))
    params = random_params(block, x, seed=1)
    got = np.asarray(block.apply({"params": params}, x))
    p = jax.tree_util.tree_map(np.asarray, params)
    for i in range(2):
        y = _np_conv_same(x[i], p["conv"]["kernel"], p["conv"]["bias"])
        mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
        y = (y - mean) / np.sqrt(var + 1e-5) * p["norm"]["scale"] + p["norm"]["bias"]
        y = np.where(y >= 0, y, 0.01 * y)
        np.testing.assert_allclose(got[i], y, atol=2e-4)


def test_transposed_conv_up_matches_numpy_loop():
    x = np.random.default_rng(0).normal(size=(1, 2, 3, 2, 3)).astype(np.float32)
    strides = (1, 2, 2)
    up = TransposedConvUp(4, strides)
    params = random_params(up, x)
    got = np.asarray(up.apply({"params": params}, x))
    w = np.asarray(params["conv"]["kernel"]).reshape(3, *strides, 4)  # [C, sz, sy, sx, O]
    want = np.zeros((1, 2, 6, 4, 4))
    for z in range(2):
        for y in range(3):
            for xx in range(2):
                for i in range(strides[0]):
                    for j in range(strides[1]):
                        for k in range(strides[2]):
                            want[0, z * 1 + i, y * 2 + j, xx * 2 + k] = (
                                x[0, z, y, xx] @ w[:, i, j, k])
    np.testing.assert_allclose(got, want + np.asarray(params["bias"]), atol=1e-5)


# ------------------------------------------------------- fusion modules: phase handling

def _fusion(name, features=3):
    return build_fusion(name, features, (3, 3, 3), "xla", jnp.float32)


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_fusion_phase_masks(name):
    """One compiled function for any mix of phase masks; an absent phase's channel content is
    ignored; each sample of a mixed batch equals the sample run alone."""
    fusion = _fusion(name)
    x = np.asarray(inputs(4, seed=3, shape=(4, 6, 6))[0])
    masks = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 0], [1, 0, 1, 1]], bool)
    params = random_params(fusion, x, masks)
    traces = []

    def fn(x, m):
        traces.append(1)
        return fusion.apply({"params": params}, x, m)

    f = jax.jit(fn)
    out = np.asarray(f(x, masks))
    assert out.shape == (4, 4, 6, 6, 3) and np.isfinite(out).all()
    absent = np.broadcast_to(~masks[:, None, None, None, :], x.shape)
    noisy = np.where(absent, np.random.default_rng(9).normal(size=x.shape) * 50,
                     x).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(f(noisy, masks)), out)
    zeros = np.where(absent, 0.0, x).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(f(zeros, masks)), out)
    nans = np.where(absent, np.nan, x).astype(np.float32)  # not even NaN leaks
    np.testing.assert_array_equal(np.asarray(f(nans, masks)), out)
    for i in range(4):  # batch of one sample, other masks: a second (and last) compilation
        np.testing.assert_allclose(np.asarray(f(x[i:i + 1], masks[i:i + 1]))[0], out[i],
                                   atol=1e-5)
    np.asarray(f(x, masks[::-1]))
    assert len(traces) == 2  # batch 4 and batch 1, whatever the masks
    # The phase mask matters (else the tests above would be vacuous).
    assert not np.allclose(np.asarray(f(x[:1], masks[1:2])), out[:1])


@pytest.mark.parametrize("shared", [True, False])
def test_ifm_equals_hand_unrolled_eq2(shared):
    """h_4 = F(concat(F(concat(F(concat(h^NC, h^A)), h^V)), h^D)) with all phases, h_3 without D
    (Eq. 2), and without NC the state starts at h^A; built from the module's own params."""
    fusion = build_fusion("ifm", 3, (3, 3, 3), "xla", jnp.float32, ifm_shared_fuse=shared)
    x = np.asarray(inputs(3, seed=4, shape=(4, 6, 6))[0])
    masks = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]], bool)
    params = random_params(fusion, x, masks)
    got = np.asarray(fusion.apply({"params": params}, x, masks))

    block = jax.jit(ContextBlock(3, (3, 3, 3), impl="xla").apply)
    conv = jax.jit(ConvNormAct(3, (3, 3, 3), impl="xla").apply)
    h = {p: block({"params": params["phase_blocks"][f"phase_{p}"]}, x[..., i:i + 1])
         for i, p in enumerate(("NC", "A", "V", "D"))}
    fuse_params = lambda p: params["fuse"] if shared else params[f"fuse_{p}"]
    F = lambda state, p: conv({"params": fuse_params(p)}, jnp.concatenate([state, h[p]], -1))
    h2 = F(h["NC"], "A")
    h3 = F(h2, "V")
    h4 = F(h3, "D")
    np.testing.assert_allclose(got[0], np.asarray(h4)[0], atol=1e-5)
    np.testing.assert_allclose(got[1], np.asarray(h3)[1], atol=1e-5)
    no_nc = F(F(h["A"], "V"), "D")
    np.testing.assert_allclose(got[2], np.asarray(no_nc)[2], atol=1e-5)
    assert not np.allclose(np.asarray(h4)[1], np.asarray(h3)[1], atol=1e-3)
    assert ("fuse" in params) == shared and ("fuse_D" in params) != shared


def test_hemis_moments_over_present_phases():
    """HeMIS back end input = mean and population variance over the present phases only (variance
    0 with one phase): checked by feeding the back end by hand."""
    fusion = _fusion("hemis")
    x = np.asarray(inputs(2, seed=5, shape=(4, 6, 6))[0])
    masks = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], bool)
    params = random_params(fusion, x, masks)
    got = np.asarray(fusion.apply({"params": params}, x, masks))
    block = jax.jit(ContextBlock(3, (3, 3, 3), impl="xla").apply)
    h = np.stack([np.asarray(block({"params": params["phase_blocks"][f"phase_{p}"]},
                                   x[..., i:i + 1])) for i, p in
                  enumerate(("NC", "A", "V", "D"))])  # [4, B, ...]
    for b in range(2):
        hp = h[masks[b], b]
        feats = np.concatenate([hp.mean(0), hp.var(0)], axis=-1)[None]
        want = ConvNormAct(3, (3, 3, 3), impl="xla").apply({"params": params["backend"]},
                                                           feats)
        np.testing.assert_allclose(got[b], np.asarray(want)[0], atol=1e-5)


def test_convlstm_matches_numpy_recurrence():
    """ConvLSTM gates from the module's own gate conv, recurrence written out in numpy, absent
    phase = no step."""
    fusion = _fusion("convlstm", features=2)
    x = np.asarray(inputs(1, seed=6, shape=(2, 3, 3))[0])
    masks = np.array([[1, 1, 0, 1]], bool)
    params = random_params(fusion, x, masks)
    got = np.asarray(fusion.apply({"params": params}, x, masks))[0]
    block = jax.jit(ContextBlock(2, (3, 3, 3), impl="xla").apply)
    w = np.asarray(params["gates"]["kernel"])
    bias = np.asarray(params["gates"]["bias"])
    sig = lambda a: 1 / (1 + np.exp(-a))
    h = np.zeros((2, 3, 3, 2))
    c = np.zeros_like(h)
    for i, p in enumerate(("NC", "A", "V", "D")):
        if not masks[0, i]:
            continue
        xt = np.asarray(block({"params": params["phase_blocks"][f"phase_{p}"]},
                              x[..., i:i + 1]))[0]
        z = _np_conv_same(np.concatenate([xt, h], -1), w, bias)
        gi, gf, go, gg = np.split(z, 4, axis=-1)
        c = sig(gf) * c + sig(gi) * np.tanh(gg)
        h = sig(go) * np.tanh(c)
    np.testing.assert_allclose(got, h, atol=1e-5)


# ------------------------------------------------------------------- the full network

@pytest.fixture(scope="module")
def ifm_model_run():
    model = smoke_model()
    x, _ = inputs(3, seed=7)
    masks = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]], bool)
    params = random_params(model, x, masks)
    traces = []

    def fn(params, x, m):
        traces.append(1)
        return model.apply({"params": params}, x, m, train=True)

    return model, params, jax.jit(fn), traces, np.asarray(x), masks


def test_model_one_compilation_any_phase_mix_and_absent_phase_ignored(ifm_model_run):
    model, params, f, traces, x, masks = ifm_model_run
    out = jax.tree_util.tree_map(np.asarray, f(params, x, masks))
    for v in out.values():
        assert np.isfinite(v).all()
    noisy = x.copy()
    noisy[1, ..., 3] = np.random.default_rng(1).normal(size=noisy.shape[1:4]) * 10
    noisy[2, ..., 0] = 0.0
    out_noisy = f(params, noisy, masks)
    for key in out:
        np.testing.assert_array_equal(np.asarray(out_noisy[key]), out[key])
    for other in ([[1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]], np.ones((3, 4))):
        f(params, x, np.asarray(other, bool))
    assert len(traces) == 1
    if hasattr(f, "_cache_size"):
        assert f._cache_size() == 1


def test_model_mixed_batch_equals_each_sample_alone(ifm_model_run):
    model, params, f, _, x, masks = ifm_model_run
    out = f(params, x, masks)
    alone = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
    for i in range(3):
        single = alone(params, x[i:i + 1], masks[i:i + 1])
        for key in out:
            np.testing.assert_allclose(np.asarray(single[key])[:, 0] if key != "masks" else
                                       np.asarray(single[key])[:, 0],
                                       np.asarray(out[key])[:, i], atol=2e-4, rtol=1e-4)


def test_bfloat16_activations_float32_params():
    model = smoke_model(dtype="bfloat16", head="per_voxel", conv_impl="auto")
    x, pm = inputs(1, seed=8)
    params = random_params(model, x, pm)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    out, inter = jax.jit(lambda p: model.apply(
        {"params": p}, x, pm, capture_intermediates=lambda m, _: isinstance(m, ContextBlock),
        mutable=["intermediates"]))(params)
    stages = inter["intermediates"]["encoder"]
    assert all(stages[f"stage_{i}"]["__call__"][0].dtype == jnp.bfloat16 for i in range(3))
    assert out["seg_logits"].dtype == jnp.float32 and np.isfinite(out["seg_logits"]).all()
    ref = smoke_model(head="per_voxel", conv_impl="auto")
    out32 = jax.jit(lambda p: ref.apply({"params": p}, x, pm))(params)
    a, b = np.asarray(out["seg_logits"]).ravel(), np.asarray(out32["seg_logits"]).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.97  # bf16 rounding, same function


def test_bfloat16_mask2former_runs():
    model = smoke_model(dtype="bfloat16", dec_layers=1)
    x, pm = inputs(1, seed=8)
    out = jax.jit(lambda p: model.apply({"params": p}, x, pm))(random_params(model, x, pm))
    for v in out.values():
        assert v.dtype == jnp.float32 and np.isfinite(np.asarray(v)).all()
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["embed"]), axis=-1), 1.0,
                               atol=1e-5)


def test_remat_encoder_same_values_and_gradients():
    x = inputs(1, seed=9, shape=(4, 8, 8))[0]
    args = ((4, 8), ((3, 3, 3),) * 2, ((1, 1, 1), (2, 2, 2)))
    plain, remat = Encoder(*args, impl="xla"), Encoder(*args, remat=True, impl="xla")
    params = random_params(plain, x)
    loss = lambda m: lambda p: sum(jnp.sum(s ** 2) for s in m.apply({"params": p}, x))
    g0, g1 = jax.grad(loss(plain))(params), jax.grad(loss(remat))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------- partitioning and cost

def test_logical_partitioning_boxes_unbox_and_map_to_mesh():
    model = smoke_model()
    x, pm = inputs(1)
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, pm)
    specs = nn.get_partition_spec(boxed)["params"]
    stage0 = specs["encoder"]["stage_0"]["block0"]
    assert tuple(stage0["conv"]["kernel"]) == (None, None, None, "conv_in", "conv_out")
    ffn = specs["transformer_decoder"]["ffn_0"]
    assert tuple(ffn["linear1"]["kernel"]) == ("embed", "mlp")
    plain = nn.meta.unbox(boxed)
    leaves = jax.tree_util.tree_leaves(plain)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in leaves)
    assert count_params(boxed) == count_params(plain) == sum(int(np.prod(v.shape))
                                                             for v in leaves)
    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    for rules, sharded in ((LOGICAL_AXIS_RULES, True), (logical_axis_rules("replicated"), False)):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        conv = shardings["params"]["encoder"]["stage_0"]["block0"]["conv"]
        want = (None, None, None, None, "data" if sharded else None)
        assert tuple(conv["kernel"].spec) + (None,) * (5 - len(conv["kernel"].spec)) == want
        assert tuple(conv["bias"].spec) in ((), (None,), ("data",))
        # Same tree structure as the unboxed params: usable as jit out_shardings.
        assert (jax.tree_util.tree_structure(plain) ==
                jax.tree_util.tree_structure(shardings))


@pytest.mark.parametrize("impl", ["xla", "planes", "matmul"])
def test_forward_flops_of_a_convolution_matches_analytic_count(impl):
    n, c_in, c_out, k = (4, 8, 8), 3, 5, 3
    conv = ConvNormAct(c_out, (k, k, k), impl=impl)
    x = jax.ShapeDtypeStruct((1, *n, c_in), jnp.float32)
    variables = nn.meta.unbox(jax.eval_shape(conv.init, jax.random.PRNGKey(0), x))
    flops = forward_flops(lambda v, x: conv.apply(v, x), variables, x)
    inside = lambda size: sum(1 for o in range(size) for t in range(k)
                              if 0 <= o + t - k // 2 < size)
    if impl == "xla":  # XLA's convolution counts only taps inside the volume (padding is free)
        macs = inside(n[0]) * inside(n[1]) * inside(n[2]) * c_out * c_in
    elif impl == "planes":  # 2-D convolutions over depth-padded planes: padding free in-plane
        macs = n[0] * k * inside(n[1]) * inside(n[2]) * c_out * c_in
    else:  # im2col: one [N, k^3 C_in] @ [k^3 C_in, C_out] product, padding taps included
        macs = np.prod(n) * k ** 3 * c_in * c_out
    # 2 FLOPs per multiply-add, plus bias / norm / activation: a few per output voxel.
    assert 2 * macs <= flops <= 2 * macs + 30 * np.prod(n) * c_out


def test_model_cost_smoke():
    cost = model_cost(smoke_model(), PATCH, batch_size=1)
    model = smoke_model()
    x, pm = inputs(1)
    assert cost["params"] == count_params(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                                         x, pm))
    assert cost["flops"] > 0
