"""How sure a test-set number is, and whether two runs really differ.

Intervals are percentile bootstrap intervals over the test images (Efron & Tibshirani, 1993):
resample the N test images with replacement, RESAMPLES times from a seeded generator, compute the
statistic on each resample, and take its 2.5th and 97.5th percentiles. Every statistic here depends
on an image only through a few outcomes (its true and predicted class; for two runs, its class and
which run gets it right), so a resample is drawn as its counts: N images drawn uniformly with
replacement fall into those cells as one multinomial draw with the cells' observed shares. That is
the same distribution as resampling image indices, without a (RESAMPLES, N) index matrix.

A proportion measured on fewer than MIN_IMAGES images gets no interval: its resamples take at most
n + 1 values, 7 of 7 right resamples to 100% every time, and the percentile interval's coverage
falls far below 95%. It prints `too_few(n)` instead of a number.

Two runs on the same test images are compared pairwise: McNemar's exact test on the images one run
gets right and the other wrong (a two-sided binomial test of those discordant pairs at 1/2), and a
paired bootstrap interval of the accuracy difference (both runs scored on the same resampled
images). Both measure the test set's sampling noise for two trained models, not the noise of
training again with another seed (`mean_sd` over seeds does that).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .calibration import ece

RESAMPLES = 2000      # bootstrap resamples: the 2.5/97.5 percentiles move by ~0.1 point between seeds
LEVEL = 0.95          # the intervals' nominal coverage
SEED = 0              # the resampling generator's seed: the same run gives the same interval
MIN_IMAGES = 20       # a proportion on fewer images gets no interval (see above)
ALPHA = 0.05          # beyond chance: McNemar's p below ALPHA and an interval that excludes 0
TOP_CONFUSIONS = 5    # (true, predicted) pairs the report and the card list


def too_few(n: int) -> str:
    return f"too few images (n={n}) for an interval"


@dataclass
class Interval:
    """A statistic on the test set and its bootstrap interval; low/high None: too few images."""
    value: float | None   # None: undefined (no image to measure it on)
    low: float | None
    high: float | None
    n: int                # the images it is a proportion of

    def text(self, fmt: str = ".1%") -> str:
        if self.value is None:
            return "n/a (no images)"
        if self.low is None:
            return f"{self.value:{fmt}} ({too_few(self.n)})"
        return f"{self.value:{fmt}} ({LEVEL:.0%} CI {self.low:{fmt}} to {self.high:{fmt}})"

    def points(self) -> str:
        """A difference of fractions in points, signed: '+0.8 points (95% CI -0.3 to +1.9)'."""
        if self.value is None:
            return "n/a (no images)"
        how = too_few(self.n) if self.low is None else \
            f"{LEVEL:.0%} CI {self.low * 100:+.1f} to {self.high * 100:+.1f}"
        return f"{self.value * 100:+.1f} points ({how})"

    def excludes_zero(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return {"value": self.value, "low": self.low, "high": self.high, "images": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> "Interval":
        return cls(d.get("value"), d.get("low"), d.get("high"), int(d.get("images", 0)))


def _finite(x) -> float | None:
    return float(x) if np.isfinite(x) else None


def _intervals(values: np.ndarray, draws: np.ndarray, n: np.ndarray) -> list[Interval]:
    """Intervals of K statistics: values (K,), their bootstrap draws (B, K), the images each is on (K,)."""
    with warnings.catch_warnings():  # a statistic undefined in every resample: NaN on purpose
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanpercentile(draws, [50 * (1 - LEVEL), 50 * (1 + LEVEL)], axis=0)   # (K,), (K,)
    return [Interval(_finite(v), *((None, None) if m < MIN_IMAGES else (_finite(a), _finite(b))), int(m))
            for v, a, b, m in zip(values, lo, hi, n)]


def _resample(counts: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """Bootstrap resamples of N images, as counts per cell: (resamples, *counts.shape)."""
    n = int(counts.sum())
    rng = np.random.default_rng(seed)
    flat = counts.ravel() / max(n, 1)
    return rng.multinomial(n, flat, size=resamples).reshape(resamples, *counts.shape)


# -- one run: per-class precision, recall, F1, calibration, and what it confuses ----------------------

@dataclass
class ClassStats:
    name: str
    images: int            # test images of the class
    precision: Interval    # of the images predicted as the class, the share that are
    recall: Interval       # of the images of the class, the share predicted as it (per-class accuracy)
    f1: Interval
    ece: float | None      # calibration error within the class (15 bins), of the probabilities given

    def to_dict(self) -> dict:
        return {"images": self.images, "precision": self.precision.to_dict(), "recall": self.recall.to_dict(),
                "f1": self.f1.to_dict(), "ece": self.ece}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "ClassStats":
        return cls(name, int(d["images"]), *(Interval.from_dict(d[k]) for k in ("precision", "recall", "f1")),
                   d.get("ece"))


def confusion(labels, preds, k: int) -> np.ndarray:
    """Counts (K, K): row = true class, column = predicted class."""
    y, p = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def _prf(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class of confusion counts (..., K, K); NaN where undefined."""
    tp = np.diagonal(conf, axis1=-2, axis2=-1).astype(np.float64)                  # (..., K)
    actual, predicted = conf.sum(-1), conf.sum(-2)                                 # (..., K)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / predicted, tp / actual, 2 * tp / (actual + predicted)


def per_class(labels, preds, classes: list[str], probs=None, resamples: int = RESAMPLES,
              seed: int = SEED) -> list[ClassStats]:
    """Precision, recall and F1 of each class with bootstrap intervals over the test images, and
    (given probabilities) the ECE of each class's images. Precision's interval counts the images
    predicted as the class, recall's those of the class, F1's the fewer of the two."""
    k = len(classes)
    conf = confusion(labels, preds, k)                                             # (K, K)
    draws = [d.reshape(resamples, k) for d in _prf(_resample(conf, resamples, seed))]  # 3 x (B, K)
    actual, predicted = conf.sum(1), conf.sum(0)                                   # (K,), (K,)
    precision, recall, f1 = (_intervals(v, d, n) for v, d, n in
                             zip(_prf(conf), draws, (predicted, actual, np.minimum(actual, predicted))))
    y = np.asarray(labels)
    eces = [None if probs is None or not (y == c).any() else ece(np.asarray(probs)[y == c], y[y == c])
            for c in range(k)]
    return [ClassStats(classes[c], int(actual[c]), precision[c], recall[c], f1[c], eces[c]) for c in range(k)]


def top_confusions(labels, preds, classes: list[str], n: int = TOP_CONFUSIONS) -> list[tuple[str, str, int]]:
    """The n most frequent mistakes as (true class, predicted class, images), most first."""
    k = len(classes)
    conf = confusion(labels, preds, k)
    np.fill_diagonal(conf, 0)
    order = np.argsort(-conf.ravel(), kind="stable")[:n]                          # ties: lower class first
    return [(classes[i // k], classes[i % k], int(conf.flat[i])) for i in order if conf.flat[i] > 0]


def summary(labels, preds, classes: list[str], probs=None) -> dict:
    """What results.json keeps: the per-class statistics, how they were made, the top confusions."""
    stats = per_class(labels, preds, classes, probs)
    return {"per_class": {"level": LEVEL, "resamples": RESAMPLES, "seed": SEED, "min_images": MIN_IMAGES,
                          "classes": {s.name: s.to_dict() for s in stats}},
            "confusions": [{"true": t, "predicted": p, "images": c}
                           for t, p, c in top_confusions(labels, preds, classes)]}


def record(results, labels, probs, classes: list[str]) -> None:
    """Set results.json's `per_class` and `confusions` (a rundir.Results) from a run's test labels
    (N,) and its calibrated test probabilities (N, K)."""
    probs = np.asarray(probs)
    s = summary(labels, probs.argmax(1), classes, probs)
    results.per_class, results.confusions = s["per_class"], s["confusions"]


def from_summary(per_class_dict: dict) -> list[ClassStats]:
    """ClassStats back from results.json's `per_class`."""
    return [ClassStats.from_dict(name, d) for name, d in per_class_dict["classes"].items()]


# -- two runs on the same test images ------------------------------------------------------------------

@dataclass
class McNemar:
    only_a: int     # images run A gets right and run B wrong
    only_b: int     # images run B gets right and run A wrong
    p: float        # exact two-sided p-value; 1 when the runs never disagree


def mcnemar(right_a, right_b) -> McNemar:
    """McNemar's exact test of two runs' paired right/wrong answers (boolean (N,) each)."""
    from scipy.stats import binomtest
    a, b = np.asarray(right_a, bool), np.asarray(right_b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return McNemar(only_a, only_b, min(p, 1.0))


@dataclass
class Difference:
    """Run B's accuracy minus run A's on the same images (fractions), paired."""
    acc_a: float | None
    acc_b: float | None
    diff: Interval
    test: McNemar

    @property
    def beyond_chance(self) -> bool:
        return self.test.p < ALPHA and self.diff.excludes_zero()


def paired_differences(labels, preds_a, preds_b, k: int, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[Difference, list[Difference]]:
    """B minus A over all test images, and within each of the k classes: the difference of
    accuracies with a paired bootstrap interval (the same resampled images score both runs) and
    McNemar's exact test."""
    y = np.asarray(labels, np.int64)
    ra, rb = np.asarray(preds_a) == y, np.asarray(preds_b) == y                    # (N,), (N,)
    cells = np.bincount(y * 4 + 2 * ra + rb, minlength=4 * k).reshape(k, 4)        # (K, 4): wrong/right of A, B
    draws = _resample(cells, resamples, seed)                                      # (B, K, 4)

    def diff(c):  # (..., 4) counts -> (B right, A wrong) - (A right, B wrong), and the images
        return (c[..., 1] - c[..., 2]).astype(np.float64), c.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        (d_all, n_all), (d_k, n_k) = diff(cells.sum(0)), diff(cells)
        (b_all, bn_all), (b_k, bn_k) = diff(draws.sum(1)), diff(draws)
        total = _intervals(np.array([d_all / n_all]), (b_all / bn_all)[:, None], np.array([n_all]))[0]
        each = _intervals(d_k / n_k, b_k / bn_k, n_k)

    def acc(right, mask):
        return float(right[mask].mean()) if mask.any() else None
    every = np.ones(len(y), bool)
    overall = Difference(acc(ra, every), acc(rb, every), total, mcnemar(ra, rb))
    return overall, [Difference(acc(ra, y == c), acc(rb, y == c), each[c], mcnemar(ra[y == c], rb[y == c]))
                     for c in range(k)]


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def verdict(name_a: str, name_b: str, d: Difference) -> str:
    """One sentence: which run is how many points above the other, how sure, and whether that is
    beyond chance ("B is 0.8 points above A (95% CI 0.3 to 1.3, McNemar p = 0.002): beyond chance")."""
    iv = d.diff
    if iv.value is None:
        return f"{name_a} and {name_b}: no test images to compare"
    up, down, sign = (name_b, name_a, 1) if iv.value >= 0 else (name_a, name_b, -1)
    if iv.low is None:
        how = too_few(iv.n)
    else:
        lo, hi = sorted((sign * iv.low * 100, sign * iv.high * 100))
        how = f"{LEVEL:.0%} CI {lo:.1f} to {hi:.1f}"
    what = (f"{name_a} and {name_b} are level" if iv.value == 0 else
            f"{up} is {abs(iv.value) * 100:.1f} points above {down}")
    return f"{what} ({how}, McNemar {p_text(d.test.p)}): {'beyond' if d.beyond_chance else 'within'} chance"


def mean_sd(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of 2+ values, e.g. one recipe's accuracies over seeds."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1))
