r"""The paper's ablations (Tables 2 and 3, and the delayed phase), one training run per row.

  python scripts/ablation.py --root runs/ablation                 # every row, demo base
  python scripts/ablation.py --root runs/ablation --rows t3_baseline t3_sam delayed
  python scripts/ablation.py --root /tmp/abl --base smoke --steps 2 --rows t2_ifm t3_sam
  python scripts/ablation.py --root runs/ablation --dry-run       # print the commands

Each row is one `python -m lidia_jax.main --config=configs/lidia.py:<base>,<overrides>
--workdir=<root>/<row>` run. All rows share ONE dataset and preprocessing cache, made once
under <root>/data (the synthetic cohort of the base variant, or --data-root), so that rows
differ only in the model, loss, optimiser and patient score. Resumable: a row whose workdir has
test_metrics.json is read, not re-run; a row with checkpoints but no test metrics is resumed by
running the same command again (the trainer restores the latest checkpoint). A workdir made by a
different command (other base, overrides or --steps) is refused rather than silently reused.

Rows (paper section 4):
  Table 2, fusion methods on the per-voxel (nnU-Net) head, patient score = predicted lesion
  volume as in [24]; trained without SAM, as nnU-Net is:
    t2_early (the baseline: early fusion with the delayed phase discarded, delayed=0),
    t2_hemis, t2_convlstm, t2_ifm.
  Table 3, Mask2Former head, one change per row:
    t3_baseline (early fusion, CE, volume score, no contrastive loss, no SAM), t3_focal
    (+focal loss), t3_livermax (+LiverMax), t3_ifm (+IFM), t3_acl (+ACL), t3_sam (+SAM = LIDIA);
    all without this project's mask-pooled intensity logits and auxiliary semantic map (pooled=0,
    aux_semantic=0). Beyond the paper: t3_pooled, t3_acl with both (pooled=1,
    aux_semantic=0.5) and cross-entropy: the demo config until 2026-12-05 (Table 4's base).
  delayed: LIDIA (t3_sam's checkpoint) evaluated on the same test cases with the delayed
    phase removed from every case (D channel zeroed, phase_mask[3] False); the table gives the
    per-class AUC with D, without D and the difference.
  Table 4 (not in the paper), one change each to the demo model as it was measured (t3_pooled,
    cross-entropy), where the classes are learned at the CPU budget: t4_early (early fusion
    instead of IFM), t4_no_acl (no contrastive loss), t4_volume (lesion-volume patient score
    instead of LiverMax), t4_focal (the paper's focal class loss instead of cross-entropy: the
    demo since, which from 2026-12-06 also infers with the weights' moving average), t4_sam
    (+SAM, as the paper), t4_no_delayed (the base tested without the delayed phase).
  Every row has ema=0 (the weights' last values, as the rows were measured).
LiverMax changes inference only, so `t3_livermax` is not trained: it evaluates t3_focal's
checkpoint with the LiverMax patient score (as `delayed` evaluates t3_sam's), which isolates the
score from training noise and saves a run; so do t4_volume and t4_no_delayed with t3_pooled's.
Evaluation-only rows wait for their source row.

Row commands name this checkout's files relative to it (`configs/lidia.py`,
`scripts/ablation.py`) and run with the checkout as working directory, so a row recorded by
one clone is recognised by another.

Metrics come from each row's WORKDIR/test_report/metrics.json (lidia_jax.evaluation: per-class
patient AUC, AUC-8 = mean over the classes with a defined AUC, AUC-2 malignant vs benign, global
lesion Dice, lesion sensitivity and precision). Writes --out (markdown) and the same with .json.
"""

import argparse
import collections
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
from lidia_jax.config_file import load_config  # noqa: E402

LESIONS = ("HCC", "ICC", "meta", "heman", "FNH", "cyst", "calc", "others")
SCALARS = ("auc8", "auc2", "lesion_dice", "lesion_sensitivity", "lesion_precision")
SCALAR_TITLES = ("Mean (AUC-8)", "AUC-2", "lesion Dice", "sensitivity", "precision")

# source: the row whose trained model this row evaluates (None: the row trains its own);
# without_delayed: that evaluation removes the delayed phase from every test case.
Row = collections.namedtuple("Row", "table label overrides source without_delayed",
                             defaults=(None, False))

# Per-voxel rows at lr 1e-2: at the demo's 2e-3 the U-Net's held-out lesion-voxel class accuracy
# after 400 steps was 0.056, at 1e-2 0.226 (nnU-Net's SGD, 1e-2 / 0.99: 0.115); README.
# Every row spells out ema=0, paste=0 and synth_calc=0: the demo infers with the weights' moving
# average since 2026-12-06 and trains with lesion copy-paste and synthetic calcifications since
# 2026-12-07, and the rows were measured without them.
_OFF = ("ema=0", "paste=0", "synth_calc=0")
# On the demo base the rows were also measured with the fused phases in four channels (eight since
# 2026-12-06), 3,400 steps (3,800 since 2026-12-07) and the network naming the lesions (the lesion
# forest since 2026-12-07); the other bases keep their own.
_MEASURED_ON = {"demo": ("fusion_features=4", "steps=3400", "forest=0")}
_T2 = ("head=per_voxel", "patient_score=volume", "sam=0", "contrastive=none", "lr=1e-2",
       "pooled=0", "aux_semantic=0") + _OFF
# The paper's Mask2Former rows leave out this project's mask-pooled intensity logits and
# auxiliary semantic map (both on in the demo config); t3_pooled adds them to t3_acl, with
# cross-entropy, which made it the demo config until 2026-12-05.
_T3 = ("head=mask2former", "delayed=1", "pooled=0", "aux_semantic=0") + _OFF
# Table 4's base, the demo config with cross-entropy spelled out (t3_pooled), and its one change
# per row. The demo has the focal class loss since (t4_focal's config): the measured rows keep
# their commands, so they are reused.
_T4 = ("head=mask2former", "delayed=1", "fusion=ifm", "cls_loss=ce", "patient_score=livermax",
       "contrastive=acl", "sam=0", "pooled=1", "aux_semantic=0.5") + _OFF
T4_BASE = "t3_pooled"


def _t4_with(change):
    """_T4 with the override of `change`'s key replaced by `change`."""
    key = change.split("=")[0]
    return tuple(change if o.split("=")[0] == key else o for o in _T4)


ROWS = collections.OrderedDict([
    ("t2_early", Row(2, "Baseline nnU-Net (early fusion, no delayed phase)",
                     _T2 + ("fusion=early", "delayed=0"))),
    ("t2_hemis", Row(2, "HeMIS", _T2 + ("fusion=hemis", "delayed=1"))),
    ("t2_convlstm", Row(2, "ConvLSTM", _T2 + ("fusion=convlstm", "delayed=1"))),
    ("t2_ifm", Row(2, "IFM", _T2 + ("fusion=ifm", "delayed=1"))),
    ("t3_baseline", Row(3, "Baseline", _T3 + ("fusion=early", "cls_loss=ce",
                                              "patient_score=volume", "contrastive=none",
                                              "sam=0"))),
    ("t3_focal", Row(3, "+Focal loss", _T3 + ("fusion=early", "cls_loss=focal",
                                              "patient_score=volume", "contrastive=none",
                                              "sam=0"))),
    ("t3_livermax", Row(3, "+LiverMax", _T3 + ("fusion=early", "cls_loss=focal",
                                               "patient_score=livermax", "contrastive=none",
                                               "sam=0"), source="t3_focal")),
    ("t3_ifm", Row(3, "+IFM", _T3 + ("fusion=ifm", "cls_loss=focal", "patient_score=livermax",
                                     "contrastive=none", "sam=0"))),
    ("t3_acl", Row(3, "+ACL", _T3 + ("fusion=ifm", "cls_loss=focal", "patient_score=livermax",
                                     "contrastive=acl", "sam=0"))),
    ("t3_sam", Row(3, "+SAM (LIDIA)", _T3 + ("fusion=ifm", "cls_loss=focal",
                                             "patient_score=livermax", "contrastive=acl",
                                             "sam=1"))),
    ("t3_pooled", Row(3, "t3_acl + mask-pooled intensity logits, auxiliary semantic map, CE "
                         "(not in the paper; the demo until 2026-12-05)", _T4)),
    ("t4_early", Row(4, "early fusion instead of IFM", _t4_with("fusion=early"))),
    ("t4_no_acl", Row(4, "no contrastive loss (ACL removed)", _t4_with("contrastive=none"))),
    ("t4_volume", Row(4, "lesion-volume patient score instead of LiverMax",
                      _t4_with("patient_score=volume"), source=T4_BASE)),
    ("t4_focal", Row(4, "focal class loss instead of cross-entropy", _t4_with("cls_loss=focal"))),
    ("t4_sam", Row(4, "+SAM", _t4_with("sam=1"))),
    ("t4_no_delayed", Row(4, "tested without the delayed phase", _T4, source=T4_BASE,
                          without_delayed=True)),
])
DELAYED = "delayed"  # LIDIA without the delayed phase at test time
DELAYED_SOURCE = "t3_sam"
ALL_ROWS = tuple(ROWS) + (DELAYED,)
ROW_FILE = "ablation_row.json"  # the command a workdir was made with
CONFIG_FILE = "configs/lidia.py"  # relative to ROOT, the rows' working directory
SCRIPT_FILE = "scripts/ablation.py"


def source_of(name):
    """The row whose checkpoint row `name` evaluates, or None if `name` trains."""
    return DELAYED_SOURCE if name == DELAYED else ROWS[name].source


def without_delayed(name):
    """Whether row `name` tests its source's checkpoint with the delayed phase removed."""
    return name == DELAYED or ROWS[name].without_delayed


def variant(base, name):
    """The config string of row `name` on variant `base`: "demo,head=per_voxel,..."."""
    overrides = list(ROWS[name].overrides) + list(_MEASURED_ON.get(base, ()))
    base = "" if base == "paper" else base
    return ",".join(([base] if base else []) + overrides)


def data_paths(root, data_root=None):
    """(dataset folder, preprocessing cache folder) shared by every row."""
    root = pathlib.Path(root).resolve()
    dataset = pathlib.Path(data_root).resolve() if data_root else root / "data" / "synthetic"
    return dataset, root / "data" / "preprocessed"


def row_config(base, name, root, data_root=None, steps=None):
    """The ConfigDict row `name` trains with (the same overrides as its command line)."""
    config = load_config(variant(base, DELAYED_SOURCE if name == DELAYED else name))
    dataset, cache_dir = data_paths(root, data_root)
    config.data.root, config.data.cache_dir = str(dataset), str(cache_dir)
    if steps:
        config.train.num_steps = int(steps)
    return config


def row_command(name, args):
    """argv of row `name`, run from ROOT: a training run, or an evaluation of its source row's
    checkpoint (t3_livermax, delayed)."""
    root = pathlib.Path(args.root).resolve()
    dataset, cache_dir = data_paths(root, args.data_root)
    if source_of(name):
        argv = [args.python, SCRIPT_FILE, "--root", str(root), "--base", args.base,
                f"--evaluate-row={name}"]
        if args.data_root:
            argv += ["--data-root", str(dataset)]
    else:
        argv = [args.python, "-m", "lidia_jax.main",
                f"--config={CONFIG_FILE}:{variant(args.base, name)}",
                f"--workdir={root / name}", f"--config.data.root={dataset}",
                f"--config.data.cache_dir={cache_dir}"]
    if args.steps:
        argv.append(f"--steps={args.steps}" if source_of(name)
                    else f"--config.train.num_steps={args.steps}")
    return argv


def row_status(workdir):
    """"done" (test metrics written), "partial" (checkpoints, no test metrics) or "new"."""
    workdir = pathlib.Path(workdir)
    if (workdir / "test_metrics.json").is_file() and (
            workdir / "test_report" / "metrics.json").is_file():
        return "done"
    ckpts = workdir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        return "partial"
    return "new"


def check_same_command(workdir, argv):
    """Refuses a workdir made by another command (stale results would be misattributed)."""
    path = pathlib.Path(workdir) / ROW_FILE
    if path.is_file():
        previous = json.loads(path.read_text())["command"]
        # The interpreter may differ between machines; the rest must not.
        if previous[1:] != argv[1:]:
            raise SystemExit(
                f"{path}: this workdir was made by\n  {shlex.join(previous)}\nnot by\n  "
                f"{shlex.join(argv)}\nDelete {workdir} or use another --root.")


def prepare_data(args, names, log=print):
    """Generates (or checks) the dataset and preprocesses it once for every selected row.

    Rows with delayed=0 need their own cache entry (the fingerprint includes drop_delayed);
    it lives in the same cache folder and is made here too, so no row preprocesses.
    """
    sys.path.insert(0, str(ROOT))
    from lidia_jax.data import preprocessing
    from lidia_jax.data import synthetic

    dataset, cache_dir = data_paths(args.root, args.data_root)
    base = load_config(args.base)
    if not args.data_root and not (dataset / "dataset.json").is_file():
        syn = base.data.synthetic
        log(f"ablation: generating the synthetic cohort ({syn.cases} cases, size {syn.size}) "
            f"into {dataset}")
        synthetic.make_cohort(dataset, cases=syn.cases, seed=syn.seed, size=syn.size,
                              test_fraction=syn.test_fraction,
                              workers=max(1, base.preprocess.num_workers))
    done = set()
    for name in names:
        config = row_config(args.base, name, args.root, args.data_root)
        settings = json.dumps(preprocessing.settings_from_config(config.preprocess,
                                                                 config.data), sort_keys=True)
        if settings not in done:
            done.add(settings)
            preprocessing.preprocess_dataset(dataset, cache_dir, config.preprocess,
                                             config.data, log=log)


def run_row(name, args, log=print):
    """Runs (or resumes, or reuses) one row; returns its status afterwards."""
    workdir = pathlib.Path(args.root).resolve() / name
    argv = row_command(name, args)
    check_same_command(workdir, argv)
    status = row_status(workdir)
    if status == "done":
        log(f"ablation: {name}: reusing {workdir / 'test_metrics.json'}")
        return status
    source = source_of(name)
    if source and row_status(workdir.parent / source) != "done":
        log(f"ablation: {name}: needs {source} trained first; skipped")
        return "blocked"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / ROW_FILE).write_text(json.dumps({"row": name, "command": argv}, indent=1))
    log(f"ablation: {name} ({'resuming' if status == 'partial' else 'starting'}): "
        f"{shlex.join(argv)}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    t0 = time.time()
    with open(workdir / "ablation.log", "a") as logfile:
        proc = subprocess.run(argv, cwd=str(ROOT), env=env, stdout=logfile,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (workdir / "ablation.log").read_text().splitlines()[-20:]
        log("\n".join(tail))
        log(f"ablation: {name} FAILED (exit {proc.returncode}) after {time.time() - t0:.0f} s; "
            f"log {workdir / 'ablation.log'}")
        return "failed"
    log(f"ablation: {name} finished in {(time.time() - t0) / 60:.1f} min")
    return row_status(workdir)


# ------------------------------------------------------------ delayed-phase evaluation


class WithoutDelayed:
    """A preprocessing Cache whose cases read as if the delayed phase had not been acquired.

    load(case) returns the cached case with image[..., 3] zeroed (absent phases are zero in
    the cache) and meta["phase_mask"][3] False: exactly what preprocessing writes for a case
    without D, so the model sees the input it would have seen.
    """

    def __init__(self, cache):
        self._cache = cache
        self.path = cache.path
        self.plan = cache.plan

    def case_names(self, split):
        return self._cache.case_names(split)

    def load(self, case, mmap=True):
        import numpy as np

        data = self._cache.load(case, mmap=mmap)
        image = np.array(data["image"], np.float32)  # a writable copy of the memory map
        image[..., 3] = 0.0
        meta = dict(data["meta"])
        meta["phase_mask"] = [bool(m) for m in meta["phase_mask"][:3]] + [False]
        return dict(data, image=image, meta=meta)


def evaluate_row(name, args, log=print):
    """An evaluation-only row: its source row's checkpoint (config.inference.checkpoint, as in
    the trainer's test report) on the source's test cases, with row `name`'s inference
    settings (t3_livermax: the LiverMax score) or without the D phase (delayed, t4_no_delayed)."""
    drop_d = without_delayed(name)
    sys.path.insert(0, str(ROOT))
    from lidia_jax import model as model_lib
    from lidia_jax.data import preprocessing
    from lidia_jax.evaluation import evaluate as evaluate_lib
    from lidia_jax.train import checkpoint as ckpt

    root = pathlib.Path(args.root).resolve()
    source, out = root / source_of(name), root / name
    config = row_config(args.base, name, root, args.data_root, args.steps)
    plan_file = source / "plan.json"
    if not plan_file.is_file():
        raise SystemExit(f"{plan_file} is missing: train the {source.name} row first.")
    plan = json.loads(plan_file.read_text())
    cache = preprocessing.Cache(pathlib.Path(config.data.cache_dir) / plan["fingerprint"])
    cases = cache.case_names("test") or cache.case_names("val")  # as the trainer's test report
    with_d = sum(bool(json.loads((cache.path / c / "meta.json").read_text())["phase_mask"][3])
                 for c in cases)
    params, step = ckpt.restore_params(source, config.inference.checkpoint,
                                       config.inference.use_ema)
    log(f"ablation: {name}: evaluating {source} ({config.inference.checkpoint} checkpoint, step "
        f"{step}) on {len(cases)} test cases"
        + (f" without the delayed phase ({with_d} had it)" if drop_d else "")
        + f", patient score {config.inference.patient_score}")
    model = model_lib.build_model(config.model)
    summary = evaluate_lib.evaluate_cache(
        model, params, WithoutDelayed(cache) if drop_d else cache, cases, config,
        report_dir=out / "test_report", log=log)
    summary_extra = {"checkpoint_step": step, "source": source.name}
    if drop_d:
        summary_extra["cases_with_delayed"] = with_d
    (out / "test_metrics.json").write_text(json.dumps(
        {**{k: v for k, v in summary.items() if isinstance(v, (int, float))}, **summary_extra},
        indent=2, default=float))
    return summary


# ------------------------------------------------------------------------- tables


def read_metrics(workdir):
    """WORKDIR/test_report/metrics.json -> {"auc": {class: AUC or None}, scalars...} or None."""
    path = pathlib.Path(workdir) / "test_report" / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    missing = [k for k in ("auc",) + SCALARS if k not in m]
    if missing:
        raise ValueError(f"{path}: missing {missing}; not an evaluation metrics.json")
    out = {"auc": {n: m["auc"].get(n) for n in LESIONS}, "num_cases": m.get("num_cases")}
    out.update({k: m[k] for k in SCALARS})
    return out


def _fmt(x):
    return "n/a" if x is None else f"{x:.3f}"


def _status_text(status):
    return {"new": "not run", "partial": "training (resumable)"}.get(status, status)


def _metric_row(label, m):
    cells = [_fmt(m["auc"][n]) for n in LESIONS] + [_fmt(m[k]) for k in SCALARS]
    return f"| {label} | " + " | ".join(cells) + " |"


def _header(first):
    cols = [first] + list(LESIONS) + list(SCALAR_TITLES)
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def collect(root):
    """{row: metrics or None} for every known row under `root`."""
    root = pathlib.Path(root)
    return {name: read_metrics(root / name) for name in ALL_ROWS}


def difference(a, b):
    """Per-class AUC and scalar differences a - b (None where either is undefined)."""
    def diff(x, y):
        return None if x is None or y is None else x - y
    out = {"auc": {n: diff(a["auc"][n], b["auc"][n]) for n in LESIONS}}
    out.update({k: diff(a[k], b[k]) for k in SCALARS})
    return out


def markdown(results):
    env, rows = results["environment"], results["rows"]
    lines = ["# LIDIA ablations (paper Tables 2 and 3, delayed phase; Table 4)", "",
             f"- Date (UTC): {env['date_utc']}; machine: {env['machine']}; devices: "
             f"{env['devices']}",
             f"- Command: `{results['command']}`",
             f"- Base config: `{results['base']}`"
             + (f", every row trained for {results['steps']} steps (--steps)"
                if results["steps"] else ""),
             f"- Data: `{results['dataset']}` (one preprocessing cache for every row: "
             f"`{results['cache_dir']}`)",
             "- Patient AUC per class on the test split; Mean (AUC-8) averages the classes with a"
             " defined AUC (n/a: the class is absent from, or present in, every test patient);"
             " lesion Dice is global (voxels pooled); sensitivity/precision are lesion-wise.", ""]
    def row_line(name, label):
        m = rows[name]["metrics"]
        return (_metric_row(f"{label} (`{name}`)", m) if m else
                f"| {label} (`{name}`) | {_status_text(rows[name]['status'])} |"
                + " |" * (len(LESIONS) + len(SCALARS) - 1))

    base = rows[T4_BASE]["metrics"]
    for table, title in ((2, "Table 2: multi-phase fusion (per-voxel nnU-Net head, patient "
                             "score = lesion volume [24])"),
                         (3, "Table 3: ablation (Mask2Former head)"),
                         (4, "Table 4 (not in the paper): one change each to the demo model "
                             "with cross-entropy")):
        names = [n for n, row in ROWS.items() if row.table == table]
        lines += [f"## {title}", ""] + _header("Method")
        if table == 4:
            lines.append(row_line(T4_BASE, "the base"))
        lines += [row_line(n, ROWS[n].label) for n in names]
        if table == 3:
            lines.append(f"\n`t3_livermax` is not trained: it scores "
                         f"`{ROWS['t3_livermax'].source}`'s checkpoint with LiverMax (an "
                         "inference-only change).")
        if table == 4:
            done = [n for n in names if base and rows[n]["metrics"]]
            if done:
                lines += ["", "Each row minus the base:", ""] + _header("Change")
                lines += [_metric_row(f"{ROWS[n].label} (`{n}`)",
                                      difference(rows[n]["metrics"], base)) for n in done]
            evaluated = " and ".join(f"`{n}`" for n in names if ROWS[n].source)
            lines.append(f"\n{evaluated} are not trained: they test `{T4_BASE}`'s checkpoint.")
        lines.append("")
    lines += ["## Delayed phase: LIDIA (t3_sam) with vs without D at test time", ""]
    d = results.get("delayed")
    if d:
        lines += _header("Test input")
        lines += [_metric_row("with D (as acquired)", rows[DELAYED_SOURCE]["metrics"]),
                  _metric_row("without D (removed)", rows[DELAYED]["metrics"]),
                  _metric_row("difference (with - without)", d)]
        if results.get("cases_with_delayed") is not None:
            lines += ["", f"{results['cases_with_delayed']} of "
                      f"{rows[DELAYED]['metrics']['num_cases']} test cases had a delayed phase; "
                      "the others are unchanged."]
    else:
        lines.append(f"Not available (t3_sam: {rows[DELAYED_SOURCE]['status']}, delayed: "
                     f"{rows[DELAYED]['status']}).")
    lines += ["", "## Commands", ""]
    lines += [f"- `{name}` ({rows[name]['status']}): `{rows[name]['command']}`"
              for name in rows]
    return "\n".join(lines) + "\n"


def environment():
    try:
        import jax
        devices = ", ".join(f"{d.platform}:{d.id} {d.device_kind}" for d in jax.devices())
    except Exception as e:  # the tables must still be written
        devices = f"unknown ({type(e).__name__})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.node()}, {cpu} x {os.cpu_count()}", "devices": devices}


def write_tables(args, statuses, log=print):
    """Reads every row's metrics under args.root; writes args.out (.md) and .json."""
    root = pathlib.Path(args.root).resolve()
    metrics = collect(root)
    dataset, cache_dir = data_paths(root, args.data_root)
    rows = {}
    for name in ALL_ROWS:
        status = statuses.get(name) or row_status(root / name)
        if status == "done" and metrics[name] is None:
            status = "no metrics"
        rows[name] = {"status": status if metrics[name] is None else "done",
                      "metrics": metrics[name],
                      "command": shlex.join(row_command(name, args)),
                      "workdir": str(root / name)}
    results = {"environment": environment(), "command": shlex.join([sys.argv[0]] + args.argv),
               "base": args.base, "steps": args.steps, "dataset": str(dataset),
               "cache_dir": str(cache_dir), "rows": rows, "delayed": None,
               "cases_with_delayed": None}
    if metrics[DELAYED] and metrics[DELAYED_SOURCE]:
        results["delayed"] = difference(metrics[DELAYED_SOURCE], metrics[DELAYED])
        extra = root / DELAYED / "test_metrics.json"
        if extra.is_file():
            results["cases_with_delayed"] = json.loads(extra.read_text()).get(
                "cases_with_delayed")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    log(f"ablation: wrote {out} and {out.with_suffix('.json')}")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--root", default="runs/ablation", help="one workdir per row + data/")
    parser.add_argument("--base", default="demo", help="config variant: demo | smoke | paper")
    parser.add_argument("--rows", nargs="+", choices=ALL_ROWS, default=list(ALL_ROWS))
    parser.add_argument("--steps", type=int, default=None,
                        help="override config.train.num_steps of every row (quick runs)")
    parser.add_argument("--data-root", default=None,
                        help="a dataset folder (data contract) instead of the base variant's "
                             "synthetic cohort in ROOT/data/synthetic")
    parser.add_argument("--out", default=None, help="markdown table (default ROOT/ablation.md);"
                        " the JSON goes next to it")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--tables-only", action="store_true",
                        help="only (re)write the tables from the rows already run")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the rows")
    parser.add_argument("--evaluate-row", choices=[n for n in ALL_ROWS if source_of(n)],
                        help=argparse.SUPPRESS)  # an evaluation-only row's command
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    try:
        load_config(args.base)
    except ValueError as e:
        parser.error(f"--base: {e}")
    args.out = args.out or str(pathlib.Path(args.root) / "ablation.md")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.evaluate_row:
        evaluate_row(args.evaluate_row, args)
        return 0
    names = [n for n in ALL_ROWS if n in args.rows]  # the table order
    if args.dry_run:
        for name in names:
            label = f"{DELAYED_SOURCE} without the delayed phase" if name == DELAYED else \
                ROWS[name].label
            if source_of(name):
                label += f" (evaluates {source_of(name)}'s checkpoint)"
            print(f"# {name}: {label}")
            print(shlex.join(row_command(name, args)))
        return 0
    statuses = {}
    if not args.tables_only:
        # An evaluation-only row needs its source row's cache entry.
        needs = sorted({source_of(n) or n for n in names
                        if row_status(pathlib.Path(args.root) / n) != "done"})
        if needs:
            prepare_data(args, needs)
        for name in names:
            statuses[name] = run_row(name, args)
    write_tables(args, statuses)
    failed = [n for n, s in statuses.items() if s in ("failed", "blocked")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
