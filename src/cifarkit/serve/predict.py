"""Batch prediction over files and folders: unreadable files are listed, never fatal."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..console import progress
from ..errors import CifarkitError
from ..images import SUFFIXES, rgb_array


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


def predict_files(model, paths: list[Path], top_k: int = 3,
                  batch_size: int = 256) -> tuple[list[dict], list[str]]:
    """Top-k classes per readable image, in batches; (results, errors) in input order."""
    k = max(1, min(top_k, len(model.classes)))
    results, errors = [], []
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
                probs = model.probabilities(np.stack(images))
                top = probs.topk(k, dim=1)
                for name, vals, idx in zip(names, top.values.tolist(), top.indices.tolist()):
                    results.append({"image": name, "top": [{"class": model.classes[i], "prob": round(v, 4)}
                                                           for v, i in zip(vals, idx)]})
            bar.advance(len(paths[start:start + batch_size]))
    return results, errors


def write_csv(results: list[dict], path: str | Path) -> None:
    k = max((len(r["top"]) for r in results), default=0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"prob_{i}")])
        for r in results:
            w.writerow([r["image"]] + [v for t in r["top"] for v in (t["class"], t["prob"])])
