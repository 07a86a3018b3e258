"""Prediction sets with a guarantee: split conformal prediction with adaptive prediction sets (APS).

Fitted on held-out images of the training distribution (never the test set): each held-out image's
conformity score is the probability mass of the classes ranked at or above its true class, the last
one counted by a uniform draw u (Romano, Sesia & Candes, 2020; randomized, as TorchCP's APS). For a
coverage 1 - alpha the threshold is the ceil((n + 1)(1 - alpha))-th smallest of the n scores; a test
image's set is every class whose score falls at or under it. For exchangeable images the set then
holds the true class with probability at least 1 - alpha (and at most 1 - alpha + 1 / (n + 1)). The
held-out scores are stored with the weights, so any coverage can be asked for at prediction time.
"""
from __future__ import annotations

import math

import torch

from ..errors import CifarkitError

SEED = 0                 # the draws u: a prediction set is the same every time it is asked for
SCORES = "conformal.scores"  # the held-out conformity scores' name among a model's stored stats


def check_coverage(coverage: float, n: int | None = None) -> None:
    if not 0 < coverage < 1:
        raise CifarkitError(f"--coverage must be in (0, 1), e.g. 0.9 for sets that hold the true class 90% "
                            f"of the time; got {coverage}")
    if n is not None and math.ceil((n + 1) * coverage) > n:
        raise CifarkitError(f"a coverage of {coverage} needs more than the {n} held-out images this model was "
                            f"calibrated on: ask for at most {n / (n + 1):.3f}")


def _draws(n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(SEED), dtype=torch.float64)


def aps_scores(probs: torch.Tensor) -> torch.Tensor:
    """(B, K) probabilities -> (B, K) the APS score each class would have as the true one: the mass of
    the classes ranked above it plus u times its own."""
    p = probs.double()
    order = p.argsort(dim=1, descending=True)
    sorted_p = p.gather(1, order)
    above = sorted_p.cumsum(dim=1) - sorted_p                               # mass ranked strictly above
    u = _draws(len(p))[:, None]
    return torch.empty_like(p).scatter_(1, order, above + u * sorted_p)


def fit(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The held-out conformity scores (n,), sorted: what prediction sets at any coverage need."""
    if len(labels) < 20:
        raise CifarkitError(f"prediction sets need at least 20 held-out images, got {len(labels)}")
    return aps_scores(probs).gather(1, labels.long()[:, None])[:, 0].sort().values.float()


def threshold(scores: torch.Tensor, coverage: float) -> float:
    n = len(scores)
    check_coverage(coverage, n)
    return float(scores[math.ceil((n + 1) * coverage) - 1])


def prediction_sets(probs: torch.Tensor, scores: torch.Tensor, coverage: float) -> torch.Tensor:
    """(B, K) bool: the classes in each image's set (its most probable class always among them)."""
    inside = aps_scores(probs) <= threshold(scores, coverage)
    top = probs.argmax(dim=1)
    inside[torch.arange(len(probs)), top] = True  # never an empty set
    return inside


def coverage_and_size(sets: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(share of images whose set holds the true class, mean set size)."""
    return (float(sets[torch.arange(len(labels)), labels.long()].float().mean()),
            float(sets.sum(dim=1).float().mean()))
