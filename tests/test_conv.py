"""lidia_jax.model.conv: every implementation equals a numpy loop and lax.conv_general_dilated.

References: a numpy loop over kernel taps on the 'SAME'-padded input (forward), its adjoint
written as a scatter-add over taps (input gradient) and a correlation over voxels (kernel
gradient); lax.conv_general_dilated and its autodiff gradients.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lidia_jax.model import conv as conv_lib
from lidia_jax.model.conv import Conv

IMPLS = ("xla", "planes", "matmul")
# (input spatial shape, kernel, strides): odd and even sizes, anisotropic kernels and strides.
CASES = [
    ((5, 7, 6), (3, 3, 3), (1, 1, 1)),
    ((5, 7, 6), (3, 3, 3), (2, 2, 2)),
    ((3, 7, 5), (1, 3, 3), (1, 1, 1)),
    ((4, 7, 6), (1, 3, 3), (1, 2, 2)),
    ((5, 6, 7), (3, 3, 3), (1, 2, 2)),
    ((3, 5, 4), (1, 1, 1), (1, 1, 1)),
    ((4, 5, 6), (1, 1, 1), (2, 2, 2)),
]


def _pads(shape, ksize, strides):
    """'SAME' as TensorFlow: out = ceil(n / s), total padding split low = total // 2."""
    outs, pads = [], []
    for n, k, s in zip(shape, ksize, strides):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        outs.append(out)
        pads.append((total // 2, total - total // 2))
    return outs, pads


def np_conv(x, w, strides):
    """y[b, o...] = sum_t sum_c xpad[b, o*s + t, c] w[t, c, :]; x [B, *S, C], w [*k, C, O]."""
    ksize = w.shape[:-2]
    outs, pads = _pads(x.shape[1:-1], ksize, strides)
    xp = np.pad(x, [(0, 0)] + pads + [(0, 0)]).astype(np.float64)
    y = np.zeros((x.shape[0], *outs, w.shape[-1]))
    for tap in itertools.product(*[range(k) for k in ksize]):
        idx = tuple(slice(t, t + (o - 1) * s + 1, s) for t, o, s in zip(tap, outs, strides))
        y += np.einsum("b...c,co->b...o", xp[(slice(None),) + idx], w[tap])
    return y


def np_conv_grads(x, w, strides, g):
    """Gradients of sum(np_conv(x, w) * g) wrt x (scatter-add over taps) and w (correlation)."""
    ksize = w.shape[:-2]
    outs, pads = _pads(x.shape[1:-1], ksize, strides)
    xp = np.pad(x, [(0, 0)] + pads + [(0, 0)]).astype(np.float64)
    dxp = np.zeros_like(xp)
    dw = np.zeros(w.shape)
    for tap in itertools.product(*[range(k) for k in ksize]):
        idx = (slice(None),) + tuple(slice(t, t + (o - 1) * s + 1, s)
                                     for t, o, s in zip(tap, outs, strides))
        dxp[idx] += np.einsum("b...o,co->b...c", g, w[tap])
        dw[tap] = xp[idx].reshape(-1, x.shape[-1]).T @ g.reshape(-1, g.shape[-1])
    crop = (slice(None),) + tuple(slice(lo, lo + n) for (lo, _), n in zip(pads, x.shape[1:-1]))
    return dxp[crop], dw


def lax_conv(x, w, strides):
    return lax.conv_general_dilated(x, w, strides, "SAME",
                                    dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                    precision=lax.Precision.HIGHEST)


def _data(shape, ksize, c_in=3, c_out=4, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *shape, c_in)).astype(np.float32)
    w = rng.standard_normal((*ksize, c_in, c_out)).astype(np.float32)
    return x, w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,ksize,strides", CASES)
def test_forward_and_gradients_match_numpy_and_lax(impl, shape, ksize, strides):
    x, w = _data(shape, ksize)
    f = jax.jit(lambda x, w: conv_lib.conv(x, w, strides, impl, lax.Precision.HIGHEST))
    y = np.asarray(f(x, w))
    ref = np_conv(x, w, strides)
    assert y.shape == ref.shape == (2, *[-(-n // s) for n, s in zip(shape, strides)], 4)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(y, np.asarray(lax_conv(x, w, strides)), rtol=1e-5, atol=1e-4)

    g = np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32)
    loss = lambda fn: (lambda x, w: jnp.sum(fn(x, w) * g))
    dx, dw = jax.jit(jax.grad(loss(f), argnums=(0, 1)))(x, w)
    dx_ref, dw_ref = np_conv_grads(x, w, strides, g)
    np.testing.assert_allclose(np.asarray(dx), dx_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), dw_ref, rtol=1e-5, atol=1e-3)
    dx_lax, dw_lax = jax.grad(loss(lambda x, w: lax_conv(x, w, strides)), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(dx), np.asarray(dx_lax), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dw), np.asarray(dw_lax), rtol=1e-5, atol=1e-3)


def test_matmul_2d_and_finite_differences():
    """N-D: a 2-D conv; the kernel gradient of one entry against a central difference."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 5, 4, 2))
    w = rng.standard_normal((3, 3, 2, 3))
    g = rng.standard_normal((1, 3, 2, 3))
    np.testing.assert_allclose(np.asarray(conv_lib.conv_matmul(x, w, (2, 2))),
                               np_conv(x, w, (2, 2)), rtol=1e-5, atol=1e-5)
    with jax.enable_x64(True):
        loss = lambda w: jnp.sum(conv_lib.conv_matmul(jnp.asarray(x), w, (2, 2)) * g)
        dw = np.asarray(jax.grad(loss)(jnp.asarray(w)))
        eps = 1e-6
        e = np.zeros_like(w)
        e[1, 2, 0, 1] = eps
        fd = (float(loss(jnp.asarray(w + e))) - float(loss(jnp.asarray(w - e)))) / (2 * eps)
    np.testing.assert_allclose(dw[1, 2, 0, 1], fd, rtol=1e-6)


def test_module_params_identical_across_impls():
    """Same parameter tree for every impl; one set of parameters gives the same output."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 5, 6, 7, 3)), jnp.float32)
    mods = {impl: Conv(8, (3, 3, 3), (1, 2, 2), impl=impl) for impl in ("auto",) + IMPLS}
    trees = {impl: m.init(jax.random.PRNGKey(0), x) for impl, m in mods.items()}
    shapes = {impl: jax.tree.map(jnp.shape, t) for impl, t in trees.items()}
    assert all(s == shapes["xla"] for s in shapes.values())
    assert shapes["xla"] == {"params": {"kernel": (3, 3, 3, 3, 8), "bias": (8,)}}
    params = trees["xla"]
    params = {"params": {"kernel": params["params"]["kernel"],
                         "bias": jnp.arange(8, dtype=jnp.float32)}}
    outs = {impl: np.asarray(m.apply(params, x)) for impl, m in mods.items()}
    ref = np_conv(np.asarray(x), np.asarray(params["params"]["kernel"]), (1, 2, 2)) + np.arange(8)
    for impl, y in outs.items():
        assert y.shape == (1, 5, 3, 4, 8), impl
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4, err_msg=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(impl):
    """dtype=bfloat16: bf16 output within bf16 rounding of the float64 result; finite grads."""
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 4, 6, 5, 4)), jnp.float32)
    m = Conv(6, (3, 3, 3), impl=impl, dtype=jnp.bfloat16)
    params = m.init(jax.random.PRNGKey(1), x)
    assert params["params"]["kernel"].dtype == jnp.float32
    y = m.apply(params, x)
    assert y.dtype == jnp.bfloat16
    ref = np_conv(np.asarray(x), np.asarray(params["params"]["kernel"]), (1, 1, 1))
    err = np.abs(np.asarray(y, np.float32) - ref)
    # 108-term sums of bf16-rounded inputs: error ~ 2^-8 * sqrt(108) * |term| ~ 0.05 * scale.
    assert err.max() < 0.05 * np.abs(ref).max(), err.max()
    grads = jax.grad(lambda p: jnp.sum(m.apply(p, x).astype(jnp.float32) ** 2))(params)
    assert grads["params"]["kernel"].dtype == jnp.float32
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(grads))


def test_auto_picks_planes_on_cpu_for_3d_and_xla_otherwise():
    assert jax.default_backend() == "cpu"
    assert conv_lib.resolve_impl("auto") == "planes"
    assert conv_lib.resolve_impl("auto", ndim=2) == "xla"
    assert conv_lib.resolve_impl("matmul") == "matmul"
    count = lambda x, w: str(jax.make_jaxpr(lambda x, w: conv_lib.conv(x, w, impl="auto"))(
        x, w)).count("conv_general_dilated")
    w = jnp.ones((3, 3, 3, 6, 2))
    # k_z * C_in = 18 > PLANES_CONCAT_MAX_CHANNELS and 65x64 planes > PLANES_CONCAT_MAX_PLANE:
    # one 2-D convolution per depth tap; on 64x64 planes, one over the concatenated taps.
    assert count(jnp.ones((1, 4, 65, 64, 6)), w) == 3
    assert count(jnp.ones((1, 4, 64, 64, 6)), w) == 1


def test_compiler_options_take_cpu_convolutions_out_of_ynnpack():
    """"planes" on the CPU compiles its 2-D convolutions with XLA's own (multi-threaded) kernel
    instead of a YNNPACK fusion; the values do not change."""
    opts = conv_lib.compiler_options("auto")
    assert opts == conv_lib.CPU_CONV_COMPILER_OPTIONS
    assert conv_lib.compiler_options("planes") == opts
    assert conv_lib.compiler_options("matmul") is None and conv_lib.compiler_options("xla") is None
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 8, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 16, 32)), jnp.float32)
    fn = lambda x, w: conv_lib.conv(x, w, impl="planes")
    ynn = lambda options: "__ynn_fusion" in jax.jit(fn, compiler_options=options).lower(
        x, w).compile().as_text()
    assert ynn(None) and not ynn(opts)  # jaxlib 0.10's default, then without it
    np.testing.assert_allclose(np.asarray(jax.jit(fn, compiler_options=opts)(x, w)),
                               np.asarray(jax.jit(fn)(x, w)), rtol=1e-5, atol=1e-4)


def test_compiler_options_none_where_the_option_is_unknown(monkeypatch):
    conv_lib._cpu_accepts_conv_options.cache_clear()
    monkeypatch.setattr(conv_lib, "CPU_CONV_COMPILER_OPTIONS",
                        {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_FUSION_TYPE"})
    try:
        assert conv_lib.compiler_options("planes") is None
    finally:
        conv_lib._cpu_accepts_conv_options.cache_clear()


@pytest.mark.parametrize("c_in", [2, 6])
def test_planes_both_branches_match_numpy(monkeypatch, c_in):
    """k_z * C_in <= 16 concatenates the depth taps (one 2-D conv); above, one conv per tap."""
    monkeypatch.setattr(conv_lib, "PLANES_CONCAT_MAX_PLANE", 0)  # these planes are small
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 5, 6, 7, c_in)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, c_in, 4)).astype(np.float32)
    for strides in [(1, 1, 1), (2, 2, 2), (2, 1, 2)]:
        y = conv_lib.conv_planes(jnp.asarray(x), jnp.asarray(w), strides)
        np.testing.assert_allclose(np.asarray(y), np_conv(x, w, strides), rtol=1e-4, atol=1e-4)
    n_convs = str(jax.make_jaxpr(lambda x: conv_lib.conv_planes(x, jnp.asarray(w), (1, 1, 1)))(
        jnp.asarray(x))).count("conv_general_dilated")
    assert n_convs == (1 if 3 * c_in <= conv_lib.PLANES_CONCAT_MAX_CHANNELS else 3)


def test_kgrad_chunks():
    assert conv_lib.kgrad_chunks(64, 64 * 64) == [(i, i + 8) for i in range(0, 64, 8)]
    assert conv_lib.kgrad_chunks(96, 192 * 192) == [(i, i + 6) for i in range(0, 96, 6)]  # cap
    assert conv_lib.kgrad_chunks(16, 16 * 16) == [(0, 16)]
    assert conv_lib.kgrad_chunks(7, 32768 // 3) == [(0, 3), (3, 6), (6, 7)]


@pytest.mark.parametrize("chunk_voxels, max_chunks, n_chunks", [(1, 16, 6), (1, 4, 3),
                                                                 (60, 16, 3)])
def test_planes_kernel_gradient_summed_over_batch_chunks(monkeypatch, chunk_voxels, max_chunks,
                                                          n_chunks):
    """The chunked kernel gradient equals XLA's, whatever the chunking (uneven last chunk too)."""
    monkeypatch.setattr(conv_lib, "KGRAD_CHUNK_VOXELS", chunk_voxels)
    monkeypatch.setattr(conv_lib, "KGRAD_MAX_CHUNKS", max_chunks)
    assert len(conv_lib.kgrad_chunks(6, 30)) == n_chunks
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((2, 3, 5, 6, 7)), jnp.float32)    # 6 planes of 5x6
    g = jnp.asarray(rng.standard_normal((2, 3, 5, 6, 4)), jnp.float32)
    monkeypatch.setattr(conv_lib, "PLANES_CONCAT_MAX_PLANE", 0)
    for kz in (1, 3):  # one 2-D conv on 7 channels; three per-tap 2-D convs (3 * 7 > 16)
        w = jnp.asarray(rng.standard_normal((kz, 3, 3, 7, 4)), jnp.float32)
        grads = {impl: jax.grad(lambda x, w: jnp.sum(conv_lib.conv(x, w, impl=impl) * g),
                                argnums=(0, 1))(x, w) for impl in ("xla", "planes")}
        for a, b in zip(grads["planes"], grads["xla"]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="config.model.conv_impl"):
        conv_lib.resolve_impl("cudnn")
    with pytest.raises(ValueError, match="kernel_size"):
        Conv(4, (3, 3)).init(jax.random.PRNGKey(0), jnp.ones((1, 4, 4, 4, 2)))
    with pytest.raises(ValueError, match="do not match"):
        conv_lib.conv(jnp.ones((1, 4, 4, 4, 2)), jnp.ones((3, 3, 3, 5, 2)))


def test_config_override_selects_the_implementation():
    from lidia_jax.config_file import load_config
    assert load_config("smoke").model.conv_impl == "auto"
    assert load_config("smoke,conv=matmul").model.conv_impl == "matmul"
