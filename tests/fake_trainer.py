"""A stand-in for a sweep's trainings: a clock, and an accuracy that is a known function of the
setting, so that a test knows where the optimum is and what each trial costs. Imported by the sweep
tests and by the worker processes they start."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from cifarkit.sweep.run import Trainer
from cifarkit.train.budget import parse_budget
from cifarkit.train.trial import Cost, TrialOutcome

BEST_LR, BEST_SMOOTHING = 0.3, 0.1  # where the fake accuracy peaks
SPACE = {"lr": {"low": 0.01, "high": 10.0, "log": True}, "label_smoothing": {"low": 0.0, "high": 0.3}}


def accuracy(cfg, epoch: int) -> float:
    """0.9 at the optimum after many epochs; less the farther lr (on a log scale) and label smoothing
    are from it, and less after fewer epochs."""
    miss = 0.1 * math.log10(cfg.lr / BEST_LR) ** 2 + 2.0 * (cfg.label_smoothing - BEST_SMOOTHING) ** 2
    return (0.9 - miss) * (1 - 0.5 ** epoch)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class RealClock:
    """Real time, each fake second `scale` real seconds long (for worker processes)."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        time.sleep(seconds * self.scale)


class FakeTrainer:
    def __init__(self, clock, startup: float = 10.0, epoch: float = 60.0, test: float = 20.0, epochs: float = 9):
        self.clock, self.startup, self.epoch, self.test, self.epochs = clock, startup, epoch, test, epochs
        self.trials, self.finals, self.measured = [], [], 0

    def measure(self, cfg) -> Cost:
        self.measured += 1
        self.clock.advance(self.startup + 2 * self.epoch / 10)
        return Cost(startup=self.startup, epoch=self.epoch, recipe=self.startup + self.epochs * self.epoch,
                    test=self.test)

    def trial(self, cfg, report) -> TrialOutcome:
        seconds = parse_budget(cfg.time_budget)
        planned = max(1, int((seconds - self.startup) / self.epoch))
        self.trials.append(cfg)
        start = self.clock()
        self.clock.advance(self.startup)
        history = []
        for e in range(1, planned + 1):
            self.clock.advance(self.epoch)
            history.append(accuracy(cfg, e))
            if report(e, history[-1], e == planned):
                return TrialOutcome(history[-1], history, planned, e, self.clock() - start, Path(cfg.out))
        return TrialOutcome(history[-1], history, planned, None, self.clock() - start, Path(cfg.out))

    def final(self, cfg, resume: bool):
        self.finals.append((cfg, resume))
        self.clock.advance(parse_budget(cfg.time_budget))
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        return Path(cfg.out), {"test_acc": accuracy(cfg, 100) - 0.01, "seconds": parse_budget(cfg.time_budget)}

    def bundle(self) -> Trainer:
        return Trainer(measure=self.measure, trial=self.trial, final=self.final)


def worker(out: str, budget: str, storage: str, study: str, scale: float, heartbeat: int) -> None:
    """One worker process: a sweep of the fake trainer on real time (a fake second lasts `scale` s)."""
    from cifarkit.console import command_line
    from cifarkit.presets import preset_config
    from cifarkit.sweep.run import run_sweep
    from cifarkit.sweep.space import parse_space
    cfg = preset_config("quick")
    clock = RealClock(scale)
    fake = FakeTrainer(clock, startup=1.0, epoch=1.0, test=1.0, epochs=4)
    with command_line():
        run_sweep(cfg, budget, out, parse_space(SPACE, cfg), storage, study, trainer=fake.bundle(), clock=clock,
                  heartbeat=heartbeat, report=False)


if __name__ == "__main__":  # python fake_trainer.py OUT BUDGET STORAGE STUDY SCALE HEARTBEAT
    out, budget, storage, study, scale, heartbeat = sys.argv[1:]
    worker(out, budget, storage, study, float(scale), int(heartbeat))
