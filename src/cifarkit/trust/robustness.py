"""Accuracy under common corruptions, generated on the fly in the spirit of CIFAR-10-C.

Hendrycks & Dietterich (2019) ship CIFAR-10-C as 2.7 GB of files; here the corruptions are made
from torchvision.transforms.v2.functional on uint8 images (N, 32, 32, 3), with a fixed seed, in
well under a second per 2,000 images. Severity 0 is the identity; 1..5 follow the table below,
CIFAR-10-C's own parameters where torchvision's operation is the same, matched otherwise.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from matplotlib.figure import Figure
from torchvision.transforms.v2 import functional as F

from ..errors import CifarkitError

# The one table of severities 1..5 (index 0 is severity 1). Units in the comments.
SEVERITIES: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),  # noise std, fraction of the 0-255 range (CIFAR-10-C)
    "gaussian_blur":  (0.4, 0.6, 0.7, 0.8, 1.0),       # blur sigma, pixels; kernel 2*round(4 sigma)+1 (CIFAR-10-C)
    "jpeg":           (80, 65, 58, 50, 40),            # JPEG quality (CIFAR-10-C)
    "brightness":     (1.1, 1.2, 1.3, 1.4, 1.6),       # pixel gain; CIFAR-10-C adds .05-.3 to HSV value,
                                                       # these gains change the test set's pixels as much
    "contrast":       (0.75, 0.5, 0.4, 0.3, 0.15),     # blend factor toward the image's mean grey (CIFAR-10-C)
    "pixelate":       (0.95, 0.9, 0.85, 0.75, 0.65),   # side of the downscaled image, fraction (CIFAR-10-C)
}
CORRUPTIONS = tuple(SEVERITIES)
MAX_SEVERITY = 5
# images per setting on a CPU: 31 x 1,000 forward passes of the fast net took 65 s on 2 busy cores
# (bench/robustness_speed.py); all 10,000 test images would take ~9 minutes there, seconds on a GPU
CPU_SUBSAMPLE = 1000


def _check(name: str, severity: int) -> None:
    if name not in SEVERITIES:
        raise CifarkitError(f"unknown corruption '{name}'; choose from: {', '.join(CORRUPTIONS)}")
    whole = isinstance(severity, (int, np.integer)) and not isinstance(severity, bool)
    if not whole or not 0 <= severity <= MAX_SEVERITY:
        raise CifarkitError(f"corruption severity {severity!r} does not exist; choose an integer from 0 "
                            f"(none) to {MAX_SEVERITY} (worst)")


# -- the corruptions, on uint8 tensors (N, 3, H, W) -------------------------------------------------

def _noise(x: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    # torchvision draws with the global generator: seed a private fork so the caller's state is
    # untouched; in float so the noise rounds (its uint8 path truncates toward zero)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        y = F.gaussian_noise(x.float() / 255, sigma=sigma, clip=True)          # (N, 3, H, W) in [0, 1]
    return (y * 255).round().to(torch.uint8)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = 2 * int(4 * sigma + 0.5) + 1  # scikit-image's truncate=4, as CIFAR-10-C used
    return F.gaussian_blur(x, [k, k], [sigma, sigma])


def _pixelate(x: torch.Tensor, fraction: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    small = F.resize(x, [int(h * fraction), int(w * fraction)], interpolation=F.InterpolationMode.BILINEAR,
                     antialias=True)                                           # area-like downscale
    return F.resize(small, [h, w], interpolation=F.InterpolationMode.NEAREST_EXACT)


def _apply(x: torch.Tensor, name: str, v: float, seed: int) -> torch.Tensor:
    if name == "gaussian_noise":
        return _noise(x, v, seed)
    if name == "gaussian_blur":
        return _blur(x, v)
    if name == "jpeg":
        return F.jpeg(x, int(v))
    if name == "brightness":
        return F.adjust_brightness(x, v)
    if name == "contrast":
        return F.adjust_contrast(x, v)
    return _pixelate(x, v)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """uint8 images (N, H, W, 3) under one corruption at severity 0..5 -> a new uint8 (N, H, W, 3).

    Deterministic: the same images, name, severity and seed give the same pixels."""
    _check(name, severity)
    a = np.asarray(images)
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise CifarkitError(f"corrupt() takes uint8 images (N, H, W, 3), got {a.dtype} {a.shape}")
    if severity == 0:
        return a.copy()
    x = torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)           # (N, 3, H, W)
    y = _apply(x, name, SEVERITIES[name][severity - 1], seed)                   # (N, 3, H, W) uint8
    return y.permute(0, 2, 3, 1).contiguous().numpy()                           # (N, H, W, 3)


# -- evaluation -------------------------------------------------------------------------------------

@dataclass
class RobustnessResult:
    names: tuple[str, ...]
    severities: tuple[int, ...]
    accuracy: np.ndarray     # (len(names), len(severities)), fraction correct
    clean_accuracy: float    # on the same images, uncorrupted
    n: int                   # images per setting (a seeded subsample when n < the test set)
    seed: int
    seconds: float           # wall time of evaluate(), corruptions and predictions

    @property
    def mean_corruption_accuracy(self) -> float:
        """The one number: mean accuracy over every corruption and severity evaluated."""
        return float(self.accuracy.mean())

    def at(self, name: str, severity: int) -> float:
        return float(self.accuracy[self.names.index(name), self.severities.index(severity)])


def _accuracy(predict_fn, images: np.ndarray, labels: np.ndarray, batch_size: int) -> float:
    right = 0
    for i in range(0, len(images), batch_size):
        out = predict_fn(images[i:i + batch_size])
        out = np.asarray(out.detach().float().cpu() if hasattr(out, "detach") else out)
        pred = out.argmax(1) if out.ndim == 2 else out                          # probs (B, K) or classes (B,)
        right += int((pred == labels[i:i + batch_size]).sum())
    return right / max(len(images), 1)


def evaluate(predict_fn: Callable[[np.ndarray], np.ndarray], images: np.ndarray, labels: np.ndarray,
             names: tuple[str, ...] = CORRUPTIONS, severities: tuple[int, ...] = (1, 2, 3, 4, 5),
             seed: int = 0, n: int | None = None, batch_size: int = 1000) -> RobustnessResult:
    """Accuracy of predict_fn (uint8 (B, 32, 32, 3) -> classes (B,) or probabilities (B, K)) on every
    corruption x severity. n: a seeded subsample of that many images, the same one for every setting
    (all images when None); it is what keeps a CPU run short (see bench/robustness_speed.py)."""
    names, severities = tuple(names), tuple(severities)
    for name in names:
        for s in severities:
            _check(name, s)  # all of them before any work, so a typo fails at once
    start = time.perf_counter()
    labels = np.asarray(labels)
    if n is not None and n < len(images):
        keep = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
        images, labels = images[keep], labels[keep]
    acc = np.zeros((len(names), len(severities)))
    for i, name in enumerate(names):
        for j, s in enumerate(severities):
            acc[i, j] = _accuracy(predict_fn, corrupt(images, name, s, seed), labels, batch_size)
    clean = _accuracy(predict_fn, images, labels, batch_size)
    return RobustnessResult(names, severities, acc, clean, len(images), seed, time.perf_counter() - start)


# -- presentation -----------------------------------------------------------------------------------

def table_rows(result: RobustnessResult) -> list[list[str]]:
    """Header, one row per corruption and a mean row, as strings for a Markdown or HTML table."""
    header = ["corruption", *[f"severity {s}" for s in result.severities], "mean"]
    pct = lambda v: f"{v:.1%}"  # noqa: E731
    rows = [[name, *map(pct, result.accuracy[i]), pct(result.accuracy[i].mean())]
            for i, name in enumerate(result.names)]
    rows.append(["all corruptions", *map(pct, result.accuracy.mean(0)), pct(result.mean_corruption_accuracy)])
    return [header, *rows]


def robustness_figure(result: RobustnessResult) -> Figure:
    """Accuracy against severity, one line per corruption; clean accuracy dashed."""
    fig = Figure(figsize=(8, 4.5))
    ax = fig.subplots()
    for i, name in enumerate(result.names):
        ax.plot(result.severities, result.accuracy[i], marker="o", ms=4, label=name.replace("_", " "))
    ax.axhline(result.clean_accuracy, color="k", ls="--", lw=1, label=f"clean {result.clean_accuracy:.1%}")
    ax.axhline(result.mean_corruption_accuracy, color="C3", ls=":", lw=1.5,
               label=f"mean corrupted {result.mean_corruption_accuracy:.1%}")
    ax.set(xlabel="severity", ylabel="test accuracy", ylim=(0, 1), xticks=list(result.severities),
           title=f"Accuracy under corruptions ({result.n:,} test images per point, seed {result.seed})")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.tight_layout()
    return fig
