"""Predictions over a split and what to learn from them: mistakes, confusion, per-class accuracy.

Everything returns data (numpy arrays, a dataclass); plots.py draws them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..rundir import RunDir, atomic_path
from ..weights import Loaded


@dataclass
class Predictions:
    images: np.ndarray   # uint8 (N, 32, 32, 3)
    labels: np.ndarray   # int64 (N,)
    probs: np.ndarray    # float32 (N, K), calibrated: softmax(logits / T)
    classes: list[str]
    logits: np.ndarray | None = None  # float32 (N, K), raw (before the temperature), when computed

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(1)

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.labels).mean())


def predict_arrays(model: Loaded, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> Predictions:
    """Raw logits and calibrated probabilities of uint8 images (N, 32, 32, 3), in batches."""
    z = model.logits(images, batch_size)                                        # (N, K)
    return Predictions(images, np.asarray(labels), model.to_probabilities(z).numpy(), list(model.classes),
                       z.numpy())


def load_test_split(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The test split of the data a run was trained on (decoded from the cache when possible)."""
    from ..data.sources import load_arrays
    a = load_arrays(*RunDir.open(run_dir).data_source())
    return a.test_x, a.test_y


def mistakes(p: Predictions, n: int | None = None, true: int | None = None, pred: int | None = None) -> np.ndarray:
    """Indices of misclassified images, most confident first; optionally of one true/predicted class."""
    wrong = p.preds != p.labels
    if true is not None:
        wrong &= p.labels == true
    if pred is not None:
        wrong &= p.preds == pred
    idx = np.flatnonzero(wrong)
    idx = idx[np.argsort(-p.confidence[idx], kind="stable")]
    return idx if n is None else idx[:n]


def correct(p: Predictions, n: int | None = None) -> np.ndarray:
    """Indices of correctly classified images, most confident first."""
    idx = np.flatnonzero(p.preds == p.labels)
    idx = idx[np.argsort(-p.confidence[idx], kind="stable")]
    return idx if n is None else idx[:n]


def confusion(p: Predictions) -> np.ndarray:
    """Counts (K, K): row = true class, column = predicted class."""
    k = len(p.classes)
    return np.bincount(p.labels * k + p.preds, minlength=k * k).reshape(k, k)


def per_class_accuracy(conf: np.ndarray) -> np.ndarray:
    return np.diag(conf) / np.maximum(conf.sum(1), 1)


# -- what the app shows without a dataset: a gallery of test images with their predictions -------


def save_gallery(run_dir: str | Path, p: Predictions, max_mistakes: int = 2000, n_correct: int = 200,
                 n_random: int = 200, seed: int = 0, label_issues: np.ndarray | None = None) -> Path:
    """Store mistakes (most confident first), confident correct and random test images with their
    probabilities, plus one example image per class, so the app needs only the run directory.
    label_issues: test-set indices of the flagged likely label errors, likeliest first
    (label_issues.py); stored as a flag and a rank (-1: not flagged) per image, and any of them not
    among the mistakes kept is stored too (kind 'flagged')."""
    run = RunDir(run_dir)
    rng = np.random.default_rng(seed)
    picks = {"mistake": mistakes(p, max_mistakes), "correct": correct(p, n_correct),
             "random": rng.choice(len(p.labels), size=min(n_random, len(p.labels)), replace=False)}
    if label_issues is not None:
        picks["flagged"] = np.setdiff1d(label_issues, picks["mistake"])
    idx = np.concatenate(list(picks.values()))
    kind = np.concatenate([np.full(len(v), k) for k, v in picks.items()])
    out = run.gallery_file
    flags = {}
    if label_issues is not None:
        rank = np.full(len(p.labels), -1)
        rank[np.asarray(label_issues, dtype=np.int64)] = np.arange(len(label_issues))
        flags = {"label_issue": rank[idx] >= 0, "label_issue_rank": rank[idx]}
    with atomic_path(out, ".npz") as tmp:
        np.savez_compressed(tmp, images=p.images[idx], labels=p.labels[idx], probs=p.probs[idx].astype(np.float16),
                            kind=kind, classes=np.array(p.classes), index=idx, **flags)
    ex_dir = run.examples_dir
    ex_dir.mkdir(exist_ok=True)
    from PIL import Image
    for c, name in enumerate(p.classes[:10] if len(p.classes) > 10 else p.classes):
        first = np.flatnonzero(p.labels == c)
        if len(first):
            Image.fromarray(p.images[first[0]]).save(ex_dir / f"{c:02d}-{name}.png")
    return out


def load_gallery(run_dir: str | Path) -> Predictions:
    """The stored gallery as Predictions with a `.kind` array, `.label_issue` flags and their
    `.label_issue_rank` (None in a gallery written before them); one line when there is none."""
    f = RunDir.open(run_dir, need=("gallery",)).gallery_file
    with np.load(f) as z:
        p = Predictions(z["images"], z["labels"], z["probs"].astype(np.float32), [str(c) for c in z["classes"]])
        p.kind, p.index = z["kind"], z["index"]                                # index: position in the test set
        p.label_issue = z["label_issue"] if "label_issue" in z.files else None
        p.label_issue_rank = z["label_issue_rank"] if "label_issue_rank" in z.files else None
    return p
