"""Multi-phase fusion modules, interchangeable by `config.model.fusion`.

Every module maps
  image      [B, D, H, W, 4]  phases NC, A, V, D in the channels (absent phases: any values)
  phase_mask [B, 4] bool      which phases each sample has
to a fused feature map [B, D, H, W, features] that feeds encoder stage 0. Phase presence is
handled with `jnp.where` / masked reductions on traced values, never with Python branches, so
one compiled function serves any mix of phase masks within a batch, and the content of an absent
phase's channel has no influence on the output.

`ifm`, `hemis` and `convlstm` share the first step: a context-specific block F_p per phase
(Eq. 1: two conv -> instance norm -> LeakyReLU blocks, separate weights per phase), so that the
variants differ only in how the per-phase features are fused (the paper's Table 2 comparison).
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from lidia_jax.model.layers import ContextBlock, ConvNormAct, conv3d

PHASES = ("NC", "A", "V", "D")  # temporal order of enhancement, = channel order


def _check_inputs(image, phase_mask):
    if image.ndim != 5 or image.shape[-1] != len(PHASES):
        raise ValueError(f"fusion: image must be [B, D, H, W, {len(PHASES)}] (phases "
                         f"{PHASES}), got shape {image.shape}")
    if phase_mask.shape != (image.shape[0], len(PHASES)):
        raise ValueError(f"fusion: phase_mask must be [B, {len(PHASES)}] = "
                         f"{(image.shape[0], len(PHASES))}, got {phase_mask.shape}")
    return phase_mask.astype(bool)


def _per_sample(flag, like):
    """[B] bool -> [B, 1, 1, 1, 1], broadcastable against an NDHWC map `like`."""
    return flag.reshape((flag.shape[0],) + (1,) * (like.ndim - 1))


class PhaseBlocks(nn.Module):
    """F_p of Eq. (1) for every phase: h^p = F_p(x^p).

    image [B, D, H, W, 4] -> tuple of 4 maps [B, D, H, W, features] (NC, A, V, D). The maps of
    absent phases are computed too (fixed shapes under jit); callers mask them out.
    """

    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image):
        return tuple(
            ContextBlock(self.features, self.kernel_size, impl=self.impl, dtype=self.dtype,
                         name=f"phase_{p}")(image[..., i:i + 1])
            for i, p in enumerate(PHASES))


class IterativeFusion(nn.Module):
    """The paper's Iterative Fusion Module (IFM, Eq. 1-2).

    h^p = F_p(x^p) (Eq. 1); then in temporal order NC -> A -> V -> D,
      h_{k+1} = F_conv(concat(h_k, h^p))                                        (Eq. 2)
    over the PRESENT phases only: the state is initialised by the first present phase (h_1 =
    h^NC when NC is present, as in the paper) and an absent phase leaves it unchanged. So the
    result is h_4 with all four phases and h_3 without D (the paper's case), and any other
    phase may be missing too (beyond the paper). A sample with no phase at all gives zeros.

    F_conv is one conv -> instance norm -> LeakyReLU block on 2C channels. `shared_fuse=True`
    (default, the literal reading of Eq. 2: one F_conv for every k) uses one F_conv for all
    steps; `shared_fuse=False` gives each incoming phase (A, V, D) its own F_conv.

    image [B, D, H, W, 4], phase_mask [B, 4] -> [B, D, H, W, features].
    """

    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    shared_fuse: bool = True
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image, phase_mask):
        present = _check_inputs(image, phase_mask)
        hs = PhaseBlocks(self.features, self.kernel_size, self.impl, self.dtype,
                         name="phase_blocks")(image)
        make_fuse = lambda name: ConvNormAct(self.features, self.kernel_size, impl=self.impl,
                                             dtype=self.dtype, name=name)
        shared = make_fuse("fuse") if self.shared_fuse else None
        state = jnp.zeros_like(hs[0])
        started = jnp.zeros(present.shape[:1], bool)  # [B]: some earlier phase was present
        for i, h_p in enumerate(hs):
            here = present[:, i]
            if i == 0:
                candidate = h_p  # nothing to fuse with yet
            else:
                fuse = shared if self.shared_fuse else make_fuse(f"fuse_{PHASES[i]}")
                fused = fuse(jnp.concatenate([state, h_p], axis=-1))
                candidate = jnp.where(_per_sample(started, h_p), fused, h_p)
            state = jnp.where(_per_sample(here, h_p), candidate, state)
            started = started | here
        return state


class EarlyFusion(nn.Module):
    """nnU-Net baseline: the phases concatenated as channels.

    Absent phases are zeroed and the phase mask is appended as 4 constant channels (so the
    network can tell a missing phase from a dark one); a context block (two conv blocks, the
    capacity of one F_p) maps the 8 channels to `features`.

    image [B, D, H, W, 4], phase_mask [B, 4] -> [B, D, H, W, features].
    """

    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image, phase_mask):
        present = _check_inputs(image, phase_mask)
        m = present[:, None, None, None, :]
        # where() rather than multiply: an absent channel holding inf/NaN must not leak.
        x = jnp.concatenate([jnp.where(m, image, 0.0).astype(image.dtype),
                             jnp.broadcast_to(m, image.shape).astype(image.dtype)], axis=-1)
        return ContextBlock(self.features, self.kernel_size, impl=self.impl, dtype=self.dtype,
                            name="stem")(x)


class HeMISFusion(nn.Module):
    """HeMIS (Havaei et al., MICCAI 2016): per-phase encoders, then the first and second moments
    over the available phases.

    mean = sum_p m_p h^p / n,  var = sum_p m_p (h^p - mean)^2 / n  (population variance: 0 when
    n = 1 instead of the unbiased estimator's NaN), n = number of present phases (>= 1 to keep a
    phase-less sample finite). concat(mean, var) [.., 2C] goes through one conv block (HeMIS's
    back end) to `features` channels.

    image [B, D, H, W, 4], phase_mask [B, 4] -> [B, D, H, W, features].
    """

    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image, phase_mask):
        present = _check_inputs(image, phase_mask)
        hs = PhaseBlocks(self.features, self.kernel_size, self.impl, self.dtype,
                         name="phase_blocks")(image)
        h = jnp.stack(hs, axis=1).astype(jnp.float32)  # [B, 4, D, H, W, C]
        m = present.astype(jnp.float32)[:, :, None, None, None, None]
        # where() rather than multiply: a non-finite absent phase must not leak as 0 * inf.
        h = jnp.where(m > 0, h, 0.0)
        n = jnp.maximum(jnp.sum(m, axis=1), 1.0)
        mean = jnp.sum(h, axis=1) / n
        var = jnp.sum(jnp.where(m > 0, jnp.square(h - mean[:, None]), 0.0), axis=1) / n
        x = jnp.concatenate([mean, var], axis=-1).astype(self.dtype)
        return ConvNormAct(self.features, self.kernel_size, impl=self.impl, dtype=self.dtype,
                           name="backend")(x)


class ConvLSTMFusion(nn.Module):
    """3-D ConvLSTM over the present phases in temporal order (Shi et al., NeurIPS 2015).

    The phases are the time steps with inputs x_t = h^p = F_p(x^p). One convolution on
    concat(x_t, h_{t-1}) gives the gates i, f, o, g; c_t = f * c_{t-1} + i * g,
    h_t = o * tanh(c_t). An absent phase keeps (h, c); the last h is the fused feature. The cell
    state is carried in float32. The forget-gate bias starts at 1 (Jozefowicz et al., 2015).

    image [B, D, H, W, 4], phase_mask [B, 4] -> [B, D, H, W, features].
    """

    features: int
    kernel_size: Sequence[int] = (3, 3, 3)
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image, phase_mask):
        present = _check_inputs(image, phase_mask)
        hs = PhaseBlocks(self.features, self.kernel_size, self.impl, self.dtype,
                         name="phase_blocks")(image)
        c = self.features
        # Gate order i, f, o, g; the forget gate's bias starts at 1.
        forget_one = lambda key, shape, dtype: jnp.zeros(shape, dtype).at[c:2 * c].set(1.0)
        gates_conv = conv3d(4 * c, self.kernel_size, use_bias=True, impl=self.impl,
                            dtype=self.dtype, bias_init=forget_one, name="gates")
        h = jnp.zeros(hs[0].shape, jnp.float32)
        cell = jnp.zeros(hs[0].shape, jnp.float32)
        for i, x_t in enumerate(hs):
            z = gates_conv(jnp.concatenate([x_t, h.astype(x_t.dtype)], axis=-1))
            z = z.astype(jnp.float32)
            gi, gf, go, gg = jnp.split(z, 4, axis=-1)
            new_cell = nn.sigmoid(gf) * cell + nn.sigmoid(gi) * jnp.tanh(gg)
            new_h = nn.sigmoid(go) * jnp.tanh(new_cell)
            here = _per_sample(present[:, i], h)
            cell = jnp.where(here, new_cell, cell)
            h = jnp.where(here, new_h, h)
        return h.astype(self.dtype)


FUSIONS = {"ifm": IterativeFusion, "early": EarlyFusion, "hemis": HeMISFusion,
           "convlstm": ConvLSTMFusion}


def build_fusion(name: str, features: int, kernel_size: Sequence[int], impl: str, dtype,
                 ifm_shared_fuse: bool = True) -> nn.Module:
    """The fusion module `name` (config.model.fusion), named "fusion"."""
    if name not in FUSIONS:
        raise ValueError(f"config.model.fusion={name!r}: expected one of {sorted(FUSIONS)}")
    kwargs = dict(features=features, kernel_size=tuple(kernel_size), impl=impl, dtype=dtype,
                  name="fusion")
    if name == "ifm":
        kwargs["shared_fuse"] = ifm_shared_fuse
    return FUSIONS[name](**kwargs)
