"""Pixel encoder: nnU-Net's PlainConvUNet encoder (dynamic-network-architectures), NDHWC."""

from typing import Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from lidia_jax.model.layers import ContextBlock


def stage_features(num_stages: int, base: int, maximum: int) -> Tuple[int, ...]:
    """nnU-Net's feature schedule: min(maximum, base * 2**i) for stage i."""
    return tuple(min(maximum, base * 2 ** i) for i in range(num_stages))


class Encoder(nn.Module):
    """Stages of two conv -> instance norm -> LeakyReLU(0.01) blocks; the first conv of stage i
    has stride strides[i] (nnU-Net plans stride 1 for stage 0), kernels kernel_sizes[i] per axis.

    x [B, D, H, W, C] -> list over stages of [B, D_i, H_i, W_i, features[i]], finest first,
    where D_i = D / prod_{j <= i} strides[j][0] (likewise H, W).
    `remat=True` rematerialises each stage in the backward pass (memory for compute).
    """

    features: Sequence[int]
    kernel_sizes: Sequence[Sequence[int]]
    strides: Sequence[Sequence[int]]
    remat: bool = False
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not (len(self.features) == len(self.kernel_sizes) == len(self.strides)):
            raise ValueError(
                f"Encoder: config.model.kernel_sizes ({len(self.kernel_sizes)} stages) and "
                f"config.model.strides ({len(self.strides)} stages) must have one entry per "
                f"stage ({len(self.features)})")
        stage_cls = nn.remat(ContextBlock) if self.remat else ContextBlock
        skips = []
        for i, (f, k, s) in enumerate(zip(self.features, self.kernel_sizes, self.strides)):
            x = stage_cls(f, tuple(k), tuple(s), impl=self.impl, dtype=self.dtype,
                          name=f"stage_{i}")(x)
            skips.append(x)
        return skips
