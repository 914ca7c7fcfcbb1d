"""Class evidence pooled from the input phases under each query's own mask (optional head).

Mask2Former classifies a query from its embedding alone. On a small cohort the embedding takes
thousands of steps to carry a lesion's enhancement pattern, while the pattern is plain in the
attenuations themselves: a random forest on per-phase intensity statistics under the demo
model's *predicted* lesion masks classifies 0.67 of its found lesions, the model itself 0.29
(README, "What it gives today"). Mask pooling (as open-vocabulary segmenters classify a mask by
pooling features under it) gives the class head those statistics directly:

  w_q(x)   = sigmoid(mask logit of query q), resized (trilinear, as the semantic map's masks)
             to the grid of the statistics; soft core c_q = min-pool_3x3x3(w_q), rim w_q - c_q
  ref_p    = mean of phase p over the predicted liver, weighted by
             sum_q softmax(query logits)_liver * w_q(x) (lesion patterns are defined against the
             same phase's liver: contrast timing shifts every value of a patient together)
  f_q      = per phase p: mean, core mean and rim mean minus ref_p, and the standard deviation,
             all under w_q ** s (s = config.model.pooled_intensity_sharpness, 1 by default;
             core and rim of that power); log of its soft volume; the 4 phase-present flags
  logits_q = query logits + MLP(f_q)

The grid of the statistics is that of encoder stage config.model.pooled_intensity_stage (0: the
input's; the masks are on stage 1's in the paper and the demo). A finer grid resolves rims and
cores: a 20 mm lesion is 5 voxels across on the demo's input grid and 2.5 on stage 1's, where its
3x3x3 core is empty. The masks on the stride-2 grid spill two or three voxels past a small lesion,
so under w_q the parenchyma dilutes its pattern. Weighing voxels by w_q ** 4 on the input's grid
raised the demo's patient AUCs but lowered its lesion sensitivity and cost 15% of its time;
neither the power nor the finer grid alone helped (README, "Sharpened statistics on the input's
grid").

With config.loss.pooled_target_weight > 0 the head is also taught on the statistics under the
*true* masks of each training patch (target_statistics, an extra cross-entropy in the objective),
so that it can learn the classes before the model's masks are good; measured in README.

The statistics see the model's outputs through stop_gradient: the class loss trains the MLP, the
mask losses alone train the masks. Zero-initialised last layer: at step 0 the head is
Mask2Former's.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from lidia_jax.model.layers import dense

LIVER_CLASS = 0  # query class index of the liver (label code 1)
_EPS = 1e-3  # voxels: a mask or liver weight summing below this counts as empty


def pool_image(image, size):
    """Average-pools image [B, D, H, W, P] to [B, *size, P] (size divides D, H, W)."""
    b, *spatial, p = image.shape
    factors = [n // s for n, s in zip(spatial, size)]
    if any(n % s for n, s in zip(spatial, size)):
        raise ValueError(f"pool_image: size {tuple(size)} does not divide the image's "
                         f"{tuple(spatial)}")
    x = image.reshape(b, size[0], factors[0], size[1], factors[1], size[2], factors[2], p)
    return x.astype(jnp.float32).mean(axis=(2, 4, 6))


def _soft_core(weights):
    """Soft erosion: min over the 3x3x3 neighbourhood (the image's voxels only), one axis at a
    time. weights [B, Q, d, h, w] -> same shape."""
    for axis in (2, 3, 4):
        window = tuple(3 if a == axis else 1 for a in range(5))
        weights = jax.lax.reduce_window(weights, jnp.inf, jax.lax.min, window, (1,) * 5, "SAME")
    return weights


def _weighted_mean(weights, image):
    """weights [B, Q, d, h, w], image [B, d, h, w, P] -> [B, Q, P] (zero where weights vanish)."""
    total = weights.sum(axis=(2, 3, 4))[..., None]
    summed = jnp.einsum("bqdhw,bdhwp->bqp", weights, image)
    return summed / jnp.maximum(total, _EPS)


def mask_statistics(weights, liver, image, phase_mask):
    """The features f_q of the module docstring from soft masks.

    Args:
      weights: [B, Q, d, h, w] in [0, 1], the masks on the statistics' grid; liver: [B, d, h, w],
        the liver's weight per voxel; image: [B, d, h, w, P]; phase_mask: [B, P] bool.
    Returns:
      [B, Q, 4 * P + 1 + P] float32.
    """
    ref = _weighted_mean(liver[:, None], image)  # [B, 1, P]
    core = _soft_core(weights)
    mean = _weighted_mean(weights, image)
    second = _weighted_mean(weights, image * image)
    std = jnp.sqrt(jnp.maximum(second - mean * mean, 0.0))
    present = phase_mask.astype(jnp.float32)[:, None, :]
    volume = jnp.log1p(weights.sum(axis=(2, 3, 4)))[..., None]
    features = [mean - ref, _weighted_mean(core, image) - ref,
                _weighted_mean(jnp.maximum(weights - core, 0.0), image) - ref, std]
    features = [f * present for f in features]
    return jnp.concatenate(
        features + [volume, jnp.broadcast_to(present, mean.shape)], axis=-1)


def pooled_statistics(mask_logits, class_logits, image, phase_mask, sharpness=1):
    """mask_statistics under the model's own masks, the liver from its liver queries.

    Args:
      mask_logits: [B, Q, d, h, w]; class_logits: [B, Q, K+1] (query logits, liver first);
      image: [B, d', h', w', P], the input pooled to the statistics' grid (pool_image), to which
        the masks are resized; phase_mask: [B, P] bool.
      sharpness: the statistics weigh each voxel by w_q(x) ** sharpness (the liver reference
        keeps w_q). The model's masks spill two or three voxels past a lesion, so with w_q alone
        the parenchyma dilutes its pattern; a power > 1 weighs the mask's confident core.
    Returns:
      [B, Q, F] float32, constant with respect to the model's outputs.
    """
    logits = jax.lax.stop_gradient(mask_logits.astype(jnp.float32))
    if logits.shape[2:] != image.shape[1:4]:
        logits = jax.image.resize(logits, logits.shape[:2] + image.shape[1:4], method="linear")
    w = jax.nn.sigmoid(logits)
    liver_prob = jax.nn.softmax(jax.lax.stop_gradient(class_logits), axis=-1)[..., LIVER_CLASS]
    liver = jnp.einsum("bq,bqdhw->bdhw", liver_prob, w)
    return mask_statistics(w ** sharpness if sharpness != 1 else w, liver, image, phase_mask)


def target_statistics(masks, classes, valid, image, phase_mask):
    """mask_statistics under the ground-truth masks of a training batch (the liver: the valid
    targets of class LIVER_CLASS), for the auxiliary class loss of the pooled head.

    Args:
      masks: bool [B, T, D, H, W] on the input's grid; classes: int [B, T]; valid: bool [B, T];
      image: [B, d, h, w, P], the input pooled to the statistics' grid; phase_mask: [B, P].
    Returns:
      [B, T, F] float32.
    """
    as_channels = jnp.moveaxis(masks.astype(jnp.float32), 1, -1)  # [B, D, H, W, T]
    w = jnp.moveaxis(pool_image(as_channels, image.shape[1:4]), -1, 1)  # area fractions
    liver = jnp.einsum("bt,btdhw->bdhw", (valid & (classes == LIVER_CLASS)).astype(jnp.float32), w)
    return mask_statistics(w, liver, image, phase_mask)


class PooledIntensityLogits(nn.Module):
    """MLP from pooled_statistics [B, Q, F] to class-logit offsets [B, Q, K+1] (float32)."""

    num_classes: int
    hidden: int = 64

    @nn.compact
    def __call__(self, features):
        x = nn.relu(dense(self.hidden, ("pooled", "mlp"), name="pool_hidden")(features))
        return dense(self.num_classes + 1, ("mlp", "classes"),
                     kernel_init=nn.initializers.zeros_init(), name="pool_logits")(x)
