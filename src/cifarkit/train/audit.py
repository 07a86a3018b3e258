"""`cifarkit audit RUN_DIR --folds K`: likely label errors in the training set, not only the test set.

A model cannot judge the labels it was trained on (it has learned them), so the run's recipe is
trained K more times, each time without one fold of its training images (TrainConfig.holdout_fold
= [k, K]: the data module drops that fold, nothing else changes), and each fold is predicted by the
one model that never saw it. Confident learning (label_issues.py) then ranks the stitched
out-of-fold probabilities. K trainings cost about K times the run: on a full CIFAR-10 run, a GPU job.
Fold runs are ordinary run directories under OUT/folds/: an interrupted audit resumes the fold it
was in and reuses the folds that finished.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..console import log
from ..errors import CifarkitError
from ..data.datamodule import out_of_fold_splits
from ..trust.label_issues import LabelIssues, find_label_issues, label_issues_figure, to_csv
from ..presets import TrainConfig
from ..rundir import RunDir

@dataclass
class Audit:
    """Out-of-fold predictions over a run's training images and the likely label errors among them."""
    indices: np.ndarray      # (N,) int, positions in the data source's training set the run trained on
    labels: np.ndarray       # (N,) int, their given labels
    probs: np.ndarray        # (N, K) float, each row from the fold model that never saw that image
    issues: LabelIssues      # .indices are positions in the data source's training set
    classes: list[str]
    folds: list[RunDir]
    csv: Path                # where the likely label errors were written (RunDir.AUDIT_CSV)


def check_folds(folds: int) -> None:
    if folds < 2:
        raise CifarkitError(f"--folds must be at least 2 (got {folds}): with one fold no model is left that "
                            "did not train on the images it judges")


def fold_config(cfg: TrainConfig, k: int, folds: int, out: Path, lr: float | None, data: str | None) -> TrainConfig:
    """The run's own recipe without fold k; the LR range test's rate, if it ran, is reused as is."""
    return dataclasses.replace(cfg, holdout_fold=[k, folds], out=str(out / "folds" / f"fold-{k}-of-{folds}"),
                               lr=lr if cfg.lr == "auto" and lr else cfg.lr, data=data or cfg.data)


def _train(cfg: TrainConfig) -> RunDir:
    from .fit import fit
    fold = RunDir(cfg.out)
    if fold.results_file.is_file() and fold.weights_file.is_file():
        log.info(f"audit: {fold.name} already trained; reusing it")
        return fold
    return fit(fold.read_config(), resume=True) if fold.config_file.is_file() else fit(cfg)


def audit(run_dir: str | Path, folds: int, out: str | Path | None = None) -> Audit:
    """Train the run's recipe `folds` times out of fold, write OUT/label_issues_train.{csv,png}."""
    check_folds(folds)
    import torch

    from .fit import build_datamodule
    from ..weights import load
    run = RunDir.open(run_dir, need=("config",))
    cfg, res = run.read_config(), run.read_results()
    out = Path(out) if out else run.audit_dir
    source, *_ = run.data_source()
    base = build_datamodule(dataclasses.replace(cfg, data=source or cfg.data, holdout_fold=None))
    n = len(base.train_idx)
    if folds > n:
        raise CifarkitError(f"--folds {folds} is more than the run's {n} training images; use at most {n}")
    took = f"the run's {res.seconds:.0f} s" if res and res.seconds else "the run's own time"
    log.info(f"audit: {folds} trainings of this run's recipe, each on {folds - 1}/{folds} of its {n:,} training "
          f"images: about {folds - 1}-{folds}x {took} in all; for a full CIFAR-10 run, a GPU job")
    probs = np.zeros((n, len(base.classes)), dtype=np.float32)                  # (N, K)
    fold_runs = []
    for k, (_, held) in enumerate(out_of_fold_splits(n, folds, cfg.seed)):    # the split the data module makes
        fold = _train(fold_config(cfg, k, folds, out, res.lr if res else None, source))
        fold_runs.append(fold)
        model = load(fold.path, expect=(cfg.model, len(base.classes)))
        model.net.to("cuda" if torch.cuda.is_available() else "cpu")
        probs[held] = model.probabilities(base.arrays.train_x[base.train_idx[held]]).numpy()
    labels = base.arrays.train_y[base.train_idx]
    found = find_label_issues(probs, labels)
    issues = dataclasses.replace(found, indices=base.train_idx[found.indices])  # positions in the training set
    out.mkdir(parents=True, exist_ok=True)
    to_csv(issues, base.classes, out / RunDir.AUDIT_CSV)
    fig = label_issues_figure(base.arrays.train_x, issues, base.classes)
    fig.suptitle("Likely label errors in the training set (out-of-fold), most likely first")
    fig.savefig(out / RunDir.AUDIT_FIGURE, dpi=110, bbox_inches="tight")
    return Audit(base.train_idx, labels, probs, issues, list(base.classes), fold_runs, out / RunDir.AUDIT_CSV)
