"""ACL (Eq. 3-5), SupCon and the memory bank against plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lidia_jax.objective import contrastive_loss
from lidia_jax.objective import init_memory
from lidia_jax.objective import update_memory

OTHERS = 8
TAU = 0.1


def np_contrastive(embed, label, valid, bank, kind):
    """Loop over anchors and pairs, written from the paper's equations."""
    cands = [(embed[j], label[j], ("cur", j)) for j in range(len(label))
             if valid[j]]
    if bank is not None:
        cands += [(bank["embed"][j], bank["label"][j], ("bank", j))
                  for j in range(len(bank["label"])) if bank["valid"][j]]
    losses = []
    for i in range(len(label)):
        if not valid[i]:
            continue
        others = [(z, y) for z, y, tag in cands if tag != ("cur", i)]
        s = lambda z: float(np.dot(embed[i], z)) / TAU  # noqa: E731
        if kind == "acl" and label[i] == OTHERS:
            # Eq. 5: log sum over common samples only.
            common = [s(z) for z, y in others if y != OTHERS]
            if common:
                losses.append(np.log(np.sum(np.exp(common))))
            continue
        pos = [s(z) for z, y in others if y == label[i]]
        if not pos:
            continue
        log_den = np.log(np.sum([np.exp(s(z)) for z, _ in others]))
        losses.append(-np.mean([p - log_den for p in pos]))  # Eq. 4
    return np.mean(losses) if losses else 0.0  # Eq. 3


def _unit(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _bank(rng, size, dim, filled):
    bank = {"embed": _unit(rng, (size, dim)),
            "label": rng.integers(1, 9, size),
            "valid": np.arange(size) < filled,
            "ptr": np.int32(filled % size)}
    return bank


def _jax(bank):
    return None if bank is None else {k: jnp.asarray(v) for k, v in
                                      bank.items()}


@pytest.mark.parametrize("kind", ["acl", "supcon"])
@pytest.mark.parametrize("with_bank", [False, True])
def test_matches_loop(kind, with_bank):
    rng = np.random.default_rng(0)
    for trial in range(4):
        n, e = 10, 5
        embed = _unit(rng, (n, e))
        label = rng.choice([1, 1, 2, 3, OTHERS, OTHERS], n)
        valid = rng.random(n) < 0.8
        bank = _bank(rng, 12, e, filled=7 + trial) if with_bank else None
        got = contrastive_loss(jnp.asarray(embed, jnp.float32),
                               jnp.asarray(label), jnp.asarray(valid),
                               _jax(bank), TAU, OTHERS, kind)
        want = np_contrastive(embed, label, valid, bank, kind)
        np.testing.assert_allclose(float(got), want, rtol=2e-5, atol=1e-5)


def test_no_anchor_gives_zero():
    embed = jnp.asarray(_unit(np.random.default_rng(1), (3, 4)), jnp.float32)
    for kind in ("acl", "supcon"):
        got = contrastive_loss(embed, jnp.array([1, 2, 3]),
                               jnp.ones(3, bool), None, TAU, OTHERS, kind)
        assert float(got) == 0.0
    with pytest.raises(ValueError, match="config.loss.contrastive"):
        contrastive_loss(embed, jnp.array([1, 2, 3]), jnp.ones(3, bool), None,
                         TAU, OTHERS, "triplet")


def _pair_apart(base, axis_a, axis_b, angle):
    """Two unit vectors that share `base`'s projection on axes 0..2 and split
    their remainder over two spare axes: their dot products with any vector
    living on axes 0..2 are unchanged, their mutual similarity drops."""
    a, b = base.copy(), base.copy()
    r = np.sqrt(1 - np.sum(base[:3] ** 2))
    a[3:] = 0
    b[3:] = 0
    a[axis_a] = r
    b[axis_a] = r * np.cos(angle)
    b[axis_b] = r * np.sin(angle)
    return a, b


def test_acl_asymmetry():
    """Pulling two "others" apart changes nothing; two HCC apart costs."""
    rng = np.random.default_rng(2)
    dim = 6
    common = np.zeros((3, dim))
    common[:, :3] = _unit(rng, (3, 3))
    base = np.zeros(dim)
    base[:3] = _unit(rng, 3) * 0.6

    def loss(pair_label, angle):
        a, b = _pair_apart(base, 3, 4, angle)
        embed = np.concatenate([common, [a, b]])
        label = np.array([2, 3, 4, pair_label, pair_label])
        return float(contrastive_loss(jnp.asarray(embed, jnp.float32),
                                      jnp.asarray(label), jnp.ones(5, bool),
                                      None, TAU, OTHERS, "acl"))

    np.testing.assert_allclose(loss(OTHERS, 0.0), loss(OTHERS, 1.5),
                               rtol=1e-6)
    assert loss(1, 1.5) > loss(1, 0.0) + 0.1  # HCC = class index 1
    # SupCon treats "others" as a class: pulling them apart costs there.
    sup = lambda angle: float(contrastive_loss(  # noqa: E731
        jnp.asarray(np.concatenate([common, _pair_apart(base, 3, 4, angle)]),
                    jnp.float32), jnp.asarray([2, 3, 4, OTHERS, OTHERS]),
        jnp.ones(5, bool), None, TAU, OTHERS, "supcon"))
    assert sup(1.5) > sup(0.0) + 0.1


def test_gradient_matches_finite_differences_and_bank_is_constant():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        embed = jnp.asarray(_unit(rng, (8, 4)), jnp.float64)
        label = jnp.asarray([1, 1, 2, OTHERS, OTHERS, 3, 2, 1])
        valid = jnp.asarray([1, 1, 1, 1, 1, 1, 0, 1], bool)
        bank = _jax(_bank(rng, 6, 4, 6))
        bank["embed"] = bank["embed"].astype(jnp.float64)
        for kind in ("acl", "supcon"):
            f = lambda x, m: contrastive_loss(x, label, valid, m, TAU,  # noqa
                                              OTHERS, kind)
            g = np.asarray(jax.grad(f)(embed, bank))
            for _ in range(4):
                d = rng.normal(size=embed.shape)
                fd = (f(embed + 1e-6 * d, bank) - f(embed - 1e-6 * d, bank)
                      ) / 2e-6
                np.testing.assert_allclose(np.sum(g * d), fd, rtol=1e-6,
                                           atol=1e-9)
            gm = jax.grad(lambda b: f(embed, dict(bank, embed=b)))(
                bank["embed"])
            assert float(jnp.abs(gm).sum()) == 0.0  # bank: stop_gradient


def test_memory_bank_holds_last_entries_in_order():
    size, dim = 7, 3
    rng = np.random.default_rng(4)
    memory = init_memory(size, dim)
    update = jax.jit(update_memory)
    seen_e, seen_l = [], []
    for step in range(9):
        n = 5 if step != 4 else 12  # one step larger than the bank
        embed = rng.normal(size=(n, dim)).astype(np.float32)
        label = rng.integers(1, 9, n)
        valid = rng.random(n) < 0.6
        memory = update(memory, jnp.asarray(embed), jnp.asarray(label),
                        jnp.asarray(valid))
        seen_e += list(embed[valid])
        seen_l += list(label[valid])
        filled = min(len(seen_l), size)
        assert int(memory["valid"].sum()) == filled
        assert int(memory["ptr"]) == len(seen_l) % size
        if len(seen_l) >= size:
            # Read circularly from ptr: oldest -> newest.
            order = (int(memory["ptr"]) + np.arange(size)) % size
            np.testing.assert_array_equal(np.asarray(memory["embed"])[order],
                                          np.array(seen_e[-size:]))
            np.testing.assert_array_equal(np.asarray(memory["label"])[order],
                                          np.array(seen_l[-size:]))
        else:
            np.testing.assert_array_equal(
                np.asarray(memory["embed"])[:filled], np.array(seen_e))
    assert len(seen_l) > 2 * size
