"""Mask2Former-style set criterion with LIDIA's terms and deep supervision.

L_final = seg_weight * L_seg + cls_weight * L_focal + acl_weight * L_acl (Eq. 6)
          [+ cls_weight * pooled_alone_weight * the class loss of the mask-pooled head's own
             logits, with the same matching and labels, every layer]
          [+ pooled_target_weight * CE of the mask-pooled class head under the true masks]
          [+ aux_semantic_weight * (CE + Dice) of the linear label-code map of the mask features]
          [+ aux_lesion_dice_weight * the mean over lesions of that map's lesion-wise Dice loss]

L_seg and L_focal are computed for the final prediction and, with
config.loss.deep_supervision, for every intermediate one (outputs[...][i],
i = 0..L), each layer with its own Hungarian matching (the layer axis is
vmapped); the total adds the weighted L_seg + L_focal of all layers, as
Mask2Former does. L_acl and the memory-bank update use the final layer's
matching and embeddings only: the paper contrasts the final queries, and the
bank must hold one embedding per lesion and step (intermediate layers would
enter it L+1 times, with embeddings of earlier, worse-matched queries).
"""

import jax
import jax.numpy as jnp

from lidia_jax.objective import classification
from lidia_jax.objective import contrastive
from lidia_jax.objective import mask_loss
from lidia_jax.objective import matching_cost
from lidia_jax.objective import per_voxel
from lidia_jax.objective import points as points_lib


def _at_least_f32(x):
    """bf16/f16 model outputs -> float32 for the loss; float64 stays."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check(outputs, batch, memory, config):
    logits, masks = outputs["logits"], outputs["masks"]
    k = config.model.num_classes
    if logits.ndim != 4 or logits.shape[-1] != k + 1:
        raise ValueError(f"outputs['logits'] has shape {logits.shape}; expected "
                         f"[L+1, B, Q, {k + 1}] (config.model.num_classes={k} "
                         f"+ no-object).")
    if masks.ndim != 6 or masks.shape[:3] != logits.shape[:3]:
        raise ValueError(f"outputs['masks'] has shape {masks.shape}; expected "
                         f"[L+1, B, Q, d, h, w] matching logits "
                         f"{logits.shape[:3]}.")
    if config.loss.contrastive != "none":
        width = outputs["embed"].shape[-1]
        if memory is None or memory["embed"].shape[-1] != width:
            raise ValueError(
                "compute_loss: memory bank missing or of the wrong width for "
                f"embeddings of size {width}; create it with "
                "init_memory(config.loss.memory_size, config.model.acl_dim).")
    if config.loss.get("aux_lesion_dice_weight", 0.0) > 0 and "aux_seg_logits" not in outputs:
        raise ValueError("config.loss.aux_lesion_dice_weight > 0 is a loss of the auxiliary "
                         "semantic map: set config.model.aux_semantic = True (and a "
                         "config.inference.aux_semantic_blend) or the weight to 0.")
    t = batch["masks"].shape[1]
    if t > logits.shape[2]:
        raise ValueError(f"batch['masks'] has {t} targets but the model has "
                         f"only {logits.shape[2]} queries; need "
                         f"config.data.max_instances <= "
                         f"config.model.num_queries.")


def _noise_size(num_targets, config_loss):
    """U[0, 1) numbers one layer uses per sample: matching points + the point
    selection of each target (see points.loss_points)."""
    return (3 * int(config_loss.num_points)
            + num_targets * points_lib.num_loss_noise(config_loss))


def _layer_losses(noise, class_logits, mask_logits, pooled_logits, targets, config):
    """Matching + L_seg + classification loss of one prediction layer.

    Args:
      noise: [B, _noise_size(T, config.loss)] U[0, 1) numbers.
      class_logits: [B, Q, K+1]; mask_logits: [B, Q, d, h, w] (float32).
      pooled_logits: [B, Q, K+1], the mask-pooled head's term of class_logits, or None.
      targets: dict masks bool [B, T, D, H, W], classes int [B, T],
        valid bool [B, T], cumsum int32 [B, T, D*H*W], num_masks scalar, and with
        config.loss.match_on "grid" fractions [B, T, d, h, w] (matching_cost.area_fractions).
      config: full config.

    Returns:
      (mask_ce, dice, cls, pooled cls (0 without pooled_logits)) scalars and the matching
      int32 [B, T].
    """
    cl = config.loss
    num_classes = config.model.num_classes
    b, t = targets["classes"].shape
    num_match = 3 * int(cl.num_points)
    if "fractions" in targets:  # config.loss.match_on == "grid"
        idx = jax.vmap(matching_cost.match_on_grid, in_axes=(0, 0, 0, 0, 0, None))(
            class_logits, mask_logits, targets["classes"], targets["fractions"],
            targets["valid"], cl)
    else:
        match_points = noise[:, :num_match].reshape(b, -1, 3)
        idx = jax.vmap(matching_cost.match, in_axes=(0, 0, 0, 0, 0, 0, None))(
            match_points, class_logits, mask_logits,
            targets["classes"], targets["masks"], targets["valid"], cl)
    idx = jax.lax.stop_gradient(idx)

    matched = jnp.take_along_axis(mask_logits, idx[:, :, None, None, None],
                                  axis=1)  # [B, T, d, h, w]
    target_shape = targets["masks"].shape[2:]
    sample_points = jax.vmap(jax.vmap(
        lambda u, lg, cs: points_lib.loss_points(u, lg, cs, target_shape, cl)))
    pts = sample_points(noise[:, num_match:].reshape(b, t, -1),
                        jax.lax.stop_gradient(matched),
                        targets["cumsum"])
    pts = jax.lax.stop_gradient(pts)
    sample = jax.vmap(jax.vmap(points_lib.trilinear_sample))
    point_logits = sample(matched, pts)  # [B, T, P]
    point_targets = sample(targets["masks"], pts)
    ce, dc = mask_loss.mask_losses(point_logits, point_targets,
                                   targets["valid"], targets["num_masks"])

    # Unmatched queries (and those parked on padded targets) are no-object.
    def query_labels(ix, cls, val):
        return jnp.full((class_logits.shape[1],), num_classes, jnp.int32).at[
            ix].set(jnp.where(val, cls, num_classes).astype(jnp.int32))

    labels = jax.vmap(query_labels)(idx, targets["classes"], targets["valid"])
    weights = classification.class_weights(num_classes, cl.no_object_weight)
    cls = classification.classification_loss(class_logits, labels, weights,
                                             cl.cls_loss, cl.focal_gamma)
    # The pooled head alone, on the statistics under the model's own masks (what it sees at
    # inference): in the sum, the query logits can fit the training patches by themselves and
    # leave the head untaught. Matched queries only, optionally: an unmatched duplicate of a
    # matched query has the same mask, so the same statistics, and only the query can tell them.
    pooled_cls = jnp.zeros(())
    if pooled_logits is not None:
        pooled_weights = (classification.class_weights(num_classes, 0.0)
                          if cl.get("pooled_alone_matched_only", False) else weights)
        pooled_cls = classification.classification_loss(pooled_logits, labels, pooled_weights,
                                                        cl.cls_loss, cl.focal_gamma)
    return ce, dc, cls, pooled_cls, idx


def _matched_accuracy(class_logits, idx, classes, valid):
    """Fraction of valid targets whose matched query's argmax class is the target's class.

    class_logits [B, Q, K+1]; idx, classes, valid [B, T]. Returns a scalar (0 with no target).
    """
    pred = jnp.argmax(jnp.take_along_axis(class_logits, idx[..., None], axis=1), axis=-1)
    hits = jnp.sum((pred == classes) & valid)
    return hits / jnp.maximum(jnp.sum(valid), 1)


def mask2former_loss(outputs, batch, memory, rng, config):
    """Total LIDIA loss of a mask2former head.

    Args:
      outputs: {"logits": [L+1, B, Q, K+1], "masks": [L+1, B, Q, d, h, w],
        "embed": [L+1, B, Q, E]} ([-1] = final prediction).
      batch: {"masks": bool [B, T, D, H, W], "classes": int32 [B, T],
        "valid": bool [B, T], ...} (INTERFACES.md batch layout).
      memory: memory bank (contrastive.init_memory) or None when
        config.loss.contrastive == "none".
      rng: PRNG key (point sampling).
      config: full ConfigDict.

    Returns:
      (loss, {"metrics": {...scalars}, "memory": new bank}).
    """
    _check(outputs, batch, memory, config)
    cl = config.loss
    class_logits = _at_least_f32(outputs["logits"])
    mask_logits = _at_least_f32(outputs["masks"])
    pooled_logits = None
    if cl.get("pooled_alone_weight", 0.0) > 0:
        if "pooled_logits" not in outputs:
            raise ValueError("config.loss.pooled_alone_weight > 0 needs the mask-pooled class "
                             "head: set config.model.pooled_intensity = True.")
        pooled_logits = _at_least_f32(outputs["pooled_logits"])
    if not cl.deep_supervision:
        class_logits, mask_logits = class_logits[-1:], mask_logits[-1:]
        pooled_logits = None if pooled_logits is None else pooled_logits[-1:]
    num_layers = class_logits.shape[0]

    valid = batch["valid"].astype(bool)
    classes = batch["classes"].astype(jnp.int32)
    lesion = valid & (classes >= 1)  # target 0 / class 0 is the liver
    # Global count: under a global jit the batch axis is the global batch.
    num_masks = jnp.maximum(jnp.sum(valid).astype(jnp.float32), 1.0)
    targets = {
        "masks": batch["masks"].astype(bool),
        "classes": classes,
        "valid": valid,
        "cumsum": jax.vmap(jax.vmap(points_lib.foreground_cumsum))(
            batch["masks"].astype(bool)),
        "num_masks": num_masks,
    }
    match_on = cl.get("match_on", "points")
    if match_on == "grid":  # once per step: the targets are the same for every layer
        targets["fractions"] = matching_cost.area_fractions(targets["masks"],
                                                            mask_logits.shape[-3:])
    elif match_on != "points":
        raise ValueError(f"config.loss.match_on={match_on!r}; expected 'points' or 'grid'")
    # A single PRNG draw for everything: each threefry call site adds seconds
    # of XLA:CPU compile time.
    noise = jax.random.uniform(
        rng, (num_layers, valid.shape[0], _noise_size(valid.shape[1], cl)))
    # Layers in parallel (vmap) in groups of config.loss.layers_in_parallel
    # (0: all at once, best on accelerators; 1: a sequential lax.map, which
    # XLA:CPU runs ~1.6x faster than the batched gathers/while loops of vmap).
    group = int(cl.layers_in_parallel) or num_layers
    ce, dc, cls, pooled_cls, idx = jax.lax.map(
        lambda args: _layer_losses(*args, targets, config),
        (noise, class_logits, mask_logits, pooled_logits),
        batch_size=min(group, num_layers))
    seg = cl.ce_weight * ce + cl.dice_weight * dc  # [layers]
    per_layer = cl.seg_weight * seg + cl.cls_weight * cls
    if pooled_logits is not None:
        per_layer = per_layer + cl.cls_weight * cl.pooled_alone_weight * pooled_cls
    total = jnp.sum(per_layer)

    metrics = {
        "loss_mask_ce": ce[-1],
        "loss_dice": dc[-1],
        "loss_seg": seg[-1],
        "loss_cls": cls[-1],
        "loss_aux": jnp.sum(per_layer[:-1]),
        "num_targets": jnp.sum(valid).astype(jnp.float32),
        # Share of the lesion targets whose matched query (final layer) predicts their class.
        "matched_lesion_accuracy": _matched_accuracy(class_logits[-1], idx[-1], classes, lesion),
    }

    if pooled_logits is not None:
        metrics["loss_pooled_alone"] = pooled_cls[-1]
        metrics["pooled_alone_lesion_accuracy"] = _matched_accuracy(
            pooled_logits[-1], idx[-1], classes, lesion)

    if "target_logits" in outputs:  # the pooled head taught on clean statistics (mask_pooling)
        target_logits = _at_least_f32(outputs["target_logits"])
        pooled = classification.target_class_loss(target_logits, classes, valid)
        total = total + cl.pooled_target_weight * pooled
        metrics["loss_pooled_target"] = pooled
        metrics["pooled_target_lesion_accuracy"] = jnp.sum(
            (jnp.argmax(target_logits, -1) == classes) & lesion) / jnp.maximum(jnp.sum(lesion), 1)

    if "aux_seg_logits" in outputs:  # model.aux_semantic
        aux_seg = per_voxel.to_label_grid(_at_least_f32(outputs["aux_seg_logits"]),
                                          batch["semantic"].shape)
        ce_sem, dc_sem = per_voxel.dice_ce(aux_seg, batch["semantic"])
        total = total + cl.get("aux_semantic_weight", 1.0) * (ce_sem + dc_sem)
        metrics["loss_aux_semantic_ce"] = ce_sem
        metrics["loss_aux_semantic_dice"] = dc_sem
        if cl.get("aux_lesion_dice_weight", 0.0) > 0:
            lesion_dc = per_voxel.lesion_wise_dice(aux_seg, targets["masks"], classes, valid)
            total = total + cl.aux_lesion_dice_weight * lesion_dc
            metrics["loss_aux_lesion_dice"] = lesion_dc

    new_memory = memory
    if cl.contrastive != "none":
        embed = _at_least_f32(outputs["embed"][-1])  # [B, Q, E]
        matched = jnp.take_along_axis(embed, idx[-1][:, :, None], axis=1)
        e = matched.reshape(-1, matched.shape[-1])
        lab, val = classes.reshape(-1), lesion.reshape(-1)
        acl = contrastive.contrastive_loss(e, lab, val, memory,
                                           cl.temperature, cl.others_class,
                                           cl.contrastive)
        new_memory = contrastive.update_memory(memory, e, lab, val)
        total = total + cl.acl_weight * acl
        metrics["loss_acl"] = acl
        metrics["memory_fill"] = jnp.mean(
            new_memory["valid"].astype(jnp.float32))
    metrics["loss"] = total
    return total, {"metrics": metrics, "memory": new_memory}
