"""lidia_jax.matching.hungarian against scipy.optimize.linear_sum_assignment."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from conftest import ROOT, host_devices_env
from lidia_jax.matching import hungarian

_batched = jax.jit(jax.vmap(hungarian))

# (queries N, targets M): square, rectangular, degenerate.
SHAPES = [(1, 1), (3, 3), (7, 7), (6, 2), (9, 4), (12, 12), (50, 20), (20, 1)]


def _draw(rng, kind, shape):
    if kind == "uniform":
        return rng.random(shape)
    if kind == "integer":  # many ties
        return rng.integers(0, 4, shape).astype(float)
    if kind == "signed":
        return rng.normal(size=shape) * 10.0
    if kind == "range":  # 1e-6 .. 1e6
        return 10.0 ** rng.uniform(-6, 6, shape)
    raise ValueError(kind)


def _check_optimal(costs, assigned, atol):
    """Each row of `assigned` must be a valid assignment whose total cost
    equals scipy's optimum (up to `atol` per matrix)."""
    for c, a in zip(costs, assigned):
        n, m = c.shape
        assert a.shape == (m,) and a.dtype == np.int32
        assert len(set(a.tolist())) == m and a.min() >= 0 and a.max() < n
        rows, cols = linear_sum_assignment(c)
        best = c[rows, cols].sum()
        ours = c[a, np.arange(m)].sum()
        assert ours >= best - atol
        assert ours <= best + atol, (c, a, rows, cols)


@pytest.mark.parametrize("kind", ["uniform", "integer", "signed", "range"])
def test_total_cost_equals_scipy(kind):
    rng = np.random.default_rng({"uniform": 0, "integer": 1, "signed": 2,
                                 "range": 3}[kind])
    total = 0
    for shape in SHAPES:
        batch = 150
        costs = _draw(rng, kind, (batch,) + shape).astype(np.float32)
        assigned = np.asarray(_batched(costs))
        # float32 potentials: optimal up to rounding of the largest entry.
        atol = 1e-5 * max(1.0, np.abs(costs).max()) * shape[1]
        _check_optimal(costs.astype(np.float64), assigned, atol)
        total += batch
    assert total >= 1000


def test_float64_is_exact_over_huge_dynamic_range():
    with jax.enable_x64(True):
        rng = np.random.default_rng(4)
        costs = 10.0 ** rng.uniform(-6, 6, (200, 9, 6))
        assigned = np.asarray(jax.jit(jax.vmap(hungarian))(
            jnp.asarray(costs, jnp.float64)))
    _check_optimal(costs, assigned, atol=1e-9 * 6)


def test_padded_targets_do_not_disturb_real_ones():
    rng = np.random.default_rng(5)
    n, m = 10, 6
    costs = rng.random((300, n, m)).astype(np.float32)
    valid = rng.random((300, m)) < 0.6
    valid[:, 0] = True
    # Padded columns hold garbage that would attract queries if considered.
    costs = np.where(valid[:, None, :], costs, -100.0).astype(np.float32)
    assigned = np.asarray(jax.jit(jax.vmap(hungarian))(costs, valid))
    for c, v, a in zip(costs, valid, assigned):
        assert len(set(a.tolist())) == m
        real = np.flatnonzero(v)
        sub = c[:, real]
        rows, cols = linear_sum_assignment(sub)
        np.testing.assert_allclose(c[a[real], real].sum(),
                                   sub[rows, cols].sum(), rtol=1e-5)
        # Documented: padded targets take the free queries, lowest first.
        free = sorted(set(range(n)) - set(a[real].tolist()))
        np.testing.assert_array_equal(a[~v], free[:(~v).sum()])


def test_all_padded_and_non_finite():
    a = np.asarray(hungarian(jnp.zeros((4, 3)), jnp.zeros((3,), bool)))
    np.testing.assert_array_equal(a, [0, 1, 2])
    c = np.array([[np.inf, 1.0], [2.0, np.nan], [5.0, 5.0]], np.float32)
    # inf/nan are treated as very expensive: the finite pairing wins.
    np.testing.assert_array_equal(np.asarray(hungarian(c)), [1, 0])


def test_rejects_more_targets_than_queries():
    with pytest.raises(ValueError, match="N \\(queries\\) >= M"):
        hungarian(jnp.zeros((2, 3)))


def test_compiles_once_per_shape():
    traces = []

    def counted(c):
        traces.append(c.shape)
        return hungarian(c)

    f = jax.jit(counted)
    rng = np.random.default_rng(6)
    for _ in range(5):
        f(rng.random((8, 5)).astype(np.float32))
    assert len(traces) == 1
    f(rng.random((9, 5)).astype(np.float32))
    assert len(traces) == 2


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_runs_in_a_sharded_jit(axis_type):
    """4 host devices, cost batch sharded along the batch axis (subprocess:
    the device count must be set before jax initialises)."""
    code = textwrap.dedent("""
        import numpy as np, jax, jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P
        from scipy.optimize import linear_sum_assignment
        from lidia_jax.matching import hungarian
        assert jax.device_count() == 4, jax.devices()
        import sys
        if sys.argv[1] == "explicit":  # sharding in types (make_mesh default)
            mesh = jax.make_mesh((4,), ("data",),
                                 axis_types=(jax.sharding.AxisType.Explicit,))
        else:
            mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
        rng = np.random.default_rng(0)
        costs = rng.random((8, 12, 5)).astype(np.float32)
        valid = np.ones((8, 5), bool); valid[::3, 4] = False
        sh = NamedSharding(mesh, P("data"))
        c = jax.device_put(costs, sh); v = jax.device_put(valid, sh)
        with jax.set_mesh(mesh):
            out = jax.jit(jax.vmap(hungarian), out_shardings=sh)(c, v)
        assert len(out.sharding.device_set) == 4
        out = np.asarray(out)
        for cc, vv, a in zip(costs, valid, out):
            sub = cc[:, vv]
            r, k = linear_sum_assignment(sub)
            assert abs(cc[a[vv], np.flatnonzero(vv)].sum() - sub[r, k].sum()) < 1e-5
        print("OK")
    """)
    env = host_devices_env(4)
    res = subprocess.run([sys.executable, "-c", code, axis_type], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "OK" in res.stdout
