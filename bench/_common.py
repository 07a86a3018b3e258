"""Shared by the bench scripts: time Lightning training steps after a warm-up."""
import time

import lightning as L


class StepTimer(L.Callback):
    """Seconds per training step, counted from the start of step `warmup` to the end of training."""

    def __init__(self, warmup: int = 5):
        self.warmup, self.n, self.t = warmup, 0, None

    def on_train_batch_start(self, *args):
        if self.n == self.warmup:
            self.t = time.perf_counter()
        self.n += 1

    def on_train_end(self, *args):
        self.per_step = (time.perf_counter() - self.t) / (self.n - self.warmup)
