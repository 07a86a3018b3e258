"""The run's length, owned by one object.

A `Schedule` says how many optimizer steps the run takes, how many epochs of them see low-res images,
how long the whitening stem's bias trains, and how the lookahead average tightens towards the end.
It is made once before training (from the resolved config, or from the time budget's plan) and is
the only thing a re-plan writes; the module (its one-cycle and lookahead), the augmentation, the
run guard (the last step and the trainer's epoch limit) read it. A checkpoint carries it through
the time budget's state, so a resumed run continues on the latest plan.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..presets import LOOKAHEAD_EXAMPLES, TrainConfig


def steps_of(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of `epochs` epochs (a fractional epoch ends part-way into it)."""
    return math.ceil(epochs * steps_per_epoch - 1e-6)  # total / spe * spe may not be total


@dataclass
class Schedule:
    steps_per_epoch: int          # optimizer steps of one epoch, per process
    total_steps: int              # optimizer steps of the whole run
    low_res: int                  # px of the low-res epochs (0: none)
    low_res_epochs: int           # the first epochs that see images at low_res px
    whiten_bias_epochs: int       # the first epochs in which the whitening stem's bias trains
    lookahead_every: int          # optimizer steps between lookahead updates
    lookahead_decay: float        # its EMA decay per LOOKAHEAD_EXAMPLES training examples
    lookahead_power: float        # the decay is scaled by (step / total) ** power

    @classmethod
    def of(cls, cfg: TrainConfig, steps_per_epoch: int, epochs: float | None = None) -> "Schedule":
        """The schedule of a resolved config (its epochs, or `epochs` as planned) at this many steps an epoch."""
        low_epochs = cfg.augment.get("low_res_epochs", 0)
        low_res = cfg.augment.get("low_res", 0) if low_epochs else 0
        return cls(steps_per_epoch, steps_of(cfg.epochs if epochs is None else epochs, steps_per_epoch),
                   low_res, low_epochs if low_res else 0, cfg.whiten_bias_epochs,
                   cfg.lookahead_every, cfg.lookahead_decay, cfg.lookahead_power)

    @property
    def epochs(self) -> float:
        return self.total_steps / self.steps_per_epoch

    @property
    def max_epochs(self) -> int:
        """Epochs the trainer must be allowed to start (the last one may end part-way)."""
        return math.ceil(self.epochs - 1e-9)

    def at_low_res(self, epoch: int) -> bool:
        return bool(self.low_res) and epoch < self.low_res_epochs

    def whiten_bias_trains(self, epoch: int) -> bool:
        return epoch < self.whiten_bias_epochs

    def lookahead_decay_at(self, step: int, examples_per_step: int) -> float | None:
        """The lookahead's decay after optimizer step `step` (1 at the last step: the net becomes the
        average), or None where no lookahead update falls. Early on the weights are followed, late
        they are averaged; the window is the same at any batch size."""
        if step >= self.total_steps:
            return 1.0
        if step % self.lookahead_every:
            return None
        per_step = self.lookahead_decay ** (examples_per_step / LOOKAHEAD_EXAMPLES)
        return per_step ** self.lookahead_every * (step / self.total_steps) ** self.lookahead_power

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
