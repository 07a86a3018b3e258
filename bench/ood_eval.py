"""Out-of-distribution scores of a trained run, side by side: how well each tells the run's test images
from images of none of its classes (AUROC, and the share of them accepted at the threshold that keeps
95% of the test images, FPR95). Every score is fitted on the run's held-out images, as `cifarkit
calibrate` fits it; nothing here needs a download.

Far-OOD sets, 500 images each (seeded): scikit-learn's bundled handwritten digits (8x8, upscaled),
rendered text, stripes and checkerboards, smooth noise, uniform colours, white noise. Near-OOD: with
--near RUN_DIR of a run trained on some classes only (`--classes`), the test images of the others.

Prediction sets: the test coverage and mean size of cifarkit's sets (least-ambiguous class, LAC)
beside adaptive prediction sets (APS, randomized), each with and without the top class forced in, at
80/90/95%, fitted on the same held-out images.

    python bench/ood_eval.py runs/quick-seed0 [--near runs/six-classes] [--out runs/ood.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from cifarkit.data.sources import load_arrays
from cifarkit.rundir import RunDir
from cifarkit.trust import conformal, ood
from cifarkit.trust.calibration import held_out, to_probs
from cifarkit.weights import load

N = 500
WORDS = ("the", "model", "page", "invoice", "total", "hello", "world", "chapter", "figure", "table", "data")


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1).astype(np.uint8)


def far_sets(seed: int = 0) -> dict[str, np.ndarray]:
    """name -> uint8 images (N, 32, 32, 3) of none of CIFAR's classes."""
    from sklearn.datasets import load_digits
    rng = np.random.default_rng(seed)
    digits = load_digits().images[:N] / 16 * 255                                   # (N, 8, 8) in [0, 255]
    digits = np.stack([np.asarray(Image.fromarray(d.astype(np.uint8)).resize((32, 32), Image.BICUBIC))
                       for d in digits])
    text = []
    for i in range(N):
        im = Image.new("RGB", (96, 96), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(im)
        for line in range(6):
            draw.text((2, 2 + 15 * line), " ".join(rng.choice(WORDS, 3)), fill=(0, 0, 0))
        text.append(np.asarray(im.resize((32, 32), Image.BICUBIC)))
    yy, xx = np.mgrid[:32, :32]
    textures = []
    for i in range(N):
        period, angle = rng.integers(2, 12), rng.uniform(0, np.pi)
        if i % 2:
            pattern = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0)
        else:
            pattern = ((xx // period + yy // period) % 2).astype(bool)
        a, b = rng.integers(0, 256, (2, 3))
        textures.append(np.where(pattern[..., None], a, b).astype(np.uint8))
    smooth = [np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32), Image.BICUBIC))
              for _ in range(N)]
    colours = np.broadcast_to(rng.integers(0, 256, (N, 1, 1, 3)), (N, 32, 32, 3)).astype(np.uint8)
    noise = rng.integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    return {"digits": _rgb(digits), "text": np.stack(text), "textures": np.stack(textures),
            "smooth noise": np.stack(smooth), "uniform colours": colours, "white noise": noise}


def _scores(model, detectors: dict, images: np.ndarray) -> dict[str, np.ndarray]:
    features, logits = model.features_and_logits(images)
    return {m: d.score(logits, features).numpy() for m, d in detectors.items()}


def _aps(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """APS scores of every class (mass ranked above it + u times its own), for the comparison."""
    order = probs.argsort(1, descending=True)
    ranked = probs.gather(1, order)
    return torch.empty_like(probs).scatter_(1, order, ranked.cumsum(1) - ranked + u[:, None] * ranked)


def set_methods(fit_probs, fit_y, test_probs, test_y) -> dict:
    """{method: {coverage: [test coverage, mean size, share of empty sets]}}."""
    g = torch.Generator().manual_seed(0)
    u_fit, u_test = (torch.rand(n, generator=g, dtype=torch.float64) for n in (len(fit_y), len(test_y)))
    rows, top = {}, test_probs.argmax(1)
    aps_fit = _aps(fit_probs, u_fit)[torch.arange(len(fit_y)), fit_y].sort().values
    for c in (0.8, 0.9, 0.95):
        lac = conformal.prediction_sets(test_probs, conformal.fit(fit_probs, fit_y), c)
        aps = _aps(test_probs, u_test) <= aps_fit[math.ceil((len(fit_y) + 1) * c) - 1]
        for name, sets in (("LAC (cifarkit)", lac), ("APS, randomized", aps)):
            forced = sets.clone()
            forced[torch.arange(len(top)), top] = True
            for label, s in ((name, sets), (name + ", top class forced in", forced)):
                cov, size = conformal.coverage_and_size(s, test_y)
                rows.setdefault(label, {})[c] = [round(cov, 4), round(size, 3), round(float((s.sum(1) == 0).float().mean()), 4)]
    return rows


def _cost(model, detector, images, rounds: int = 3) -> float:
    """Extra time of the verdict over plain probabilities, the best of `rounds` timings of each."""
    def best(fn):
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    plain = best(lambda: model.probabilities(images))
    return best(lambda: detector.score(*reversed(model.features_and_logits(images)))) / plain - 1


def evaluate(run_dir: str, near_dir: str | None = None) -> dict:
    run = RunDir.open(run_dir, need=("config", "weights"))
    arrays = load_arrays(*run.data_source())
    model = load(run.path)
    fit_idx, fitted_on = held_out(run, arrays)
    t = time.perf_counter()
    features, logits = model.features_and_logits(arrays.train_x[fit_idx])
    labels = torch.as_tensor(arrays.train_y[fit_idx]).long()
    detectors = {m: ood.fit(m, logits, features, labels) for m in ood.METHODS}
    fit_seconds = time.perf_counter() - t
    t = time.perf_counter()
    test = _scores(model, detectors, arrays.test_x)
    predict_seconds = time.perf_counter() - t
    sets = {name: _scores(model, detectors, x) for name, x in far_sets().items()}
    out = {"run": run.path.name, "fitted_on": fitted_on, "fit_seconds": round(fit_seconds, 1),
           "test_images": len(arrays.test_y), "far": {}, "near": {}}
    for m in ood.METHODS:
        rows = {name: (ood.auroc(test[m], s[m]), ood.fpr_at_tpr(test[m], s[m])) for name, s in sets.items()}
        allfar = np.concatenate([s[m] for s in sets.values()])
        out["far"][m] = {"auroc": ood.auroc(test[m], allfar), "fpr95": ood.fpr_at_tpr(test[m], allfar),
                         "per_set": {k: [round(a, 4), round(f, 4)] for k, (a, f) in rows.items()}}
    out["seconds_per_1000"] = round(predict_seconds / len(arrays.test_y) * 1000, 3)
    t = model.temperature
    _, test_logits = model.features_and_logits(arrays.test_x)
    out["sets"] = set_methods(to_probs(logits, t).double(), labels, to_probs(test_logits, t).double(),
                              torch.as_tensor(arrays.test_y).long())
    out["ood_cost"] = round(_cost(model, detectors[ood.DEFAULT], arrays.test_x[:2000]), 3)
    if near_dir:
        out["near"] = near(near_dir)
    return out


def near(run_dir: str) -> dict:
    """A run trained on some classes: its test images of those (in) against those of the others."""
    run = RunDir.open(run_dir, need=("config", "weights"))
    cfg = run.read_config()
    full = load_arrays(cfg.data, cfg.dataset)
    model = load(run.path)
    known = np.isin(np.asarray(full.classes)[full.test_y], model.classes)
    arrays = load_arrays(*run.data_source())
    fit_idx, _ = held_out(run, arrays)
    features, logits = model.features_and_logits(arrays.train_x[fit_idx])
    labels = torch.as_tensor(arrays.train_y[fit_idx]).long()
    detectors = {m: ood.fit(m, logits, features, labels) for m in ood.METHODS}
    inside, outside = _scores(model, detectors, full.test_x[known]), _scores(model, detectors, full.test_x[~known])
    return {m: {"auroc": ood.auroc(inside[m], outside[m]), "fpr95": ood.fpr_at_tpr(inside[m], outside[m])}
            for m in ood.METHODS}


def table(result: dict) -> str:
    lines = ["| score | far-OOD AUROC | far-OOD FPR95 | near-OOD AUROC | near-OOD FPR95 |", "| --- | --- | --- | --- | --- |"]
    for m in ood.METHODS:
        far, nr = result["far"][m], result["near"].get(m)
        near_cells = f"{nr['auroc']:.3f} | {nr['fpr95']:.1%}" if nr else "- | -"
        lines.append(f"| {m} | {far['auroc']:.3f} | {far['fpr95']:.1%} | {near_cells} |")
    lines += ["", "| far set | " + " | ".join(ood.METHODS) + " |", "| --- |" + " --- |" * len(ood.METHODS)]
    for name in result["far"][ood.METHODS[0]]["per_set"]:
        lines.append(f"| {name} | " + " | ".join(f"{result['far'][m]['per_set'][name][0]:.3f}" for m in ood.METHODS) + " |")
    lines += ["", "| prediction sets | 80%: coverage, size, empty | 90% | 95% |", "| --- | --- | --- | --- |"]
    for name, by_c in result.get("sets", {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{v[0]:.2%}, {v[1]:.2f}, {v[2]:.1%}" for v in by_c.values()) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--near", help="a run trained on some of the classes (`--classes`): near-OOD")
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    result = evaluate(args.run_dir, args.near)
    print(table(result))
    cost = result["ood_cost"]
    print(f"\nfitted on the {result['fitted_on']}; the default score ({ood.DEFAULT}) "
          + (f"adds {cost:.0%} to the time of plain probabilities" if cost > 0.01 else
             f"adds no measurable time to plain probabilities ({cost:+.0%}, best of 3 timings each)"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
