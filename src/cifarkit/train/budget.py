"""The best model in the minutes you have: `--time-budget 10m` plans the recipe's schedule to fit.

The budget counts from the start of the command (`fit(started=...)`; from Python, by default, the
start of `fit`): imports, decoding from the cache, building the net, measuring, training,
validation and the test with its test-time views, to the tested and calibrated weights. The schedule
is planned, not cut: the first steps are timed at each image size the recipe trains at (a few
steps on the run's own net, whose weights are then put back), one test batch is timed, and the
number of epochs is the most that fits. The recipe keeps its proportions: the share of low-res
epochs, the share of epochs the whitening bias trains, the one-cycle's warm-up share and the
lookahead's averaging follow the planned length. At the end of every epoch the finish is
predicted from the average step time so far at each image size, and the remaining steps are
re-planned when it falls past the budget or more than 5% short of it (the one-cycle's anneal
goes on from where it is; a re-plan in the low-res epochs sets how many there are from the new
length, in the recipe's share). A resumed run re-plans its remaining steps to the budget that is left.
"""
from __future__ import annotations

import copy
import math
import re
import time
from dataclasses import asdict, dataclass, field

import torch

from ..console import log
from ..errors import CifarkitError

MARGIN = 0.015       # of the budget kept in reserve against the clock's noise
DRIFT = 0.035        # re-plan when the predicted finish is more than MARGIN + DRIFT (5%) short of the budget
OVERRUN = 0.05       # a run this much past its budget says so, and why
TIMED_STEPS = 6      # steps timed per image size, after WARMUP_STEPS untimed ones
WARMUP_STEPS = 2
UNSURE = 0.4        # share of test images under the fast recipe's threshold 0.7 (about a third, measured)


def parse_budget(text: str) -> float:
    """'90s', '10m', '1h', '1h30m', '2.5m' or plain seconds ('600') -> seconds."""
    m = re.fullmatch(r"\s*(?:(\d+(?:\.\d*)?)\s*h)?\s*(?:(\d+(?:\.\d*)?)\s*m(?:in)?)?\s*(?:(\d+(?:\.\d*)?)\s*s?)?\s*",
                     str(text))
    if not m or not any(m.groups()):
        raise CifarkitError(f"--time-budget must look like 90s, 10m, 1h or 1h30m; got '{text}'")
    h, mins, s = (float(g) if g else 0.0 for g in m.groups())
    seconds = 3600 * h + 60 * mins + s
    if seconds <= 0:
        raise CifarkitError(f"--time-budget must be more than nothing; got '{text}'")
    return seconds


def views_per_image(tta: int, threshold: float) -> float:
    """Forward passes per test image: the plain one, and the extra views for the unsure share."""
    extra = {0: 0, 1: 1, 2: 5}[tta]
    return 1 + extra * (UNSURE if threshold < 1 else 1.0)


def format_seconds(s: float) -> str:
    s = int(math.ceil(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class Plan:
    budget: float                 # seconds, fit start to tested weights
    spent: float                  # seconds already spent when the plan was made
    step_seconds: dict            # image size (px) -> seconds per optimizer step, measured
    steps_per_epoch: int
    test_seconds: float           # the test with its test-time views (and calibration), predicted
    val_seconds: float            # one validation pass, predicted (0: no validation split)
    epochs: float                 # planned
    low_res_epochs: int
    low_res: int                  # px of the low-res epochs (0: none)
    batch_size: int
    replanned: list = field(default_factory=list)  # (at step, total steps before, after, why)
    finish: float = 0.0           # the finish predicted at the last re-plan (0: not re-planned)
    low_res_share: float = 0.0    # the recipe's share of low-res epochs, kept by re-plans in them

    @property
    def total_steps(self) -> int:
        return math.ceil(self.epochs * self.steps_per_epoch - 1e-6)  # total / spe * spe may not be total

    def epoch_seconds(self, low: bool) -> float:
        size = self.low_res if low and self.low_res else max(self.step_seconds)
        return self.steps_per_epoch * self.step_seconds[size] + self.val_seconds

    def images_per_second(self) -> dict:
        return {size: round(self.batch_size / s, 1) for size, s in self.step_seconds.items()}

    def predicted(self) -> float:
        if self.finish:  # re-planned: from the time spent then and the step times measured so far
            return self.finish
        low = min(self.low_res_epochs, self.epochs)
        return (self.spent + low * self.epoch_seconds(True) + (self.epochs - low) * self.epoch_seconds(False)
                + self.test_seconds)

    def describe(self) -> str:
        low = f", the first {self.low_res_epochs} at {self.low_res} px" if self.low_res_epochs else ""
        speed = ", ".join(f"{v:,.0f} images/s at {k} px" for k, v in sorted(self.images_per_second().items()))
        return (f"time budget {format_seconds(self.budget)}: {self.epochs:.2f} epochs ({self.total_steps} steps of "
                f"{self.batch_size}{low}), measured {speed}; test and calibration predicted {self.test_seconds:.0f} s; "
                f"{format_seconds(self.spent)} spent before training; predicted finish "
                f"{format_seconds(self.predicted())}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["step_seconds"] = {int(k): round(v, 4) for k, v in self.step_seconds.items()}
        return {**d, "total_steps": self.total_steps, "images_per_second": self.images_per_second(),
                "predicted_seconds": round(self.predicted(), 1)}


def plan_schedule(budget: float, spent: float, step_seconds: dict, steps_per_epoch: int, test_seconds: float,
                  val_seconds: float, batch_size: int, low_res: int = 0, low_res_share: float = 0.0,
                  min_epochs: float = 1.0) -> Plan:
    """The most epochs that fit: low_res_share of them (whole epochs, the nearest) at low_res px."""
    plan = Plan(budget, spent, dict(step_seconds), steps_per_epoch, test_seconds, val_seconds, 0.0, 0,
                low_res if low_res_share else 0, batch_size, low_res_share=low_res_share if low_res else 0.0)
    left = budget * (1 - MARGIN) - spent - test_seconds
    low, full = plan.epoch_seconds(True), plan.epoch_seconds(False)
    plan.low_res_epochs = low_res_count(plan, left, 0, low, full)
    plan.epochs = plan.low_res_epochs + (left - plan.low_res_epochs * low) / full
    if plan.epochs < min_epochs:  # then no epoch is at low res: the least is min_epochs at full size
        least = (spent + test_seconds + min_epochs * full) / (1 - MARGIN)
        raise CifarkitError(f"a time budget of {format_seconds(budget)} leaves {max(left, 0):.0f} s for training "
                            f"here, less than {min_epochs:g} epoch ({full:.0f} s); the least that makes sense on "
                            f"this machine is about --time-budget {format_seconds(least)}")
    return plan


def low_res_count(plan: Plan, left: float, done: int, low: float, full: float) -> int:
    """How many of a run's epochs are low-res when `left` seconds remain after `done` epochs, all of them
    low-res, and a low-res and a full-size epoch take `low` and `full` seconds: the recipe's share of
    the epochs that fit, whole epochs (the nearest), at most half of the run, at least those done."""
    share = plan.low_res_share  # 0 without low-res epochs
    if not share:
        return 0
    # e epochs in all: (share e - done) low + (1 - share) e full = left
    epochs = (left + done * low) / (share * low + (1 - share) * full)
    return max(done, min(round(share * epochs), int(epochs / 2)))


def scale_recipe(cfg, plan: Plan, preset_epochs: float | None = None) -> None:
    """Put the plan into the config: its length, its low-res epochs, and (given the preset's length, at
    the first plan) the recipe's other epoch-counted parts in proportion."""
    cfg.epochs = round(plan.epochs, 4)
    if plan.low_res:
        cfg.augment = {**cfg.augment, "low_res_epochs": plan.low_res_epochs}
    if cfg.whiten_bias_epochs and preset_epochs:  # the preset's share of epochs, at least one
        cfg.whiten_bias_epochs = max(1, round(cfg.whiten_bias_epochs * plan.epochs / preset_epochs))
    cfg.plan = plan.to_dict()


# -- measuring ------------------------------------------------------------------------------------


def measure_steps(module, dm, trainer_kwargs: dict, sizes: list[int]) -> dict:
    """Seconds per optimizer step at each image size, on the run's own module (its weights, buffers
    and metric states put back afterwards), after a few untimed warm-up steps."""
    import lightning as L

    class Clock(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, *args):
            self.times.append(time.perf_counter())

    saved = copy.deepcopy(module.state_dict())
    low_epochs = dm.augment.low_res_epochs
    out = {}
    try:
        for size in sizes:
            dm.augment.low_res_epochs = 10**9 if size < 32 else 0  # every step at this size
            clock = Clock()
            trainer = L.Trainer(**{**trainer_kwargs, "logger": False, "enable_checkpointing": False,
                                   "max_epochs": -1, "max_steps": WARMUP_STEPS + TIMED_STEPS + 1,
                                   "callbacks": [clock], "devices": 1, "num_nodes": 1, "strategy": "auto",
                                   "limit_val_batches": 0, "enable_progress_bar": False,
                                   "enable_model_summary": False})
            trainer.fit(module, datamodule=dm)
            t = clock.times[WARMUP_STEPS:]
            out[size] = (t[-1] - t[0]) / (len(t) - 1)
    finally:
        dm.augment.low_res_epochs = low_epochs
        module.load_state_dict(saved)
        module._ema, module._lrs = None, []
    return out


@torch.no_grad()
def measure_eval(module, dm, precision: str):
    """A function (images, views) -> predicted seconds to evaluate that many images with that many
    forward passes each, from one eval batch timed once (after one untimed)."""
    from .module import tta_logits
    device = next(module.parameters()).device
    batch = dm.augment.normalize(torch.from_numpy(dm.arrays.test_x[: dm.eval_batch_size]).to(device))
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    module.eval()
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=precision in ("bf16-mixed", "16-mixed")):
            for _ in range(2):
                t = time.perf_counter()
                tta_logits(module.net, batch, 0)
                seconds = time.perf_counter() - t
    finally:
        module.train()
    return lambda images, views=1: seconds * math.ceil(images / dm.eval_batch_size) * views


# -- during training ----------------------------------------------------------------------------


def budget_callback(plan: Plan, start: float, guard, module, on_replan=None):
    """A Lightning callback that re-plans the remaining steps: at the end of each epoch after which the
    predicted finish (from the average step time so far at each image size) is past the budget or
    more than MARGIN + DRIFT short of it, and at the start of a resumed run (then from the
    budget left when its checkpoint was written). on_replan(plan): called after each re-plan."""
    import lightning as L

    class BudgetGuard(L.Callback):
        def __init__(self):
            self.epoch_start = self.last_end = None
            self.so_far: dict = {}  # image size -> [seconds, steps] of training so far, in this process
            self.resumed_spent: float | None = None  # the budget spent before an interruption

        def spent(self) -> float:  # of the budget, both sittings of a resumed run
            return time.time() - start + (self.resumed_spent or 0.0)

        def state_dict(self) -> dict:
            return {"spent": self.spent(), "plan": plan.to_dict()}

        def load_state_dict(self, state: dict) -> None:
            self.resumed_spent = float(state["spent"])

        def on_train_start(self, trainer, pl_module) -> None:
            if self.resumed_spent is not None:  # a resumed run: what is left, from here
                left = plan.budget - self.spent()
                done = trainer.global_step
                per_step = plan.epoch_seconds(False) / plan.steps_per_epoch
                todo = max(1, int((left * (1 - MARGIN) - plan.test_seconds) / per_step))
                self._retarget(trainer, done + todo, "resumed with the budget left",
                               plan.budget - left + todo * per_step + plan.test_seconds)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.epoch_start, self.epoch_steps = time.perf_counter(), trainer.global_step

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            now, last_end, self.last_end = time.perf_counter(), self.last_end, time.perf_counter()
            steps = trainer.global_step - self.epoch_steps
            if steps < plan.steps_per_epoch or trainer.should_stop:
                return
            low = plan.low_res and trainer.current_epoch < plan.low_res_epochs
            size = plan.low_res if low else max(plan.step_seconds)
            # the step time at this size so far, from the end of the epoch before: what happens between
            # epochs (the checkpoint) counts too. A shared machine's speed swings from minute to
            # minute, so every epoch end predicts the finish from the averages so far.
            so_far = self.so_far.setdefault(size, [0.0, 0])
            so_far[0] += now - (last_end or self.epoch_start) - plan.val_seconds
            so_far[1] += steps

            def per_step(k):  # a step at size k with its share of validation: measured so far, or planned
                seconds, n = self.so_far.get(k, (plan.step_seconds[k], 1))
                return seconds / n + plan.val_seconds / plan.steps_per_epoch

            full, spe, done = max(plan.step_seconds), plan.steps_per_epoch, trainer.global_step
            elapsed = self.spent()

            def finish_at(total, low_epochs):  # a run of `total` steps, the first `low_epochs` epochs low-res
                low_left = max(0, min(total, low_epochs * spe) - done)
                return (elapsed + (low_left * per_step(plan.low_res) if low_left else 0.0)
                        + (total - done - low_left) * per_step(full) + plan.test_seconds)

            finish = finish_at(module.total_steps(), plan.low_res_epochs)
            if plan.budget * (1 - MARGIN - DRIFT) <= finish <= plan.budget:
                return
            left = plan.budget * (1 - MARGIN) - elapsed - plan.test_seconds
            low_epochs = plan.low_res_epochs
            if low:  # still in the low-res epochs: how many follows the re-planned length
                low_epochs = low_res_count(plan, left, trainer.current_epoch + 1, per_step(plan.low_res) * spe,
                                           per_step(full) * spe)
            low_left = max(0, low_epochs * spe - done)
            if low_left:
                left -= low_left * per_step(plan.low_res)
            total = done + low_left + max(1, int(left / per_step(full)))
            expected, measured = plan.step_seconds[size], so_far[0] / so_far[1]
            plan.step_seconds[size] = measured
            self._retarget(trainer, total, f"{'low-res' if low else 'full-size'} steps so far ran at "
                                           f"{measured / expected:.0%} of the planned step time "
                                           f"(predicted finish {finish:.0f} s)", finish_at(total, low_epochs),
                           low_epochs)

        def _retarget(self, trainer, total: int, why: str, finish: float, low_epochs: int | None = None) -> None:
            before = module.total_steps()
            if low_epochs is not None and low_epochs != plan.low_res_epochs:
                why += f"; {low_epochs} low-res epochs instead of {plan.low_res_epochs}"
                plan.low_res_epochs = trainer.datamodule.augment.low_res_epochs = low_epochs
            elif total == before:
                return
            plan.replanned.append([trainer.global_step, before, total, why])
            plan.finish = finish
            plan.epochs = total / plan.steps_per_epoch
            module.steps = guard.stop_at_step = total
            for config in trainer.lr_scheduler_configs:
                config.scheduler.retarget(total)
            trainer.fit_loop.max_epochs = max(trainer.fit_loop.max_epochs, math.ceil(plan.epochs))
            log.info(f"time budget: re-planned to {total} steps ({plan.epochs:.2f} epochs): {why}")
            if on_replan is not None:
                on_replan(plan)

    return BudgetGuard()


def overrun_notice(plan: Plan, seconds: float, trained: float, tested: float) -> str | None:
    """One line when a run finished more than 5% past its budget: by how much, and which part ran long
    (`trained`, `tested`: the seconds training and the test took)."""
    if seconds <= plan.budget * (1 + OVERRUN):
        return None
    planned_test = plan.test_seconds
    planned_train = plan.predicted() - plan.spent - planned_test
    why = (f"the test took {tested:.0f} s against {planned_test:.0f} s predicted" if tested - planned_test
           > trained - planned_train else
           f"training took {trained:.0f} s against {planned_train:.0f} s planned (this machine ran slower "
           "than in the measured first steps: other work on it, or throttling)")
    return (f"notice: the run took {format_seconds(seconds)}, {seconds / plan.budget - 1:.0%} over its time budget "
            f"of {format_seconds(plan.budget)}: {why}")
