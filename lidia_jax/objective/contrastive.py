"""Asymmetric contrastive loss (ACL, Eq. 3-5), supervised contrastive loss
(SupCon, Eq. 3-4) and the cross-batch memory bank.

Samples are the ACL embeddings z (unit norm, [A, E]) of the queries matched to
lesion targets, labelled with their class index (1..8; others = 8). Anchors are
the current step's samples; contrast samples are the current ones (minus the
anchor itself) plus the valid entries of the memory bank (no gradient).

ACL (`kind="acl"`), with s(x, a) = z(x).z(a) / tau:
  * common anchor x (class != others), Eq. 4:
      L(x) = -1/|P(x)| sum_{p in P(x)} [s(x, p) - log sum_{a in A(x)} exp s(x, a)]
    P(x) = contrast samples of x's class, A(x) = all contrast samples,
    common and "others": a common lesion is pushed away from "others" too.
  * "others" anchor x_r, Eq. 5:
      L(x_r) = log sum_{a in A_c(x_r)} exp s(x_r, a),  A_c = common samples.
  "others" vs "others" pairs appear nowhere: not as positives and not in any
  denominator, so two "others" embeddings may be anywhere relative to each
  other (the paper: "we do not try to cluster them together").
SupCon (`kind="supcon"`): Eq. 4 for every anchor, "others" an ordinary class.
Eq. 3: the mean over anchors with a non-empty positive set (ACL "others":
non-empty A_c); 0 when there is none.
"""

import jax
import jax.numpy as jnp


def init_memory(size, dim):
    """Empty memory bank: {"embed": f32 [S, E], "label": i32 [S],
    "valid": bool [S], "ptr": i32 []} (ptr = next slot to write)."""
    return {
        "embed": jnp.zeros((size, dim), jnp.float32),
        "label": jnp.zeros((size,), jnp.int32),
        "valid": jnp.zeros((size,), bool),
        "ptr": jnp.zeros((), jnp.int32),
    }


def update_memory(memory, embed, label, valid):
    """FIFO write of the valid samples (in order) at ptr, with wraparound.

    Args:
      memory: bank from `init_memory`.
      embed: [A, E]; label: int [A]; valid: bool [A].

    Returns:
      new bank. Read circularly from `ptr`, it holds the last S valid samples
      ever written, oldest first.
    """
    size = memory["label"].shape[0]
    num = valid.shape[0]
    # Compaction: valid samples first, original order kept (stable sort).
    order = jnp.argsort(~valid, stable=True)
    embed = jax.lax.stop_gradient(embed)[order].astype(jnp.float32)
    label = label[order].astype(jnp.int32)
    count = jnp.sum(valid.astype(jnp.int32))
    k = jnp.arange(num)
    # Only the last S of the new samples survive; skipping the others keeps
    # every written slot unique (scatter order is unspecified).
    keep = (k < count) & (k >= count - size)
    slot = jnp.where(keep, (memory["ptr"] + k) % size, size)  # size: dropped
    return {
        "embed": memory["embed"].at[slot].set(embed, mode="drop"),
        "label": memory["label"].at[slot].set(label, mode="drop"),
        "valid": memory["valid"].at[slot].set(True, mode="drop"),
        "ptr": ((memory["ptr"] + count) % size).astype(jnp.int32),
    }


def contrastive_loss(embed, label, valid, memory, temperature, others_class,
                     kind="acl"):
    """L_acl (Eq. 3-5) or SupCon over current samples + memory bank.

    Args:
      embed: [A, E] unit-norm embeddings of the current step.
      label: int [A] class index; valid: bool [A].
      memory: bank dict (its entries get no gradient) or None.
      temperature: tau.
      others_class: class index of "others" (ACL only).
      kind: "acl" | "supcon".

    Returns:
      scalar loss.
    """
    if kind not in ("acl", "supcon"):
        raise ValueError(f"config.loss.contrastive={kind!r}; expected 'acl', "
                         f"'supcon' or 'none'.")
    # bf16 -> f32, f64 stays f64.
    embed = embed.astype(jnp.promote_types(embed.dtype, jnp.float32))
    num = embed.shape[0]
    if memory is not None:
        bank = jax.lax.stop_gradient(memory["embed"]).astype(embed.dtype)
        c_embed = jnp.concatenate([embed, bank], 0)
        c_label = jnp.concatenate([label, memory["label"]], 0)
        c_valid = jnp.concatenate([valid, memory["valid"]], 0)
    else:
        c_embed, c_label, c_valid = embed, label, valid
    logits = embed @ c_embed.T / temperature  # [A, A + S]
    not_self = jnp.arange(c_embed.shape[0])[None, :] != jnp.arange(num)[:, None]
    contrast = c_valid[None, :] & not_self & valid[:, None]
    positive = contrast & (c_label[None, :] == label[:, None])
    if kind == "acl":
        anchor_others = label == others_class
        cand_others = c_label == others_class
        # Eq. 5 sums over common samples only; others-others pairs are gone.
        contrast = contrast & ~(anchor_others[:, None] & cand_others[None, :])
        positive = positive & ~anchor_others[:, None]
    neg_inf = jnp.finfo(jnp.float32).min
    log_denominator = jax.nn.logsumexp(jnp.where(contrast, logits, neg_inf),
                                       axis=1)
    num_pos = positive.sum(1)
    mean_pos_logit = (jnp.sum(jnp.where(positive, logits, 0.0), 1)
                      / jnp.maximum(num_pos, 1))
    per_anchor = log_denominator - mean_pos_logit  # Eq. 4
    counted = valid & (num_pos > 0)
    if kind == "acl":
        per_anchor = jnp.where(anchor_others, log_denominator, per_anchor)
        counted = jnp.where(anchor_others, valid & (contrast.sum(1) > 0),
                            counted)
    per_anchor = jnp.where(counted, per_anchor, 0.0)
    return jnp.sum(per_anchor) / jnp.maximum(counted.sum(), 1)
