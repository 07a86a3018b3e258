"""One training as a sweep's trial, and what a training of a recipe costs on this machine.

A trial is an ordinary budgeted `fit` that is validated after every epoch and never tested: it is
judged by its validation accuracy (the test set is for the one final training of the best setting).
After each validation `report(epoch, val_acc, last)` is called; when it answers True, training
stops at the end of that epoch (the sweep's pruner stopped a weak trial). A trial is never resumed
(a killed one is marked failed and the sweep goes on), so its checkpoints are removed when it ends.
"""
from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from ..presets import TrainConfig, resolve
from ..rundir import RunDir
from .budget import MARGIN

Report = Callable[[int, float, bool], bool]  # (epoch from 1, validation accuracy, last epoch?) -> stop now?


@dataclass(frozen=True)
class Cost:
    """What a training of a recipe costs here, from its first steps timed (seconds)."""
    startup: float       # from the start of `fit` to its first step: data from the cache, the net, measuring
    epoch: float         # one full-size epoch with its validation
    recipe: float        # the recipe's own length (its low-res epochs at their speed) with validation
    test: float          # the test with its views, and calibration: what the final training adds

    def least(self) -> float:
        """The shortest budget a training can be planned in here: one epoch, with the planner's reserve."""
        return (self.startup + self.epoch) / (1 - MARGIN)


@dataclass
class TrialOutcome:
    """What one trial did."""
    val_acc: float | None         # the last validation's accuracy
    history: list[float]          # validation accuracy after each epoch
    planned_epochs: float         # what its budget planned
    stopped_at: int | None        # the epoch after which `report` stopped it (None: it ran its plan)
    seconds: float
    run_dir: Path | None = None

    @property
    def epochs(self) -> int:
        return len(self.history)


def measure_cost(cfg: TrainConfig) -> Cost:
    """Time a few steps of `cfg`'s recipe here, as a budgeted `fit` does before planning, and predict
    what its trainings cost. The data is decoded first (once: the cache serves the trainings after)."""
    from .fit import build_datamodule, build_module, measure_speed, validate
    cfg = resolve(cfg)
    validate(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    build_datamodule(cfg)  # the first decode is not what a training pays: the cache serves it
    t = time.perf_counter()
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    module.lr = float(cfg.lr) if cfg.lr != "auto" else 0.1  # the rate does not change the step time
    steps, tested, val, shape = measure_speed(cfg, dm, module)
    startup = time.perf_counter() - t
    spe, full = shape.steps_per_epoch, max(steps)
    epoch = spe * steps[full] + val
    low = min(shape.low_res_epochs, cfg.epochs) if shape.low_res else 0
    recipe = low * (spe * steps[shape.low_res] + val) + (cfg.epochs - low) * epoch if low else cfg.epochs * epoch
    return Cost(startup=startup, epoch=epoch, recipe=startup + recipe, test=tested)


class EpochReport(L.Callback):
    """After each validation: the accuracy to `report`, and a stop at this epoch's end when it says so."""

    def __init__(self, report: Report):
        self.report, self.history, self.stopped_at = report, [], None

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("val_acc")
        if trainer.sanity_checking or value is None:
            return
        acc = float(value)  # once an epoch: nothing waits on the device between
        self.history.append(acc)
        last = trainer.should_stop  # the schedule's last step is done: nothing is left to stop
        if self.report(len(self.history), acc, last) and not last:
            trainer.should_stop = True
            self.stopped_at = len(self.history)


def train_trial(cfg: TrainConfig, report: Report) -> TrialOutcome:
    """Train `cfg` (budgeted, with a validation split) as a trial: validated each epoch, not tested."""
    from .fit import fit
    if not cfg.val_size:
        raise ValueError("a trial is judged on validation: give it a validation split (val_size > 0)")
    reporter = EpochReport(report)
    start = time.time()
    try:
        run = fit(cfg, callbacks=(reporter,), test=False)
    finally:
        if cfg.out:
            shutil.rmtree(RunDir(cfg.out).checkpoints, ignore_errors=True)  # a trial is never resumed
        gc.collect()  # the trainer, the net and the data of one trial are gone before the next
    res = run.read_results()
    return TrialOutcome(val_acc=reporter.history[-1] if reporter.history else res.val_acc,
                        history=reporter.history, planned_epochs=res.epochs, stopped_at=reporter.stopped_at,
                        seconds=time.time() - start, run_dir=run.path)


def train_final(cfg: TrainConfig, resume: bool = False) -> tuple[RunDir, dict]:
    """The final training of a sweep's best setting: an ordinary `fit`, tested once; (run, results).
    resume: go on with the run in `cfg.out` as its own config.yaml says (its plan included), or
    take its results when it had finished."""
    from .fit import fit
    run = RunDir(cfg.out)
    if resume and run.read_results() is None:
        run = fit(run.read_config(), resume=True)
    elif not resume:
        run = fit(cfg)
    return run, run.read_results().to_dict()

