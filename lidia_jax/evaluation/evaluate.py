"""Evaluation of a trained model: on a labelled dataset folder, or on preprocessed cache cases.

run_evaluate: the dataset's labelled test cases (imagesTs with labelsTs) if it has any, else its
  labelled training cases; predicts them exactly as `predict` does (files written under
  OUTPUT/predictions) and scores the written files against the label files in the ORIGINAL
  venous geometry. True instances come from instancesT? when present, else from connected
  components per lesion class (data contract).
evaluate_cache: cases of the preprocessing cache, scored on the preprocessed grid (no resampling
  back): fast, for the training loop's periodic validation and its final test report.
Metric definitions: lidia_jax/evaluation/metrics.py.
"""

import pathlib
import time
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from lidia_jax.data import contract
from lidia_jax.data import geometry as geo
from lidia_jax.evaluation import metrics as metrics_lib
from lidia_jax.evaluation import report as report_lib
from lidia_jax.evaluation import targets as targets_lib
from lidia_jax.inference import diagnose as diagnose_lib
from lidia_jax.inference import lesion_forest
from lidia_jax.inference import predict as predict_lib
from lidia_jax.inference import semantic


def _summarize(records, config):
    """metrics.summarize, with "targets" (targets.compare) where config.eval.targets has any."""
    summary = metrics_lib.summarize(records, diagnose_lib.lesion_names(config),
                                    tuple(config.data.malignant), tuple(config.data.benign))
    if config.eval.get("targets"):
        summary["targets"] = targets_lib.compare(summary, config.eval.targets)
    return summary


def evaluate_cache(model, params, cache, case_names: Sequence[str], config,
                   max_cases: int = -1, report_dir=None, log: Callable[[str], None] = print,
                   tile_predictor=None, forest=None) -> dict:
    """Metrics of `params` on preprocessed cases (the cache's grid).

    Args:
      model: the flax module (build_model(config.model)); params: its params tree (or variables).
      cache: data.preprocessing.Cache; case_names: cases to score (unlabelled ones are skipped).
      max_cases: score only the first max_cases cases (<= 0: all).
      report_dir: if given, write metrics.json, report.md and figures there.
      forest: the lesion forest (inference/lesion_forest.py) or None.
    Returns:
      metrics.summarize dict (scalars auc8, auc2, lesion_* at the top level).
    """
    predictor = tile_predictor or semantic.model_tile_predictor(model, config)
    tile_fn = semantic.bind(predictor, semantic.as_variables(params))
    names = list(case_names)[:max_cases] if max_cases and max_cases > 0 else list(case_names)
    records, overlays = [], []
    t0 = time.perf_counter()
    for case in names:
        data = cache.load(case)
        if data["seg"] is None:
            log(f"evaluate: {case} has no labels in the cache; skipped")
            continue
        meta = data["meta"]
        diag = diagnose_lib.diagnose_volume(data["image"], meta["phase_mask"], tile_fn,
                                            meta["spacing"], config, forest)
        gt_classes = {int(k): int(v) for k, v in meta["instance_classes"].items()}
        records.append(metrics_lib.case_record(
            case, np.asarray(data["seg"]), np.asarray(data["inst"]), gt_classes, diag.seg,
            diag.instances, diagnose_lib.instance_classes(diag.lesions),
            diag.patient_probabilities, diag.malignancy_probability,
            config.eval.lesion_iou_threshold,
            patient_codes=meta.get("patient_classes", sorted(set(gt_classes.values()))),
            voxel_mm3=float(np.prod(meta["spacing"]))))
        if report_dir is not None and len(overlays) < config.eval.num_overlays:
            image = np.asarray(data["image"])
            overlays.append({"case": case, "gt": np.asarray(data["seg"]), "pred": diag.seg,
                             "images": {p: (image[..., c] if meta["phase_mask"][c] else None)
                                        for c, p in enumerate(contract.PHASES)}})
    summary = _summarize(records, config)
    summary["seconds"] = time.perf_counter() - t0
    if report_dir is not None:
        report_lib.write_report(summary, report_dir, overlays,
                                notes=["Scored on the preprocessed grid (cache), not the "
                                       "original geometry.", _scoring_note(config)])
    return summary


def _scoring_note(config) -> str:
    """The report line that says how patients and lesions were scored."""
    inf = config.inference
    forest = (f", blended {inf.lesion_forest_weight:g} with the lesion forest's, which names the "
              "lesions" if inf.get("lesion_forest", False) else "")
    return (f"Patient score: {inf.patient_score}{forest}; lesion IoU threshold "
            f"{config.eval.lesion_iou_threshold}.")


def labelled_cases(dataset: contract.Dataset):
    """Labelled test cases if the dataset has any, else labelled training cases; with the split."""
    for split in ("Ts", "Tr"):
        cases = [c for c in dataset.cases[split] if c.label is not None]
        if cases:
            return cases, split
    raise contract.DatasetError(dataset.root, "no labelled case: evaluation needs labelsTs/ "
                                "(or labelsTr/) files named like the images' CASE")


def _truth(case_files: contract.CaseFiles):
    """Label and instance maps in the files' own (original) array order, instance classes, and
    the label file's voxel volume (mm^3)."""
    label_image = sitk.ReadImage(str(case_files.label))
    label = sitk.GetArrayFromImage(label_image).astype(np.uint8)
    if case_files.instance is not None:
        inst = sitk.GetArrayFromImage(sitk.ReadImage(str(case_files.instance))).astype(np.uint16)
    else:
        inst = contract.connected_instances(label)
    classes = contract.instance_classes(inst, label)
    inst[(inst > 0) & ~np.isin(inst, list(classes))] = 0
    return label, inst, classes, float(np.prod(label_image.GetSpacing()))


def run_evaluate(config, variables, model, input_dir, output_dir, plan: dict,
                 log: Callable[[str], None] = print, tile_predictor=None, forest=None) -> dict:
    """Predicts and scores a labelled dataset folder in the original geometry (see module doc).

    variables: one model's, or a list of several models' (an ensemble: semantic.bind).
    Writes OUTPUT/predictions/CASE_* (as predict), OUTPUT/metrics.json, report.md and figures.
    Returns the metrics summary ({} when no case could be scored).
    """
    output_dir = pathlib.Path(output_dir)
    dataset = contract.read_dataset(input_dir)
    cases, split = labelled_cases(dataset)
    log(f"evaluating {len(cases)} labelled cases of images{split} in {dataset.root}")
    predictor = tile_predictor or semantic.model_tile_predictor(model, config)
    tile_fn = semantic.bind(predictor, semantic.as_variables(variables))
    pred_dir = output_dir / "predictions"
    records, overlays, failed = [], [], {}
    for i, case in enumerate(cases, start=1):
        try:
            report = predict_lib.predict_case(case, dataset, plan, tile_fn, config, pred_dir,
                                              forest)
            gt_seg, gt_inst, gt_classes, voxel_mm3 = _truth(case)
            pred_seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir
                                                                 / f"{case.name}_seg.nii.gz")))
            pred_inst = sitk.GetArrayFromImage(sitk.ReadImage(
                str(pred_dir / f"{case.name}_instances.nii.gz")))
        except contract.CaseError as e:
            failed[case.name] = str(e)
            log(f"[{i}/{len(cases)}] {case.name}: FAILED {e.file}: {e.message}")
            continue
        except Exception as e:  # keep the cohort going; the report lists the failure
            failed[case.name] = f"unexpected {type(e).__name__}: {e}"
            log(f"[{i}/{len(cases)}] {case.name}: FAILED unexpected {type(e).__name__}: {e}")
            continue
        code = {n: c for c, n in enumerate(config.data.labels)}
        pred_classes = {l["id"]: code[l["class"]] for l in report["lesions"]}
        names = diagnose_lib.lesion_names(config)
        records.append(metrics_lib.case_record(
            case.name, gt_seg, gt_inst, gt_classes, pred_seg, pred_inst, pred_classes,
            [report["patient_probabilities"][n] for n in names],
            report["malignancy_probability"], config.eval.lesion_iou_threshold,
            voxel_mm3=voxel_mm3))
        log(f"[{i}/{len(cases)}] {case.name}: {len(gt_classes)} true / "
            f"{len(pred_classes)} predicted lesions")
        if len(overlays) < config.eval.num_overlays:
            loaded = contract.load_case(case, dataset, True, False)
            overlays.append({"case": case.name, "images": loaded.images,
                             "gt": geo.to_canonical(gt_seg, loaded.canonical),
                             "pred": geo.to_canonical(pred_seg, loaded.canonical)})
    if not records:
        log("evaluation: no case could be scored")
        return {}
    summary = _summarize(records, config)
    summary["failed_cases"] = failed
    notes = [f"Dataset {dataset.root}, images{split}; scored in the original venous geometry.",
             _scoring_note(config)]
    if failed:
        notes.append("Failed cases: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    report_lib.write_report(summary, output_dir, overlays, notes=notes)
    log(f"AUC-8 {summary['auc8']:.4f}, AUC-2 {summary['auc2']:.4f}, lesion Dice "
        f"{summary['lesion_dice']:.4f}; report {output_dir / 'report.md'}")
    if "targets" in summary:
        log(targets_lib.describe(summary["targets"]))
    return summary


def evaluate_from_workdir(config, workdir, input_dir, output_dir, log=print,
                          ensemble: Sequence[str] = ()) -> dict:
    """CLI entry (lidia_jax.main --mode=evaluate): trained workdir(s) -> run_evaluate.

    ensemble: more trained workdirs whose models are averaged with workdir's
    (predict.load_models).
    """
    from lidia_jax import model as model_lib

    try:
        plan, variables = predict_lib.load_models(config, [workdir, *ensemble], log)
        forest = lesion_forest.load(config, workdir, log)
    except (FileNotFoundError, ValueError) as e:
        log(f"ERROR {e}")
        return {}
    model = model_lib.build_model(config.model)
    return run_evaluate(config, variables, model, input_dir, output_dir, plan, log,
                        forest=forest)
