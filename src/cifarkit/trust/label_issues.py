"""Likely label errors: the test images whose given label the model finds least plausible.

The ranking is self-confidence: the calibrated probability softmax(logits / T) of the given label,
averaged over the models there are (the run's, and its audit's fold models, which never saw the
test set either), lowest first: cleanlab's "self_confidence" label quality and its ensemble score
with equal weights, in a few lines (tests/test_label_issues.py checks them against cleanlab's own,
a dev dependency). Listed: the images whose averaged prediction is another class. Flagged:
the first FLAGGED of them, as deep as the measured precision holds up (MEASURED).

Measured against the 54 CIFAR-10 test images a human study confirmed as mislabelled
(bench/label_errors.py, bench/data/README.md), with the fast preset at the headline's length:
- confident learning's rule (find_label_issues: p_given below t_given = the mean p of that class
  over the images labelled with it, another class at or above its own t, ranked by the margin
  between the two), what the report used before: 3 confirmed in its first 20, 6 in its first 100,
  238 flagged of which 9 confirmed. Ranking by the margin puts an image the model hesitates on
  between two other classes below a confident mistake;
- self-confidence: 4 in the first 20, 10 in the first 100; 40 of the 54 among the 1,033 listed.
(The quick preset, 86%: 2 and 5 before, 2 and 6 after.) What did not help (each within one
confirmed image of self-confidence in the first 20 and 100, or worse; `--variants`): averaging the
six test-time views, per-class thresholds from the held-out split (p_given / t_given, or cleanlab's
subtraction of them), the margin; nor, measured once by hand, agreement with the labels of the
nearest training images in the model's feature space. Most of what is left above the real label
errors are the model's own confident mistakes, which look alike to every one of these signals; the
study's own cross-validated probabilities, which chose the images its workers saw, reach 7 in 20.

Probabilities must be out-of-sample: test-set predictions are, training-set ones only when they
come from models that did not see those images (`cifarkit audit` trains such fold models).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..errors import CifarkitError

FLAGGED = 20  # how many the report flags: deeper, the measured precision falls (fast: 6 in 50, 10 in 100)
# Confirmed label errors among the first FLAGGED, by preset: bench/label_errors.py on CIFAR-10, JPEG-q75 copy,
# against the 54 of Northcutt, Athalye & Mueller (2021). fast: the headline's length, seed 0, 2,000 training
# images held out for calibration (90.76% test accuracy); quick: seed 0 (86.10%).
MEASURED = {"fast": 4, "quick": 2}
MEASURED_ON = "CIFAR-10's human-verified list"


@dataclass
class LabelIssues:
    """Likely label errors, most likely first; all arrays (M,)."""
    indices: np.ndarray      # int64, positions in the scored set
    given: np.ndarray        # int64, the label in the data
    suggested: np.ndarray    # int64, the class the model prefers
    p_given: np.ndarray      # float, model probability of the given label (averaged over views and models)
    p_suggested: np.ndarray  # float, model probability of the suggested label (likewise)
    thresholds: np.ndarray   # float (K,), the per-class thresholds t_j
    agreement: np.ndarray | None = None  # float, share of the views x models whose top class is the suggested one
    flagged: int | None = None           # how many of the first the report vouches for; None: all

    @property
    def margin(self) -> np.ndarray:
        return self.p_suggested - self.p_given

    @property
    def flagged_indices(self) -> np.ndarray:
        return self.indices[:self.flagged]

    def __len__(self) -> int:
        return len(self.indices)


def class_thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """t_j = mean p_j over samples labelled j (K,); a class nobody is labelled gets inf (never suggested)."""
    k = probs.shape[1]
    count = np.bincount(labels, minlength=k)                                   # (K,)
    total = np.array([probs[labels == j, j].sum() for j in range(k)])          # (K,)
    return np.where(count > 0, total / np.maximum(count, 1), np.inf)


def _checked(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if p.ndim == 2:
        p = p[None]                                                            # (1, N, K)
    if p.ndim != 3 or p.shape[1] != len(y):
        raise CifarkitError(f"probabilities {p.shape} and labels {y.shape} do not match: give (N, K) or "
                            "(views, N, K) and (N,)")
    return p, y


def find_label_issues(probs, labels) -> LabelIssues:
    """Confident learning's rule on one model's probabilities (N, K): below t_given, another class
    at or above its t, ranked by margin. What the report used before `rank_label_issues`; kept as
    the baseline it is measured against."""
    p, y = _checked(probs, labels)
    if len(p) > 1:
        raise CifarkitError(f"confident learning's rule takes one model's probabilities (N, K), got {p.shape}")
    p = p[0]
    rows = np.arange(len(y))
    t = class_thresholds(p, y)                                                 # (K,)
    p_given = p[rows, y]                                                       # (N,)
    above = p >= t                                                             # (N, K) confident in k
    above[rows, y] = False                                                     # only *other* classes
    suggested = np.where(above, p, -1.0).argmax(1)                             # (N,)
    idx = np.flatnonzero((p_given < t[y]) & above.any(1))
    p_sugg = p[idx, suggested[idx]]
    idx = idx[np.argsort(-(p_sugg - p_given[idx]), kind="stable")]             # largest margin first
    return LabelIssues(idx, y[idx], suggested[idx], p_given[idx], p[idx, suggested[idx]], t)


def rank_label_issues(probs, labels, flagged: int | None = FLAGGED) -> LabelIssues:
    """Images whose averaged prediction is not their given label, lowest self-confidence first.

    probs: calibrated probabilities (N, K), or (M, N, K) for M models (or views) of the same N images;
    a prediction of NaN is left out of the average (one computed only for some of the images)."""
    p, y = _checked(probs, labels)
    mean = np.nanmean(p, axis=0)                                               # (N, K)
    rows = np.arange(len(y))
    others = mean.copy()
    others[rows, y] = -1.0
    suggested = others.argmax(1)                                               # (N,)
    p_given = mean[rows, y]
    idx = np.flatnonzero(mean.argmax(1) != y)
    idx = idx[np.argsort(p_given[idx], kind="stable")]                         # least plausible first
    agree = None
    if len(p) > 1:
        tops = np.where(np.isnan(p[..., 0]), -1, p.argmax(-1))                 # (M, N), -1: not computed
        agree = ((tops == suggested).sum(0) / np.maximum((tops >= 0).sum(0), 1))[idx]
    return LabelIssues(idx, y[idx], suggested[idx], p_given[idx], mean[idx, suggested[idx]],
                       class_thresholds(mean, y), agree, None if flagged is None else min(flagged, len(idx)))


def measured_line(preset: str | None) -> str:
    """How many of the flagged ones are real label errors, as measured for this preset (or the fast one)."""
    if preset in MEASURED:
        return (f"about {MEASURED[preset]} in {FLAGGED} of these are real label errors, measured on {MEASURED_ON} "
                f"with the {preset} preset (bench/label_errors.py)")
    return (f"not measured for this run's preset; with the fast preset about {MEASURED['fast']} in {FLAGGED} are "
            f"real label errors, measured on {MEASURED_ON} (bench/label_errors.py)")


# -- a run's test set ---------------------------------------------------------------------------

def audit_models(run_dir) -> list[Path]:
    """The finished fold runs of the run's `cifarkit audit` (RUN/audit/folds/): models of the same
    recipe that never saw the test set, so more opinions on it."""
    from ..rundir import RunDir
    folds = RunDir(run_dir).audit_dir / "folds"
    return [f for f in sorted(folds.glob("fold-*")) if RunDir(f).weights_file.is_file()
            and RunDir(f).results_file.is_file()]


def rank_test_set(run_dir, model, images: np.ndarray, labels: np.ndarray, plain: np.ndarray,
                  flagged: int | None = FLAGGED) -> tuple[LabelIssues, int]:
    """The report's ranking of a run's test images (uint8 (N, 32, 32, 3), labels (N,)): the model's
    calibrated probabilities `plain` (N, K), and those of the audit's fold models when the run has
    them. Returns the issues and the number of models asked."""
    from ..weights import load
    probs = [plain]
    for fold in audit_models(run_dir):
        other = load(fold, expect=(model.meta["model"], len(model.classes)))
        probs.append(other.probabilities(images).numpy())
    return rank_label_issues(np.stack(probs), labels, flagged=flagged), len(probs)


# -- output ---------------------------------------------------------------------------------------

CSV_COLUMNS = ("rank", "index", "given_label", "suggested_label", "p_given", "p_suggested", "margin", "agreement",
               "flagged")


def to_csv(issues: LabelIssues, classes: list[str], path_or_file) -> None:
    """One row per listed image, most likely first; labels by class name, probabilities to 4 decimals;
    agreement: the share of views x models whose top class is the suggested one; flagged: 1 for the
    ones the report vouches for."""
    agree = issues.agreement if issues.agreement is not None else np.full(len(issues), np.nan)
    n = len(issues) if issues.flagged is None else issues.flagged

    def write(f):
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r, (i, g, s, pg, ps, a) in enumerate(zip(issues.indices, issues.given, issues.suggested,
                                                     issues.p_given, issues.p_suggested, agree)):
            w.writerow([r + 1, int(i), classes[g], classes[s], f"{pg:.4f}", f"{ps:.4f}", f"{ps - pg:.4f}",
                        "" if np.isnan(a) else f"{a:.2f}", int(r < n)])
    if hasattr(path_or_file, "write"):
        write(path_or_file)
    else:
        with open(Path(path_or_file), "w", newline="") as f:
            write(f)


def label_issues_figure(images: np.ndarray, issues: LabelIssues, classes: list[str], n: int = 20,
                        ncols: int = 5) -> Figure:
    """The n likeliest label errors among uint8 images (N, 32, 32, 3), titled given / suggested (p)."""
    from .explain import upscale
    shown = issues.flagged_indices[:n]
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
