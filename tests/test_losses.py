"""Objective terms against plain numpy loops, finite differences and
end-to-end properties of compute_loss."""

import itertools
import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, host_devices_env, load_config
from lidia_jax.objective import classification
from lidia_jax.objective import compute_loss
from lidia_jax.objective import init_memory
from lidia_jax.objective import mask_loss
from lidia_jax.objective import matching_cost
from lidia_jax.objective import per_voxel
from lidia_jax.objective import points as points_lib


# ------------------------------------------------------------ references
def np_trilinear(vol, pt):
    """Naive loop: align_corners=True trilinear interpolation at one point."""
    out = 0.0
    pos, lo = [], []
    for axis in range(3):
        size = vol.shape[axis]
        p = min(max(pt[axis], 0.0), 1.0) * (size - 1)
        pos.append(p)
        lo.append(min(int(math.floor(p)), max(size - 2, 0)))
    for corner in itertools.product((0, 1), repeat=3):
        w, idx = 1.0, []
        for axis in range(3):
            size = vol.shape[axis]
            i = min(lo[axis] + corner[axis], size - 1)
            f = pos[axis] - lo[axis] if size > 1 else 0.0
            w *= f if corner[axis] else 1.0 - f
            idx.append(i)
        out += w * vol[tuple(idx)]
    return out


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_bce(x, t):
    p = np_sigmoid(x)
    return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def np_dice(x, t):
    p = np_sigmoid(x)
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def np_softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def np_matching_cost(cl, x, classes, targets, cfg):
    """Mask2Former's matching cost [Q, T] by a loop over (query, target) pairs: class logits
    cl [Q, K+1], mask logits x [Q, P] and targets [T, P] at the same P points or voxels."""
    cost = np.zeros((len(x), len(targets)))
    for i in range(len(x)):
        for j in range(len(targets)):
            cost[i, j] = (-cfg.match_class * np_softmax(cl[i])[classes[j]]
                          + cfg.match_mask * np.mean(np_bce(x[i], targets[j]))
                          + cfg.match_dice * np_dice(x[i], targets[j]))
    return cost


# ------------------------------------------------------------ points
@pytest.mark.parametrize("shape", [(4, 5, 6), (1, 3, 2), (2, 1, 7)])
def test_trilinear_matches_naive_loop(shape):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=shape)
    pts = rng.uniform(-0.1, 1.1, (40, 3))  # outside [0, 1]: clamped
    pts[:6] = [[0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 1], [.5, .5, .5],
               [1, .25, 0]]
    got = np.asarray(points_lib.trilinear_sample(jnp.asarray(vol, jnp.float32),
                                                 jnp.asarray(pts, jnp.float32)))
    want = [np_trilinear(vol, p) for p in pts]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_trilinear_hits_voxels_at_normalised_indices():
    # align_corners=True: index i <-> coordinate i / (size - 1).
    vol = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)
    idx = np.array([[0, 0, 0], [2, 3, 4], [1, 2, 3], [2, 0, 1]])
    pts = idx / (np.array(vol.shape) - 1.0)
    got = points_lib.trilinear_sample(jnp.asarray(vol), jnp.asarray(pts))
    np.testing.assert_allclose(got, vol[tuple(idx.T)], atol=1e-4)


def _fg_points(mask, num):
    rng = np.random.default_rng(1)
    noise = jnp.asarray(rng.random((num, 4)), jnp.float32)

    @jax.jit
    def draw(noise, mask_):
        cs = points_lib.foreground_cumsum(mask_)
        return points_lib.foreground_points(noise, cs, mask.shape)

    return np.asarray(draw(noise, jnp.asarray(mask)))


def test_foreground_points_many_voxels_distinct_and_inside():
    rng = np.random.default_rng(2)
    mask = rng.random((6, 7, 8)) < 0.4
    pts = _fg_points(mask, 50)
    idx = np.rint(pts * (np.array(mask.shape) - 1)).astype(int)
    np.testing.assert_allclose(idx / (np.array(mask.shape) - 1), pts,
                               atol=1e-6)
    assert mask[tuple(idx.T)].all()
    assert len({tuple(i) for i in idx}) == 50  # without replacement


def test_foreground_points_tiny_mask_takes_all_then_random():
    mask = np.zeros((5, 6, 7), bool)
    vox = np.array([[0, 0, 0], [2, 3, 4], [4, 5, 6]])
    mask[tuple(vox.T)] = True
    pts = _fg_points(mask, 10)
    idx = np.rint(pts[:3] * (np.array(mask.shape) - 1)).astype(int)
    np.testing.assert_array_equal(idx, vox)  # raster order, each once
    # Top-up points are uniform, not on voxel centres.
    rest = pts[3:] * (np.array(mask.shape) - 1)
    assert np.abs(rest - np.rint(rest)).max() > 0.05
    empty = _fg_points(np.zeros((5, 6, 7), bool), 10)
    assert ((empty >= 0) & (empty <= 1)).all()


def test_uncertain_points_keep_most_uncertain_candidates():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 5, 6)).astype(np.float32)
    num, over, ratio = 8, 3.0, 0.75
    n_noise = points_lib.num_uncertain_noise(num, over, ratio)
    assert n_noise == 24 + 2
    noise = rng.random((n_noise, 3)).astype(np.float32)
    pts = np.asarray(points_lib.uncertain_points(
        jnp.asarray(noise), jnp.asarray(logits), num, over, ratio))
    unc = np.array([-abs(np_trilinear(logits, p)) for p in noise[:24]])
    want = noise[np.argsort(-unc, kind="stable")[:6]]
    np.testing.assert_allclose(np.sort(pts[:6], 0), np.sort(want, 0),
                               atol=1e-6)
    np.testing.assert_allclose(pts[6:], noise[24:])


def test_loss_points_split():
    cfg = load_config("smoke").loss
    cfg.num_points = 40
    mask = np.zeros((6, 6, 6), bool)
    mask[2:5, 2:5, 2:5] = True
    n = points_lib.num_loss_noise(cfg)
    pts = np.asarray(jax.jit(lambda u, lg, m: points_lib.loss_points(
        u, lg, points_lib.foreground_cumsum(m), mask.shape, cfg))(
            jax.random.uniform(jax.random.PRNGKey(0), (n,)),
            jnp.zeros((3, 3, 3)), jnp.asarray(mask)))
    assert pts.shape == (40, 3)
    idx = np.rint(pts[:20] * 5).astype(int)
    assert mask[tuple(idx.T)].all()  # fg_point_ratio 0.5 of the points


# ------------------------------------------------------------ mask losses
def test_sigmoid_ce_and_dice_match_loops():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 11)) * 3
    t = (rng.random((2, 3, 11)) < 0.4).astype(float)
    t[0, 1] = rng.random(11)  # soft targets (trilinear on a mask)
    valid = np.array([[True, True, False], [True, False, False]])
    ce, dc = mask_loss.mask_losses(jnp.asarray(x, jnp.float32),
                                   jnp.asarray(t, jnp.float32),
                                   jnp.asarray(valid), 3.0)
    ref_ce = sum(np.mean(np_bce(x[b, i], t[b, i]))
                 for b in range(2) for i in range(3) if valid[b, i]) / 3
    ref_dc = sum(np_dice(x[b, i], t[b, i])
                 for b in range(2) for i in range(3) if valid[b, i]) / 3
    np.testing.assert_allclose([ce, dc], [ref_ce, ref_dc], rtol=1e-5)


def test_matching_cost_matches_pair_loop():
    rng = np.random.default_rng(5)
    q, t, p, k = 5, 3, 17, 4
    cl = rng.normal(size=(q, k + 1))
    x = rng.normal(size=(q, p)) * 2
    tg = (rng.random((t, p)) < 0.5).astype(float)
    tc = np.array([0, 3, 1])
    cfg = load_config("smoke").loss
    got = np.asarray(matching_cost.matching_cost(
        jnp.asarray(cl, jnp.float32), jnp.asarray(x, jnp.float32),
        jnp.asarray(tc), jnp.asarray(tg, jnp.float32), cfg))
    np.testing.assert_allclose(got, np_matching_cost(cl, x, tc, tg, cfg), rtol=1e-5, atol=1e-5)


def test_area_fractions_match_block_loop():
    rng = np.random.default_rng(7)
    masks = rng.random((2, 3, 4, 6, 8)) < 0.3
    got = np.asarray(matching_cost.area_fractions(jnp.asarray(masks), (2, 3, 2)))
    want = np.zeros((2, 3, 2, 3, 2))
    for idx in np.ndindex(want.shape):
        z, y, x = idx[2:]
        want[idx] = masks[idx[0], idx[1], 2 * z:2 * z + 2, 2 * y:2 * y + 2, 4 * x:4 * x + 4].mean()
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="divide the patch"):
        matching_cost.area_fractions(jnp.asarray(masks), (3, 3, 2))


def test_match_on_grid_is_optimal_against_scipy():
    """The grid matcher's assignment costs what scipy's optimum of the same cost (built by a
    loop over the grid's voxels, targets as covered fractions) costs."""
    from scipy.optimize import linear_sum_assignment
    rng = np.random.default_rng(8)
    q, t, k = 7, 4, 4
    cfg = load_config("smoke").loss
    cl = rng.normal(size=(q, k + 1)).astype(np.float32)
    logits = (rng.normal(size=(q, 2, 3, 3)) * 3).astype(np.float32)
    masks = rng.random((t, 4, 6, 6)) < 0.2
    classes = np.array([0, 2, 1, 3])
    valid = np.array([True, True, True, False])
    fractions = matching_cost.area_fractions(jnp.asarray(masks), (2, 3, 3))
    got = np.asarray(matching_cost.match_on_grid(
        jnp.asarray(cl), jnp.asarray(logits), jnp.asarray(classes), fractions,
        jnp.asarray(valid), cfg))
    frac = masks.reshape(t, 2, 2, 3, 2, 3, 2).mean(axis=(2, 4, 6)).reshape(t, -1)
    x = logits.reshape(q, -1)
    cost = np_matching_cost(cl, x, classes, frac, cfg)
    rows, cols = linear_sum_assignment(cost[:, valid])
    assert len(set(got[valid])) == valid.sum()
    np.testing.assert_allclose(cost[got[valid], np.flatnonzero(valid)].sum(),
                               cost[rows, cols].sum(), rtol=1e-5)


def test_grid_matching_finds_a_small_lesion_by_its_mask():
    """Two queries name the lesion's class equally; only one's mask covers the 2x2x2-voxel
    lesion. On the grid the matcher takes it; 64 uniform points over the 16x32x32 patch would
    hit the lesion with probability 1 - (1 - 8 / 16384) ** 64, about 3%."""
    cfg = load_config("smoke").loss
    k = 4
    masks = np.zeros((1, 16, 32, 32), bool)
    masks[0, 6:8, 10:12, 20:22] = True
    logits = np.full((3, 8, 16, 16), -6.0, np.float32)
    logits[1, 3, 5, 10] = 6.0  # over the lesion (the grid cell of its 2x2x2 voxels)
    logits[2, 1, 12, 3] = 6.0  # as confident, elsewhere
    cl = np.zeros((3, k + 1), np.float32)
    cl[1:, 2] = 4.0
    got = matching_cost.match_on_grid(
        jnp.asarray(cl), jnp.asarray(logits), jnp.asarray([2]),
        matching_cost.area_fractions(jnp.asarray(masks), (8, 16, 16)), jnp.asarray([True]), cfg)
    assert int(got[0]) == 1


def test_compute_loss_matching_on_the_grid():
    """match_on="grid" on masks at half the targets' resolution: finite loss and gradients, and
    perfect predictions are matched to their targets (lesion accuracy 1, no class loss)."""
    cfg = load_config("smoke")
    cfg.loss.match_on = "grid"
    outputs, batch = _model_shaped(4, cfg)
    k = cfg.model.num_classes
    fine = np.asarray(batch["masks"])
    half = np.asarray(matching_cost.area_fractions(jnp.asarray(fine), tuple(
        n // 2 for n in fine.shape[2:])))
    masks = np.full(outputs["masks"].shape[:3] + half.shape[2:], -30.0, np.float32)
    logits = np.zeros(outputs["logits"].shape, np.float32)
    logits[..., k] = 30.0
    for b, i in zip(*np.nonzero(np.asarray(batch["valid"]))):
        masks[:, b, 2 + i] = np.where(half[b, i] > 0.5, 30.0, -30.0)
        logits[:, b, 2 + i, int(batch["classes"][b, i])] = 30.0
        logits[:, b, 2 + i, k] = 0.0
    memory = init_memory(cfg.loss.memory_size, cfg.model.acl_dim)
    f = jax.jit(jax.value_and_grad(lambda o, b, m, r: compute_loss(o, b, m, r, cfg),
                                   has_aux=True))
    (loss, aux), grads = f(dict(outputs, masks=jnp.asarray(masks), logits=jnp.asarray(logits)),
                           batch, memory, jax.random.PRNGKey(0))
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(aux["metrics"]["matched_lesion_accuracy"]) == 1.0
    assert float(aux["metrics"]["loss_cls"]) < 1e-6
    cfg.loss.match_on = "voxels"
    with pytest.raises(ValueError, match="match_on"):
        compute_loss(outputs, batch, memory, jax.random.PRNGKey(0), cfg)


# ------------------------------------------------------------ classification
@pytest.mark.parametrize("kind", ["focal", "ce"])
def test_classification_matches_loop(kind):
    rng = np.random.default_rng(6)
    k = 4
    logits = rng.normal(size=(2, 6, k + 1)) * 2
    labels = rng.integers(0, k + 1, (2, 6))
    labels[0, :3] = k
    w = np.ones(k + 1)
    w[k] = 0.1
    num = den = 0.0
    for b in range(2):
        for q in range(6):
            p = np_softmax(logits[b, q])[labels[b, q]]
            per = -np.log(p) * ((1 - p) ** 2 if kind == "focal" else 1.0)
            num += w[labels[b, q]] * per
            den += w[labels[b, q]]
    got = classification.classification_loss(
        jnp.asarray(logits, jnp.float32), jnp.asarray(labels),
        classification.class_weights(k, 0.1), kind, 2.0)
    np.testing.assert_allclose(got, num / den, rtol=1e-5)
    with pytest.raises(ValueError, match="cls_loss"):
        classification.classification_loss(jnp.asarray(logits),
                                           jnp.asarray(labels),
                                           jnp.ones(k + 1), "hinge")


def test_target_class_loss_matches_loop():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(2, 5, 10)) * 2
    classes = rng.integers(0, 9, (2, 5))
    valid = rng.random((2, 5)) < 0.6
    valid[0, 0] = True
    nll = [-np.log(np_softmax(logits[b, t])[classes[b, t]])
           for b, t in zip(*np.nonzero(valid))]
    got = classification.target_class_loss(jnp.asarray(logits, jnp.float32),
                                           jnp.asarray(classes), jnp.asarray(valid))
    np.testing.assert_allclose(got, np.mean(nll), rtol=1e-5)
    none = classification.target_class_loss(jnp.asarray(logits), jnp.asarray(classes),
                                            jnp.zeros((2, 5), bool))
    assert float(none) == 0.0


# ------------------------------------------------------------ gradients
def _fd_check(f, x, eps=1e-6, rtol=1e-6, n=6, seed=0):
    """Directional finite differences in float64."""
    rng = np.random.default_rng(seed)
    f = jax.jit(f)
    g = np.asarray(jax.jit(jax.grad(f))(x))
    for _ in range(n):
        d = rng.normal(size=x.shape)
        fd = (f(x + eps * d) - f(x - eps * d)) / (2 * eps)
        np.testing.assert_allclose(np.sum(g * d), fd, rtol=rtol, atol=1e-9)


def test_gradients_match_finite_differences():
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        x = jnp.asarray(rng.normal(size=(3, 9)), jnp.float64)
        t = jnp.asarray(rng.random((3, 9)), jnp.float64)
        valid = jnp.asarray([True, False, True])
        _fd_check(lambda v: sum(mask_loss.mask_losses(v, t, valid, 2.0)), x)
        logits = jnp.asarray(rng.normal(size=(4, 6)), jnp.float64)
        labels = jnp.asarray([5, 0, 2, 5])
        w = classification.class_weights(5, 0.1).astype(jnp.float64)
        for kind in ("focal", "ce"):
            _fd_check(lambda v: classification.classification_loss(
                v, labels, w, kind, 2.0), logits)
        vol = jnp.asarray(rng.normal(size=(3, 4, 5)), jnp.float64)
        pts = jnp.asarray(rng.random((10, 3)), jnp.float64)
        _fd_check(lambda v: jnp.sum(points_lib.trilinear_sample(v, pts) ** 2),
                  vol)
        seg = jnp.asarray(rng.normal(size=(1, 2, 3, 4, 10)), jnp.float64)
        lab = jnp.asarray(rng.integers(0, 10, (1, 2, 3, 4)))
        _fd_check(lambda v: sum(per_voxel.dice_ce(v, lab)), seg)


# ------------------------------------------------------------ per-voxel
def test_per_voxel_dice_ce_and_deep_supervision_match_loops():
    rng = np.random.default_rng(8)
    b, shape, c = 2, (4, 6, 6), 10
    sem = rng.integers(0, 4, (b,) + shape)
    full = rng.normal(size=(b,) + shape + (c,))
    ds = rng.normal(size=(b, 2, 3, 3, c))
    cfg = load_config("smoke,head=per_voxel")
    loss, metrics = per_voxel.per_voxel_loss(
        {"seg_logits": jnp.asarray(full, jnp.float32),
         "seg_logits_ds": (jnp.asarray(ds, jnp.float32),)},
        {"semantic": jnp.asarray(sem, jnp.int32)}, cfg)

    def ref(logits, labels):
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        ce = np.mean([-np.log(prob[idx + (labels[idx],)])
                      for idx in np.ndindex(labels.shape)])
        dices = []
        for k in range(1, c):
            tp = fp = fn = 0.0
            for idx in np.ndindex(labels.shape):
                p, y = prob[idx + (k,)], float(labels[idx] == k)
                tp += p * y
                fp += p * (1 - y)
                fn += (1 - p) * y
            dices.append((2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5))
        return ce, 1 - np.mean(dices)

    # nearest-exact: coarse voxel i reads fine voxel floor((i + .5) * 2).
    sem_ds = sem[:, 1::2, 1::2, 1::2]
    ce0, dc0 = ref(full, sem)
    ce1, dc1 = ref(ds, sem_ds)
    np.testing.assert_allclose([metrics["loss_ce"], metrics["loss_dice"]],
                               [ce0, dc0], rtol=1e-5)
    w = np.array([1.0, 0.5]) / 1.5
    np.testing.assert_allclose(loss, w[0] * (ce0 + dc0) + w[1] * (ce1 + dc1),
                               rtol=1e-5)
    lab = np.asarray(per_voxel.downsample_labels(jnp.asarray(sem), (3, 4, 5)))
    for i, j, k in np.ndindex(3, 4, 5):
        src = (int((i + .5) * 4 / 3), int((j + .5) * 6 / 4),
               int((k + .5) * 6 / 5))
        np.testing.assert_array_equal(lab[:, i, j, k], sem[(slice(None),) + src])


# ------------------------------------------------------------ compute_loss
CFG = load_config("smoke")


def _model_shaped(seed, cfg=CFG, batch_size=2):
    rng = np.random.default_rng(seed)
    l1 = cfg.model.dec_layers + 1
    q, k, e = cfg.model.num_queries, cfg.model.num_classes, cfg.model.acl_dim
    shape = tuple(cfg.input.patch_size)  # smoke: mask_stride_stage 0
    t = cfg.data.max_instances
    emb = rng.normal(size=(l1, batch_size, q, e))
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    outputs = {
        "logits": jnp.asarray(rng.normal(size=(l1, batch_size, q, k + 1)),
                              jnp.float32),
        "masks": jnp.asarray(rng.normal(size=(l1, batch_size, q) + shape),
                             jnp.float32),
        "embed": jnp.asarray(emb, jnp.float32),
    }
    valid = np.zeros((batch_size, t), bool)
    valid[0, :4] = True
    valid[1, :2] = True
    masks = np.zeros((batch_size, t) + shape, bool)
    for b, i in zip(*np.nonzero(valid)):
        lo = rng.integers(0, np.array(shape) - 4)
        size = rng.integers(1, 5, 3) if i else np.array(shape) // 2
        masks[b, i, lo[0]:lo[0] + size[0], lo[1]:lo[1] + size[1],
              lo[2]:lo[2] + size[2]] = True
    # Liver, two HCC, one "others"; liver, one HCC.
    classes = np.zeros((batch_size, t), np.int64)
    classes[0, :4] = [0, 1, 1, cfg.loss.others_class]
    classes[1, :2] = [0, 1]
    batch = {"masks": jnp.asarray(masks), "classes": jnp.asarray(classes,
                                                                 jnp.int32),
             "valid": jnp.asarray(valid)}
    return outputs, batch


_loss_and_grad = jax.jit(jax.value_and_grad(
    lambda o, b, m, r: compute_loss(o, b, m, r, CFG), has_aux=True))


def test_compute_loss_jitted_finite_with_gradients():
    outputs, batch = _model_shaped(0)
    memory = init_memory(CFG.loss.memory_size, CFG.model.acl_dim)
    (loss, aux), grads = _loss_and_grad(outputs, batch, memory,
                                        jax.random.PRNGKey(0))
    m = aux["metrics"]
    assert np.isfinite(float(loss)) and float(loss) > 0
    for name in ("loss_mask_ce", "loss_dice", "loss_cls", "loss_acl",
                 "loss_aux"):
        assert np.isfinite(float(m[name])) and float(m[name]) > 0, name
    assert float(m["num_targets"]) == 6
    cl = CFG.loss
    final = cl.seg_weight * float(m["loss_seg"]) + cl.cls_weight * float(
        m["loss_cls"])
    np.testing.assert_allclose(
        float(loss), final + float(m["loss_aux"])
        + cl.acl_weight * float(m["loss_acl"]), rtol=1e-5)
    for g in jax.tree.leaves(grads):
        assert np.isfinite(np.asarray(g)).all()
    # Every layer and every head output gets a gradient (deep supervision).
    assert (np.abs(np.asarray(grads["masks"])).sum(axis=(1, 2, 3, 4, 5))
            > 0).all()
    assert (np.abs(np.asarray(grads["logits"])).sum(axis=(1, 2, 3)) > 0).all()
    assert np.abs(np.asarray(grads["embed"][-1])).sum() > 0
    assert np.abs(np.asarray(grads["embed"][:-1])).sum() == 0  # ACL: final
    # The 4 lesion targets (not the livers) are written to the bank.
    assert int(aux["memory"]["valid"].sum()) == 4
    assert int(aux["memory"]["ptr"]) == 4


def test_compute_loss_invariant_to_query_order():
    """Matching makes the loss a function of the set of predictions."""
    outputs, batch = _model_shaped(1)
    memory = init_memory(CFG.loss.memory_size, CFG.model.acl_dim)
    perm = np.random.default_rng(0).permutation(CFG.model.num_queries)
    permuted = {k: v[:, :, perm] for k, v in outputs.items()}
    key = jax.random.PRNGKey(3)
    (l0, a0), _ = _loss_and_grad(outputs, batch, memory, key)
    (l1, a1), _ = _loss_and_grad(permuted, batch, memory, key)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a0["memory"]["embed"]),
                               np.asarray(a1["memory"]["embed"]), atol=1e-6)


def test_compute_loss_small_for_perfect_predictions():
    outputs, batch = _model_shaped(2)
    memory = init_memory(CFG.loss.memory_size, CFG.model.acl_dim)
    k = CFG.model.num_classes
    t = CFG.data.max_instances
    # Query 2 + i predicts target i exactly; other queries say no-object.
    masks = np.full(outputs["masks"].shape, -30.0, np.float32)
    logits = np.zeros(outputs["logits"].shape, np.float32)
    logits[..., k] = 30.0
    for b in range(2):
        for i in range(t):
            if batch["valid"][b, i]:
                masks[:, b, 2 + i] = np.where(batch["masks"][b, i], 30.0, -30.0)
                logits[:, b, 2 + i] = 0.0
                logits[:, b, 2 + i, int(batch["classes"][b, i])] = 30.0
    perfect = dict(outputs, masks=jnp.asarray(masks),
                   logits=jnp.asarray(logits))
    key = jax.random.PRNGKey(0)
    (lp, ap), _ = _loss_and_grad(perfect, batch, memory, key)
    (lr, ar), _ = _loss_and_grad(outputs, batch, memory, key)
    mp, mr = ap["metrics"], ar["metrics"]
    assert float(mp["loss_cls"]) < 1e-6
    assert float(mp["loss_dice"]) < 0.1 < float(mr["loss_dice"])
    # CE only at points between voxels on a mask boundary.
    assert float(mp["loss_mask_ce"]) < 0.2 * float(mr["loss_mask_ce"])
    assert float(mp["matched_lesion_accuracy"]) == 1.0
    # Lesion queries all naming a class no target has (FNH; the perfect masks still decide the
    # matching): no lesion counts as classified; the liver target does not enter the figure.
    fnh = 5
    assert fnh not in np.asarray(batch["classes"])
    wrong = logits.copy()
    for b in range(2):
        for i in range(t):
            if batch["valid"][b, i] and int(batch["classes"][b, i]) >= 1:
                wrong[:, b, 2 + i] = 0.0
                wrong[:, b, 2 + i, fnh] = 30.0
    (_, aw), _ = _loss_and_grad(dict(perfect, logits=jnp.asarray(wrong)), batch, memory, key)
    assert float(aw["metrics"]["matched_lesion_accuracy"]) == 0.0


@pytest.mark.parametrize("variant", ["smoke,head=per_voxel",
                                     "smoke,contrastive=none,cls_loss=ce"])
def test_compute_loss_variants(variant):
    cfg = load_config(variant)
    memory = init_memory(cfg.loss.memory_size, cfg.model.acl_dim)
    if cfg.model.head == "per_voxel":
        rng = np.random.default_rng(0)
        outputs = {"seg_logits": jnp.asarray(rng.normal(size=(2, 4, 8, 8, 10)),
                                             jnp.float32),
                   "seg_logits_ds": (jnp.asarray(
                       rng.normal(size=(2, 2, 4, 4, 10)), jnp.float32),)}
        batch = {"semantic": jnp.asarray(rng.integers(0, 10, (2, 4, 8, 8)),
                                         jnp.int32)}
    else:
        cfg.loss.deep_supervision = False
        outputs, batch = _model_shaped(3, cfg)
    # The batch is an argument, not a closed-over constant: XLA would spend
    # seconds constant-folding the loss on it.
    f = jax.jit(jax.value_and_grad(
        lambda o, b, m, r: compute_loss(o, b, m, r, cfg), has_aux=True))
    (loss, aux), grads = f(outputs, batch, memory, jax.random.PRNGKey(0))
    assert np.isfinite(float(loss))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # The bank passes through unchanged.
    for a, b in zip(jax.tree.leaves(aux["memory"]), jax.tree.leaves(memory)):
        np.testing.assert_array_equal(a, b)
    if cfg.model.head == "mask2former":
        m = aux["metrics"]
        assert float(m["loss_aux"]) == 0.0
        assert "loss_acl" not in m
        np.testing.assert_allclose(
            float(loss), cfg.loss.seg_weight * float(m["loss_seg"])
            + cfg.loss.cls_weight * float(m["loss_cls"]), rtol=1e-6)


def test_pooled_target_term_adds_to_the_total():
    """outputs["target_logits"] (the pooled head under the true masks) adds
    pooled_target_weight x its cross-entropy over the valid targets, and nothing else."""
    cfg = load_config("smoke,contrastive=none")
    cfg.loss.deep_supervision = False
    cfg.loss.pooled_target_weight = 3.0
    outputs, batch = _model_shaped(6, cfg)
    rng = np.random.default_rng(6)
    target_logits = jnp.asarray(rng.normal(size=batch["classes"].shape + (10,)), jnp.float32)
    f = jax.jit(lambda o, b, r: compute_loss(o, b, None, r, cfg))
    key = jax.random.PRNGKey(1)
    plain, plain_aux = f(outputs, batch, key)
    loss, aux = f(dict(outputs, target_logits=target_logits), batch, key)
    want = classification.target_class_loss(target_logits, batch["classes"], batch["valid"])
    np.testing.assert_allclose(float(aux["metrics"]["loss_pooled_target"]), float(want),
                               rtol=1e-6)
    np.testing.assert_allclose(float(loss), float(plain) + 3.0 * float(want), rtol=1e-5)
    assert "loss_pooled_target" not in plain_aux["metrics"]


def test_aux_semantic_term_adds_upsampled_dice_ce():
    """outputs["aux_seg_logits"] (model.aux_semantic), on a grid half the labels', adds
    aux_semantic_weight x (CE + Dice) of the logits upsampled trilinearly to the labels' grid
    (scipy's zoom, order 1, half-voxel centres), and nothing else."""
    import scipy.ndimage

    cfg = load_config("smoke,contrastive=none")
    cfg.loss.deep_supervision = False
    cfg.loss.aux_semantic_weight = 2.0
    outputs, batch = _model_shaped(9, cfg)
    rng = np.random.default_rng(9)
    shape = tuple(cfg.input.patch_size)
    coarse = rng.normal(size=(2,) + tuple(s // 2 for s in shape) + (10,))
    sem = rng.integers(0, 10, (2,) + shape)
    f = jax.jit(lambda o, b, r: compute_loss(o, b, None, r, cfg))
    key = jax.random.PRNGKey(3)
    plain, plain_aux = f(outputs, dict(batch, semantic=jnp.asarray(sem, jnp.int32)), key)
    loss, aux = f(dict(outputs, aux_seg_logits=jnp.asarray(coarse, jnp.float32)),
                  dict(batch, semantic=jnp.asarray(sem, jnp.int32)), key)

    up = scipy.ndimage.zoom(coarse, (1, 2, 2, 2, 1), order=1, grid_mode=True, mode="nearest")
    prob = np.exp(up - up.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    onehot = np.eye(10)[sem]
    ce = -np.mean(np.log(np.sum(prob * onehot, -1)))
    tp = np.sum(prob * onehot, (0, 1, 2, 3))[1:]
    fp = np.sum(prob * (1 - onehot), (0, 1, 2, 3))[1:]
    fn = np.sum((1 - prob) * onehot, (0, 1, 2, 3))[1:]
    dice = 1 - np.mean((2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5))
    m = aux["metrics"]
    np.testing.assert_allclose([m["loss_aux_semantic_ce"], m["loss_aux_semantic_dice"]],
                               [ce, dice], rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(plain) + 2.0 * (ce + dice), rtol=1e-5)
    assert "loss_aux_semantic_ce" not in plain_aux["metrics"]


def np_lesion_wise_dice(logits, masks, classes, valid, smooth=1e-5):
    """Naive loop over patches and lesions of per_voxel.lesion_wise_dice."""
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    losses = []
    for b in range(masks.shape[0]):
        for t in range(masks.shape[1]):
            if not valid[b, t] or classes[b, t] < 1:
                continue
            others = np.zeros(masks.shape[2:], bool)
            for u in range(masks.shape[1]):
                if u != t and valid[b, u] and classes[b, u] >= 1:
                    others |= masks[b, u]
            p = prob[b, ..., classes[b, t] + 1][~others]
            m = masks[b, t][~others].astype(float)
            losses.append(1 - (2 * np.sum(p * m) + smooth) / (np.sum(p) + m.sum() + smooth))
    return np.mean(losses) if losses else 0.0


def _lesion_targets(seed, shape=(2, 6, 5, 8, 8)):
    """Random overlapping instance masks [B, T, D, H, W], classes (0 = liver) and validity."""
    rng = np.random.default_rng(seed)
    b, t = shape[:2]
    masks = rng.random(shape) < 0.15
    classes = rng.integers(1, 9, (b, t))
    classes[:, 0] = 0
    valid = rng.random((b, t)) < 0.8
    logits = rng.normal(size=(b,) + shape[2:] + (10,)) * 2
    return logits, masks, classes, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lesion_wise_dice_matches_naive_loop(seed):
    """per_voxel.lesion_wise_dice equals a loop over lesions, each Dice of its class channel
    on the voxels outside the other lesions; the liver and invalid slots are skipped."""
    logits, masks, classes, valid = _lesion_targets(seed)
    got = per_voxel.lesion_wise_dice(jnp.asarray(logits, jnp.float32), jnp.asarray(masks),
                                     jnp.asarray(classes), jnp.asarray(valid))
    np.testing.assert_allclose(float(got), np_lesion_wise_dice(logits, masks, classes, valid),
                               rtol=1e-5)


def test_lesion_wise_dice_counts_each_lesion_once():
    """A large lesion found exactly and a one-voxel lesion of the same class missed: the loss
    is 1/2 (the class Dice of dice_ce would be 1 - 128/129, near 0); no lesion gives 0, not
    NaN."""
    shape = (1, 3, 4, 8, 8)
    masks = np.zeros(shape, bool)
    masks[0, 1, :, :4, :4] = True  # 64 voxels of class 2 (code 3)
    masks[0, 2, 0, 7, 7] = True  # 1 voxel of class 2
    classes = np.array([[0, 2, 2]])
    valid = np.array([[False, True, True]])
    logits = np.full(shape[:1] + shape[2:] + (10,), -20.0)
    logits[..., 1] = 0.0  # parenchyma everywhere...
    logits[0, :, :4, :4, :] = -20.0
    logits[0, :, :4, :4, 3] = 20.0  # ...but the large lesion, found exactly
    got = float(per_voxel.lesion_wise_dice(jnp.asarray(logits, jnp.float32),
                                           jnp.asarray(masks), jnp.asarray(classes),
                                           jnp.asarray(valid)))
    np.testing.assert_allclose(got, 0.5, atol=1e-3)
    none = per_voxel.lesion_wise_dice(jnp.asarray(logits, jnp.float32), jnp.asarray(masks),
                                      jnp.asarray(classes), jnp.zeros_like(jnp.asarray(valid)))
    assert float(none) == 0.0


def test_lesion_wise_dice_gradient_matches_finite_differences():
    """d loss / d logits against central differences in float64, at a few logits."""
    logits, masks, classes, valid = _lesion_targets(5, (1, 4, 3, 4, 4))
    with jax.enable_x64(True):
        f = lambda x: per_voxel.lesion_wise_dice(x, jnp.asarray(masks), jnp.asarray(classes),
                                                 jnp.asarray(valid))
        x = jnp.asarray(logits, jnp.float64)
        grad = np.asarray(jax.grad(f)(x))
        rng = np.random.default_rng(0)
        for _ in range(6):
            idx = tuple(int(rng.integers(0, n)) for n in logits.shape)
            e = np.zeros_like(logits)
            e[idx] = 1e-5
            fd = (float(f(x + e)) - float(f(x - e))) / 2e-5
            np.testing.assert_allclose(grad[idx], fd, rtol=1e-4, atol=1e-9)


def test_aux_lesion_dice_term_is_added_and_needs_the_aux_map():
    """aux_lesion_dice_weight adds weight x lesion_wise_dice of the aux logits on the labels'
    grid to the loss; without outputs["aux_seg_logits"] (model.aux_semantic off) it is refused
    with the config fields to change. `lesion_dice=W` in the config string sets the weight."""
    cfg = load_config("smoke,contrastive=none")
    cfg.loss.deep_supervision = False
    outputs, batch = _model_shaped(9, cfg)
    rng = np.random.default_rng(4)
    shape = tuple(cfg.input.patch_size)
    aux = jnp.asarray(rng.normal(size=(2,) + shape + (10,)), jnp.float32)
    batch = dict(batch, semantic=jnp.asarray(rng.integers(0, 10, (2,) + shape), jnp.int32))
    key = jax.random.PRNGKey(3)
    plain, _ = compute_loss(dict(outputs, aux_seg_logits=aux), batch, None, key, cfg)
    cfg.loss.aux_lesion_dice_weight = 3.0
    loss, extra = compute_loss(dict(outputs, aux_seg_logits=aux), batch, None, key, cfg)
    want = np_lesion_wise_dice(np.asarray(aux), np.asarray(batch["masks"]).astype(bool),
                               np.asarray(batch["classes"]), np.asarray(batch["valid"]))
    assert want > 0
    np.testing.assert_allclose(float(extra["metrics"]["loss_aux_lesion_dice"]), want,
                               rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(plain) + 3.0 * want, rtol=1e-5)
    with pytest.raises(ValueError, match="model.aux_semantic"):
        compute_loss(outputs, batch, None, key, cfg)
    assert load_config("demo").loss.aux_lesion_dice_weight == 0.0
    assert load_config("demo,lesion_dice=5").loss.aux_lesion_dice_weight == 5.0


def test_pooled_alone_term_uses_the_class_loss_labels():
    """pooled_alone_weight adds cls_weight x weight x the class loss of outputs["pooled_logits"]
    with the same matching and labels: given the class logits themselves as the pooled logits,
    that term equals loss_cls, at the final layer and (deep supervision) summed over layers."""
    for deep in (False, True):
        cfg = load_config("smoke,contrastive=none")
        cfg.loss.deep_supervision = deep
        outputs, batch = _model_shaped(7, cfg)
        f = jax.jit(lambda o, b, r, c=cfg: compute_loss(o, b, None, r, c))
        key = jax.random.PRNGKey(2)
        plain, plain_aux = f(outputs, batch, key)
        assert "loss_pooled_alone" not in plain_aux["metrics"]
        cfg.loss.pooled_alone_weight = 0.5
        f = jax.jit(lambda o, b, r, c=cfg: compute_loss(o, b, None, r, c))
        loss, aux = f(dict(outputs, pooled_logits=outputs["logits"]), batch, key)
        m = aux["metrics"]
        np.testing.assert_allclose(float(m["loss_pooled_alone"]), float(m["loss_cls"]),
                                   rtol=1e-6)
        np.testing.assert_allclose(float(m["pooled_alone_lesion_accuracy"]),
                                   float(m["matched_lesion_accuracy"]))
        # Doubling the pooled weight adds the same amount again: the term is linear in it.
        cfg.loss.pooled_alone_weight = 1.0
        f = jax.jit(lambda o, b, r, c=cfg: compute_loss(o, b, None, r, c))
        loss2, _ = f(dict(outputs, pooled_logits=outputs["logits"]), batch, key)
        gain = float(loss) - float(plain)
        np.testing.assert_allclose(float(loss2) - float(plain), 2 * gain, rtol=1e-5)
        if not deep:
            np.testing.assert_allclose(gain, cfg.loss.cls_weight * 0.5 * float(m["loss_cls"]),
                                       rtol=1e-5)
        else:  # every layer's class loss: more than the final layer's alone
            assert gain > cfg.loss.cls_weight * 0.5 * float(m["loss_cls"]) * 1.01


def test_pooled_alone_matched_only_leaves_out_the_no_object_queries():
    """With pooled_alone_matched_only the term averages over matched queries alone: zero when
    nothing is matched, while the default term also teaches no-object to every query."""
    cfg = load_config("smoke,contrastive=none")
    cfg.loss.deep_supervision = False
    cfg.loss.pooled_alone_weight = 1.0
    outputs, batch = _model_shaped(9, cfg)
    outputs = dict(outputs, pooled_logits=outputs["logits"])
    key = jax.random.PRNGKey(3)
    empty = dict(batch, valid=jnp.zeros_like(batch["valid"]))
    terms = {}
    for matched_only in (False, True):
        cfg.loss.pooled_alone_matched_only = matched_only
        for name, b in (("empty", empty), ("batch", batch)):
            _, aux = compute_loss(outputs, b, None, key, cfg)
            terms[matched_only, name] = float(aux["metrics"]["loss_pooled_alone"])
    assert terms[True, "empty"] == 0.0 and terms[False, "empty"] > 0.0
    # Logits drawn at random: the matched queries' mean loss is not the weighted mean over all.
    assert terms[True, "batch"] > 0.0 and terms[True, "batch"] != terms[False, "batch"]


def test_pooled_alone_weight_needs_the_pooled_head():
    cfg = load_config("smoke,contrastive=none")
    cfg.loss.pooled_alone_weight = 1.0
    outputs, batch = _model_shaped(8, cfg)
    with pytest.raises(ValueError, match="pooled_intensity"):
        compute_loss(outputs, batch, None, jax.random.PRNGKey(0), cfg)


def test_compute_loss_errors_are_actionable():
    outputs, batch = _model_shaped(0)
    with pytest.raises(ValueError, match="unknown outputs keys"):
        compute_loss({"foo": 1}, batch, None, jax.random.PRNGKey(0), CFG)
    bad = dict(outputs, logits=outputs["logits"][..., :5])
    with pytest.raises(ValueError, match="num_classes"):
        compute_loss(bad, batch, None, jax.random.PRNGKey(0), CFG)
    with pytest.raises(ValueError, match="init_memory"):
        compute_loss(outputs, batch, init_memory(4, 3), jax.random.PRNGKey(0),
                     CFG)


def test_layers_in_parallel_does_not_change_the_loss():
    """vmap over all layers (0) == the smoke config's sequential lax.map (1)."""
    assert CFG.loss.layers_in_parallel == 1
    outputs, batch = _model_shaped(4)
    memory = init_memory(CFG.loss.memory_size, CFG.model.acl_dim)
    key = jax.random.PRNGKey(5)
    (loss1, aux1), _ = _loss_and_grad(outputs, batch, memory, key)
    cfg = load_config("smoke")
    cfg.loss.layers_in_parallel = 0
    loss0, aux0 = jax.jit(lambda o, b, m, r: compute_loss(o, b, m, r, cfg))(
        outputs, batch, memory, key)
    np.testing.assert_allclose(float(loss0), float(loss1), rtol=1e-5)
    for name, value in aux1["metrics"].items():
        np.testing.assert_allclose(float(aux0["metrics"][name]), float(value),
                                   rtol=1e-5, atol=1e-7, err_msg=name)


@pytest.mark.slow
def test_compute_loss_in_a_sharded_jit():
    """Batch sharded over 2 host devices (auto-axis mesh, as the train step
    uses): same loss as unsharded, gradients keep the batch sharding. A
    subprocess, since the device count must be set before jax starts."""
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, "tests")
        import numpy as np, jax
        from jax.sharding import NamedSharding, PartitionSpec as P
        from test_losses import _model_shaped, CFG
        from lidia_jax.objective import compute_loss, init_memory
        assert jax.device_count() == 2
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        put = lambda x, s: jax.device_put(x, NamedSharding(mesh, s))
        o, b = _model_shaped(0)
        mem = init_memory(CFG.loss.memory_size, CFG.model.acl_dim)
        f = jax.jit(jax.value_and_grad(
            lambda o, b, m, r: compute_loss(o, b, m, r, CFG), has_aux=True))
        key = jax.random.PRNGKey(0)
        (ref, _), _ = f(o, b, mem, key)
        (loss, aux), g = f({k: put(v, P(None, "data")) for k, v in o.items()},
                           {k: put(v, P("data")) for k, v in b.items()},
                           jax.tree.map(lambda x: put(x, P()), mem), key)
        np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
        assert g["masks"].sharding.spec[1] == "data", g["masks"].sharding
        print("OK")
    """)
    env = host_devices_env(2)
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout
