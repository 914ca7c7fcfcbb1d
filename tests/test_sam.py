"""Optimiser: SAM two-pass update by hand, schedules, SAM-off path, the weights' EMA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from lidia_jax.train.optimizer import find_ema_params
from lidia_jax.train.optimizer import make_optimizer
from lidia_jax.train.optimizer import make_schedule

A = np.array([[3.0, 0.5, 0.0], [0.5, 2.0, 0.3], [0.0, 0.3, 1.0]])
B = np.array([1.0, -2.0, 0.5])


def quad_grad(w):
    return A @ w - B


def _cfg(**kw):
    cfg = load_config("smoke").optim
    cfg.warmup_steps = 0
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _adamw_first_step(g, w, lr, wd, eps=1e-8):
    # Step 1: bias-corrected moments are g and g^2.
    return -lr * (g / (np.abs(g) + eps) + wd * w)


@pytest.mark.parametrize("grad_clip", [100.0, 0.5])
def test_sam_step_equals_two_pass_by_hand(grad_clip):
    cfg = _cfg(sam=True, sam_rho=0.3, lr=0.1, weight_decay=0.05,
               grad_clip=grad_clip)
    opt = make_optimizer(cfg, num_steps=100)
    w = np.array([0.2, -0.4, 1.0])
    params = {"w": jnp.asarray(w, jnp.float32)}
    state = opt.init(params)
    grad_fn = jax.jit(lambda p: {"w": quad_grad(p["w"])})
    updates, state = jax.jit(lambda g, s, p: opt.update(
        g, s, p, grad_fn=grad_fn))(grad_fn(params), state, params)

    g = quad_grad(w)
    g_sam = quad_grad(w + 0.3 * g / np.linalg.norm(g))
    norm = np.linalg.norm(g_sam)
    if norm > grad_clip:
        g_sam = g_sam * grad_clip / norm
    want = _adamw_first_step(g_sam, w, 0.1, 0.05)
    np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-5)
    # Adam's first step is sign-like, so check its first moment too: it must
    # hold the (clipped) SAM gradient, not the clean one.
    mu = optax.tree_utils.tree_get(state, "mu")["w"]
    np.testing.assert_allclose(np.asarray(mu), 0.1 * g_sam, rtol=1e-5)
    assert np.abs(g_sam - g * min(1.0, grad_clip / np.linalg.norm(g))
                  ).max() > 1e-3


def test_sam_zero_gradient_is_finite_and_requires_grad_fn():
    opt = make_optimizer(_cfg(sam=True), num_steps=10)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    zero = {"w": jnp.zeros(3)}
    updates, _ = opt.update(zero, state, params, grad_fn=lambda p: zero)
    assert np.isfinite(np.asarray(updates["w"])).all()
    with pytest.raises(ValueError, match="grad_fn"):
        opt.update(zero, state, params)


def test_sam_off_ignores_grad_fn():
    cfg = _cfg(sam=False, lr=0.1, weight_decay=0.05, grad_clip=100.0)
    opt = make_optimizer(cfg, num_steps=100)
    w = np.array([0.2, -0.4, 1.0])
    params = {"w": jnp.asarray(w, jnp.float32)}
    state = opt.init(params)

    def never(_):
        raise AssertionError("grad_fn must not be called without SAM")

    g = quad_grad(w)
    updates, _ = opt.update({"w": jnp.asarray(g, jnp.float32)}, state, params,
                            grad_fn=never)
    np.testing.assert_allclose(np.asarray(updates["w"]),
                               _adamw_first_step(g, w, 0.1, 0.05), rtol=1e-5)


def test_schedules():
    steps, warm, lr = 100, 10, 0.5
    poly = make_schedule(_cfg(schedule="poly", warmup_steps=warm, lr=lr), steps)
    cos = make_schedule(_cfg(schedule="cosine", warmup_steps=warm, lr=lr),
                        steps)
    const = make_schedule(_cfg(schedule="constant", lr=lr), steps)
    for s in [0, 5, 10, 40, 99, 100]:
        warm_v = lr * s / warm
        t = (s - warm) / (steps - warm)
        want_poly = warm_v if s < warm else lr * (1 - t) ** 0.9
        want_cos = warm_v if s < warm else lr * 0.5 * (1 + np.cos(np.pi * t))
        np.testing.assert_allclose(float(poly(s)), want_poly, atol=1e-6)
        np.testing.assert_allclose(float(cos(s)), want_cos, atol=1e-6)
        assert float(const(s)) == pytest.approx(lr)
    with pytest.raises(ValueError, match="config.optim.schedule"):
        make_schedule(_cfg(schedule="step"), steps)


def test_sgd_matches_torch_nesterov_sgd_loop():
    """optim.name="sgd" = torch.optim.SGD(lr, momentum, weight_decay, nesterov=True) after
    grad-norm clipping (nnU-Net's step), written out for five steps on the quadratic."""
    cfg = _cfg(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01, grad_clip=2.0,
               schedule="constant", sam=False)
    opt = make_optimizer(cfg, num_steps=10)
    params = {"w": jnp.asarray([0.2, -0.4, 1.0], jnp.float32)}
    state = opt.init(params)
    w, buf = np.array([0.2, -0.4, 1.0]), np.zeros(3)
    step = jax.jit(lambda p, s: opt.update({"w": quad_grad(p["w"])}, s, p))
    for _ in range(5):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        g = quad_grad(w)
        g = g * min(1.0, 2.0 / np.linalg.norm(g))
        d = g + 0.01 * w
        buf = 0.9 * buf + d
        w = w - 0.05 * (d + 0.9 * buf)
        np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="optim.name"):
        make_optimizer(_cfg(name="lamb"), num_steps=10)


@pytest.mark.parametrize("sam", [False, True])
def test_ema_of_the_weights_equals_a_loop_and_leaves_training_unchanged(sam):
    """optim.ema_decay: the updates are those without it, bit for bit, and the EMA equals
    e <- d e + (1 - d) w_(t+1), d = min(decay, (1 + t) / (10 + t)), written out for 30 steps
    (decay 0.9, so the warm-up's d and the constant one both occur); SAM keeps it in its state."""
    kw = dict(sam=sam, sam_rho=0.1, lr=0.05, weight_decay=0.01, grad_clip=2.0)
    plain = make_optimizer(_cfg(**kw), num_steps=30)
    with_ema = make_optimizer(_cfg(ema_decay=0.9, **kw), num_steps=30)
    grad_fn = jax.jit(lambda p: {"w": quad_grad(p["w"])})

    def run(opt):
        params = {"w": jnp.asarray([0.2, -0.4, 1.0], jnp.float32)}
        state = opt.init(params)
        step = jax.jit(lambda p, s: opt.update(grad_fn(p), s, p, grad_fn=grad_fn))
        trajectory = [np.asarray(params["w"], np.float64)]
        for _ in range(30):
            updates, state = step(params, state)
            params = optax.apply_updates(params, updates)
            trajectory.append(np.asarray(params["w"], np.float64))
        return trajectory, state

    want_w, state_plain = run(plain)
    got_w, state = run(with_ema)
    np.testing.assert_array_equal(np.stack(got_w), np.stack(want_w))
    assert find_ema_params(state_plain) is None
    ema = want_w[0]
    for t, w in enumerate(want_w[1:]):
        d = min(0.9, (1 + t) / (10 + t))
        ema = d * ema + (1 - d) * w
    np.testing.assert_allclose(np.asarray(find_ema_params(state)["w"]), ema, rtol=1e-5)
    assert np.abs(ema - want_w[-1]).max() > 1e-3  # the average is not the last weights


def test_ema_decay_out_of_range_is_named():
    for decay in (-0.1, 1.0):
        with pytest.raises(ValueError, match="optim.ema_decay"):
            make_optimizer(_cfg(ema_decay=decay), num_steps=10)
