"""The train state: one pytree holding everything a step reads and writes."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


class TrainState(flax.struct.PyTreeNode):
    """Everything that is checkpointed, as one printable pytree.

    Attributes:
      step: int32 [] optimiser steps taken (skipped non-finite steps included).
      params: model parameters (float32).
      opt_state: optax state of the base optimiser (and SAM's, when on).
      memory: the ACL memory bank {"embed" [S, E], "label" [S], "valid" [S], "ptr" []}.
      rng: PRNG key [2] for the losses' point sampling.
      nonfinite_in_a_row: int32 [] consecutive steps whose loss or gradient was not finite.
      nonfinite_total: int32 [] all such skipped steps.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    memory: Any
    rng: jax.Array
    nonfinite_in_a_row: jax.Array
    nonfinite_total: jax.Array

    @classmethod
    def create(cls, params, tx, memory, rng):
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                   memory=memory, rng=rng, nonfinite_in_a_row=jnp.zeros((), jnp.int32),
                   nonfinite_total=jnp.zeros((), jnp.int32))
