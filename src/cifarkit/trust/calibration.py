"""How far to trust a model's confidence: expected calibration error, NLL and temperature scaling.

Arrays are numpy: logits or probabilities (N, K) and integer labels (N,). A torch tensor is accepted
at the door (detached, moved to the CPU); everything returned is numpy or a Python float.
Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted on held-out data:
the predicted class never changes, only how sure the model says it is. `calibrate_run` fits T for a
run directory and stores it in the weights' metadata, where every prediction path reads it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from ..errors import CifarkitError

BINS = 15                   # equal-width confidence bins, as in Guo et al.
MIN_FIT_SAMPLES = 100       # fewer held-out samples fit noise, not a temperature
T_RANGE = (0.05, 20.0)      # search interval for T; real nets land in 0.5-5
TRAIN_SLICE = 5000          # training images a run without a validation split is calibrated on
COVERAGES = (0.8, 0.9, 0.95)  # the prediction sets' coverages measured on the test set


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _is_probs(x: np.ndarray) -> bool:
    """Rows non-negative and summing to 1: probabilities; anything else is taken as logits."""
    return bool(np.all(x >= 0) and np.allclose(x.sum(1), 1.0, atol=1e-3))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)                                  # (N, K), stable
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def softmax(logits) -> np.ndarray:
    return np.exp(_log_softmax(_np(logits).astype(np.float64)))      # (N, K)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Calibrated probabilities softmax(logits / T) (N, K); the argmax is unchanged for any T > 0."""
    return softmax(_np(logits).astype(np.float64) / float(temperature))


# -- metrics --------------------------------------------------------------------------------------

@dataclass
class Reliability:
    """Per-bin data of a reliability diagram; empty bins hold NaN confidence and accuracy."""
    edges: np.ndarray        # (bins + 1,) from 0 to 1
    confidence: np.ndarray   # (bins,) mean top-class probability in the bin
    accuracy: np.ndarray     # (bins,) fraction of the bin's samples predicted right
    count: np.ndarray        # (bins,) int, sums to N

    @property
    def ece(self) -> float:
        used = self.count > 0
        gaps = np.abs(self.accuracy[used] - self.confidence[used])
        return float((self.count[used] * gaps).sum() / max(self.count.sum(), 1))


def reliability(probs, labels, bins: int = BINS) -> Reliability:
    """Bin samples by their top-class probability into `bins` equal-width bins (lo, hi]."""
    p, y = _np(probs), _np(labels).astype(np.int64)
    conf, right = p.max(1), (p.argmax(1) == y)                        # (N,), (N,)
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins become NaN on purpose
        mean_conf = np.bincount(which, weights=conf, minlength=bins) / count
        acc = np.bincount(which, weights=right, minlength=bins) / count
    return Reliability(np.linspace(0, 1, bins + 1), mean_conf, acc, count)


def ece(probs, labels, bins: int = BINS) -> float:
    """Expected calibration error: the count-weighted mean |accuracy - confidence| over the bins."""
    return reliability(probs, labels, bins).ece


def nll(scores, labels) -> float:
    """Mean negative log-likelihood of the labels; `scores` are probabilities (rows sum to 1) or logits."""
    s, y = _np(scores).astype(np.float64), _np(labels).astype(np.int64)
    logp = np.log(np.clip(s, 1e-12, 1.0)) if _is_probs(s) else _log_softmax(s)   # (N, K)
    return float(-logp[np.arange(len(y)), y].mean())


# -- temperature scaling --------------------------------------------------------------------------

def _enough(n: int) -> None:
    if n < MIN_FIT_SAMPLES:
        raise CifarkitError(f"fitting a temperature needs at least {MIN_FIT_SAMPLES} held-out samples, "
                            f"got {n}; use a larger --val-size")


def fit_temperature(logits, labels) -> float:
    """The T > 0 minimizing NLL of softmax(logits / T) on held-out data; deterministic.

    NLL is convex in 1/T, hence unimodal in log T: a golden-section search on log T over T_RANGE
    finds the optimum to ~1e-9 without a gradient, an optimizer or a random start. Give logits;
    from probabilities only, np.log(probs) are valid logits (softmax ignores a per-row shift)."""
    z, y = _np(logits).astype(np.float64), _np(labels).astype(np.int64)
    if z.ndim != 2 or len(z) != len(y):
        raise CifarkitError(f"logits {z.shape} and labels {y.shape} do not match: give (N, K) and (N,)")
    _enough(len(z))
    if not np.all(np.isfinite(z)):
        raise CifarkitError("logits contain NaN or infinity: the model diverged; retrain before calibrating")
    loss = lambda log_t: nll(z / np.exp(log_t), y)  # noqa: E731
    lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(60):  # the interval shrinks by 0.618 each step: 6 * 0.618**60 ~ 1e-12
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = loss(b)
    return float(np.exp((lo + hi) / 2))


@dataclass
class CalibrationReport:
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    temperature: float
    n: int              # samples the metrics were measured on
    fitted_on: str      # e.g. "validation split (5,000 images)"; never the test set
    ood: dict | None = None       # the out-of-distribution score fitted beside T: method, threshold, kept
    coverage: dict | None = None  # nominal coverage -> [test coverage, mean set size] of the prediction sets


def calibrate(fit_logits, fit_labels, logits, labels, fitted_on: str, bins: int = BINS) -> CalibrationReport:
    """Fit T on (fit_logits, fit_labels), then measure ECE and NLL before and after on (logits, labels)."""
    t = fit_temperature(fit_logits, fit_labels)
    z = _np(logits).astype(np.float64)                                # (N, K)
    return CalibrationReport(ece(softmax(z), labels, bins), ece(apply_temperature(z, t), labels, bins),
                             nll(z, labels), nll(z / t, labels), t, len(z), fitted_on)


# -- a run directory ------------------------------------------------------------------------------

def held_out(run, arrays) -> tuple[np.ndarray, str]:
    """(training-set indices, description) of the images a run is calibrated on, rebuilt as training
    made them: its calibration split (--calib-size), else its validation split; with neither, a
    seeded slice of the training set."""
    from ..data.datamodule import split_calibration, split_train_val
    cfg = run.read_config()
    train, val = split_train_val(arrays.train_y, cfg.val_size, cfg.seed)
    _, calib = split_calibration(train, arrays.train_y, cfg.calib_size, cfg.seed)
    if len(calib):
        return calib, f"calibration split ({len(calib):,} images held out from training)"
    if len(val):
        return val, f"validation split ({len(val):,} images)"
    val = np.sort(np.random.default_rng(cfg.seed).permutation(len(arrays.train_y))[:TRAIN_SLICE])
    return val, (f"{len(val):,} training-set images, a seeded slice (the run has no validation split, "
                 "--val-size 0; it trained on most or all of them, so T may under-correct)")


def calibrate_run(run_dir, fit_logits=None, test_logits=None, ood_method: str | None = None,
                  keep: float | None = None) -> CalibrationReport:
    """Fit on a run's held-out images (never the test set) what makes its outputs trustworthy, and
    store it with the weights: the temperature T (in the metadata), the out-of-distribution score's
    statistics and threshold (trust/ood.py), and the conformity scores of its prediction sets
    (trust/conformal.py). ECE/NLL before and after T, the sets' test coverage, and the per-class
    statistics after T (trust/stats.py) go into results.json. Idempotent: fits on raw logits.

    fit_logits, test_logits: the run's plain logits of its held-out and test images, when training
    has just computed them (then no forward pass is made again for T); else computed here, in bf16
    where the hardware runs it (the temperature and ECE do not need fp32's last digits)."""
    import torch

    from ..rundir import Results, RunDir
    from ..data.sources import load_arrays
    from ..weights import load, update_metadata
    from . import conformal, ood
    from .stats import record as record_per_class
    run = RunDir.open(run_dir, need=("config", "weights"))
    arrays = load_arrays(*run.data_source())
    fit_idx, fitted_on = held_out(run, arrays)
    _enough(len(fit_idx))  # before any forward pass
    model = load(run.path, expect=(run.read_config().model, len(arrays.classes)))
    method = ood_method or model.meta.get("ood_method", ood.DEFAULT)
    keep = keep or float(model.meta.get("ood_keep", ood.KEEP))
    model.net.to("cuda" if torch.cuda.is_available() else "cpu")
    features, held_logits = model.features_and_logits(arrays.train_x[fit_idx])  # fp32, as predictions are
    if fit_logits is None or len(fit_logits) != len(fit_idx):  # T from bf16 logits, as training's own
        fit_logits = model.logits(arrays.train_x[fit_idx], autocast=True)
    if test_logits is None or len(test_logits) != len(arrays.test_y):
        test_logits = model.logits(arrays.test_x, autocast=True)
    fit_labels = torch.as_tensor(arrays.train_y[fit_idx]).long()
    report = calibrate(fit_logits, fit_labels.numpy(), test_logits, arrays.test_y, fitted_on)
    detector = ood.fit(method, held_logits, features, fit_labels, keep)
    scores = conformal.fit(to_probs(fit_logits, report.temperature), fit_labels)
    report.ood = {"method": method, "threshold": detector.threshold, "keep": keep}
    test_probs, test_labels = to_probs(test_logits, report.temperature), torch.as_tensor(arrays.test_y).long()
    report.coverage = {c: [round(v, 4) for v in conformal.coverage_and_size(
        conformal.prediction_sets(test_probs, scores, c), test_labels)] for c in COVERAGES}
    stats, ood_meta = detector.to_weights()
    update_metadata(run.weights_file, stats={**stats, conformal.SCORES: scores},
                    temperature=repr(report.temperature), calibration_fitted_on=fitted_on, **ood_meta)
    res = run.read_results() or Results()
    res.temperature, res.calibration_fitted_on = report.temperature, fitted_on
    res.ece_before, res.ece_after, res.nll_before, res.nll_after = (
        report.ece_before, report.ece_after, report.nll_before, report.nll_after)
    res.ood, res.coverage = report.ood, {str(k): v for k, v in report.coverage.items()}
    record_per_class(res, arrays.test_y, test_probs.numpy(), list(arrays.classes))  # per-class ECE after this T
    run.write_results(res)
    return report


def to_probs(logits, temperature: float):
    """Calibrated probabilities as a torch tensor (N, K)."""
    import torch
    return torch.softmax(torch.as_tensor(_np(logits), dtype=torch.float64) / temperature, dim=1).float()


def describe(report: CalibrationReport) -> str:
    text = (f"temperature {report.temperature:.3f} fitted on the {report.fitted_on}; test ECE "
            f"{report.ece_before:.2%} -> {report.ece_after:.2%}, NLL {report.nll_before:.3f} -> {report.nll_after:.3f}")
    if report.ood:
        text += (f"; out-of-distribution score {report.ood['method']}, its threshold keeping "
                 f"{report.ood['keep']:.0%} of the held-out images")
    if report.coverage:
        cov, size = report.coverage[0.9]
        text += f"; 90% prediction sets cover {cov:.1%} of the test set, {size:.2f} classes on average"
    return text


def calibrate_after_training(run_dir, fit_logits=None, test_logits=None) -> CalibrationReport | None:
    """What `fit` calls last: calibrate, or say in one line why not (the run itself is complete)."""
    from ..console import log
    try:
        report = calibrate_run(run_dir, fit_logits, test_logits)
    except CifarkitError as exc:
        log.warning(f"notice: probabilities not calibrated: {exc}")
        return None
    log.info(f"calibration: {describe(report)}")
    return report


# -- figure ---------------------------------------------------------------------------------------

def _diagram(ax, hx, probs, labels, title: str, bins: int) -> None:
    r = reliability(probs, labels, bins)
    centers, width = (r.edges[:-1] + r.edges[1:]) / 2, 1 / bins
    used = r.count > 0
    ax.bar(centers[used], r.accuracy[used], width=width, edgecolor="k", lw=0.5, color="C0", label="accuracy")
    ax.bar(centers[used], r.confidence[used] - r.accuracy[used], bottom=r.accuracy[used], width=width,
           color="C3", alpha=0.35, edgecolor="C3", lw=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title}: ECE {r.ece:.2%}")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    hx.bar(centers, r.count / max(r.count.sum(), 1), width=width, color="C7", edgecolor="k", lw=0.5)
    hx.set(xlim=(0, 1), xlabel="confidence (top-class probability)", ylabel="share of images")
    hx.grid(alpha=0.3)


def reliability_figure(before_probs, after_probs, labels, bins: int = BINS) -> Figure:
    """Reliability diagrams before and after temperature scaling, each over its confidence histogram.

    after_probs may be None (no temperature fitted): then one column."""
    panels = [("Before temperature scaling", before_probs)]
    if after_probs is not None:
        panels.append(("After temperature scaling", after_probs))
    fig = Figure(figsize=(5.5 * len(panels), 6.5))
    axes = fig.subplots(2, len(panels), squeeze=False, sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    for j, (title, probs) in enumerate(panels):
        _diagram(axes[0, j], axes[1, j], probs, labels, title, bins)
    fig.tight_layout()
    return fig
