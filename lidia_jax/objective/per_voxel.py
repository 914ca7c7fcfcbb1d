"""nnU-Net baseline objective: Dice + CE over label codes with deep
supervision (nnU-Net's DC_and_CE_loss inside DeepSupervisionWrapper)."""

import jax
import jax.numpy as jnp


def downsample_labels(labels, shape):
    """Nearest-exact downsampling of label codes (torch 'nearest-exact'; what
    nnU-Net v2 uses for its deep-supervision targets).

    Args:
      labels: int [B, D, H, W]; shape: (d, h, w).

    Returns:
      int [B, d, h, w]: source index floor((i + 0.5) * D / d) on every axis.
    """
    out = labels
    for axis, size in enumerate(shape, start=1):
        full = labels.shape[axis]
        if full == size:
            continue
        idx = jnp.floor((jnp.arange(size) + 0.5) * (full / size)).astype(
            jnp.int32)
        out = jnp.take(out, jnp.clip(idx, 0, full - 1), axis=axis)
    return out


def dice_ce(logits, labels, smooth=1e-5):
    """nnU-Net Dice + CE for one resolution.

    CE: mean over voxels of softmax cross-entropy. Dice: batch Dice (sums over
    batch and space) per foreground class (background excluded, do_bg=False),
    (2 tp + smooth) / (2 tp + fp + fn + smooth), averaged over classes; the
    loss is CE + (1 - Dice) (nnU-Net subtracts Dice without the 1: same
    gradient).

    Args:
      logits: [B, d, h, w, C]; labels: int [B, d, h, w] in 0..C-1.

    Returns:
      (ce, dice_loss) scalars.
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    num_classes = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
    ce = -jnp.mean(jnp.sum(onehot * logp, axis=-1))
    prob = jnp.exp(logp)
    axes = tuple(range(logits.ndim - 1))
    tp = jnp.sum(prob * onehot, axis=axes)[1:]
    fp = jnp.sum(prob * (1.0 - onehot), axis=axes)[1:]
    fn = jnp.sum((1.0 - prob) * onehot, axis=axes)[1:]
    dice = (2.0 * tp + smooth) / (2.0 * tp + fp + fn + smooth)
    return ce, 1.0 - jnp.mean(dice)


def deep_supervision_weights(num_levels, decay):
    """[num_levels] weights decay^i (1/2^i for 0.5), normalised to sum 1."""
    w = jnp.asarray([decay ** i for i in range(num_levels)], jnp.float32)
    return w / jnp.sum(w)


def per_voxel_loss(outputs, batch, config):
    """Dice + CE over label codes, full resolution + every coarser level.

    Args:
      outputs: {"seg_logits": [B, D, H, W, 10], "seg_logits_ds": tuple of
        [B, d_i, h_i, w_i, 10], finest first}.
      batch: needs "semantic" int32 [B, D, H, W] label codes.
      config: full ConfigDict (config.loss.deep_supervision,
        config.loss.ds_weights_decay).

    Returns:
      (loss, metrics dict).
    """
    levels = [outputs["seg_logits"]]
    if config.loss.deep_supervision:
        levels += list(outputs.get("seg_logits_ds", ()))
    weights = deep_supervision_weights(len(levels),
                                       config.loss.ds_weights_decay)
    semantic = batch["semantic"]
    total = 0.0
    metrics = {}
    for i, logits in enumerate(levels):
        labels = downsample_labels(semantic, logits.shape[1:4])
        ce, dc = dice_ce(logits, labels)
        total = total + weights[i] * (ce + dc)
        if i == 0:
            metrics["loss_ce"] = ce
            metrics["loss_dice"] = dc
    metrics["loss"] = total
    return total, metrics


def to_label_grid(logits, label_shape):
    """[B, d, h, w, C] -> [B, D, H, W, C] (label_shape = (B, D, H, W)), trilinear with half-voxel
    centres (jax.image.resize); unchanged when already on that grid. The Mask2Former head's
    auxiliary semantic map (config.model.aux_semantic_stage) is lossed on the labels' grid, so
    the smallest lesions keep their voxels in the loss."""
    shape = tuple(label_shape) + logits.shape[-1:]
    if logits.shape != shape:
        logits = jax.image.resize(logits, shape, method="trilinear")
    return logits


def lesion_wise_dice(logits, masks, classes, valid, smooth=1e-5):
    """Mean over the lesions of 1 - Dice of each lesion against its own class channel: blob
    loss (Kofler et al., 2022, "blob loss: instance imbalance aware loss functions"), here for
    the auxiliary map (config.loss.aux_lesion_dice_weight; not in the paper).

    The class Dice of dice_ce sums over the batch, so a patch's large lesion outweighs its small
    ones; here every lesion counts once. For lesion t of class k (label code k + 1), with p the
    softmax over label codes and R_t the voxels outside the other lesions (their own voxels are
    neither rewarded nor punished for t; background false positives are):
      Dice_t = (2 sum_R p_{k+1} m_t + smooth) / (sum_R p_{k+1} + sum_R m_t + smooth).

    Args:
      logits: [B, D, H, W, C] on the masks' grid (to_label_grid).
      masks: bool [B, T, D, H, W] instance targets; classes: int [B, T] (0 the liver, k >= 1 the
        lesion classes, label code k + 1); valid: bool [B, T]. The liver target is skipped.

    Returns:
      scalar: mean of 1 - Dice_t over the valid lesion targets (0 when there are none).
    """
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    prob = jax.nn.softmax(logits, axis=-1)
    lesion = valid & (classes >= 1)
    m = (masks & lesion[:, :, None, None, None]).astype(prob.dtype)  # [B, T, D, H, W]
    select = jax.nn.one_hot(classes + 1, prob.shape[-1], dtype=prob.dtype)  # [B, T, C]
    p = jnp.einsum("bdhwc,btc->btdhw", prob, select)
    others = (jnp.sum(m, axis=1, keepdims=True) - m) > 0  # voxels of R's complement
    p, m = jnp.where(others, 0.0, p), jnp.where(others, 0.0, m)
    axes = (2, 3, 4)
    dice = ((2.0 * jnp.sum(p * m, axes) + smooth)
            / (jnp.sum(p, axes) + jnp.sum(m, axes) + smooth))
    return jnp.sum(jnp.where(lesion, 1.0 - dice, 0.0)) / jnp.maximum(jnp.sum(lesion), 1)
