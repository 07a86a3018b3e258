"""Likely label errors by confident learning (Northcutt, Jiang & Chuang, 2021), in a few lines.

cleanlab implements this but is AGPL-licensed; the method needs only per-class thresholds:
  t_j = mean predicted probability of class j over the samples *labelled* j  (the model's own
        average confidence in that class, so a class it is always unsure of gets a low bar);
  a sample labelled g is an issue when p_g < t_g (the given label is implausible by that class's
  own standard) and some other class k has p_k >= t_k; the suggestion is the most probable such k.
Issues are ranked by margin = p_suggested - p_given, largest first. The margin, not self-confidence
(p_given alone), because it needs both halves of "implausible label, confidently another class":
a blurry image the model is unsure about everywhere has a low p_given but also a low margin, so it
ranks below a clear cat labelled dog. (cleanlab's "normalized_margin" ranking is the same idea.)

Probabilities must be out-of-sample: test-set predictions are, training-set ones only when they
come from models that did not see those images; data.datamodule.out_of_fold_splits() gives the K folds.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..errors import CifarkitError


@dataclass
class LabelIssues:
    """Likely label errors, most likely first; all arrays (M,)."""
    indices: np.ndarray      # int64, positions in the scored set
    given: np.ndarray        # int64, the label in the data
    suggested: np.ndarray    # int64, the class the model confidently prefers
    p_given: np.ndarray      # float, model probability of the given label
    p_suggested: np.ndarray  # float, model probability of the suggested label
    thresholds: np.ndarray   # float (K,), the per-class thresholds t_j used

    @property
    def margin(self) -> np.ndarray:
        return self.p_suggested - self.p_given

    def __len__(self) -> int:
        return len(self.indices)


def class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_j = mean p_j over samples labelled j (K,); a class nobody is labelled gets inf (never suggested)."""
    k = probs.shape[1]
    count = np.bincount(labels, minlength=k)                                   # (K,)
    total = np.array([probs[labels == j, j].sum() for j in range(k)])          # (K,)
    return np.where(count > 0, total / np.maximum(count, 1), np.inf)


def find_label_issues(probs, labels) -> LabelIssues:
    """Confident-learning label issues of out-of-sample probabilities (N, K) and given labels (N,)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if p.ndim != 2 or len(p) != len(y):
        raise CifarkitError(f"probabilities {p.shape} and labels {y.shape} do not match: give (N, K) and (N,)")
    rows = np.arange(len(y))
    t = class_thresholds(p, y)                                                 # (K,)
    p_given = p[rows, y]                                                       # (N,)
    above = p >= t                                                             # (N, K) confident in k
    above[rows, y] = False                                                     # only *other* classes
    candidates = np.where(above, p, -1.0)                                      # (N, K)
    suggested = candidates.argmax(1)                                           # (N,)
    is_issue = (p_given < t[y]) & above.any(1)
    idx = np.flatnonzero(is_issue)
    p_sugg = p[idx, suggested[idx]]
    order = np.argsort(-(p_sugg - p_given[idx]), kind="stable")               # largest margin first
    idx = idx[order]
    return LabelIssues(idx, y[idx], suggested[idx], p_given[idx], p[idx, suggested[idx]], t)


# -- output ---------------------------------------------------------------------------------------

CSV_COLUMNS = ("index", "given_label", "suggested_label", "p_given", "p_suggested", "margin")


def to_csv(issues: LabelIssues, classes: list[str], path_or_file) -> None:
    """One row per issue, most likely first; labels by class name, probabilities to 4 decimals."""
    def write(f):
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for i, g, s, pg, ps in zip(issues.indices, issues.given, issues.suggested, issues.p_given,
                                   issues.p_suggested):
            w.writerow([int(i), classes[g], classes[s], f"{pg:.4f}", f"{ps:.4f}", f"{ps - pg:.4f}"])
    if hasattr(path_or_file, "write"):
        write(path_or_file)
    else:
        with open(Path(path_or_file), "w", newline="") as f:
            write(f)


def label_issues_figure(images: np.ndarray, issues: LabelIssues, classes: list[str], n: int = 20,
                        ncols: int = 5) -> Figure:
    """The n likeliest label errors among uint8 images (N, 32, 32, 3), titled given / suggested (p)."""
    from .explain import upscale
    shown = issues.indices[:n]
    rows = max(-(-len(shown) // ncols), 1)
    fig = Figure(figsize=(2.3 * ncols, 2.5 * rows))
    axes = fig.subplots(rows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if len(shown) == 0:
        axes[0, 0].text(0, 0.5, "no likely label errors found", fontsize=12, transform=axes[0, 0].transAxes)
    big = upscale(images[shown]) if len(shown) else []                         # (n, 128, 128, 3)
    for j, ax in enumerate(axes.flat[:len(shown)]):
        ax.imshow(big[j])
        ax.set_title(f"given {classes[issues.given[j]]} / suggested\n{classes[issues.suggested[j]]} "
                     f"({issues.p_suggested[j]:.0%})", fontsize=8)
    fig.suptitle("Likely label errors, most likely first")
    fig.tight_layout()
    return fig
