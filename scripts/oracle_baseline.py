"""How well can a cohort's lesion classes be told apart at all? An oracle radiomics baseline.

Given the *true* lesion masks (so detection and segmentation are perfect), a random forest on
simple per-lesion intensity features, trained on the training split, classifies the test split's
lesions; the patient probability of a class is the max over the patient's lesions (LiverMax on
lesions), malignancy the max over lesions of the malignant classes' summed probability. The
records go through the project's own `evaluation.metrics`, so AUC-8, AUC-2 and the lesion
accuracy are the same definitions the model is scored with. The result bounds what a model that
learns intensity and rim/core patterns can reach on this cohort, and so what a target is worth.

Features per lesion: those of `lidia_jax/inference/lesion_forest.py` (per phase on the
preprocessed, z-scored cache, liver-relative: mean, 10th and 90th percentile, core and rim mean,
standard deviation, the core's and rim's phase-to-phase changes, rim minus core; log volume;
absent phases are zero, as in the cache), whose forest `--config.inference.lesion_forest` puts
after the network, fitted on the training split alone.

  python scripts/oracle_baseline.py --workdir runs/demo     # a workdir that was trained/preprocessed
  python scripts/oracle_baseline.py --cache DIR/preprocessed/FINGERPRINT --out oracle.md
  python scripts/oracle_baseline.py --workdir runs/demo --predicted

--predicted: the same forest classifies the lesions the workdir's trained model *predicts* on the
test split (its final checkpoint, as the test report), with the liver reference taken from its
predicted liver, and the model's own figures on those predictions are printed beside it. The gap
between the two rows is what the model's classification loses on its own detections; the gap to
the true-mask row is what detection and segmentation lose.
"""

import argparse
import datetime
import json
import pathlib
import sys

import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lidia_jax.config_file import load_config  # noqa: E402
from lidia_jax.data import preprocessing  # noqa: E402
from lidia_jax.evaluation import metrics  # noqa: E402
from lidia_jax.inference import lesion_forest  # noqa: E402
from lidia_jax.train import trainer  # noqa: E402


def lesion_record(case, gt_seg, gt_inst, gt_classes, pred_seg, pred_inst, pred_ids, prob,
                  malignant, lesions, iou_threshold, patient_codes=None) -> dict:
    """metrics.case_record of lesions classified by `prob` [L, 8]: each lesion takes its most
    probable class; the patient's class probability is the max over its lesions (LiverMax on
    lesions), malignancy the max of the malignant classes' summed probability."""
    mal_cols = [lesions.index(n) for n in malignant]
    predicted = dict(zip(pred_ids, (metrics.FIRST_LESION_CODE + prob.argmax(1)).tolist()))
    patient = prob.max(0) if len(prob) else np.zeros(len(lesions))
    malign = float(prob[:, mal_cols].sum(1).max()) if len(prob) else 0.0
    return metrics.case_record(case, gt_seg, gt_inst, gt_classes, pred_seg, pred_inst, predicted,
                               patient, malign, iou_threshold, patient_codes)


def trained_model(workdir: pathlib.Path):
    """(run config, bound tile predictor) of a trained workdir's test checkpoint."""
    from lidia_jax import model as model_lib  # only --predicted needs the model
    from lidia_jax.inference import semantic
    from lidia_jax.train import checkpoint

    run = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    params, _ = checkpoint.restore_params(workdir, run.inference.checkpoint,
                                          run.inference.get("use_ema", True))
    model = model_lib.build_model(run.model)
    return run, semantic.bind(semantic.model_tile_predictor(model, run),
                              semantic.as_variables(params))


def predicted_rows(run, tile_fn, cache, test, classify, lesions, cfg):
    """[(label, records)] for the forest on the model's predicted lesions and for the model.

    run, tile_fn: trained_model(); test: main's (case, seg, inst, true ids, true codes,
    features) of the test cases."""
    from lidia_jax.inference import diagnose

    iou = cfg.eval.lesion_iou_threshold
    forest_records, model_records = [], []
    for case, seg, inst, true_ids, true_codes, _ in test:
        data = cache.load(case, mmap=False)
        meta = data["meta"]
        diag = diagnose.diagnose_volume(data["image"], meta["phase_mask"], tile_fn,
                                        meta["spacing"], run)
        gt = (case, seg, inst, dict(zip(true_ids, true_codes.tolist())))
        patient_codes = meta.get("patient_classes")
        # Predicted lesions on the predicted liver: the features' reference is the model's liver.
        pred_seg = np.where(diag.instances > 0, metrics.FIRST_LESION_CODE, diag.seg)
        ids, _, x = lesion_forest.lesion_features(data["image"], pred_seg, diag.instances)
        forest_records.append(lesion_record(*gt, diag.seg, diag.instances, ids, classify(x),
                                            cfg.data.malignant, lesions, iou, patient_codes))
        model_records.append(metrics.case_record(
            *gt, diag.seg, diag.instances, diagnose.instance_classes(diag.lesions),
            diag.patient_probabilities, diag.malignancy_probability, iou, patient_codes))
    return [("the model's predicted lesions, classified by the forest", forest_records),
            ("the model's predicted lesions, classified by the model", model_records)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="a trained workdir (plan.json, config.json)")
    p.add_argument("--cache", help="a preprocessed cache folder (holds plan.json and cases)")
    p.add_argument("--config", default="demo", help="config string for the label names")
    p.add_argument("--out", help="markdown file to write (default: print only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--predicted", action="store_true",
                   help="also classify the lesions the workdir's model predicts (see above)")
    args = p.parse_args(argv)
    if bool(args.workdir) == bool(args.cache):
        p.error("give exactly one of --workdir and --cache")
    if args.predicted and not args.workdir:
        p.error("--predicted needs --workdir (a trained model)")
    if args.workdir:
        cache_dir = trainer.trained_cache_dir(args.workdir)  # the cache the run trained on
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
                out.append((case, d["seg"], d["inst"])
                           + lesion_forest.lesion_features(d["image"], d["seg"], d["inst"]))
        return out

    train = split("train") + split("val")
    test = split("test")
    x_train = np.concatenate([t[5] for t in train])
    y_train = np.concatenate([t[4] for t in train])
    if len(np.unique(y_train)) < 2:
        p.error(f"{cache_dir}: the train and val cases hold lesions of "
                f"{len(np.unique(y_train))} class(es); a classifier needs at least two")
    forest = lesion_forest.fit(x_train, y_train, len(lesions), trees=500, seed=args.seed)
    classify = forest.probabilities
    iou = cfg.eval.lesion_iou_threshold
    records = []
    for case, seg, inst, ids, codes, x in test:
        patient_codes = cache.load(case)["meta"].get("patient_classes")
        records.append(lesion_record(case, seg, inst, dict(zip(ids, codes.tolist())), seg, inst,
                                     ids, classify(x), cfg.data.malignant, lesions, iou,
                                     patient_codes))
    rows = [("true lesion masks", records)]
    if args.predicted:
        run, tile_fn = trained_model(pathlib.Path(args.workdir))
        rows += predicted_rows(run, tile_fn, cache, test, classify, lesions, cfg)
    lines = [
        f"`python scripts/oracle_baseline.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" ({datetime.date.today().isoformat()})",
        "",
        f"Oracle baseline on {cache_dir}: random forest on lesion features, trained on "
        f"{len(y_train)} true lesions ({len(train)} cases), {len(test)} test cases.",
        "",
        "| lesions | " + " | ".join(lesions) + " | AUC-8 | AUC-2 | lesion accuracy | "
        "lesion sensitivity | lesion precision |",
        "|" + "---|" * (len(lesions) + 6),
    ]
    for label, recs in rows:
        summary = metrics.summarize(recs, lesions, cfg.data.malignant, cfg.data.benign)
        lines.append(
            f"| {label} | " + " | ".join("-" if summary["auc"][n] is None else
                                         f"{summary['auc'][n]:.3f}" for n in lesions)
            + "".join(f" | {summary[k]:.3f}" for k in ("auc8", "auc2", "lesion_accuracy",
                                                       "lesion_sensitivity", "lesion_precision"))
            + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
