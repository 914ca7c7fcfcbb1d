"""Mask2Former's masked-attention transformer decoder in 3-D (Cheng et al., CVPR 2022; PLAN).

Each layer: masked cross-attention (queries -> one scale of pixel features) -> self-attention
-> FFN, post-norm, dropout 0; scales visited round robin, coarsest first. Before each layer the
previous prediction's mask logits, resized to that scale, give the attention mask (Mask2Former
Eq. 2 style: attend where sigmoid >= 0.5). Prediction heads run on the learnable queries before
the first layer and after every layer (L + 1 predictions, all supervised).
"""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidia_jax.model import mask_pooling
from lidia_jax.model import partitioning
from lidia_jax.model.layers import dense, layer_norm
from lidia_jax.model.position import sine_position_3d

_XAVIER = nn.initializers.xavier_uniform()  # Mask2Former's _reset_parameters for the layers


def masked_attention(q, k, v, allowed=None):
    """Scaled dot-product attention with a boolean attention mask, softmax in float32.

    q [B, Q, H, d], k [B, N, H, d], v [B, N, H, d_v]; allowed [B, Q, N] bool (True = may attend,
    shared by all heads) or None. A query that may attend nowhere attends everywhere
    (Mask2Former's fix: a fully blocked row would give softmax(-inf, ..., -inf) = NaN).
    Returns [B, Q, H, d_v] in v's dtype.
    """
    logits = jnp.einsum("bqhd,bnhd->bhqn", q, k,
                        preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if allowed is not None:
        allowed = allowed | ~jnp.any(allowed, axis=-1, keepdims=True)
        logits = jnp.where(allowed[:, None], logits, -jnp.inf)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.einsum("bhqn,bnhd->bqhd", weights.astype(v.dtype), v)


def attention_mask(mask_logits, size: Sequence[int]):
    """Attention mask for the next layer from the previous mask prediction.

    mask_logits [B, Q, D, H, W] -> bool [B, Q, d*h*w] (True = may attend) at `size` = (d, h, w):
    trilinear resize (half-pixel centres, no antialiasing, like torch's F.interpolate with
    align_corners=False), attend where sigmoid(logit) >= 0.5, i.e. logit >= 0. Rows that block
    everything are opened entirely. No gradient flows through the mask (Mask2Former detaches it).
    """
    b, q = mask_logits.shape[:2]
    m = jax.lax.stop_gradient(mask_logits).astype(jnp.float32)
    if tuple(m.shape[2:]) != tuple(size):
        m = jax.image.resize(m, (b, q) + tuple(size), method="trilinear", antialias=False)
    allowed = (m >= 0.0).reshape(b, q, -1)
    return allowed | ~jnp.any(allowed, axis=-1, keepdims=True)


class MultiHeadAttention(nn.Module):
    """torch.nn.MultiheadAttention's maths: q/k/v projections, masked_attention, out projection.

    query [B, Q, E], key [B, N, E], value [B, N, E], allowed [B, Q, N] | None -> [B, Q, E].
    """

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query, key, value, allowed=None):
        e = query.shape[-1]
        if e % self.num_heads:
            raise ValueError(f"config.model.hidden_dim={e} must be divisible by "
                             f"config.model.num_heads={self.num_heads}")
        split = lambda x: x.reshape(x.shape[:2] + (self.num_heads, e // self.num_heads))
        proj = lambda name: dense(e, ("embed", "qkv"), self.dtype, kernel_init=_XAVIER,
                                  name=name)
        out = masked_attention(split(proj("query")(query)), split(proj("key")(key)),
                               split(proj("value")(value)), allowed)
        return dense(e, ("qkv", "embed"), self.dtype, kernel_init=_XAVIER,
                     name="out")(out.reshape(out.shape[:2] + (e,)))


class CrossAttentionLayer(nn.Module):
    """tgt = LN(tgt + MHA(tgt + query_pos, memory + pos, memory, allowed)) (post-norm)."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tgt, memory, pos, query_pos, allowed):
        att = MultiHeadAttention(self.num_heads, self.dtype, name="attn")(
            tgt + query_pos, memory + pos, memory, allowed)
        return layer_norm(name="norm")(tgt + att.astype(jnp.float32))


class SelfAttentionLayer(nn.Module):
    """tgt = LN(tgt + MHA(tgt + query_pos, tgt + query_pos, tgt)) (post-norm)."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tgt, query_pos):
        qk = tgt + query_pos
        att = MultiHeadAttention(self.num_heads, self.dtype, name="attn")(qk, qk, tgt)
        return layer_norm(name="norm")(tgt + att.astype(jnp.float32))


class FFNLayer(nn.Module):
    """tgt = LN(tgt + W2 relu(W1 tgt)) (post-norm)."""

    ffn_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tgt):
        e = tgt.shape[-1]
        x = dense(self.ffn_dim, ("embed", "mlp"), self.dtype, kernel_init=_XAVIER,
                  name="linear1")(tgt)
        x = dense(e, ("mlp", "embed"), self.dtype, kernel_init=_XAVIER,
                  name="linear2")(nn.relu(x))
        return layer_norm(name="norm")(tgt + x.astype(jnp.float32))


class PredictionHeads(nn.Module):
    """Mask2Former heads plus LIDIA's ACL projection, shared by all L + 1 predictions.

    queries [B, Q, E], mask_features [B, D, H, W, M] ->
      logits [B, Q, K+1] (float32), mask logits [B, Q, D, H, W] (float32),
      embed  [B, Q, acl_dim] (float32, unit L2 norm; z(x) of Eq. 4).
    """

    num_classes: int
    mask_dim: int
    acl_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, queries, mask_features):
        e = queries.shape[-1]
        x = layer_norm(name="decoder_norm")(queries)
        logits = dense(self.num_classes + 1, ("embed", "classes"), self.dtype,
                       name="class_embed")(x)
        m = x
        for i, f in enumerate((e, e, self.mask_dim)):  # 3-layer MLP
            m = dense(f, ("embed", "mlp") if i < 2 else ("embed", "mask"), self.dtype,
                      name=f"mask_embed_{i}")(m)
            m = nn.relu(m) if i < 2 else m
        masks = jnp.einsum("bqc,bdhwc->bqdhw", m.astype(self.dtype),
                           mask_features.astype(self.dtype),
                           preferred_element_type=jnp.float32)
        z = nn.relu(dense(e, ("embed", "mlp"), self.dtype, name="acl_proj_0")(x))
        z = dense(self.acl_dim, ("mlp", "acl"), self.dtype, name="acl_proj_1")(z)
        z = z.astype(jnp.float32)
        z = z * jax.lax.rsqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))
        return logits.astype(jnp.float32), masks.astype(jnp.float32), z


class TransformerDecoder(nn.Module):
    """Masked-attention decoder.

    multi_scale: list of num_scales maps [B, d_l, h_l, w_l, hidden_dim], coarsest first.
    mask_features: [B, D, H, W, mask_dim].
    image [B, D', H', W', P], phase_mask [B, P]: the input on the grid of mask_pooling's
      statistics (mask_pooling.pool_image), needed (only) with pooled_intensity, which adds
      mask_pooling's class-logit term to every prediction.
    targets: optional training targets {"masks" bool [B, T, D0, H0, W0] on the input's grid,
      "classes" [B, T], "valid" [B, T]}; with pooled_intensity, the pooled head's logits under
      the true masks are returned too, for the objective's auxiliary class loss.
    Returns dict (all float32):
      logits [L+1, B, Q, K+1], masks [L+1, B, Q, D, H, W], embed [L+1, B, Q, acl_dim]
    index 0 from the learnable queries before the first layer, -1 the final prediction; with
    pooled_intensity, pooled_logits [L+1, B, Q, K+1] (the pooled head's term of logits, for the
    objective's own loss on it), and target_logits [B, T, K+1] when targets are given.
    """

    num_queries: int
    hidden_dim: int
    num_heads: int
    ffn_dim: int
    dec_layers: int
    num_classes: int
    mask_dim: int
    acl_dim: int
    dtype: jnp.dtype = jnp.float32
    pooled_intensity: bool = False
    pooled_intensity_sharpness: int = 1  # mask_pooling.pooled_statistics

    @nn.compact
    def __call__(self, multi_scale, mask_features, image=None, phase_mask=None, targets=None):
        b = mask_features.shape[0]
        e = self.hidden_dim
        num_scales = len(multi_scale)
        sizes = [tuple(x.shape[1:4]) for x in multi_scale]
        for x in multi_scale:
            if x.shape[-1] != e:
                raise ValueError(f"TransformerDecoder: pixel features have {x.shape[-1]} "
                                 f"channels, expected hidden_dim={e}")
        level_embed = self.param("level_embed", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), (None, "embed")), (num_scales, e), jnp.float32)
        memories = [x.reshape(b, -1, e).astype(jnp.float32) + level_embed[l]
                    for l, x in enumerate(multi_scale)]
        positions = [jnp.asarray(sine_position_3d(s, e))[None] for s in sizes]
        table = lambda name: self.param(name, nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("queries", "embed")), (self.num_queries, e),
            jnp.float32)
        query_feat = table("query_feat")
        query_pos = jnp.broadcast_to(table("query_pos")[None], (b, self.num_queries, e))
        output = jnp.broadcast_to(query_feat[None], (b, self.num_queries, e))
        split = partitioning.batch_split_in_type(memories[0])
        if split is not None:
            # Sharding in types (an Explicit mesh axis): split the queries over the batch like
            # everything else. (On Auto meshes the partitioner decides; a constraint there would
            # change the reduction order of their gradient.)
            query_pos, output = (jax.sharding.reshard(x, jax.sharding.PartitionSpec(split))
                                 for x in (query_pos, output))

        heads = PredictionHeads(self.num_classes, self.mask_dim, self.acl_dim, self.dtype,
                                name="heads")
        preds, pooled = [], []
        if self.pooled_intensity:
            if image is None or phase_mask is None:
                raise ValueError("TransformerDecoder: pooled_intensity needs image and phase_mask")
            pooled_head = mask_pooling.PooledIntensityLogits(self.num_classes,
                                                             name="pooled_intensity")

        def predict(out, next_size):
            logits, masks, z = heads(out, mask_features)
            if self.pooled_intensity:
                pooled.append(pooled_head(mask_pooling.pooled_statistics(
                    masks, logits, image, phase_mask, self.pooled_intensity_sharpness)))
                logits = logits + pooled[-1]
            preds.append((logits, masks, z))
            return attention_mask(masks, next_size)

        allowed = predict(output, sizes[0])
        for i in range(self.dec_layers):
            l = i % num_scales
            output = CrossAttentionLayer(self.num_heads, self.dtype, name=f"cross_{i}")(
                output, memories[l], positions[l], query_pos, allowed)
            output = SelfAttentionLayer(self.num_heads, self.dtype, name=f"self_{i}")(
                output, query_pos)
            output = FFNLayer(self.ffn_dim, self.dtype, name=f"ffn_{i}")(output)
            allowed = predict(output, sizes[(i + 1) % num_scales])
        logits, masks, embed = (jnp.stack(t) for t in zip(*preds))
        out = {"logits": logits, "masks": masks, "embed": embed}
        if self.pooled_intensity:
            out["pooled_logits"] = jnp.stack(pooled)
        if self.pooled_intensity and targets is not None:
            out["target_logits"] = pooled_head(mask_pooling.target_statistics(
                targets["masks"], targets["classes"], targets["valid"], image, phase_mask))
        return out
