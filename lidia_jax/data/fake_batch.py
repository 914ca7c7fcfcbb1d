"""Deterministic fake training batches in the input pipeline's layout, without any data.

For train-step tests and step-time benchmarks (scripts/benchmark.py): fixed shapes from the
config, so the step compiles exactly as it does on real batches.
"""

import numpy as np


def fake_batch(config, batch_size, seed=0):
    """A batch like the grain pipeline's: a liver block with 1-2 cubic lesions per sample.

    Returns numpy arrays: image f32 [B, D, H, W, 4], phase_mask bool [B, 4] (every other sample
    without the delayed phase), semantic i32 [B, D, H, W], masks bool [B, T, D, H, W],
    classes i32 [B, T], valid bool [B, T].
    """
    rng = np.random.default_rng(seed)
    d, h, w = config.input.patch_size
    t = config.data.max_instances
    image = rng.normal(size=(batch_size, d, h, w, 4)).astype(np.float32)
    phase_mask = np.ones((batch_size, 4), bool)
    phase_mask[1::2, 3] = False
    image *= phase_mask[:, None, None, None, :]
    semantic = np.zeros((batch_size, d, h, w), np.int32)
    masks = np.zeros((batch_size, t, d, h, w), bool)
    classes = np.zeros((batch_size, t), np.int32)
    valid = np.zeros((batch_size, t), bool)
    for b in range(batch_size):
        semantic[b, d // 4:, h // 4:, : 3 * w // 4] = 1
        masks[b, 0] = semantic[b] >= 1
        valid[b, 0] = True
        for k in range(1, 1 + rng.integers(1, 3)):
            z, y, x = rng.integers(d // 4, d - 3), rng.integers(h // 4, h - 5), rng.integers(
                0, 3 * w // 4 - 5)
            cls = int(rng.integers(1, 9))
            lesion = np.zeros((d, h, w), bool)
            lesion[z:z + 3, y:y + 5, x:x + 5] = True
            lesion &= semantic[b] == 1
            semantic[b][lesion] = cls + 1
            masks[b, k], classes[b, k], valid[b, k] = lesion, cls, lesion.any()
            image[b, lesion, :3] += 0.5 * cls
    return dict(image=image, phase_mask=phase_mask, semantic=semantic, masks=masks,
                classes=classes, valid=valid)
