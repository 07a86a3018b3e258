"""The LR range test: an exponential sweep of the learning rate, raw losses, a debiased moving
average, and a suggestion that is never at or past the minimum.

The sweep is driven here, with public Lightning hooks only (a Callback sets the rate before each
step and records the raw loss after it), rather than by `Tuner.lr_find`: Lightning's finder swaps
in its own callback list (ours would never run), keeps only its smoothed losses, and its moving
average divides by `1 - beta ** (global_step + 1)` when `global_step` is already 1 at the first
loss, so the curve starts at 0.505x the first loss and rises (lightning issue #14167).

The rule (README, "LR range test"): smooth the raw losses with an exponential moving average
debiased as Adam does (its first point is the first raw loss); find the minimum of the smoothed
loss; suggest the rate where, before that minimum and below the starting loss, the smoothed loss
falls fastest in relative terms (steepest slope of log loss against log learning rate). Relative,
so the point does not depend on how many steps the sweep spent getting there: on a quadratic bowl
it is the rate 1/curvature, half the rate at which the loss diverges.
"""
from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

from ..errors import CifarkitError
from ..presets import default
from ..rundir import RunDir, atomic_write

if TYPE_CHECKING:  # Lightning is imported by find_lr only: reading and drawing a record needs none
    import lightning as L

MIN_STEPS = 10           # a shorter sweep cannot separate a trend from batch noise
LAG_DECADES = 0.1        # the moving average lags the raw loss by this much of a decade of lr
SLOPE_DECADES = 0.1      # the slope is measured over +- this much of a decade of lr
DIVERGE_OVER_BEST = 4.0  # stop: smoothed loss > 4x its best so far (Lightning's and fastai's 4x) ...
DIVERGE_OVER_START = 1.5  # ... or > 1.5x where it started (cross-entropy: far worse than chance)
MIN_DROP_SIGMAS = 4.0    # the fall to the minimum must exceed 4 step-to-step noise levels
SWEEP = default("lr_find")  # min_lr, max_lr, num_training: TrainConfig declares the sweep's defaults

MUON_REFUSAL = ("the LR range test sweeps one rate, but Muon steps the conv filters at their own "
                "rate (--muon-lr): pass --muon-lr 0 to sweep and train with plain SGD, or give --lr a number")


class LRFindRefused(CifarkitError):
    """The sweep ran but its curve cannot be read; `curve` holds what it recorded (no suggestion),
    for a caller that wants to draw it. Its message is the one line to show."""

    def __init__(self, message: str, curve: dict):
        super().__init__(message)
        self.curve = curve


@dataclass
class LRFind:
    """The result of a range test: the suggested rate, why, and the whole curve (what the JSON holds)."""
    suggestion: float
    reason: str
    curve: dict = field(repr=False)

    @property
    def diverged_at(self) -> float | None:
        return self.curve["diverged_at"]

    def summary(self) -> str:
        """One line for a terminal: the sweep, where it stopped, the minimum and the suggestion."""
        c = self.curve
        stop = (f"the loss diverged at lr {c['diverged_at']:.3g}, stopped after {len(c['lr'])} of "
                f"{c['num_training']} steps" if c["diverged_at"] else f"{len(c['lr'])} steps")
        return (f"LR range test from {c['min_lr']:.3g} to {c['max_lr']:.3g}: {stop}; smoothed loss "
                f"{c['start_loss']:.3g} at the start, minimum {c['min_loss']:.3g} at lr "
                f"{c['min_loss_lr']:.3g}; suggestion {self.suggestion:.3g}")


def check_sweepable(muon_lr: float) -> None:
    """Refuse a range test for a recipe with Muon: it would sweep one group and train two."""
    if muon_lr:
        raise CifarkitError(MUON_REFUSAL)


# ---------------------------------------------------------------------------------------------
# The curve: pure functions of the raw losses


def default_beta(num_training: int, min_lr: float, max_lr: float) -> float:
    """The EMA factor whose lag is LAG_DECADES of lr at this sweep's steps per decade, in [0.5, 0.98].

    A fixed beta = 0.98 (Lightning, fastai) lags ~49 steps: 1.5 decades on a 200-step sweep over 6.
    """
    lag = LAG_DECADES * (num_training - 1) / math.log10(max_lr / min_lr)  # steps
    return min(max(lag / (1 + lag), 0.5), 0.98)


def smooth(raw: list[float], beta: float) -> list[float]:
    """Exponential moving average debiased by 1 - beta^(k+1) at the k-th loss (k from 0): a
    weighted mean of the losses so far, so the first point is the first loss."""
    out, avg = [], 0.0
    for k, v in enumerate(raw):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (k + 1)))
    return out


def diverged(smoothed: list[float]) -> bool:
    """The newest smoothed loss is not finite, or far above its best or its start."""
    s = smoothed[-1]
    if not math.isfinite(s):
        return True
    if len(smoothed) < 3:
        return False
    return s > DIVERGE_OVER_BEST * min(smoothed) or s > DIVERGE_OVER_START * smoothed[0]


def _fall_over_noise(f, start: float, low: float, raw: np.ndarray) -> float:
    """The fall from the starting level to the minimum over the step-to-step noise of the raw losses
    up to it, on the scale f. Noise: RMS of second differences / sqrt(6) (a smooth trend drops out;
    white noise of std sigma gives sigma)."""
    d2 = np.diff(f(raw), 2)
    noise = float(np.sqrt(np.mean(d2 ** 2) / 6)) if len(d2) else math.inf
    fall = float(f(start) - f(low))
    return fall / noise if noise > 0 else math.inf


def suggest(lr: list[float], raw: list[float], beta: float) -> tuple[float, str, dict]:
    """(suggested lr, the reason in one sentence, facts of the curve); CifarkitError when unreadable."""
    lr_a, raw_a = np.asarray(lr, float), np.asarray(raw, float)
    s = np.asarray(smooth(raw, beta))
    n = len(s) if np.isfinite(s).all() else int(np.argmin(np.isfinite(s)))  # before the first inf/nan
    m = int(np.argmin(s[:n])) if n else 0
    facts = dict(start_loss=float(s[0]) if n else math.nan, min_loss=float(s[m]) if n else math.nan,
                 min_loss_lr=float(lr_a[m]) if n else math.nan)
    head = max(3, math.ceil(1 / (1 - beta)))  # raw losses that make up the starting level
    if m < head + 3:
        raise CifarkitError(f"the LR range test's loss did not fall before it rose (smoothed minimum at "
                            f"lr {lr_a[m]:.3g}, step {m + 1}): start the sweep lower (lr_find min_lr) "
                            "or give --lr a number")
    linear = lambda v: np.asarray(v, float)  # noqa: E731
    positive = bool((raw_a[:m + 1] > 0).all())
    f = np.log if positive else linear  # a relative change needs a positive loss
    # the fall against the noise on a log scale (noise in proportion to the loss, as on a bowl) and
    # on a linear one (a loss near 0 makes log noise explode): the larger counts
    z = max(_fall_over_noise(g, raw_a[:head].mean(), s[m], raw_a[:m + 1])
            for g in ((np.log, linear) if positive else (linear,)))
    if not z > MIN_DROP_SIGMAS:
        raise CifarkitError(f"the LR range test is too short or too noisy to read (its fall to the "
                            f"minimum is {z:.2g}x the step-to-step noise, {MIN_DROP_SIGMAS:g}x is needed): "
                            "sweep longer (lr_find num_training, cifarkit lr-find --num-training) or with "
                            "a larger batch, or give --lr a number")
    ll, fs = np.log10(lr_a[:n]), f(s[:n])
    h = max(1, round(SLOPE_DECADES * _steps_per_decade(lr_a)))
    slopes = {}
    for k in range(1, m):  # strictly before the minimum ...
        if s[k] < s[0]:    # ... and below the start
            a, b = max(0, k - h), min(n - 1, k + h)
            slopes[k] = (fs[b] - fs[a]) / (ll[b] - ll[a])
    k = min(slopes, key=slopes.get) if slopes else None
    if k is None or slopes[k] >= 0:
        raise CifarkitError("the LR range test's smoothed loss never fell below its start before its "
                            "minimum: sweep longer or from a lower rate, or give --lr a number")
    per_decade = (1 - math.exp(slopes[k])) if positive else -slopes[k]
    how = f"{per_decade:.0%} of its level" if positive else f"{per_decade:.3g}"
    reason = (f"steepest descent of the smoothed loss before its minimum ({s[m]:.3g} at lr {lr_a[m]:.3g}) "
              f"and below its start ({s[0]:.3g}): there it falls fastest, by {how} per decade of lr")
    return float(lr_a[k]), reason, dict(facts, suggestion_loss=float(s[k]))


def _steps_per_decade(lr: np.ndarray) -> float:
    span = math.log10(lr[-1] / lr[0]) if len(lr) > 1 and lr[-1] > lr[0] else 0.0
    return (len(lr) - 1) / span if span else 1.0


# ---------------------------------------------------------------------------------------------
# The sweep on a Lightning Trainer


class _Sweep:
    """The hooks of the sweep's Callback: set every parameter group's rate before each step (keeping
    the groups' ratios to the first), record the raw loss after it, stop the fit once the smoothed
    loss has diverged."""

    def __init__(self, lrs: list[float], beta: float):
        self.lrs, self.beta = lrs, beta
        self.lr, self.raw, self.smooth = [], [], []
        self.diverged_at: float | None = None
        self._avg = 0.0

    def on_train_start(self, trainer, pl_module):
        if len(trainer.optimizers) != 1:
            raise CifarkitError(f"the LR range test needs one optimizer; configure_optimizers returned "
                                f"{len(trainer.optimizers)}: give --lr a number")
        trainer.strategy.lr_scheduler_configs = []  # the sweep sets the rate; no schedule steps
        opt = trainer.optimizers[0]
        groups = opt.param_groups
        for g in groups:  # a cycling schedule (OneCycleLR, CyclicLR) already set its max momentum:
            if "max_momentum" in g and "momentum" in opt.defaults:  # sweep with the built one instead
                g["momentum"] = opt.defaults["momentum"]
        first = groups[0]["lr"]
        self.ratios = [g["lr"] / first if first else 1.0 for g in groups]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._now = self.lrs[min(len(self.raw), len(self.lrs) - 1)]  # a skipped step does not count
        for g, r in zip(trainer.optimizers[0].param_groups, self.ratios):
            g["lr"] = self._now * r

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:  # a skipped step
            return
        self.lr.append(self._now)
        self.raw.append(float(loss))  # one host sync per step: the sweep needs it to stop
        self._avg = self.beta * self._avg + (1 - self.beta) * self.raw[-1]  # as smooth() does
        self.smooth.append(self._avg / (1 - self.beta ** len(self.raw)))
        if diverged(self.smooth):
            self.diverged_at = self._now
            trainer.should_stop = True


def _sweep_callback(lrs: list[float], beta: float) -> _Sweep:
    import lightning as L

    class LRSweep(_Sweep, L.Callback):
        pass

    return LRSweep(lrs, beta)


def check_settings(min_lr: float = SWEEP["min_lr"], max_lr: float = SWEEP["max_lr"],
                   num_training: int = SWEEP["num_training"], muon_lr: float = default("muon_lr")) -> None:
    """Refuse, before any data is decoded, a sweep too short to read, an empty range, or Muon."""
    if num_training < MIN_STEPS:
        raise CifarkitError(f"a {num_training}-step LR range test is too short to read (at least "
                            f"{MIN_STEPS} steps; the presets use {SWEEP['num_training']}): raise lr_find num_training "
                            "(cifarkit lr-find --num-training), or give --lr a number")
    if not 0 < min_lr < max_lr:
        raise CifarkitError(f"the LR range test needs 0 < min_lr < max_lr, got {min_lr} and {max_lr}")
    check_sweepable(muon_lr)


@contextmanager
def _restored(module):
    saved = copy.deepcopy(module.state_dict())
    try:
        yield module
    finally:
        module.load_state_dict(saved)


def find_lr(module: L.LightningModule, datamodule: L.LightningDataModule | None, trainer_kwargs: dict,
            min_lr: float = SWEEP["min_lr"], max_lr: float = SWEEP["max_lr"],
            num_training: int = SWEEP["num_training"], beta: float | None = None) -> LRFind:
    """Sweep the rate exponentially from min_lr to max_lr over num_training steps on a throwaway
    trainer, one device, and suggest a peak rate (see the module docstring for the rule).

    Works for any LightningModule with automatic optimization and one optimizer: the swept rate is
    the first parameter group's (the others keep their ratio to it, as configure_optimizers set
    them), so the suggestion is the value of the attribute that sets that group's rate. The
    module's schedulers do not step during the sweep, and a momentum a cycling schedule set at its
    start (OneCycleLR: 0.95) goes back to the one the optimizer was built with (the seed's 0.9).
    Its weights, buffers and metric states come back as they were. Raises CifarkitError (one
    line) for a sweep too short (before it runs) and a module with Muon (MUON_REFUSAL);
    LRFindRefused (a CifarkitError carrying the recorded curve) for a curve too flat or too noisy
    to read, or a loss that never falls before it diverges.
    """
    import lightning as L
    # cifarkit's LitClassifier reads its settings from its TrainConfig (`cfg`); others from hparams
    hp = getattr(module, "cfg", None) or SimpleNamespace(**dict(getattr(module, "hparams", {})))
    check_settings(min_lr, max_lr, num_training, getattr(hp, "muon_lr", 0.0))
    beta = default_beta(num_training, min_lr, max_lr) if beta is None else beta
    lrs = [min_lr * (max_lr / min_lr) ** (k / (num_training - 1)) for k in range(num_training)]
    sweep = _sweep_callback(lrs, beta)
    devices = trainer_kwargs.get("devices", "auto")
    one = [devices[0]] if isinstance(devices, (list, tuple)) else 1
    from ..console import lightning_bar
    bar = lightning_bar()
    trainer = L.Trainer(**{**trainer_kwargs, "logger": False, "enable_checkpointing": False,
                           "max_epochs": -1, "max_steps": num_training, "callbacks": [sweep] + ([bar] if bar else []),
                           "enable_progress_bar": bar is not None,
                           "devices": one, "num_nodes": 1, "strategy": "auto",
                           "limit_val_batches": 0, "num_sanity_val_steps": 0,
                           "accumulate_grad_batches": 1, "enable_model_summary": False})
    # cifarkit's module puts itself back (lookahead off: the average would blend the sweep's steps
    # into the net); any other module gets its weights, buffers and metric states back
    with (module.scratch(lookahead=False) if hasattr(module, "scratch") else _restored(module)):
        trainer.fit(module, datamodule=datamodule)
    if not sweep.raw:
        raise CifarkitError("the LR range test recorded no loss (an empty training set?): give --lr a number")
    curve = dict(lr=sweep.lr, raw_loss=sweep.raw, smooth_loss=smooth(sweep.raw, beta),
                 diverged_at=sweep.diverged_at, beta=beta, min_lr=min_lr, max_lr=max_lr,
                 num_training=num_training)
    try:
        suggestion, reason, facts = suggest(sweep.lr, sweep.raw, beta)
    except CifarkitError as exc:
        raise LRFindRefused(str(exc), curve) from None
    return LRFind(suggestion, reason, dict(curve, suggestion=suggestion, reason=reason, **facts))


# ---------------------------------------------------------------------------------------------
# Saving, reading and drawing


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no inf/nan; a diverged sweep's last losses can be either
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def save_lr_find(run_dir: Path, result: LRFind | dict) -> None:
    """RUN/lr_find.json (the curve, the suggestion and its reason) and RUN/lr_find.png. Only for a
    curve with a suggestion: a resumed run takes its peak rate from that file."""
    curve = result.curve if isinstance(result, LRFind) else result
    run = RunDir(run_dir)
    atomic_write(run.lr_find_json, json.dumps({k: _jsonable(v) for k, v in curve.items()}))
    plot_lr_find(curve).savefig(run.lr_find_png, dpi=120, bbox_inches="tight")


def load_lr_find(path: Path) -> dict:
    """The curve dict from lr_find.json; a file from an older cifarkit (lr, loss, suggestion: the
    loss was Lightning's smoothed one) reads with no raw losses."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
        suggestion = float(d["suggestion"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CifarkitError(f"{path} is not an LR range test record ({type(exc).__name__}): "
                            "run `cifarkit lr-find` again, or give --lr a number") from None
    floats = lambda xs: [math.nan if x is None else float(x) for x in xs or []]  # noqa: E731
    if "smooth_loss" not in d:  # the older format
        d = dict(lr=d.get("lr", []), raw_loss=[], smooth_loss=d.get("loss", []), suggestion=suggestion,
                 reason="steepest descent of Lightning's smoothed loss (an older cifarkit)",
                 diverged_at=None, beta=0.98)
    d.update(lr=floats(d["lr"]), raw_loss=floats(d.get("raw_loss")), smooth_loss=floats(d["smooth_loss"]),
             suggestion=suggestion)
    return d


def plot_lr_find(curve: dict) -> Figure:
    """Raw losses faint, the smoothed loss over them, the suggestion and the minimum marked, on a
    log-lr axis; a refused curve (LRFindRefused.curve) draws without a suggestion. Built without
    pyplot: drawing it never touches matplotlib's global state."""
    finite = lambda v: np.where(np.isfinite(v), v, np.nan)  # noqa: E731  (inf, nan: not drawn; saved as null)
    lr = np.asarray(curve["lr"], float)
    s = finite(np.asarray(curve["smooth_loss"], float))
    raw = finite(np.asarray(curve.get("raw_loss") or [], float))
    sug = curve.get("suggestion")
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    if len(raw):
        ax.plot(lr, raw, color="C0", alpha=0.3, lw=0.8, label="loss per step")
    beta = curve.get("beta")
    ax.plot(lr, s, color="C0", lw=1.8, label="smoothed" + (f" (EMA, beta {beta:.2f})" if beta else ""))
    if np.isfinite(s).any():
        m = int(np.nanargmin(s))
        ax.plot([lr[m]], [s[m]], "o", color="C2", label=f"minimum {s[m]:.3g} at lr {lr[m]:.3g}")
        if sug:
            k = int(np.argmin(np.abs(np.log(lr) - math.log(sug))))
            ax.plot([sug], [s[k]], "o", color="C3", ms=8, label=f"suggestion {sug:.3g}")
        start, low = s[0], s[m]
        if low > 0 and start / low > 10:  # a fall over decades (a bowl): the rule's relative view
            ax.set_yscale("log")
            ax.set_ylim(low / 3, max(start, np.nanmax(s[:m + 1])) * 3)
        else:
            span = max(start - low, 0.05 * abs(start), 1e-12)
            ax.set_ylim(low - 0.15 * span, max(start, np.nanmax(s[:m + 1])) + 0.6 * span)
    if curve.get("diverged_at"):
        ax.axvline(curve["diverged_at"], color="0.5", ls=":", label=f"diverged at lr {curve['diverged_at']:.3g}")
    ax.set_xscale("log")
    title = f"suggestion {sug:.3g}" if sug else "no suggestion (the curve cannot be read)"
    ax.set(title=f"LR range test: {title}", xlabel="learning rate (log)", ylabel="training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
