"""The LIDIA network: fusion -> nnU-Net encoder -> (FPN + masked-attention decoder | U-Net decoder).

  model = build_model(config.model)
  variables = model.init(rng, image, phase_mask, train=False)
  out = model.apply(variables, image, phase_mask, train=True)
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lidia_jax.model import mask_pooling
from lidia_jax.model.encoder import Encoder, stage_features
from lidia_jax.model.fusion import FUSIONS, build_fusion
from lidia_jax.model.layers import ConvNormAct, dense
from lidia_jax.model.pixel_decoder import FPNPixelDecoder
from lidia_jax.model.transformer_decoder import TransformerDecoder
from lidia_jax.model.unet_decoder import UNetDecoder

HEADS = ("mask2former", "per_voxel")
NUM_LABEL_CODES = 10  # per-voxel head: label codes 0..9, background included
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class LIDIA(nn.Module):
    """LIDIA (Huang et al., MICCAI 2024) and its baselines, NDHWC.

    __call__(image [B, D, H, W, 4] float, phase_mask [B, 4] bool, train, targets=None) ->
      head "mask2former": {"logits" [L+1, B, Q, K+1], "masks" [L+1, B, Q, d, h, w],
                           "embed" [L+1, B, Q, E]}, (d, h, w) = encoder stage mask_stride_stage
      head "per_voxel":   {"seg_logits" [B, D, H, W, 10], "seg_logits_ds" (coarser levels,
                           finest first)}
    pooled_intensity adds mask_pooling's class logits (the input pooled under each query's
    mask on the grid of encoder stage pooled_intensity_stage) to every Mask2Former prediction,
    and returns that term alone as "pooled_logits" [L+1, B, Q, K+1]; given the training targets
    ({"masks", "classes", "valid"} of the batch) it also returns "target_logits" [B, T, K+1],
    that head under the true masks (TransformerDecoder).
    aux_semantic adds "aux_seg_logits" [B, d_a, h_a, w_a, 10]: label-code logits from a linear
    map of the mask features, for the objective's dense auxiliary loss (not in the paper). On
    the grid of encoder stage aux_semantic_stage (-1: the masks' grid): for each stage s finer
    than the masks', y = LeakyReLU(trilinear(y) + lateral_s(skip_s)), lateral = 1x1x1 conv ->
    norm (the FPN's, light enough for the input's grid), before the linear map.
    All outputs float32 whatever `dtype`. `train` is accepted for the interface; the network has
    no dropout and no batch statistics (instance norm), so train and eval are the same function.
    """

    fusion: str = "ifm"
    head: str = "mask2former"
    fusion_features: int = 32
    base_features: int = 32
    max_features: int = 320
    kernel_sizes: Sequence[Sequence[int]] = ((3, 3, 3),) * 4
    strides: Sequence[Sequence[int]] = ((1, 1, 1),) + ((2, 2, 2),) * 3
    num_queries: int = 50
    hidden_dim: int = 64
    mask_dim: int = 64
    num_heads: int = 8
    ffn_dim: int = 512
    dec_layers: int = 3
    num_scales: int = 3
    mask_stride_stage: int = 1
    acl_dim: int = 64
    num_classes: int = 9
    ifm_shared_fuse: bool = True
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    conv_impl: str = "auto"
    pooled_intensity: bool = False
    pooled_intensity_stage: int = 1
    pooled_intensity_sharpness: int = 1
    aux_semantic: bool = False
    aux_semantic_stage: int = -1

    def _check(self, image, phase_mask):
        if image.ndim != 5 or image.shape[-1] != 4:
            raise ValueError(f"LIDIA: image must be [B, D, H, W, 4] (NDHWC, phases NC, A, V, D),"
                             f" got {image.shape}")
        if phase_mask.shape != (image.shape[0], 4):
            raise ValueError(f"LIDIA: phase_mask must be [B, 4] = {(image.shape[0], 4)}, got "
                             f"{phase_mask.shape}")
        total = np.prod(np.asarray(self.strides), axis=0)
        if any(n % t for n, t in zip(image.shape[1:4], total)):
            raise ValueError(
                f"LIDIA: spatial size {tuple(image.shape[1:4])} (config.input.patch_size) must "
                f"be divisible by the product of config.model.strides per axis, "
                f"{tuple(int(t) for t in total)}")

    @nn.compact
    def __call__(self, image, phase_mask, train: bool = False, targets=None):
        del train  # no dropout / batch statistics: see the class docstring
        self._check(image, phase_mask)
        features = stage_features(len(self.strides), self.base_features, self.max_features)
        x = build_fusion(self.fusion, self.fusion_features, self.kernel_sizes[0],
                         self.conv_impl, self.dtype, self.ifm_shared_fuse)(image, phase_mask)
        skips = Encoder(features, self.kernel_sizes, self.strides, remat=self.remat,
                        impl=self.conv_impl, dtype=self.dtype, name="encoder")(x)
        if self.head == "per_voxel":
            if tuple(self.strides[0]) != (1, 1, 1):
                raise ValueError(f"config.model.strides[0]={tuple(self.strides[0])}: the "
                                 f"per_voxel head predicts at stage 0, which must keep the "
                                 f"input resolution (stride (1, 1, 1), as nnU-Net plans)")
            return UNetDecoder(features, self.kernel_sizes, self.strides, NUM_LABEL_CODES,
                               impl=self.conv_impl, dtype=self.dtype, name="unet_decoder")(skips)
        if self.head != "mask2former":
            raise ValueError(f"config.model.head={self.head!r}: expected one of {HEADS}")
        multi_scale, mask_features = FPNPixelDecoder(
            self.hidden_dim, self.mask_dim, self.num_scales, self.mask_stride_stage,
            self.kernel_sizes, impl=self.conv_impl, dtype=self.dtype,
            name="pixel_decoder")(skips)
        pooled_image = None
        if self.pooled_intensity:  # the statistics' grid is that stage's features' grid
            pooled_image = mask_pooling.pool_image(
                image, skips[self.pooled_intensity_stage].shape[1:4])
        out = TransformerDecoder(
            self.num_queries, self.hidden_dim, self.num_heads, self.ffn_dim, self.dec_layers,
            self.num_classes, self.mask_dim, self.acl_dim, self.dtype, self.pooled_intensity,
            self.pooled_intensity_sharpness,
            name="transformer_decoder")(multi_scale, mask_features, pooled_image, phase_mask,
                                        targets)
        if self.aux_semantic:  # every voxel supervised, not only the matched queries' points
            out["aux_seg_logits"] = self._aux_semantic(mask_features, skips)
        return out

    def _aux_semantic(self, mask_features, skips):
        """mask_features [B, d_m, h_m, w_m, M] -> label-code logits [B, d_a, h_a, w_a, 10]."""
        if not -1 <= self.aux_semantic_stage <= self.mask_stride_stage:
            raise ValueError(f"config.model.aux_semantic_stage={self.aux_semantic_stage}: the "
                             f"auxiliary map is on the masks' grid (mask_stride_stage="
                             f"{self.mask_stride_stage}) or a finer stage: expected -1 (the "
                             f"masks') or 0..{self.mask_stride_stage}")
        stage = self.mask_stride_stage if self.aux_semantic_stage < 0 else self.aux_semantic_stage
        y = mask_features
        for s in range(self.mask_stride_stage - 1, stage - 1, -1):
            lateral = ConvNormAct(self.mask_dim, (1, 1, 1), activation=False, impl=self.conv_impl,
                                  dtype=self.dtype, name=f"aux_semantic_lateral_{s}")(skips[s])
            up = jax.image.resize(y, y.shape[:1] + lateral.shape[1:4] + y.shape[-1:],
                                  method="trilinear")
            y = nn.leaky_relu(up + lateral, negative_slope=0.01)
        return dense(NUM_LABEL_CODES, ("mask", "classes"), self.dtype,
                     name="aux_semantic")(y).astype(jnp.float32)


def build_model(model_cfg) -> LIDIA:
    """LIDIA from `config.model` (a ConfigDict or anything with the same attributes)."""
    if model_cfg.fusion not in FUSIONS:
        raise ValueError(f"config.model.fusion={model_cfg.fusion!r}: expected one of "
                         f"{sorted(FUSIONS)}")
    if model_cfg.head not in HEADS:
        raise ValueError(f"config.model.head={model_cfg.head!r}: expected one of {HEADS}")
    if str(model_cfg.dtype) not in _DTYPES:
        raise ValueError(f"config.model.dtype={model_cfg.dtype!r}: expected one of "
                         f"{sorted(_DTYPES)}")
    tup = lambda seq: tuple(tuple(int(v) for v in s) for s in seq)
    get = lambda name, default: (model_cfg.get(name, default) if hasattr(model_cfg, "get")
                                 else getattr(model_cfg, name, default))
    return LIDIA(
        fusion=model_cfg.fusion, head=model_cfg.head,
        fusion_features=int(model_cfg.fusion_features),
        base_features=int(model_cfg.base_features), max_features=int(model_cfg.max_features),
        kernel_sizes=tup(model_cfg.kernel_sizes), strides=tup(model_cfg.strides),
        num_queries=int(model_cfg.num_queries), hidden_dim=int(model_cfg.hidden_dim),
        mask_dim=int(model_cfg.mask_dim), num_heads=int(model_cfg.num_heads),
        ffn_dim=int(model_cfg.ffn_dim), dec_layers=int(model_cfg.dec_layers),
        num_scales=int(model_cfg.num_scales), mask_stride_stage=int(model_cfg.mask_stride_stage),
        acl_dim=int(model_cfg.acl_dim), num_classes=int(model_cfg.num_classes),
        ifm_shared_fuse=bool(get("ifm_shared_fuse", True)),
        dtype=_DTYPES[str(model_cfg.dtype)], remat=bool(model_cfg.remat),
        conv_impl=str(model_cfg.conv_impl),
        pooled_intensity=bool(get("pooled_intensity", False)),
        pooled_intensity_stage=int(get("pooled_intensity_stage", 1)),
        pooled_intensity_sharpness=int(get("pooled_intensity_sharpness", 1)),
        aux_semantic=bool(get("aux_semantic", False)),
        aux_semantic_stage=int(get("aux_semantic_stage", -1)))
