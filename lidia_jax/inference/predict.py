"""Prediction: phase files in, the data contract's outputs out.

For every case, into the output folder (shared/spec/dataset_format.md, "What a prediction
writes"):
  CASE_seg.nii.gz        uint8 label codes      } in the venous input's exact geometry
  CASE_instances.nii.gz  uint16 lesion ids 1..K } (size, spacing, origin, direction)
  CASE.json              patient probabilities, malignancy, lesions (measured on that grid)

Inputs (`inputs`):
  - a dataset folder with dataset.json: its imagesTs cases if it has any, else its imagesTr
    cases (labels, if any, are ignored);
  - a folder of phase files without dataset.json: files named CASE_000c<ending> (c = 0 NC,
    1 A, 2 V, 3 D) grouped by CASE;
  - the phase files of one case (a list of paths named as above).

Each case: read + checked + aligned (data.contract.load_case), preprocessed with the training
cache's plan (same spacing, crop and intensity statistics), sliding window, post-processing and
patient score on the preprocessed grid; the label and instance maps are then mapped back by
nearest neighbour (data.geometry.to_original) and each lesion measured on the written grid. A
case that fails (unreadable file, missing phase, ...) is reported with the file and the problem
and the others go on; the return value is 1 if any case failed (0 otherwise).
"""

import json
import pathlib
import time
import traceback
from typing import Callable, List, Optional, Sequence, Tuple, Union

import jax
import numpy as np
import SimpleITK as sitk

from lidia_jax.data import contract
from lidia_jax.data import geometry as geo
from lidia_jax.data import preprocessing
from lidia_jax.inference import diagnose as diagnose_lib
from lidia_jax.inference import lesion_forest
from lidia_jax.inference import postprocess as postprocess_lib
from lidia_jax.inference import semantic

PathLike = Union[str, pathlib.Path]


def _group_loose_files(folder: pathlib.Path) -> List[Union[contract.CaseFiles, Tuple]]:
    """CASE_000c files of a folder without dataset.json, grouped per case."""
    groups = {}
    for f in sorted(folder.iterdir()):
        ending = next((e for e in contract.KNOWN_ENDINGS if f.name.endswith(e)), None)
        if ending is None or not f.is_file():
            continue
        stem = f.name[: -len(ending)]
        case = stem.rsplit("_", 1)[0] if "_" in stem else stem
        groups.setdefault(case, []).append(f)
    if not groups:
        raise contract.DatasetError(folder, "no image file found: expected dataset.json or files "
                                    f"named CASE_0002.nii.gz (endings {contract.KNOWN_ENDINGS})")
    out = []
    for case, files in sorted(groups.items()):
        try:
            out.append(contract.find_case_files(files))
        except contract.CaseError as e:
            out.append((case, e))
    return out


def collect_cases(inputs: Union[PathLike, Sequence[PathLike]]):
    """Resolves `inputs` (see the module docstring) -> (list of CaseFiles or (name, error),
    Dataset or None)."""
    if isinstance(inputs, (str, pathlib.Path)):
        inputs = [inputs]
    paths = [pathlib.Path(p) for p in inputs]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if (folder / "dataset.json").is_file():
            dataset = contract.read_dataset(folder)
            return list(dataset.cases["Ts"] or dataset.cases["Tr"]), dataset
        return _group_loose_files(folder), None
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise contract.DatasetError(missing[0], "input file does not exist")
    try:
        return [contract.find_case_files(paths)], None
    except contract.CaseError as e:
        return [(paths[0].name, e)], None


def _renumber(instances: np.ndarray, seg_lesions: list, present: set):
    """Drops lesions that vanished when mapped back and renumbers the rest 1..K in order."""
    mapping = np.zeros(int(instances.max(initial=0)) + 1, np.uint16)
    kept = [l for l in seg_lesions if l["id"] in present]
    for new_id, l in enumerate(kept, start=1):
        mapping[l["id"]] = new_id
    out = []
    for new_id, l in enumerate(kept, start=1):
        out.append(dict(l, id=new_id, old_id=l["id"]))
    return mapping[instances], out


def predict_case(case_files: contract.CaseFiles, dataset, plan: dict, tile_fn: Callable,
                 config, output_dir: pathlib.Path, forest=None) -> dict:
    """Predicts one case and writes its three files; returns the CASE.json content (forest: the
    lesion forest, inference/lesion_forest.py, or None)."""
    settings = plan["settings"]
    loaded = contract.load_case(case_files, dataset, settings.get("allow_missing_phases", False),
                                settings.get("drop_delayed", False))
    image, _, _, meta = preprocessing.preprocess_case(loaded, plan)
    del loaded
    geometry = meta["geometry"]
    diag = diagnose_lib.diagnose_volume(image, meta["phase_mask"], tile_fn, meta["spacing"],
                                        config, forest)
    del image
    names = diagnose_lib.label_names(config)
    seg = sitk.GetArrayFromImage(geo.to_original(diag.seg, geometry, is_label=True))
    inst = sitk.GetArrayFromImage(geo.to_original(diag.instances, geometry, is_label=True))
    grid = geometry["original"]
    present = set(int(i) for i in np.unique(inst) if i > 0)
    lesions = diag.lesions
    if present != {l["id"] for l in lesions}:
        inst, lesions = _renumber(inst, lesions, present)
        seg[(seg >= 2) & (inst == 0)] = 1  # a vanished lesion's stray voxels (none expected)
    measures = postprocess_lib.measure_lesions(inst, grid)
    report = {
        "case": case_files.name,
        "phases": [p for p, m in zip(contract.PHASES, meta["phase_mask"]) if m],
        "patient_probabilities": {n: round(float(p), 6) for n, p in
                                  zip(diagnose_lib.lesion_names(config),
                                      diag.patient_probabilities)},
        "malignancy_probability": round(diag.malignancy_probability, 6),
        "lesions": [diagnose_lib.lesion_report(l, measures.get(l["id"]), names)
                    for l in lesions],
        "patient_score": config.inference.patient_score,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    name = case_files.name
    sitk.WriteImage(geo.image_from_array(seg.astype(np.uint8), grid),
                    str(output_dir / f"{name}_seg.nii.gz"), True)
    sitk.WriteImage(geo.image_from_array(inst.astype(np.uint16), grid),
                    str(output_dir / f"{name}_instances.nii.gz"), True)
    (output_dir / f"{name}.json").write_text(json.dumps(report, indent=2))
    report["_seconds"] = diag.seconds
    return report


def run_predict(config, variables, model, inputs, output_dir, plan: dict,
                log: Callable[[str], None] = print, tile_predictor=None, forest=None) -> int:
    """Predicts every case of `inputs` into `output_dir`. Returns the exit status (0 = all ok).

    variables: model variables ({"params": ...}) or the params tree, or a list of several
    models' (an ensemble: semantic.bind); plan: the training cache's plan.json (preprocessing
    settings + intensity statistics).
    """
    output_dir = pathlib.Path(output_dir)
    try:
        cases, dataset = collect_cases(inputs)
    except contract.DatasetError as e:
        log(f"ERROR {e}")
        return 1
    predictor = tile_predictor or semantic.model_tile_predictor(model, config)
    tile_fn = semantic.bind(predictor, semantic.as_variables(variables))
    failed = {}
    for i, case in enumerate(cases, start=1):
        head = f"[{i}/{len(cases)}]"
        if isinstance(case, tuple):
            name, err = case
            failed[name] = str(err)
            log(f"{head} {name}: FAILED {err}")
            continue
        t0 = time.perf_counter()
        try:
            report = predict_case(case, dataset, plan, tile_fn, config, output_dir, forest)
        except contract.CaseError as e:
            failed[case.name] = str(e)
            log(f"{head} {case.name}: FAILED {e.file}: {e.message}")
            continue
        except Exception as e:  # keep the cohort going; name the case, keep the traceback
            failed[case.name] = f"unexpected {type(e).__name__}: {e}"
            log(f"{head} {case.name}: FAILED unexpected {type(e).__name__}: {e}\n"
                + traceback.format_exc(limit=3))
            continue
        sec = report["_seconds"]
        log(f"{head} {case.name}: {len(report['lesions'])} lesions, malignancy "
            f"{report['malignancy_probability']:.3f}, {time.perf_counter() - t0:.1f} s "
            f"({sec['tiles']} tiles, sliding window {sec['sliding_window']:.1f} s)")
    log(f"predicted {len(cases) - len(failed)}/{len(cases)} cases into {output_dir}"
        + (f"; FAILED: {', '.join(sorted(failed))}" if failed else ""))
    return 1 if failed else 0


def load_plan(workdir) -> dict:
    path = pathlib.Path(workdir) / "plan.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; it is copied there by training (the "
                                "preprocessing plan the model was trained with)")
    return json.loads(path.read_text())


def _model_section(workdir) -> Optional[dict]:
    path = pathlib.Path(workdir) / "config.json"
    return json.loads(path.read_text()).get("model") if path.is_file() else None


def load_models(config, workdirs: Sequence[PathLike], log: Callable[[str], None] = print):
    """The preprocessing plan and inference weights of one trained workdir, or of several.

    Several workdirs make an ensemble whose probabilities are averaged (semantic.bind), as
    nnU-Net ensembles its folds, e.g. the same recipe trained with other --config.seed values.
    The first workdir's plan preprocesses the cases; every other must have been trained with
    the same preprocessing (the plan's settings and intensity statistics) and the same model
    (config.json's model section, the parameters' shapes), else a ValueError names it.
    Returns (plan, [variables of each workdir]); FileNotFoundError if one has no checkpoint.
    """
    from lidia_jax.train import checkpoint as ckpt_lib  # orbax and grain: not for the readers

    plan, members, first_params = None, [], None
    for workdir in workdirs:
        this_plan = load_plan(workdir)
        params, step = ckpt_lib.restore_params(workdir, config.inference.checkpoint,
                                               config.inference.use_ema)
        log(f"using the {config.inference.checkpoint} checkpoint (step {step}) of {workdir}")
        if plan is None:
            plan, first_params, first_model = this_plan, params, _model_section(workdir)
        else:
            for key in ("settings", "intensity"):
                if this_plan.get(key) != plan.get(key):
                    raise ValueError(f"{workdir}: trained with another preprocessing ({key} of "
                                     f"plan.json differ from {workdirs[0]}'s); an ensemble's "
                                     "models must share one")
            model = _model_section(workdir)
            same_shapes = jax.tree.map(np.shape, params) == jax.tree.map(np.shape, first_params)
            if not same_shapes or (model and first_model and model != first_model):
                raise ValueError(f"{workdir}: trained with another model than {workdirs[0]}'s ("
                                 "config.json's model section or the parameters' shapes "
                                 "differ); an ensemble's models must share one")
        members.append({"params": params})
    return plan, members


def predict_from_workdir(config, workdir, inputs, output_dir, log=print,
                         ensemble: Sequence[PathLike] = ()) -> int:
    """CLI entry (lidia_jax.main --mode=predict): trained workdir(s) -> run_predict.

    ensemble: more trained workdirs whose models are averaged with workdir's (load_models).
    """
    from lidia_jax import model as model_lib

    try:
        plan, variables = load_models(config, [workdir, *ensemble], log)
        forest = lesion_forest.load(config, workdir, log)
    except (FileNotFoundError, ValueError) as e:
        log(f"ERROR {e}")
        return 1
    model = model_lib.build_model(config.model)
    return run_predict(config, variables, model, inputs, output_dir, plan, log, forest=forest)
