"""Does a trained model find each lesion class on unseen patients, or only on its training ones?

Draws patches with the training pipeline (lesion-centred, class-balanced, augmented, as training
sees them, but without pasted lesions) from each split of a trained workdir's cache, runs the
model's last decoder layer on them, and for every lesion target of the patch reads:

  score   the target class's probability in the semantic map (inference/semantic.py: Mask2Former's
          sum_q p_q(c) * sigmoid(mask_q), made a distribution over the label codes) at its
          highest voxel inside the true lesion, as LiverMax would read it;
  class   the query whose mask (sigmoid > 0.5) best overlaps the lesion predicts its class;
  head    (models with the mask-pooled class head) that query's pooled head alone, its
          `pooled_logits` term, predicts the class.

A class found on the training split but not on the validation and test splits is memorised,
not learned.

  python scripts/class_probe.py --workdir runs/demo --batches 100
"""

import argparse
import collections
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lidia_jax.data import pipeline  # noqa: E402
from lidia_jax.inference import semantic  # noqa: E402
from lidia_jax.model import lidia as model_lib  # noqa: E402
from lidia_jax.train import checkpoint as ckpt  # noqa: E402
from lidia_jax.train import trainer  # noqa: E402


def probe(apply, params, batches):
    """{class index: [(score, class right, head alone right or None)]} over the lesion targets of
    `batches` (training batches: image, phase_mask, masks, classes, valid); apply(params, image,
    phase_mask) gives the model's outputs."""
    rows = collections.defaultdict(list)
    for batch in batches:
        out = apply(params, jnp.asarray(batch["image"]), jnp.asarray(batch["phase_mask"]))
        logits = out["logits"][-1]
        scores, mask_probs = semantic.mask2former_semantic(
            logits, out["masks"][-1], batch["image"].shape[1:4])
        probs = np.asarray(semantic.label_probabilities(scores))  # [B, D, H, W, K + 1], codes
        mask_probs = np.asarray(mask_probs)
        predicted = np.asarray(jnp.argmax(logits, axis=-1))
        head = (np.asarray(jnp.argmax(out["pooled_logits"][-1], axis=-1))
                if "pooled_logits" in out else None)
        for b, t in zip(*np.nonzero(batch["valid"][:, 1:])):
            t += 1  # slot 0 is the liver
            c, truth = int(batch["classes"][b, t]), batch["masks"][b, t]
            binary = mask_probs[b] > 0.5
            iou = (binary & truth).sum((1, 2, 3)) / np.maximum((binary | truth).sum((1, 2, 3)), 1)
            score = float(probs[b][truth, c + 1].max())  # class index c is label code c + 1
            q = int(iou.argmax())
            rows[c].append((score, predicted[b, q] == c, None if head is None else head[b, q] == c))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a trained workdir")
    p.add_argument("--splits", default="train,val,test")
    p.add_argument("--batches", type=int, default=100, help="patches batches per split")
    p.add_argument("--seed", type=int, default=123)
    args = p.parse_args(argv)

    workdir = pathlib.Path(args.workdir)
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    config.input.num_workers = 0
    # The patches as the data has them: no pasted or synthetic lesions.
    config.input.paste_prob = config.input.synth_calc_prob = 0.0
    cache_dir = trainer.trained_cache_dir(workdir)
    params, step = ckpt.restore_params(workdir, "latest", config.inference.get("use_ema", True))
    model = model_lib.build_model(config.model)
    apply = jax.jit(lambda p_, x, m: model.apply({"params": p_}, x, m))
    names = ["liver"] + list(config.data.labels[2:])

    splits = args.splits.split(",")
    results = {}
    for split in splits:
        it = pipeline.make_train_iterator(cache_dir, config, split=split, seed=args.seed)
        results[split] = probe(apply, params, (next(it) for _ in range(args.batches)))
    with_head = bool(config.model.get("pooled_intensity", False))
    columns = "n, median score, class right" + (", head alone right" if with_head else "")
    print(f"{workdir}, checkpoint step {step}, {args.batches} batches per split\n")
    print("| class | " + " | ".join(f"{s}: {columns}" for s in splits) + " |")
    print("|---|" + "---|" * len(splits))
    for c in range(1, len(names)):
        cells = []
        for s in splits:
            r = np.array([row[:2 + with_head] for row in results[s].get(c, [])],
                         float).reshape(-1, 2 + with_head)
            cells.append(", ".join([str(len(r)), f"{np.median(r[:, 0]):.2f}"]
                                   + [f"{x:.2f}" for x in r[:, 1:].mean(0)]) if len(r) else "0")
        print(f"| {names[c]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
