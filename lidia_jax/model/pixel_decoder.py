"""Pixel decoder: an FPN in 3-D (Mask2Former's BasePixelDecoder, as PLAN uses it), NDHWC."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidia_jax.model.layers import ConvNormAct, conv3d


def _output_kernel(kernel_size: Sequence[int]) -> tuple:
    """The "3x3" output conv of an FPN level, in 3-D: 3 along the axes where the encoder stage
    convolves, 1 where it does not (nnU-Net's in-plane kernels for anisotropic spacing)."""
    return tuple(3 if k > 1 else 1 for k in kernel_size)


class FPNPixelDecoder(nn.Module):
    """Top-down FPN over encoder stages coarsest .. `mask_stage`.

    coarsest stage: y = output_conv(x) (conv 3 -> norm -> act);
    every finer stage s: y = output_conv_s(lateral_s(x_s) + upsample_nearest(y)), lateral =
    1x1x1 conv -> norm (Mask2Former).
    skips: encoder outputs, finest first, [B, D_i, H_i, W_i, F_i].
    Returns (multi_scale, mask_features):
      multi_scale   list of `num_scales` maps [B, d_l, h_l, w_l, conv_dim], COARSEST first
                    (the FPN outputs of the num_scales coarsest stages)
      mask_features [B, D_m, H_m, W_m, mask_dim], m = mask_stage (3-D conv of the FPN output)
    """

    conv_dim: int
    mask_dim: int
    num_scales: int
    mask_stage: int
    kernel_sizes: Sequence[Sequence[int]]
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, skips):
        n = len(skips)
        if not 0 <= self.mask_stage < n:
            raise ValueError(f"config.model.mask_stride_stage={self.mask_stage} is not an "
                             f"encoder stage (0..{n - 1})")
        if not 1 <= self.num_scales <= n - self.mask_stage:
            raise ValueError(
                f"config.model.num_scales={self.num_scales} needs that many encoder stages "
                f"from the coarsest down to mask_stride_stage={self.mask_stage}; the encoder "
                f"has {n} stages (config.model.strides)")
        outs = {}
        y = None
        for s in range(n - 1, self.mask_stage - 1, -1):
            kernel = _output_kernel(self.kernel_sizes[s])
            if y is None:
                y = skips[s]
            else:
                lateral = ConvNormAct(self.conv_dim, (1, 1, 1), activation=False,
                                      impl=self.impl, dtype=self.dtype,
                                      name=f"lateral_{s}")(skips[s])
                up = jax.image.resize(y, y.shape[:1] + lateral.shape[1:4] + y.shape[-1:],
                                      method="nearest")
                y = lateral + up
            y = ConvNormAct(self.conv_dim, kernel, impl=self.impl, dtype=self.dtype,
                            name=f"output_{s}")(y)
            outs[s] = y
        multi_scale = [outs[s] for s in range(n - 1, n - 1 - self.num_scales, -1)]
        mask_features = conv3d(self.mask_dim, _output_kernel(self.kernel_sizes[self.mask_stage]),
                               impl=self.impl, dtype=self.dtype,
                               name="mask_features")(outs[self.mask_stage])
        return multi_scale, mask_features
