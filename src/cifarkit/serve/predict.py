"""Predictions a user can act on, and batch prediction over files and folders.

`Model` is a loaded model that also says when an image is none of its classes (an out-of-distribution
score and verdict) and, asked for a coverage, gives the set of classes that holds the true one that
often; both from statistics fitted on held-out images and stored with its weights. Unreadable files
are listed, never fatal.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..console import log, progress
from ..errors import CifarkitError
from ..images import SUFFIXES, rgb_array
from ..trust import conformal
from ..trust.ood import OODDetector
from ..weights import Loaded, load

NO_STATS = "this model has no out-of-distribution statistics or prediction sets (trained before they were stored)"
NOT_FITTED = f"{NO_STATS}: add them with `cifarkit calibrate RUN_DIR`"


@dataclass
class Assessment:
    probabilities: torch.Tensor       # (B, K) calibrated
    ood_score: torch.Tensor | None    # (B,) higher: less like the training images; None: not fitted
    unknown: torch.Tensor | None      # (B,) True: none of the classes
    sets: torch.Tensor | None         # (B, K) bool, when a coverage was asked for


class Model(Loaded):
    """A Loaded model with its out-of-distribution detector and conformity scores (when fitted)."""

    @property
    def detector(self) -> OODDetector | None:
        return OODDetector.from_weights(self.stats, self.meta)

    def assess(self, images, coverage: float | None = None, batch_size: int = 1000) -> Assessment:
        """Files, PIL images or uint8 images -> probabilities, the verdict "none of these" and, given a
        coverage in (0, 1), prediction sets. The verdict never changes the most probable class."""
        scores = self.stats.get(conformal.SCORES)
        if coverage is not None:
            conformal.check_coverage(coverage, None if scores is None else len(scores))
        features, logits = self.features_and_logits(images, batch_size)
        probs = self.to_probabilities(logits)
        det = self.detector
        ood = det.score(logits, features) if det is not None else None
        sets = conformal.prediction_sets(probs, scores, coverage) if coverage is not None and scores is not None else None
        return Assessment(probs, ood, det.verdict(ood) if det is not None else None, sets)


def load_model(path, revision: str | None = None) -> Model:
    """`weights.load` as a Model (a run directory, .safetensors file, Hub folder or repository id)."""
    m = load(path, revision=revision)
    return Model(m.net, m.classes, m.mean, m.std, m.meta, m.stats)


def answer(result: dict, num_classes: int) -> str:
    """One image's answer in words, from predict_files: its top classes, or "not one of the K classes
    (looks least unlike: X)", and its prediction set when one was asked for."""
    top = result["top"]
    if result.get("unknown"):
        text = f"not one of the {num_classes} classes (looks least unlike: {top[0]['class']})"
    else:
        text = ", ".join(f"{t['class']} {t['prob']:.1%}" for t in top)
    if "set" in result:
        text += f"; prediction set {{{', '.join(result['set'])}}}" if result["set"] else \
            "; prediction set empty (no class is likely enough at this coverage)"
    return text


def collect_images(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files as given, folders walked recursively for image files; (paths, errors)."""
    paths, errors = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
            if not found:
                errors.append(f"no images in folder {p}")
            paths += found
        elif p.is_file():
            paths.append(p)
        else:
            errors.append(f"no such file or folder: {p}")
    return paths, errors


def predict_files(model, paths: list[Path], top_k: int = 3, batch_size: int = 256,
                  coverage: float | None = None) -> tuple[list[dict], list[str]]:
    """Top-k classes per readable image, in batches, with the out-of-distribution score and verdict
    and (given a coverage) the prediction set; (results, errors) in input order."""
    k = max(1, min(top_k, len(model.classes)))
    results, errors = [], []
    if getattr(model, "detector", None) is None:
        log.warning(f"notice: {NOT_FITTED}")
    with progress("classifying images", len(paths)) as bar:
        for start in range(0, len(paths), batch_size):
            images, names = [], []
            for p in paths[start:start + batch_size]:
                try:
                    images.append(rgb_array(p))
                    names.append(str(p))
                except CifarkitError as exc:
                    errors.append(str(exc))
            if images:
                results += _results(model, np.stack(images), names, k, coverage)
            bar.advance(len(paths[start:start + batch_size]))
    return results, errors


def _results(model, images: np.ndarray, names: list[str], k: int, coverage: float | None) -> list[dict]:
    a = model.assess(images, coverage)
    top = a.probabilities.topk(k, dim=1)
    out = []
    for j, (name, vals, idx) in enumerate(zip(names, top.values.tolist(), top.indices.tolist())):
        r = {"image": name, "top": [{"class": model.classes[i], "prob": round(v, 4)} for v, i in zip(vals, idx)]}
        if a.ood_score is not None:
            r["ood_score"], r["unknown"] = round(float(a.ood_score[j]), 4), bool(a.unknown[j])
        if a.sets is not None:
            r["set"] = [c for c, inside in zip(model.classes, a.sets[j].tolist()) if inside]
        out.append(r)
    return out


def write_csv(results: list[dict], path: str | Path) -> None:
    k = max((len(r["top"]) for r in results), default=0)
    extra = [c for c in ("ood_score", "unknown", "set") if any(c in r for r in results)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"prob_{i}")] + extra)
        for r in results:
            cells = [" ".join(r[c]) if c == "set" and c in r else r.get(c, "") for c in extra]
            w.writerow([r["image"]] + [v for t in r["top"] for v in (t["class"], t["prob"])] + cells)
