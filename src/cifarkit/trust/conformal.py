"""Prediction sets with a guarantee: split conformal prediction with the least-ambiguous-class score.

Fitted on held-out images of the training distribution (never the test set): each held-out image's
non-conformity score is 1 minus the calibrated probability of its true class (LAC, Sadinle, Lei &
Wasserman, 2019; TorchCP's THR). For a coverage 1 - alpha the threshold q is the
ceil((n + 1)(1 - alpha))-th smallest of the n scores, and a test image's set is every class whose
probability is at least 1 - q. For exchangeable images the set holds the true class with probability
at least 1 - alpha and at most 1 - alpha + 1 / (n + 1), and LAC's sets are the smallest on average.
A set may be empty (no class is likely enough at that coverage): forcing the top class into every
set would cover more than asked (at 80% on an 86% model, every set would hold its top class, which
alone covers 86%); measured in BENCHMARKS.md, "Prediction sets", beside randomized APS. The
held-out scores are stored with the weights, so any coverage can be asked for at prediction time.
"""
from __future__ import annotations

import math

import torch

from ..errors import CifarkitError

SCORES = "conformal.scores"  # the held-out non-conformity scores' name among a model's stored stats
MIN_HELD_OUT = 20


def check_coverage(coverage: float, n: int | None = None) -> None:
    if not 0 < coverage < 1:
        raise CifarkitError(f"--coverage must be in (0, 1), e.g. 0.9 for sets that hold the true class 90% "
                            f"of the time; got {coverage}")
    if n is not None and math.ceil((n + 1) * coverage) > n:
        raise CifarkitError(f"a coverage of {coverage} needs more than the {n} held-out images this model was "
                            f"calibrated on: ask for at most {n / (n + 1):.3f}")


def fit(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The held-out non-conformity scores (n,), sorted: what prediction sets at any coverage need.
    probs: calibrated probabilities (n, K) of held-out images; labels: their classes (n,)."""
    if len(labels) < MIN_HELD_OUT:
        raise CifarkitError(f"prediction sets need at least {MIN_HELD_OUT} held-out images, got {len(labels)}")
    true = probs.double()[torch.arange(len(labels)), labels.long()]
    return (1 - true).sort().values.float()


def threshold(scores: torch.Tensor, coverage: float) -> float:
    n = len(scores)
    check_coverage(coverage, n)
    return float(scores[math.ceil((n + 1) * coverage) - 1])


def prediction_sets(probs: torch.Tensor, scores: torch.Tensor, coverage: float) -> torch.Tensor:
    """(B, K) bool: the classes in each image's set (possibly none)."""
    return (1 - probs.double()) <= threshold(scores, coverage) + 1e-12


def coverage_and_size(sets: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(share of images whose set holds the true class, mean set size)."""
    return (float(sets[torch.arange(len(labels)), labels.long()].float().mean()),
            float(sets.sum(dim=1).float().mean()))
