"""Diagnosis targets: minimum values of cohort metrics, checked in every report.

config.eval.targets maps a scalar of metrics.summarize (auc8, auc2, lesion_precision,
lesion_sensitivity, lesion_accuracy, lesion_dice, lesion_dice_per_case) to its minimum, e.g. the
demo's AUC-8 and AUC-2 >= 0.90, lesion sensitivity >= 0.80 and lesion Dice >= 0.70. The test
report and `--mode=evaluate` show each as met or missed, and the training log names the targets
its validation misses: a run that falls short there (a weak seed) is seen before its test.
"""

import math
from typing import Mapping

METRICS = ("auc8", "auc2", "lesion_precision", "lesion_sensitivity", "lesion_accuracy",
           "lesion_dice", "lesion_dice_per_case")


def check_targets(targets: Mapping[str, float]) -> dict:
    """{metric: minimum} as floats; raises ValueError naming an unknown metric or a bad value."""
    out = {}
    for name, minimum in dict(targets).items():
        if name not in METRICS:
            raise ValueError(f"config.eval.targets: unknown metric {name!r}; known: {METRICS}")
        minimum = float(minimum)
        if not math.isfinite(minimum):
            raise ValueError(f"config.eval.targets.{name}={minimum}: expected a finite number")
        out[name] = minimum
    return out


def compare(summary: Mapping, targets: Mapping[str, float]) -> dict:
    """{metric: {"value", "target", "met"}} for each target, in the targets' order.

    A value that is undefined (NaN or None: e.g. AUC-2 without a benign patient) does not meet
    its target.
    """
    out = {}
    for name, minimum in check_targets(targets).items():
        value = summary.get(name)
        value = None if value is None or not math.isfinite(float(value)) else float(value)
        out[name] = {"value": value, "target": minimum,
                     "met": value is not None and value >= minimum}
    return out


def missed(comparison: Mapping[str, Mapping]) -> list:
    """The names of the targets of `compare`'s result that are not met."""
    return [name for name, c in comparison.items() if not c["met"]]


def describe(comparison: Mapping[str, Mapping]) -> str:
    """One line: 'targets met: auc2 1.000 >= 0.90, ...; missed: auc8 0.803 < 0.90' ('' if none)."""
    def fmt(name, c, sign):
        value = "n/a" if c["value"] is None else f"{c['value']:.3f}"
        return f"{name} {value} {sign} {c['target']:.2f}"

    met = [fmt(n, c, ">=") for n, c in comparison.items() if c["met"]]
    miss = [fmt(n, c, "<") for n, c in comparison.items() if not c["met"]]
    parts = ([f"targets met: {', '.join(met)}"] if met else []) + (
        [f"missed: {', '.join(miss)}"] if miss else [])
    return "; ".join(parts)
