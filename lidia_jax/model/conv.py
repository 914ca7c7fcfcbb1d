"""N-D convolution (NDHWC, 'SAME' padding) with a switchable implementation.

Every convolution of the network goes through `Conv`, so that the formulation that is fastest on
the backend at hand can be chosen by `config.model.conv_impl` without touching the architecture:

  "xla"     lax.conv_general_dilated: XLA's native convolution. Fastest on GPU and TPU.
  "planes"  a 3-D convolution as a sum over the depth taps of native 2-D convolutions:
              y[:, z] = sum_{t_z} conv2d(x_pad[:, z * s_z + t_z], W[t_z]),
            with depth folded into the batch, [B * D_out, H, W, C] (when k_z * C_in is small, as
            in the first layer, or the planes are small, the depth taps are concatenated on the
            channel axis instead and ONE 2-D convolution with k_z * C_in input channels is done).
            The kernel gradient of each 2-D convolution is summed over chunks of the batch.
            XLA:CPU's 2-D convolutions and their gradients run near the matmul rate; its 3-D
            ones, and any im2col that materialises the taps, run far slower on x86 CPUs. Jit
            computations that use it with `compiler_options(impl)`: on the CPU, it keeps the
            2-D convolutions on XLA's own multi-threaded kernels (CPU_CONV_COMPILER_OPTIONS).
  "matmul"  im2col: the prod(kernel) shifted (strided) views of the padded input are concatenated
            on the channel axis, and the convolution is ONE matrix product
              y[n, o] = sum_{t, c} x_pad[n + t, c] * W[t, c, o],   n = output voxel, t = tap,
            [N, T*C_in] @ [T*C_in, C_out]. Costs T times the input in memory (the im2col buffer,
            kept for the backward pass); building it (XLA's concatenate of 27 strided views, and
            the page faults of a fresh buffer) takes most of its time.
  "auto"    "planes" for 3-D convolutions on the CPU backend, "xla" otherwise.

All implementations declare the same parameters, `kernel` [*k, C_in, C_out] and `bias` [C_out]
(flax nn.Conv's names and layout), so checkpoints are interchangeable between them.

Measured on a 2-core x86 CPU (jaxlib 0.10.2 against torch 2.13, 2026-11-27,
scripts/results/unet_cpu_idle.md): the demo-like U-Net training step (stages 16-128 on [2, 32, 64,
64, 4]) is 1.34x PlainConvUNet's with "planes", 7.7x with "matmul" and 7.8x with "xla"; issue 7's
two blocks 0.72x, 2.0x and 2.2x. Chunking the kernel gradient took "planes" from 2.40x to 1.82x,
and taking its 2-D convolutions out of YNNPACK (single-threaded here) from 1.82x to 1.34x.
Formulations that lost on this CPU: the sum of 27 per-tap dots (3-10x slower, 40 s compiles),
im2col over the x or (y, x) taps only with 9 or 3 dots, shifting the dot's outputs instead of its
inputs (in tap-minor and in channel-first tap-major layouts, also in cache-sized chunks under a
fori_loop: the [T*C_out, N] product with K = C_in is memory-bound), im2col by gather, im2col in
depth slabs under a fori_loop, the kernel gradient as one [T*C_in, N] @ [N, C_out] product,
bfloat16 products (Eigen's bf16 GEMM runs at half the fp32 rate here), other XLA:CPU flags
(xla_cpu_use_onednn, xla_cpu_use_xnnpack, xla_cpu_experimental_xnn_fusion_type; an empty
xla_cpu_experimental_ynn_fusion_type, which also takes dots out of YNNPACK: 1.90x), and
for "planes": one 2-D convolution to k_z * C_out channels whose outputs are summed depth-shifted,
splitting the input channels, explicit transposes in front of the kernel gradient, and chunking the
forward or input gradient. glibc's transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)
cut im2col's page faults but sped PyTorch up more.
"""

import functools
import itertools
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lidia_jax.model import partitioning

IMPLS = ("auto", "xla", "planes", "matmul")

# "planes" concatenates the depth taps on the channel axis (one 2-D convolution) when
# k_z * C_in is at most PLANES_CONCAT_MAX_CHANNELS (the first layer's 4 -> 16 conv: 2x faster) or
# the planes are at most PLANES_CONCAT_MAX_PLANE voxels (64x64 and below: the demo-like U-Net step
# 1.13-1.17 s against 1.18-1.23 s with 32x32 and below, XLA's Eigen convolutions); wider channels
# on larger planes run as one 2-D convolution per tap (the concatenation triples the input).
PLANES_CONCAT_MAX_CHANNELS = 16
PLANES_CONCAT_MAX_PLANE = 4096
# XLA:CPU's kernel-gradient 2-D convolution slows down as its contraction over the batch grows
# (64 planes of 64x64, 32 -> 32 channels: 215 ms as one call, 84 ms as 8 calls of 8 planes), so
# "planes" sums it over chunks of about this many voxels, in at most KGRAD_MAX_CHUNKS calls.
KGRAD_CHUNK_VOXELS = 32768
KGRAD_MAX_CHUNKS = 16
# jaxlib 0.10's XLA:CPU hands every convolution to a YNNPACK fusion, which ran single-threaded on
# this 2-core machine; XLA's own (Eigen) convolution uses every core. This jit option keeps YNNPACK
# for dots and reductions (its other defaults) and takes convolutions out of it. 2-D convolutions
# on 64 planes of 64x64: 16 -> 32 channels 41 ms -> 15 ms, 32 -> 16 45 ms -> 20 ms; only 16 -> 16
# (11 ms) went to Eigen already.
CPU_CONV_COMPILER_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def same_padding(size: int, kernel: int, stride: int) -> Tuple[int, Tuple[int, int]]:
    """TensorFlow/flax 'SAME': output ceil(size/stride), padding split low = total // 2.

    Returns (output size, (pad_low, pad_high)).
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return out, (total // 2, total - total // 2)


def resolve_impl(impl: str, ndim: int = 3) -> str:
    """Maps "auto" to the implementation used on `jax.default_backend()` for `ndim` spatial axes;
    checks the name."""
    if impl not in IMPLS:
        raise ValueError(f"conv impl {impl!r} (config.model.conv_impl): expected one of {IMPLS}")
    if impl != "auto":
        return impl
    return "planes" if jax.default_backend() == "cpu" and ndim == 3 else "xla"


def compiler_options(impl: str = "auto") -> Optional[Dict[str, str]]:
    """Options for `jax.jit(..., compiler_options=...)` of a computation whose convolutions use
    `impl`: CPU_CONV_COMPILER_OPTIONS for "planes" on the CPU backend, else None (also where this
    jaxlib does not know the option: checked once by compiling a tiny convolution)."""
    if jax.default_backend() != "cpu" or resolve_impl(impl) != "planes":
        return None
    return dict(CPU_CONV_COMPILER_OPTIONS) if _cpu_accepts_conv_options() else None


@functools.lru_cache(maxsize=None)
def _cpu_accepts_conv_options() -> bool:
    x = jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 1, 1), jnp.float32)
    try:
        jax.jit(lambda x, w: _conv2d(x, w, (1, 1), "SAME", None)).lower(x, w).compile(
            dict(CPU_CONV_COMPILER_OPTIONS))
    except Exception:  # an unknown option or enum value: XLA's defaults then
        return False
    return True


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


def _conv2d(x, w, strides, pads, precision):
    """x [N, H, W, C], w [k_y, k_x, C, C_out] -> [N, H', W', C_out]."""
    return lax.conv_general_dilated(x, w, strides, pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_chunked_kgrad(x, w, strides, pads, precision=None):
    """`_conv2d` whose kernel gradient is summed over chunks of the batch (KGRAD_CHUNK_VOXELS).

    Same values and gradients as `_conv2d`; only how XLA:CPU is asked for dW differs.
    """
    return _conv2d(x, w, strides, pads, precision)


def kgrad_chunks(n: int, plane_voxels: int):
    """[(start, stop)] over n output planes of plane_voxels each: chunks of about
    KGRAD_CHUNK_VOXELS voxels, at most KGRAD_MAX_CHUNKS of them."""
    per = max(KGRAD_CHUNK_VOXELS // plane_voxels, -(-n // KGRAD_MAX_CHUNKS), 1)
    return [(i, min(i + per, n)) for i in range(0, n, per)]


def _conv2d_fwd(x, w, strides, pads, precision):
    return _conv2d(x, w, strides, pads, precision), (x, w)


def _conv2d_bwd(strides, pads, precision, res, g):
    x, w = res
    dx = jax.vjp(lambda x: _conv2d(x, w, strides, pads, precision), x)[1](g)[0]
    kgrad = lambda a, b: jax.vjp(lambda w: _conv2d(a, w, strides, pads, precision), w)[1](b)[0]
    dw = sum(kgrad(x[i:j], g[i:j]) for i, j in kgrad_chunks(x.shape[0], g.shape[1] * g.shape[2]))
    return dx, dw


conv2d_chunked_kgrad.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv_planes(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                precision=None) -> jax.Array:
    """Sum over depth taps of native 2-D convolutions, equal to `conv_xla` (module docstring).

    x [B, D, H, W, C_in], kernel [k_z, k_y, k_x, C_in, C_out] -> [B, *ceil(S/s), C_out].
    Inputs with fewer than 3 spatial axes go to `conv_xla` (for them it is the same thing).
    """
    if x.ndim != 5:
        return conv_xla(x, kernel, strides, precision)
    kz, c_in, c_out = kernel.shape[0], kernel.shape[-2], kernel.shape[-1]
    sz, s2 = strides[0], tuple(strides[1:])
    out_z, pad_z = same_padding(x.shape[1], kz, sz)
    pads2 = tuple(same_padding(n, k, s)[1] for n, k, s in zip(x.shape[2:4], kernel.shape[1:3], s2))
    if pad_z != (0, 0):
        x = jnp.pad(x, ((0, 0), pad_z, (0, 0), (0, 0), (0, 0)))
    # Input planes seen by depth tap t: z_in = z_out * s_z + t, z_out < out_z.
    planes = [lax.slice_in_dim(x, t, t + (out_z - 1) * sz + 1, sz, axis=1) for t in range(kz)]

    def conv2d(xs, w):  # xs [B, out_z, H, W, C'], w [k_y, k_x, C', C_out]
        y = conv2d_chunked_kgrad(xs.reshape((-1,) + xs.shape[2:]), w, s2, pads2, precision)
        return y.reshape((x.shape[0], out_z) + y.shape[1:])

    if (kz * c_in <= PLANES_CONCAT_MAX_CHANNELS
            or x.shape[2] * x.shape[3] <= PLANES_CONCAT_MAX_PLANE):
        w = jnp.moveaxis(kernel, 0, 2).reshape(kernel.shape[1:3] + (kz * c_in, c_out))
        return conv2d(jnp.concatenate(planes, axis=-1), w)
    return sum(conv2d(xs, kernel[t]) for t, xs in enumerate(planes))


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
    fn = {"xla": conv_xla, "planes": conv_planes,
          "matmul": conv_matmul}[resolve_impl(impl, len(ksize))]
    split = partitioning.batch_split_in_type(x)
    if split is not None:
        # Sharding in types (an Explicit mesh axis): jax has no sharding rule for a convolution's
        # kernel gradient over a split batch, so the convolution runs with the mesh's axes
        # switched to Auto (XLA's partitioner sums the gradient), its output split as x is.
        return jax.sharding.auto_axes(lambda x, k: fn(x, k, strides, precision),
                                      out_sharding=jax.sharding.PartitionSpec(split))(x, kernel)
    return fn(x, kernel, strides, precision)


class Conv(nn.Module):
    """N-D convolution, NDHWC, 'SAME' padding. Parameters: kernel [*k, C_in, C_out], bias [C_out].

    x [B, D, H, W, C_in] -> [B, ceil(D/s_z), ceil(H/s_y), ceil(W/s_x), features] in `dtype`.
    impl: "auto" | "xla" | "planes" | "matmul" (module docstring). Parameters are stored in
    `param_dtype` and cast to `dtype` for the product, as flax nn.Conv does.
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
