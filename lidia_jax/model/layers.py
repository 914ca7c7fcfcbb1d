"""Building blocks shared by every part of the network (NDHWC).

Parameters carry logical axis names (flax `nn.with_logical_partitioning`), mapped to mesh axes
by `lidia_jax.model.partitioning.LOGICAL_AXIS_RULES`. Activations run in `dtype` (float32 or
bfloat16), parameters are float32, normalisation statistics are always float32.
"""

from typing import Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from lidia_jax.model.conv import Conv

# Logical names of a 3-D conv kernel [kz, ky, kx, C_in, C_out].
CONV_AXES = (None, None, None, "conv_in", "conv_out")


def conv_kernel_init(init=nn.initializers.he_normal()):
    """He-normal (nnU-Net's kaiming_normal, a=1e-2 is within 0.01 %) with logical axis names."""
    return nn.with_logical_partitioning(init, CONV_AXES)


def conv3d(features: int, kernel_size: Sequence[int], strides: Sequence[int] = (1, 1, 1),
           use_bias: bool = True, impl: str = "auto", dtype=jnp.float32,
           bias_init=nn.initializers.zeros_init(), name: str | None = None) -> Conv:
    """A `conv.Conv` (the one switchable 3-D convolution) with partitioned kernel and bias."""
    return Conv(features=features, kernel_size=tuple(kernel_size), strides=tuple(strides),
                use_bias=use_bias, impl=impl, dtype=dtype, kernel_init=conv_kernel_init(),
                bias_init=nn.with_logical_partitioning(bias_init, ("conv_out",)), name=name)


def dense(features: int, axes: Tuple[str, str], dtype=jnp.float32, use_bias: bool = True,
          kernel_init=nn.initializers.lecun_normal(), name: str | None = None) -> nn.Dense:
    """nn.Dense whose kernel [in, out] and bias [out] carry logical axis names `axes`."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           (axes[1],)),
                    name=name)


def layer_norm(name: str | None = None) -> nn.LayerNorm:
    """LayerNorm computed in float32 (eps 1e-5 as torch), partitioned scale/bias."""
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=jnp.float32,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("norm",)),
                        name=name)


class InstanceNorm(nn.Module):
    """Instance normalisation (nnU-Net: eps 1e-5, affine), statistics in float32.

    x: [B, D, H, W, C] -> [B, D, H, W, C] in `dtype`. Each sample and channel is normalised over
    its own voxels, so samples in a batch never influence each other (needed for batches that
    mix phase masks).
    """

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                                 ("norm",)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("norm",)), (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        axes = tuple(range(1, x.ndim - 1))
        mean = jnp.mean(x32, axis=axes, keepdims=True)
        # Two-pass variance: no cancellation for large-mean activations.
        var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
        y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
        return (y * scale + bias).astype(self.dtype)


class ConvNormAct(nn.Module):
    """nnU-Net conv block: 3-D conv -> InstanceNorm -> LeakyReLU(0.01).

    x: [B, D, H, W, C_in] -> [B, D/s_z, H/s_y, W/s_x, features]. `activation=False` gives
    conv -> norm (the FPN lateral convolution of Mask2Former).
    """

    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    strides: Sequence[int] = (1, 1, 1)
    activation: bool = True
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = conv3d(self.features, self.kernel_size, self.strides, use_bias=True,
                   impl=self.impl, dtype=self.dtype, name="conv")(x)
        x = InstanceNorm(dtype=self.dtype, name="norm")(x)
        if self.activation:
            x = nn.leaky_relu(x, negative_slope=0.01)
        return x


class ContextBlock(nn.Module):
    """Two ConvNormAct blocks: the context-specific block F_p of Eq. (1), also an encoder stage.

    x: [B, D, H, W, C_in] -> [B, D/s, H/s, W/s, features]; the first conv carries `strides`.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    strides: Sequence[int] = (1, 1, 1)
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = ConvNormAct(self.features, self.kernel_size, self.strides, impl=self.impl,
                        dtype=self.dtype, name="block0")(x)
        return ConvNormAct(self.features, self.kernel_size, (1, 1, 1), impl=self.impl,
                           dtype=self.dtype, name="block1")(x)


class TransposedConvUp(nn.Module):
    """Transposed 3-D convolution with kernel == stride (nnU-Net's decoder upsampling).

    With non-overlapping windows the transposed convolution is exactly a 1x1x1 convolution to
    features * prod(strides) channels followed by a depth-to-space rearrangement:
      out[b, z*sz+i, y*sy+j, x*sx+k, o] = sum_c x[b, z, y, x, c] * W[i, j, k, c, o] + bias[o].
    Writing it so keeps every 3-D convolution on `conv.Conv`. Parameters equal torch's
    ConvTranspose3d(C_in, features, strides, strides): kernel [C_in, sz*sy*sx*features], bias.

    x: [B, D, H, W, C_in] -> [B, D*sz, H*sy, W*sx, features].
    """

    features: int
    strides: Sequence[int]
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        sz, sy, sx = self.strides
        b, d, h, w, _ = x.shape
        y = conv3d(sz * sy * sx * self.features, (1, 1, 1), use_bias=False, impl=self.impl,
                   dtype=self.dtype, name="conv")(x)
        y = y.reshape(b, d, h, w, sz, sy, sx, self.features)
        y = y.transpose(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d * sz, h * sy, w * sx,
                                                        self.features)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("conv_out",)),
                          (self.features,), jnp.float32)
        return y + bias.astype(y.dtype)
