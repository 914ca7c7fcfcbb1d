"""3-D convolution with a switchable implementation.

Every convolution of the network goes through `Conv`, so that the formulation that is fastest on
the backend at hand (XLA's native convolution on GPU/TPU; a CPU-friendly one on the CPU) can be
chosen by `config.model.conv_impl` without touching the architecture.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Conv(nn.Module):
    """N-D convolution, NDHWC, 'SAME' padding. Parameters: kernel [*k, C_in, C_out], bias [C_out].

    impl: "xla" (lax.conv_general_dilated), "auto" (best for the default backend).
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1, 1)
    use_bias: bool = True
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.he_normal()

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.features, tuple(self.kernel_size), strides=tuple(self.strides),
                       padding="SAME", use_bias=self.use_bias, dtype=self.dtype,
                       kernel_init=self.kernel_init, name="conv")(x)
