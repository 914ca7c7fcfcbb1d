"""metrics.json + report.md (+ figures) from a metrics summary (metrics.summarize)."""

import json
import math
import pathlib
from typing import Optional, Sequence

from lidia_jax.evaluation import plots
from lidia_jax.evaluation import targets as targets_lib


def _fmt(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _json_ready(obj):
    """NaN/inf -> null (JSON has no NaN), numpy scalars -> Python, int dict keys -> str."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _auc2_without(summary: dict) -> str:
    """AUC-2 without each class's patients: few benign patients let one class carry AUC-2."""
    without = summary.get("auc2_without")
    if not without:
        return ""
    return (" Without the patients who hold a class: "
            + ", ".join(f"{n} {_fmt(v)}" for n, v in without.items()) + ".")


def markdown(summary: dict, title: str = "LIDIA evaluation",
             figures: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    names = list(summary["auc"])
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines += [f"Cases: {summary['num_cases']}.", ""]
    lines += _targets_table(summary.get("targets"))
    lines += ["## Patient-wise diagnosis (AUC)", "",
              "| " + " | ".join(names + ["AUC-8", "AUC-2"]) + " |",
              "|" + "---|" * (len(names) + 2),
              "| " + " | ".join([_fmt(summary["auc"][n]) for n in names]
                                + [_fmt(summary["auc8"]), _fmt(summary["auc2"])]) + " |", "",
              "Patients per class: " + ", ".join(f"{n} {summary['patients_per_class'][n]}"
                                                 for n in names) + ".",
              f"AUC-8 averages the classes with a defined AUC ({', '.join(summary['auc8_classes']) or 'none'}); "
              "a class absent from every patient or present in all has none (n/a).",
              f"AUC-2: {summary['auc2_patients']['malignant']} malignant vs "
              f"{summary['auc2_patients']['benign']} benign patients." + _auc2_without(summary),
              "", "## Lesion-wise detection", "",
              "| precision | sensitivity | classification accuracy | true | predicted | matched |",
              "|---|---|---|---|---|---|",
              f"| {_fmt(summary['lesion_precision'])} | {_fmt(summary['lesion_sensitivity'])} | "
              f"{_fmt(summary['lesion_accuracy'])} | {summary['lesion_counts']['true']} | "
              f"{summary['lesion_counts']['predicted']} | {summary['lesion_counts']['matched']} |",
              ""]
    lines += _detection_table("Detected lesions per true class (whatever class they were given)",
                              "class", summary.get("detection_by_class"))
    lines += _detection_table("Detected lesions per size (true lesion's equivalent-sphere "
                              "diameter)", "diameter (mm)", summary.get("detection_by_size_mm"))
    lines += ["## Pixel-wise lesion Dice", "",
              f"- **Global (headline): {_fmt(summary['lesion_dice'])}** (voxels of all cases "
              "pooled, all lesion classes one foreground)",
              f"- Mean per case: {_fmt(summary['lesion_dice_per_case'])} (cases with a true or "
              "predicted lesion)", "", "## Lesion confusion matrix (rows true, columns predicted)",
              ""]
    labels = summary["confusion_labels"]
    lines += ["| true \\ pred | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for name, row in zip(labels, summary["confusion_matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    lines += ["", "## Cases", "",
              "| case | true classes | lesion Dice | true | predicted | matched | malignancy |",
              "|---|---|---|---|---|---|---|"]
    for r in summary["per_case"]:
        lines.append(f"| {r['case']} | {', '.join(r['true_classes']) or '-'} | "
                     f"{_fmt(r['lesion_dice'])} | {r['true_lesions']} | "
                     f"{r['predicted_lesions']} | {r['matched']} | "
                     f"{_fmt(r['malignancy_probability'])} |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _targets_table(comparison: Optional[dict]) -> list:
    """Markdown lines of the targets (evaluation/targets.compare); none without targets."""
    if not comparison:
        return []
    missed = targets_lib.missed(comparison)
    lines = ["## Targets", "",
             f"**{len(comparison) - len(missed)} of {len(comparison)} met**"
             + (f"; missed: {', '.join(missed)}." if missed else "."), "",
             "| metric | value | target | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(c['value'])} | >= {c['target']:.2f} | "
              f"{'yes' if c['met'] else '**no**'} |" for name, c in comparison.items()]
    return lines + [""]


def _detection_table(title: str, key: str, rows: Optional[dict]) -> list:
    """Markdown lines of a {bin: {"true", "matched", "sensitivity"}} table; none for None."""
    if not rows:
        return []
    lines = [f"{title}:", "", f"| {key} | true | detected | sensitivity |", "|---|---|---|---|"]
    lines += [f"| {name} | {r['true']} | {r['matched']} | {_fmt(r['sensitivity'])} |"
              for name, r in rows.items()]
    return lines + [""]


def write_report(summary: dict, out_dir, overlays: Sequence[dict] = (),
                 title: str = "LIDIA evaluation", notes: Sequence[str] = ()) -> pathlib.Path:
    """Writes metrics.json, report.md, roc.png, confusion.png and overlay_<case>.png.

    overlays: dicts {"case", "images": {phase: [D,H,W] or None}, "gt", "pred"}.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(_json_ready(summary), indent=1))
    figures = [plots.roc_curves(summary, out / "roc.png").name,
               plots.confusion_matrix(summary, out / "confusion.png").name]
    for o in overlays:
        figures.append(plots.overlay(o["images"], o["gt"], o["pred"],
                                     out / f"overlay_{o['case']}.png", o["case"]).name)
    (out / "report.md").write_text(markdown(summary, title, figures, notes))
    return out
