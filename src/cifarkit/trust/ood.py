"""Out-of-distribution scores: "this is none of the classes".

A score is higher the less an input looks like the training distribution. Six of the field's
standard scores and one sum of two of them, each a few lines (the fitted ones checked against pytorch-ood in the tests):
- msp: minus the maximum softmax probability (Hendrycks & Gimpel, 2017), the baseline;
- maxlogit: minus the maximum logit (Hendrycks et al., 2022);
- energy: minus logsumexp of the logits (Liu et al., 2020);
- mahalanobis: the smallest Mahalanobis distance of the penultimate features to a class mean, with
  one covariance shared by the classes (Lee et al., 2018);
- knn: the distance of the normalized features to their k-th nearest held-out neighbour (Sun et al., 2022);
- featnorm: minus the mean penultimate activation, that is the features' L1 norm over their number
  (the feature-norm scores of Yu et al., 2023 and Park et al., 2023, which take the L2 norm): a net
  trained on its classes fires less on anything else;
- energynorm (the default): energy minus NORM_WEIGHT times the log of that mean activation. Energy
  is the best score on images of unknown classes near the known ones, the feature norm on images
  of nothing like them (pages of text, patterns, noise); their sum keeps most of both (BENCHMARKS.md).
The fitted statistics come from held-out images of the training distribution, never the test set,
and the threshold keeps `keep` of them (95% by default): an input scoring above it is "none of these".
The verdict never changes the predicted class.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import CifarkitError
from ..presets import OOD_DEFAULT, OOD_KEEP, OOD_METHODS

METHODS, DEFAULT, KEEP = OOD_METHODS, OOD_DEFAULT, OOD_KEEP  # declared on the recipe page
FITTED = ("mahalanobis", "knn")  # the scores that need statistics of the training distribution
KNN_K = 50                       # neighbours: the k-th distance is the score (the paper's k for CIFAR-10)
RIDGE = 1e-6                     # added to the shared covariance's diagonal (features' squared units)
NORM_WEIGHT = 1.5                # energynorm: the log mean activation's weight (picked in BENCHMARKS.md)
PREFIX = "ood."                  # the statistics' names among a model's stored stats (weights.Loaded.stats)


@dataclass
class OODDetector:
    """A fitted score and its threshold; `tensors` are the statistics the method reads."""
    method: str
    threshold: float
    keep: float
    tensors: dict = field(default_factory=dict)

    def score(self, logits: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) scores, higher = less like the training distribution."""
        return score(self.method, logits, features, self.tensors)

    def verdict(self, scores: torch.Tensor) -> torch.Tensor:
        """(B,) True where the input is none of the classes."""
        return scores > self.threshold

    def to_weights(self) -> tuple[dict, dict]:
        """(stats, metadata) to store beside the net's weights (weights.update_metadata)."""
        meta = {"ood_method": self.method, "ood_threshold": repr(self.threshold), "ood_keep": repr(self.keep)}
        return {PREFIX + k: v.contiguous() for k, v in self.tensors.items()}, meta

    @classmethod
    def from_weights(cls, tensors: dict, meta: dict) -> "OODDetector | None":
        """The detector stored with a model (its `stats` and `meta`), or None for weights fitted
        before scores were stored."""
        if "ood_method" not in meta:
            return None
        stats = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
        return cls(meta["ood_method"], float(meta["ood_threshold"]), float(meta["ood_keep"]), stats)


# -- the scores -----------------------------------------------------------------------------------


def score(method: str, logits: torch.Tensor, features: torch.Tensor | None = None,
          stats: dict | None = None) -> torch.Tensor:
    logits = logits.float()
    if method == "msp":
        return -torch.softmax(logits, dim=1).amax(dim=1)
    if method == "maxlogit":
        return -logits.amax(dim=1)
    if method == "energy":
        return -torch.logsumexp(logits, dim=1)
    if method == "mahalanobis":
        return mahalanobis(features.float(), stats["means"], stats["precision"])
    if method == "knn":
        return knn(features.float(), stats["bank"])
    if method == "featnorm":
        return -features.float().mean(dim=1)
    if method == "energynorm":
        activation = features.float().mean(dim=1).clamp(min=1e-6)     # (B,) > 0 (GELU dips just below 0)
        return -torch.logsumexp(logits, dim=1) - NORM_WEIGHT * activation.log()
    raise CifarkitError(f"unknown out-of-distribution score '{method}'; choose one of: {', '.join(METHODS)}")


def mahalanobis(f: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """min over classes k of (f - mu_k)^T P (f - mu_k): (B, D), (K, D), (D, D) -> (B,)."""
    d = f[:, None, :] - means[None]                                       # (B, K, D)
    return ((d @ precision) * d).sum(dim=2).amin(dim=1)                   # (B,)


def normalized(f: torch.Tensor) -> torch.Tensor:
    return f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)


def knn(f: torch.Tensor, bank: torch.Tensor, k: int = KNN_K) -> torch.Tensor:
    """Distance of each normalized feature to its k-th nearest row of the (normalized) bank: (B,)."""
    # |a - b| of unit vectors from their dot product: a matrix product (exports to ONNX, unlike cdist)
    dist = (2 - 2 * normalized(f) @ bank.T).clamp(min=0).sqrt()          # (B, N)
    return dist.topk(min(k, bank.shape[0]), dim=1, largest=False).values[:, -1]


# -- fitting ----------------------------------------------------------------------------------------


def fit_stats(method: str, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """The statistics a score reads, from held-out features (N, D) and labels (N,)."""
    if method == "mahalanobis":
        f = features.double()
        present = labels.unique()
        if len(present) < num_classes:
            raise CifarkitError(f"the held-out images hold {len(present)} of the {num_classes} classes: "
                                "the Mahalanobis score needs every class (hold out more images)")
        means = torch.stack([f[labels == c].mean(0) for c in range(num_classes)])      # (K, D)
        centred = f - means[labels]                                                     # (N, D)
        cov = centred.T @ centred / len(f) + RIDGE * torch.eye(f.shape[1], dtype=f.dtype)
        return {"means": means.float(), "precision": torch.linalg.inv(cov).float()}
    if method == "knn":
        return {"bank": normalized(features.float())}
    return {}


def fit(method: str, logits: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
        keep: float = KEEP) -> OODDetector:
    """A detector fitted on held-out in-distribution images: its statistics, and the threshold under
    which `keep` of those images score. The kNN bank is the held-out images themselves, so each is
    scored against the others (its own zero distance left out) for an honest threshold."""
    if not 0 < keep < 1:
        raise CifarkitError(f"the share of in-distribution images to keep must be in (0, 1), got {keep}")
    stats = fit_stats(method, features, labels, logits.shape[1])
    if method == "knn":
        held = knn(features.float(), stats["bank"], KNN_K + 1)  # the k-th neighbour other than itself
    else:
        held = score(method, logits, features, stats)
    threshold = float(np.quantile(held.numpy(), keep, method="higher"))
    return OODDetector(method, threshold, keep, stats)


# -- measuring -------------------------------------------------------------------------------------


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve of telling out- from in-distribution by the score: the chance that an
    out-of-distribution input scores above an in-distribution one (ties count half)."""
    a = np.sort(np.asarray(in_scores, dtype=np.float64))
    b = np.asarray(out_scores, dtype=np.float64)
    below, not_above = np.searchsorted(a, b, side="left"), np.searchsorted(a, b, side="right")
    return float((below + not_above).sum() / 2 / (len(a) * len(b)))


def fpr_at_tpr(in_scores, out_scores, tpr: float = 0.95) -> float:
    """Share of out-of-distribution inputs accepted at the threshold that keeps `tpr` of in-distribution."""
    threshold = np.quantile(np.asarray(in_scores, dtype=np.float64), tpr, method="higher")
    return float((np.asarray(out_scores) <= threshold).mean())
