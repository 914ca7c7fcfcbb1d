"""Figures of an evaluation (matplotlib, Agg backend: no display needed)."""

import pathlib
from typing import Mapping, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from sklearn import metrics as sk_metrics  # noqa: E402


def roc_curves(summary: dict, path) -> pathlib.Path:
    """One panel per lesion class (one-vs-rest over patients) plus malignancy: a PNG."""
    roc = summary["roc_data"]
    names = list(summary["auc"])
    truth, scores = np.asarray(roc["truth"], bool), np.asarray(roc["scores"], float)
    panels = [(n, truth[:, i] if truth.size else np.zeros(0, bool),
               scores[:, i] if scores.size else np.zeros(0)) for i, n in enumerate(names)]
    panels.append(("malignant vs benign", np.asarray(roc["malignant_truth"], bool),
                   np.asarray(roc["malignant_scores"], float)))
    cols = 3
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, y, s) in zip(axes.ravel(), panels):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if 0 < y.sum() < len(y):
            fpr, tpr, _ = sk_metrics.roc_curve(y, s)
            auc = sk_metrics.roc_auc_score(y, s)
            ax.plot(fpr, tpr, lw=1.5)
            ax.set_title(f"{title}: AUC {auc:.3f} (n+={int(y.sum())})", fontsize=9)
        else:
            ax.set_title(f"{title}: undefined (n+={int(y.sum())}/{len(y)})", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("1 - specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def confusion_matrix(summary: dict, path) -> pathlib.Path:
    """Lesion-wise confusion matrix (rows true, columns predicted, "none" = missed / false
    positive) as a PNG with counts in the cells."""
    labels = summary["confusion_labels"]
    cm = np.asarray(summary["confusion_matrix"])
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    top = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                    color="white" if v > top / 2 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title("lesion-wise confusion (matched at IoU threshold)")
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _best_slice(gt: np.ndarray, pred: np.ndarray) -> int:
    for mask in (gt >= 2, pred >= 2, gt >= 1, pred >= 1):
        area = mask.sum(axis=(1, 2))
        if area.any():
            return int(np.argmax(area))
    return gt.shape[0] // 2


def overlay(images: Mapping[str, Optional[np.ndarray]], gt: np.ndarray, pred: np.ndarray,
            path, title: str = "") -> pathlib.Path:
    """Segmentation contours over each present phase on the slice with most true lesion.

    images: {phase: [D, H, W] or None}; gt, pred: [D, H, W] label codes on the same grid
    (axis 0 = slices). Liver contours dashed, lesion contours solid; truth green, prediction red.
    """
    z = _best_slice(gt, pred)
    phases = [(p, a) for p, a in images.items() if a is not None]
    fig, axes = plt.subplots(1, len(phases), figsize=(3.3 * len(phases), 3.6), squeeze=False)
    for ax, (phase, arr) in zip(axes[0], phases):
        sl = np.asarray(arr[z], float)
        lo, hi = np.percentile(sl, [1, 99])
        ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        for lab, color in ((gt, "lime"), (pred, "red")):
            for mask, style in ((lab[z] >= 1, "--"), (lab[z] >= 2, "-")):
                if mask.any() and not mask.all():
                    ax.contour(mask.astype(float), levels=[0.5], colors=color, linewidths=0.9,
                               linestyles=style)
        ax.set_title(f"{phase}, slice {z}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{title}  (green: truth, red: prediction; dashed liver, solid lesions)",
                 fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
