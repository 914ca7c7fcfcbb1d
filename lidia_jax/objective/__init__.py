"""Training objective: matching costs, L_seg, L_focal, L_acl (Eq. 3-6) and the
nnU-Net baseline's Dice + CE. Every function is pure and jittable."""

import jax

from lidia_jax.model import partitioning
from lidia_jax.objective.contrastive import contrastive_loss
from lidia_jax.objective.contrastive import init_memory
from lidia_jax.objective.contrastive import update_memory
from lidia_jax.objective.criterion import mask2former_loss
from lidia_jax.objective.per_voxel import per_voxel_loss


def compute_loss(outputs, batch, memory, rng, config):
    """Total training loss of either head.

    Args:
      outputs: model outputs, a mask2former dict ("logits", "masks", "embed")
        or a per_voxel dict ("seg_logits", "seg_logits_ds"); see INTERFACES.md.
      batch: the training batch (INTERFACES.md).
      memory: ACL memory bank (`init_memory(config.loss.memory_size,
        config.model.acl_dim)`); passed through unchanged by the per_voxel
        head and when config.loss.contrastive == "none".
      rng: PRNG key.
      config: full ConfigDict (uses config.loss, config.model.num_classes).

    Returns:
      (loss scalar, {"metrics": dict of scalars, "memory": new memory}).
    """
    split = partitioning.batch_split_in_type(jax.tree.leaves(batch)[0])  # every leaf [B, ...]
    if split is not None:
        # Sharding in types (an Explicit mesh axis): the per-sample vmaps (matching, point
        # sampling's searchsorted) meet operands that jax cannot split alike (the replicated
        # noise), so the objective runs with the mesh's axes switched to Auto, as on the
        # trainer's meshes; the loss, metrics and bank come back replicated.
        return jax.sharding.auto_axes(
            lambda o, b, m, r: _compute_loss(o, b, m, r, config),
            out_sharding=jax.sharding.PartitionSpec())(outputs, batch, memory, rng)
    return _compute_loss(outputs, batch, memory, rng, config)


def _compute_loss(outputs, batch, memory, rng, config):
    if "seg_logits" in outputs:
        loss, metrics = per_voxel_loss(outputs, batch, config)
        return loss, {"metrics": metrics, "memory": memory}
    if "logits" in outputs and "masks" in outputs:
        return mask2former_loss(outputs, batch, memory, rng, config)
    raise ValueError(f"compute_loss: unknown outputs keys {sorted(outputs)}; "
                     "expected mask2former (logits, masks, embed) or per_voxel "
                     "(seg_logits, seg_logits_ds).")


__all__ = ["compute_loss", "contrastive_loss", "init_memory",
           "mask2former_loss", "per_voxel_loss", "update_memory"]
