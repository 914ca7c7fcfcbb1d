"""Exact linear sum assignment (Hungarian algorithm) in pure JAX.

Shortest augmenting path with row/column potentials (Jonker-Volgenant style, the
O(M^2 N) formulation of the classic e-maxx algorithm; scenic's
`model_lib/matchers/hungarian_jax.py` follows the same approach). Everything is
`lax` control flow on fixed shapes: no host callback, so it compiles once per
shape, runs under `vmap`, and runs on every device of a sharded `jit`
(a scipy `pure_callback` would serialise the global batch on one host).
"""

import jax
import jax.numpy as jnp


def _sanitize(cost):
    """Replaces NaN/inf by a value larger than every finite cost (never chosen
    over a finite one unless forced)."""
    finite = jnp.isfinite(cost)
    big = jnp.max(jnp.where(finite, jnp.abs(cost), 0.0)) * 2.0 + 1.0
    return jnp.where(finite, cost, big)


def hungarian(cost, valid=None):
    """Assigns a distinct query to every target, minimising the total cost.

    Args:
      cost: float [N, M], N >= M: cost[q, t] of giving query q to target t
        (rows = queries, columns = targets, as in Mask2Former's matcher).
        Costs should be finite; NaN/inf are replaced by a large finite value.
      valid: optional bool [M]; False marks a padded target. Padded targets
        are left out of the optimisation (the real targets get exactly the
        optimum of the reduced [N, M_valid] problem) and are then given the
        lowest-index queries not taken by a real target, in target order, so
        the result is still a permutation. Mask them out downstream.

    Returns:
      int32 [M]: index of the query assigned to each target.

    Works under `jit` / `vmap` (e.g. `jax.vmap(hungarian)(cost [B, N, M],
    valid [B, M])`). Ties are broken towards the lowest query index.
    """
    n_queries, n_targets = cost.shape
    if n_queries < n_targets:
        raise ValueError(f"hungarian: cost has shape {cost.shape}; needs "
                         f"N (queries) >= M (targets).")
    if valid is None:
        valid = jnp.ones((n_targets,), bool)
    if not jnp.issubdtype(cost.dtype, jnp.floating):
        cost = cost.astype(jnp.float32)
    dtype = cost.dtype
    # Rows = targets (the smaller side), columns = queries; 1-based with a
    # dummy row/column 0 as in the textbook formulation.
    a = _sanitize(cost).T  # [M, N]
    # Zeros that depend on the inputs: under vmap every carry is then batched
    # (and sharded like the input) from the start, which sharding-in-types
    # (explicit mesh axes) requires of loop carries and scatter operands.
    zero_f = a[0, 0] * 0
    zero_i = valid[0].astype(jnp.int32) * 0
    inf = jnp.array(jnp.inf, dtype)

    def add_row(i, state):
        u, v, p = state  # u [M+1], v [N+1], p [N+1]: row matched to column j
        # An invalid (padded) row starts with p[0] = 0: both loops exit at once.
        p = p.at[0].set(jnp.where(valid[i - 1], i, 0))

        def search_cond(s):
            _, _, p_, _, _, _, j0 = s
            return p_[j0] != 0

        def search_step(s):
            # One Dijkstra step on reduced costs: grow the alternating tree by
            # the unused column with the smallest tentative distance.
            u_, v_, p_, used, minv, way, j0 = s
            used = used.at[j0].set(True)
            i0 = p_[j0]
            cur = a[i0 - 1] - u_[i0] - v_[1:]  # [N]
            cur = jnp.concatenate([inf[None], cur])
            better = (~used) & (cur < minv)
            minv = jnp.where(better, cur, minv)
            way = jnp.where(better, j0, way)
            masked = jnp.where(used, inf, minv)
            j1 = jnp.argmin(masked).astype(jnp.int32)
            delta = masked[j1]
            # Potentials of the tree rows/columns move by delta; rows of
            # unused columns get +0 (p_ of an unused column is 0 or a row
            # outside the tree, and adding zero is harmless).
            u_ = u_.at[p_].add(jnp.where(used, delta, 0.0).astype(dtype))
            v_ = jnp.where(used, v_ - delta, v_)
            minv = jnp.where(used, minv, minv - delta)
            return u_, v_, p_, used, minv, way, j1

        init = (u, v, p, jnp.zeros((n_queries + 1,), bool) & (zero_i > 0),
                jnp.full((n_queries + 1,), inf, dtype) + zero_f,
                jnp.zeros((n_queries + 1,), jnp.int32) + zero_i, zero_i)
        u, v, p, _, _, way, j0 = jax.lax.while_loop(search_cond, search_step,
                                                    init)

        def augment_step(s):
            p_, j = s
            j_prev = way[j]
            return p_.at[j].set(p_[j_prev]), j_prev

        p, _ = jax.lax.while_loop(lambda s: s[1] != 0, augment_step, (p, j0))
        return u, v, p

    state = (jnp.zeros((n_targets + 1,), dtype) + zero_f,
             jnp.zeros((n_queries + 1,), dtype) + zero_f,
             jnp.zeros((n_queries + 1,), jnp.int32) + zero_i)
    _, _, p = jax.lax.fori_loop(1, n_targets + 1, add_row, state)

    row_of_col = p[1:]  # [N], 1-based target of each query, 0 if free
    assigned = (jnp.zeros((n_targets,), jnp.int32) + zero_i).at[
        jnp.where(row_of_col > 0, row_of_col - 1, n_targets)].set(
            jnp.arange(n_queries, dtype=jnp.int32) + zero_i, mode="drop")
    # Padded targets: the free queries in increasing index order.
    free_first = jnp.argsort(row_of_col > 0, stable=True).astype(jnp.int32)
    pad_rank = jnp.cumsum(~valid) - 1
    return jnp.where(valid, assigned,
                     free_first[jnp.clip(pad_rank, 0, n_queries - 1)])
