"""How well can a cohort's lesion classes be told apart at all? An oracle radiomics baseline.

Given the *true* lesion masks (so detection and segmentation are perfect), a random forest on
simple per-lesion intensity features, trained on the training split, classifies the test split's
lesions; the patient probability of a class is the max over the patient's lesions (LiverMax on
lesions), malignancy the max over lesions of the malignant classes' summed probability. The
records go through the project's own `evaluation.metrics`, so AUC-8, AUC-2 and the lesion
accuracy are the same definitions the model is scored with. The result bounds what a model that
learns intensity and rim/core patterns can reach on this cohort, and so what a target is worth.

Features per lesion and phase (on the preprocessed, z-scored cache; liver = the case's label-1
voxels): mean, 10th and 90th percentile, core (eroded) mean and rim mean, each minus the liver
mean, the standard deviation, plus log volume. Absent phases are zero, as in the cache.

  python scripts/oracle_baseline.py --workdir runs/demo     # a workdir that was trained/preprocessed
  python scripts/oracle_baseline.py --cache DIR/preprocessed/FINGERPRINT --out oracle.md
"""

import argparse
import datetime
import json
import pathlib
import sys
from typing import List, Tuple

import ml_collections
import numpy as np
import scipy.ndimage as ndi
from sklearn.ensemble import RandomForestClassifier

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lidia_jax.config_file import load_config  # noqa: E402
from lidia_jax.data import preprocessing  # noqa: E402
from lidia_jax.evaluation import metrics  # noqa: E402
from lidia_jax.train import trainer  # noqa: E402

LIVER = 1


def lesion_features(image: np.ndarray, seg: np.ndarray, inst: np.ndarray
                    ) -> Tuple[List[int], np.ndarray, np.ndarray]:
    """Per true lesion: (instance ids, label codes [L], features [L, 6 * P + 1]).

    image [D, H, W, P] z-scored; seg, inst [D, H, W].
    """
    liver = seg == LIVER
    ref = image[liver].mean(0) if liver.any() else np.zeros(image.shape[-1], image.dtype)
    ids, codes, rows = [], [], []
    for i in np.unique(inst):
        if i == 0:
            continue
        m = inst == i
        core = ndi.binary_erosion(m)
        core = core if core.any() else m
        rim = m & ~core
        rim = rim if rim.any() else m
        v = image[m]
        rows.append(np.concatenate([
            v.mean(0) - ref, v.std(0), np.percentile(v, 10, axis=0) - ref,
            np.percentile(v, 90, axis=0) - ref, image[core].mean(0) - ref,
            image[rim].mean(0) - ref, [np.log(m.sum())]]))
        ids.append(int(i))
        codes.append(int(np.bincount(seg[m]).argmax()))
    width = 6 * image.shape[-1] + 1
    return ids, np.asarray(codes, int), np.asarray(rows, np.float64).reshape(-1, width)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a trained workdir (plan.json, config.json)")
    p.add_argument("--cache", help="a preprocessed cache folder (holds plan.json and cases)")
    p.add_argument("--config", default="demo", help="config string for the label names")
    p.add_argument("--out", help="markdown file to write (default: print only)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if bool(args.workdir) == bool(args.cache):
        p.error("give exactly one of --workdir and --cache")
    if args.workdir:
        # The cache the run trained on: its config.json's data.cache_dir, as the trainer chose it.
        workdir = pathlib.Path(args.workdir)
        plan = json.loads((workdir / trainer.PLAN_FILE).read_text())
        run_config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
        cache_dir = trainer.cache_root(run_config.data, workdir) / plan["fingerprint"]
    else:
        cache_dir = pathlib.Path(args.cache)
    cache = preprocessing.Cache(cache_dir)
    cfg = load_config(args.config)
    lesions = list(cfg.data.labels[2:])

    def split(name):
        out = []
        for case in cache.case_names(name):
            d = cache.load(case, mmap=False)
            if d["seg"] is not None:
                out.append((case, d["seg"], d["inst"]) + lesion_features(d["image"], d["seg"],
                                                                          d["inst"]))
        return out

    train = split("train") + split("val")
    test = split("test")
    x_train = np.concatenate([t[5] for t in train])
    y_train = np.concatenate([t[4] for t in train])
    if len(np.unique(y_train)) < 2:
        p.error(f"{cache_dir}: the train and val cases hold lesions of "
                f"{len(np.unique(y_train))} class(es); a classifier needs at least two")
    forest = RandomForestClassifier(n_estimators=500, random_state=args.seed, n_jobs=-1)
    forest.fit(x_train, y_train)
    col = {int(c): k for k, c in enumerate(forest.classes_)}
    mal_cols = [lesions.index(n) for n in cfg.data.malignant]
    records = []
    for case, seg, inst, ids, codes, x in test:
        prob = np.zeros((len(ids), len(lesions)))
        if ids:
            pr = forest.predict_proba(x)
            for c, k in col.items():
                prob[:, c - metrics.FIRST_LESION_CODE] = pr[:, k]
        predicted = metrics.FIRST_LESION_CODE + prob.argmax(1)
        patient = prob.max(0) if ids else np.zeros(len(lesions))
        malign = float(prob[:, mal_cols].sum(1).max()) if ids else 0.0
        truth = dict(zip(ids, codes.tolist()))
        records.append(metrics.case_record(
            case, seg, inst, truth, seg, inst, dict(zip(ids, predicted.tolist())), patient,
            malign, iou_threshold=cfg.eval.lesion_iou_threshold))
    summary = metrics.summarize(records, lesions, cfg.data.malignant, cfg.data.benign)
    per_class = summary["auc"]
    lines = [
        f"`python scripts/oracle_baseline.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" ({datetime.date.today().isoformat()})",
        "",
        f"Oracle baseline on {cache_dir}: random forest on true-mask lesion features, "
        f"{len(y_train)} training lesions ({len(train)} cases), {len(test)} test cases.",
        "",
        "| " + " | ".join(lesions) + " | AUC-8 | AUC-2 | lesion accuracy |",
        "|" + "---|" * (len(lesions) + 3),
        "| " + " | ".join("-" if per_class[n] is None else f"{per_class[n]:.3f}"
                          for n in lesions)
        + f" | {summary['auc8']:.3f} | {summary['auc2']:.3f} | {summary['lesion_accuracy']:.3f} |",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
