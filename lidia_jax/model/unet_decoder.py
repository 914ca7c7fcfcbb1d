"""Per-voxel baseline head: nnU-Net's U-Net decoder (PlainConvUNet's UNetDecoder), NDHWC."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from lidia_jax.model.layers import ContextBlock, TransposedConvUp, conv3d


class UNetDecoder(nn.Module):
    """From the coarsest encoder stage up: transposed-conv upsampling (kernel = stride of the
    stage below), concatenation with the skip, two conv blocks, and a 1x1x1 segmentation head at
    every decoder level (deep supervision).

    skips: encoder outputs, finest first, [B, D_i, H_i, W_i, features[i]].
    Returns dict
      seg_logits     [B, D_0, H_0, W_0, num_outputs]   (float32; stage 0 = input resolution)
      seg_logits_ds  tuple of [B, D_i, H_i, W_i, num_outputs], i = 1 .. n-2, finest first
    """

    features: Sequence[int]
    kernel_sizes: Sequence[Sequence[int]]
    strides: Sequence[Sequence[int]]
    num_outputs: int = 10
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, skips):
        n = len(skips)
        if n < 2:
            raise ValueError("UNetDecoder: the encoder needs at least 2 stages "
                             "(config.model.strides)")
        x = skips[-1]
        outs = []  # coarsest decoder level first
        for s in range(n - 2, -1, -1):
            x = TransposedConvUp(self.features[s], tuple(self.strides[s + 1]), impl=self.impl,
                                 dtype=self.dtype, name=f"up_{s}")(x)
            x = jnp.concatenate([x, skips[s].astype(x.dtype)], axis=-1)
            x = ContextBlock(self.features[s], tuple(self.kernel_sizes[s]), impl=self.impl,
                             dtype=self.dtype, name=f"level_{s}")(x)
            seg = conv3d(self.num_outputs, (1, 1, 1), impl=self.impl, dtype=self.dtype,
                         name=f"seg_head_{s}")(x)
            outs.append(seg.astype(jnp.float32))
        outs = outs[::-1]  # finest first
        return {"seg_logits": outs[0], "seg_logits_ds": tuple(outs[1:])}
