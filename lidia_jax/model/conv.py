"""N-D convolution (NDHWC, 'SAME' padding) with a switchable implementation.

Every convolution of the network goes through `Conv`, so that the formulation that is fastest on
the backend at hand can be chosen by `config.model.conv_impl` without touching the architecture:

  "xla"     lax.conv_general_dilated: XLA's native convolution. Fastest on GPU and TPU.
  "matmul"  im2col: the prod(kernel) shifted (strided) views of the padded input are concatenated
            on the channel axis, and the convolution is ONE matrix product
              y[n, o] = sum_{t, c} x_pad[n + t, c] * W[t, c, o],   n = output voxel, t = tap,
            [N, T*C_in] @ [T*C_in, C_out]. XLA:CPU's native 3-D convolution (and above all its
            two backward convolutions) runs far below the matmul rate on x86 CPUs; the single
            big dot runs at Eigen's GEMM rate, and its transpose (the backward pass) is again
            two dots plus slice-adds. Costs T times the input in memory (the im2col buffer,
            kept for the backward pass).
  "auto"    "matmul" on the CPU backend, unless one im2col buffer would exceed
            `AUTO_MAX_IM2COL_BYTES` (then "xla", to bound memory); "xla" on GPU/TPU.

All implementations declare the same parameters, `kernel` [*k, C_in, C_out] and `bias` [C_out]
(flax nn.Conv's names and layout), so checkpoints are interchangeable between them.

Measured with scripts/benchmark_unet.py (jaxlib 0.10.2 vs torch 2.13.0+cpu, 2 cores, JAX time /
PyTorch time, medians of 5; scripts/results/unet_cpu_idle.md): on an idle machine, the U-Net
training step (stages 16-128, patch 32x64x64, batch 2) is xla 6.7 -> matmul 3.4 of
PlainConvUNet, and issue 7's two blocks on [2, 64, 64, 64, 4] xla 2.1 -> matmul 1.47. Beside
other jobs the ratios shrink (U-Net 1.0-1.5, two blocks 1.06), because PyTorch slows more.
Formulations that lost on this CPU: the sum of 27 per-tap dots (3-10x slower, 40 s compiles),
im2col over the x or (y, x) taps only with 9 or 3 dots, shifting the dot's outputs instead of
its inputs (a dot to [.., k, C_out] and slice-adds: slower, and the backward needs far more
memory), im2col in channel-first layout ([T*C_in, N], contiguous per-tap copies, plus two
transposes), bfloat16 products (Eigen's bf16 GEMM runs at half the fp32 rate here), and
XLA:CPU flags on the native convolution (xla_cpu_use_onednn, xla_cpu_use_xnnpack,
xla_cpu_experimental_{xnn,ynn}_fusion_type=individual_convolution: no gain).
"""

import itertools
import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "xla", "matmul")

# "auto" falls back to the native convolution above this im2col size (bytes, one call), so
# that e.g. CPU inference with the paper's 48x192x192 patches does not allocate ~12 GB buffers.
AUTO_MAX_IM2COL_BYTES = 2 << 30


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, Tuple[int, int]]:
    """TensorFlow/flax 'SAME': output ceil(size/stride), padding split low = total // 2.

    Returns (output size, (pad_low, pad_high)).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, (total // 2, total - total // 2)


def im2col_bytes(x_shape: Sequence[int], kernel_size: Sequence[int],
                 strides: Sequence[int], itemsize: int) -> int:
    """Size in bytes of the im2col buffer that the "matmul" implementation builds."""
    outs = [same_padding(n, k, s)[0] for n, k, s in zip(x_shape[1:-1], kernel_size, strides)]
    return x_shape[0] * math.prod(outs) * math.prod(kernel_size) * x_shape[-1] * itemsize


def resolve_impl(impl: str, x_shape: Optional[Sequence[int]] = None,
                 kernel_size: Optional[Sequence[int]] = None,
                 strides: Optional[Sequence[int]] = None, itemsize: int = 4) -> str:
    """Maps "auto" to the implementation used on `jax.default_backend()`; checks the name."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl {impl!r} (config.model.conv_impl): expected one of {IMPLS}")
    if impl != "auto":
        return impl
    if jax.default_backend() != "cpu":
        return "xla"
    if x_shape is not None and im2col_bytes(x_shape, kernel_size, strides,
                                            itemsize) > AUTO_MAX_IM2COL_BYTES:
        return "xla"
    return "matmul"


def conv_xla(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
             precision=None) -> jax.Array:
    """XLA's native convolution. x [B, *S, C_in], kernel [*k, C_in, C_out] -> [B, *S/s, C_out]."""
    nd = x.ndim - 2
    spatial = "DHW"[-nd:] if nd <= 3 else None
    if spatial is None:
        raise ValueError(f"conv: 1 to 3 spatial axes supported, got input shape {x.shape}")
    dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    return lax.conv_general_dilated(x, kernel, tuple(strides), "SAME", dimension_numbers=dn,
                                    precision=precision)


def conv_matmul(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                precision=None) -> jax.Array:
    """im2col convolution, equal to `conv_xla` (see module docstring).

    x [B, *S, C_in], kernel [*k, C_in, C_out] -> [B, *ceil(S/s), C_out].
    """
    ksize, (c_in, c_out) = kernel.shape[:-2], kernel.shape[-2:]
    nd = len(ksize)
    outs, pads = zip(*[same_padding(n, k, s) for n, k, s in zip(x.shape[1:-1], ksize, strides)])
    if any(p != (0, 0) for p in pads):
        x = jnp.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
    # One strided view per tap, in the row-major order of kernel.reshape(-1, C_in, C_out).
    views = []
    for tap in itertools.product(*[range(k) for k in ksize]):
        start = (0,) + tap + (0,)
        limit = ((x.shape[0],) + tuple(t + (o - 1) * s + 1 for t, o, s in zip(tap, outs, strides))
                 + (c_in,))
        views.append(lax.slice(x, start, limit, (1,) + tuple(strides) + (1,)))
    col = views[0] if len(views) == 1 else jnp.concatenate(views, axis=-1)
    w = kernel.reshape(len(views) * c_in, c_out)
    return lax.dot_general(col, w, (((nd + 1,), (0,)), ((), ())), precision=precision)


def conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1),
         impl: str = "auto", precision=None) -> jax.Array:
    """'SAME' convolution by the implementation `impl` (see module docstring).

    x [B, *S, C_in], kernel [*k, C_in, C_out] (same dtype) -> [B, *ceil(S/s), C_out].
    """
    strides = tuple(int(s) for s in strides)
    ksize = tuple(kernel.shape[:-2])
    if x.ndim - 2 != len(ksize) or len(strides) != len(ksize) or x.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"conv: input {x.shape}, kernel {kernel.shape}, strides {strides} do not "
                         "match (expected x [B, *S, C_in], kernel [*k, C_in, C_out], "
                         "one stride per spatial axis)")
    impl = resolve_impl(impl, x.shape, ksize, strides, x.dtype.itemsize)
    if impl == "xla":
        return conv_xla(x, kernel, strides, precision)
    return conv_matmul(x, kernel, strides, precision)


class Conv(nn.Module):
    """N-D convolution, NDHWC, 'SAME' padding. Parameters: kernel [*k, C_in, C_out], bias [C_out].

    x [B, D, H, W, C_in] -> [B, ceil(D/s_z), ceil(H/s_y), ceil(W/s_x), features] in `dtype`.
    impl: "auto" | "xla" | "matmul" (module docstring). Parameters are stored in `param_dtype`
    and cast to `dtype` for the product, as flax nn.Conv does.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1, 1)
    use_bias: bool = True
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.he_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros_init()
    param_dtype: jnp.dtype = jnp.float32
    precision: Optional[lax.Precision] = None

    @nn.compact
    def __call__(self, x):
        ksize = tuple(int(k) for k in self.kernel_size)
        if len(ksize) != x.ndim - 2:
            raise ValueError(f"Conv {self.name}: kernel_size {ksize} needs {len(ksize) + 2}-D "
                             f"input [B, *spatial, C], got {x.shape}")
        kernel = self.param("kernel", self.kernel_init, ksize + (x.shape[-1], self.features),
                            self.param_dtype)
        y = conv(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.impl,
                 self.precision)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
