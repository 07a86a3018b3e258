"""`--compile`: the net's training step compiled up front, its seconds counted apart, and a run that
goes on uncompiled where the compiler cannot build.

torch.compile is lazy: the graphs are built by the first call at each input shape and state
(Inductor writes and compiles C++ on a CPU, which needs a working compiler). Left to training, that
time would fall inside the first epochs, after a time budget measured the machine's speed, and a
machine without a C++ compiler would crash there. So before anything is measured or trained, two
steps run at each image size and whitening-bias state the recipe trains with, inside the module's
scratch() (the weights come back as they were): a time budget counts that time among what it found
spent before training, and a compile that fails costs one line and the run trains the plain net.
`CompileClock` sums Dynamo's own compile time (forward, the lazily built backward, recompiles during
training) for results.json's `compile_seconds`. Evaluation always runs the plain net (module.py).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..console import log
from .budget import probe_fit
from .schedule import Schedule


class CompileClock:
    """Seconds torch.compile spent building graphs while inside `with CompileClock() as clock:`
    (Dynamo's start and end callbacks; a compile that failed counts too)."""

    def __init__(self):
        self.seconds, self._started = 0.0, None

    def _start(self, args) -> None:
        self._started = time.perf_counter()

    def _end(self, args) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def __enter__(self) -> "CompileClock":
        handler = torch._dynamo.callback_handler
        handler.register_start_callback(self._start)
        handler.register_end_callback(self._end)
        return self

    def __exit__(self, *exc) -> None:
        handler = torch._dynamo.callback_handler
        handler.remove_start_callback(self._start)
        handler.remove_end_callback(self._end)


def training_states(schedule: Schedule, stem: bool) -> list[tuple[int, bool]]:
    """(image size in px, whether the whitening stem's bias trains) of every epoch of `schedule`, once
    each, in order: the shapes and states a compiled training step meets (the bias only with a `stem`)."""
    states = []
    for epoch in range(schedule.max_epochs):
        state = (schedule.low_res if schedule.at_low_res(epoch) else 32, stem and schedule.whiten_bias_trains(epoch))
        if state not in states:
            states.append(state)
    return states


def compile_up_front(module, dm, trainer_kwargs: dict, schedule: Schedule) -> bool:
    """Build the compiled training step of `module` (LitClassifier with a compiled net) for each
    training state of `schedule`, two steps each inside its scratch(). False, with one line said and
    the module left uncompiled, when the compiler cannot build here."""
    stem = hasattr(module.net, "stem_bias_trains")
    try:
        for size, bias in training_states(schedule, stem):
            low = size < 32
            probe = dataclasses.replace(schedule, total_steps=2, low_res=size if low else 0,
                                        low_res_epochs=10**9 if low else 0,
                                        whiten_bias_epochs=10**9 if bias else 0)
            probe_fit(module, dm, trainer_kwargs, probe)
    except torch._dynamo.exc.TorchDynamoException as exc:  # InductorError: no working C++ compiler, ...
        module.uncompile(exc)
        return False
    return True
