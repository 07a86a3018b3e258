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

The finish: in the last WINDOW of the budget (the low-res epochs done) the finish is predicted after
every step, from the times of the last RECENT steps and the time measured between epochs, and the
last step is moved whenever the prediction strays more than SLACK from the aim, MARGIN inside the
budget. A machine that slows down or speeds up late in the run then still ends it within FINISH
of its budget, either side (the test's own time is predicted, not re-planned: MARGIN is what it
may run long or short).
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch

from ..console import log
from ..errors import CifarkitError
from ..presets import LOW_RES_MAX_SHARE, UNSURE_SHARE, TrainConfig
from .schedule import Schedule

FINISH = 0.015       # a run ends within this share of its budget, either side
MARGIN = FINISH / 2  # the plans aim the finish this share inside the budget: the middle of the FINISH
                     # below it, so the test (predicted, after the last step) may run long or short
DRIFT = 0.0425       # at an epoch end, re-plan when the predicted finish is more than MARGIN + DRIFT
                     # (5%) short of the budget, or past it
WINDOW = 0.10        # the last share of the budget, in which the finish is checked after every step
SLACK = 0.0025       # there, re-plan when the predicted finish is this share of the budget off the aim
RECENT = 20          # steps whose times predict the rest of the run in that window (at least 3)
OVERRUN = 0.05       # a run this much past its budget says so, and why
TIMED_STEPS = 6      # steps timed per image size, after WARMUP_STEPS untimed ones
WARMUP_STEPS = 2


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
    return 1 + extra * (UNSURE_SHARE if threshold < 1 else 1.0)


def format_seconds(s: float) -> str:
    s = int(math.ceil(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


@dataclass
class Plan:
    """What the time budget measured and planned, and its record of re-plans. The run's length is
    its `schedule`, the one thing a re-plan writes."""
    budget: float                 # seconds, fit start to tested weights
    spent: float                  # seconds already spent when the plan was made
    step_seconds: dict            # image size (px) -> seconds per optimizer step, measured
    test_seconds: float           # the test with its test-time views (and calibration), predicted
    val_seconds: float            # one validation pass, predicted (0: no validation split)
    batch_size: int
    schedule: Schedule
    replanned: list = field(default_factory=list)  # (at step, total steps before, after, why)
    finish: float = 0.0           # the finish predicted at the last re-plan (0: not re-planned)
    low_res_share: float = 0.0    # the recipe's share of low-res epochs, kept by re-plans in them

    @property
    def steps_per_epoch(self) -> int:
        return self.schedule.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def epochs(self) -> float:
        return self.schedule.epochs

    @property
    def low_res_epochs(self) -> int:
        return self.schedule.low_res_epochs

    @property
    def low_res(self) -> int:
        return self.schedule.low_res

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
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "schedule"}
        d["step_seconds"] = {int(k): round(v, 4) for k, v in self.step_seconds.items()}
        return {**d, "steps_per_epoch": self.steps_per_epoch, "epochs": self.epochs,
                "low_res_epochs": self.low_res_epochs, "low_res": self.low_res, "total_steps": self.total_steps,
                "images_per_second": self.images_per_second(), "predicted_seconds": round(self.predicted(), 1),
                "schedule": self.schedule.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, cfg: TrainConfig) -> "Plan":
        """The plan a config.yaml or checkpoint recorded (one written before schedules were recorded
        too: its length from `epochs`, the rest of the schedule from `cfg`)."""
        if "schedule" in d:
            schedule = Schedule.from_dict(d["schedule"])
        else:
            schedule = dataclasses.replace(Schedule.of(cfg, int(d["steps_per_epoch"]), d["epochs"]),
                                           low_res=int(d.get("low_res", 0)), low_res_epochs=int(d.get("low_res_epochs", 0)))
        names = {f.name for f in dataclasses.fields(cls)} - {"schedule"}
        plan = cls(**{k: v for k, v in d.items() if k in names}, schedule=schedule)
        plan.step_seconds = {int(k): v for k, v in plan.step_seconds.items()}
        return plan

    def restore(self, d: dict) -> None:
        """Become the plan a checkpoint recorded, in place (the run's readers hold this schedule). A
        plan recorded before schedules were gives its length and low-res epochs."""
        saved = Schedule.from_dict(d["schedule"]) if "schedule" in d else dataclasses.replace(
            self.schedule, total_steps=int(d.get("total_steps") or math.ceil(d["epochs"] * self.steps_per_epoch - 1e-6)),
            low_res_epochs=int(d.get("low_res_epochs", self.low_res_epochs)))
        for f in dataclasses.fields(Schedule):
            setattr(self.schedule, f.name, getattr(saved, f.name))
        self.replanned, self.finish = list(d.get("replanned", [])), float(d.get("finish", 0.0))
        self.step_seconds = {int(k): v for k, v in d.get("step_seconds", self.step_seconds).items()}


def plan_schedule(budget: float, spent: float, step_seconds: dict, test_seconds: float, val_seconds: float,
                  batch_size: int, schedule: Schedule, low_res_share: float = 0.0, min_epochs: float = 1.0,
                  recipe_epochs: float | None = None) -> Plan:
    """The most epochs that fit, on `schedule`'s shape (its steps per epoch, low-res size, whitening
    and lookahead): low_res_share of them (whole epochs, the nearest) at low res; given the recipe's
    own length, the whitening bias keeps its share of the epochs (at least one)."""
    schedule = dataclasses.replace(schedule)
    if not low_res_share:
        schedule.low_res = 0
    plan = Plan(budget, spent, dict(step_seconds), test_seconds, val_seconds, batch_size, schedule,
                low_res_share=low_res_share if schedule.low_res else 0.0)
    left = budget * (1 - MARGIN) - spent - test_seconds
    low, full = plan.epoch_seconds(True), plan.epoch_seconds(False)
    low_epochs = low_res_count(plan, left, 0, low, full)
    epochs = low_epochs + (left - low_epochs * low) / full
    if epochs < min_epochs:  # then no epoch is at low res: the least is min_epochs at full size
        least = (spent + test_seconds + min_epochs * full) / (1 - MARGIN)
        raise CifarkitError(f"a time budget of {format_seconds(budget)} leaves {max(left, 0):.0f} s for training "
                            f"here, less than {min_epochs:g} epoch ({full:.0f} s); the least that makes sense on "
                            f"this machine is about --time-budget {format_seconds(least)}")
    schedule.total_steps = math.ceil(epochs * schedule.steps_per_epoch - 1e-6)
    schedule.low_res_epochs = low_epochs
    if schedule.whiten_bias_epochs and recipe_epochs:  # the recipe's share of epochs, at least one
        schedule.whiten_bias_epochs = max(1, round(schedule.whiten_bias_epochs * epochs / recipe_epochs))
    return plan


def low_res_count(plan: Plan, left: float, done: int, low: float, full: float) -> int:
    """How many of a run's epochs are low-res when `left` seconds remain after `done` epochs, all of them
    low-res, and a low-res and a full-size epoch take `low` and `full` seconds: the recipe's share of
    the epochs that fit, whole epochs (the nearest), at most LOW_RES_MAX_SHARE of the run, at least
    those done."""
    share = plan.low_res_share  # 0 without low-res epochs
    if not share:
        return 0
    # e epochs in all: (share e - done) low + (1 - share) e full = left
    epochs = (left + done * low) / (share * low + (1 - share) * full)
    return max(done, min(round(share * epochs), int(epochs * LOW_RES_MAX_SHARE)))


def planned_config(cfg: TrainConfig, plan: Plan) -> TrainConfig:
    """The config a budgeted run records (config.yaml, the checkpoint's hyperparameters): its planned
    length, low-res epochs and whitening bias, and the plan itself."""
    s = plan.schedule
    augment = {**cfg.augment, "low_res_epochs": s.low_res_epochs} if cfg.augment.get("low_res") else cfg.augment
    return dataclasses.replace(cfg, epochs=round(s.epochs, 4), augment=augment,
                               whiten_bias_epochs=s.whiten_bias_epochs, plan=plan.to_dict())


# -- measuring ------------------------------------------------------------------------------------


def probe_fit(module, dm, trainer_kwargs: dict, probe: Schedule, callbacks: tuple = ()) -> None:
    """`probe.total_steps` training steps of the run's own module, on one device, following `probe`
    (its shape, image size and whitening), inside the module's `scratch()`: its weights, buffers and
    metric states come back as they were."""
    import lightning as L
    trainer = L.Trainer(**{**trainer_kwargs, "logger": False, "enable_checkpointing": False,
                           "max_epochs": -1, "max_steps": probe.total_steps,
                           "callbacks": list(callbacks), "devices": 1, "num_nodes": 1, "strategy": "auto",
                           "limit_val_batches": 0, "enable_progress_bar": False,
                           "enable_model_summary": False})
    with module.scratch(schedule=probe), dm.augment.following(probe):
        trainer.fit(module, datamodule=dm)


def measure_steps(module, dm, trainer_kwargs: dict, schedule: Schedule, sizes: list[int]) -> dict:
    """Seconds per optimizer step at each image size, after a few untimed warm-up steps, on the run's
    own module (on `schedule`'s shape, every step at that size; see probe_fit)."""
    import lightning as L

    class Clock(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, *args):
            self.times.append(time.perf_counter())

    out, steps = {}, WARMUP_STEPS + TIMED_STEPS + 1
    for size in sizes:
        low = size < 32
        probe = dataclasses.replace(schedule, total_steps=steps, low_res=size if low else 0,
                                    low_res_epochs=10**9 if low else 0)  # every step at this size
        clock = Clock()
        probe_fit(module, dm, trainer_kwargs, probe, (clock,))
        t = clock.times[WARMUP_STEPS:]
        out[size] = (t[-1] - t[0]) / (len(t) - 1)
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


def budget_callback(plan: Plan, start: float):
    """A Lightning callback that re-plans the remaining steps: at the end of each epoch after which the
    predicted finish (from the average step time so far at each image size) is past the budget or
    more than MARGIN + DRIFT short of it; after every step in the budget's last WINDOW (the finish,
    from the last steps' times); and at the start of a resumed run (then from the budget left when
    its checkpoint was written). A re-plan writes `plan.schedule` and nothing else of the run (the
    module, augmentation and run guard read it); every checkpoint keeps the plan, so a resumed run
    starts from the latest. Place it before the run guard in the trainer's callbacks."""
    import lightning as L

    class BudgetGuard(L.Callback):
        def __init__(self):
            self.epoch_start = self.last_end = None
            self.so_far: dict = {}  # image size -> [seconds, steps] of training so far, in this process
            self.resumed_spent: float | None = None  # the budget spent before an interruption
            self.last_step: float | None = None  # when the latest step ended (perf_counter)
            self.recent: deque = deque(maxlen=RECENT)  # seconds of the latest steps inside an epoch
            self.between: float | None = None  # seconds between two epochs' steps (validation, checkpoint)
            self.crossed = False  # an epoch started since the latest step

        def spent(self) -> float:  # of the budget, both sittings of a resumed run
            return time.time() - start + (self.resumed_spent or 0.0)

        def state_dict(self) -> dict:
            return {"spent": self.spent(), "plan": plan.to_dict()}

        def load_state_dict(self, state: dict) -> None:
            self.resumed_spent = float(state["spent"])
            if "plan" in state:
                plan.restore(state["plan"])

        def on_train_start(self, trainer, pl_module) -> None:
            if self.resumed_spent is not None:  # a resumed run: what is left, from here
                done = trainer.global_step
                per_step = plan.epoch_seconds(False) / plan.steps_per_epoch
                todo = max(1, math.ceil((plan.budget * (1 - MARGIN) - self.spent() - plan.test_seconds) / per_step))
                self._retarget(trainer, done + todo, "resumed with the budget left",
                               self.spent() + todo * per_step + plan.test_seconds)

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.epoch_start, self.epoch_steps = time.perf_counter(), trainer.global_step
            self.crossed = self.last_step is not None

        def in_window(self, trainer, elapsed: float) -> bool:
            """In the budget's last WINDOW, every low-res step done: the finish check's to re-plan."""
            if plan.low_res and plan.low_res_epochs * plan.steps_per_epoch > trainer.global_step:
                return False
            return plan.budget * (1 - MARGIN) - elapsed - plan.test_seconds <= WINDOW * plan.budget

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            now, last, self.last_step = time.perf_counter(), self.last_step, time.perf_counter()
            if last is None:
                return
            if self.crossed:  # this step's time holds the epoch's end and the next one's start
                self.crossed = False
                self.between = max(0.0, now - last - (self.rate() or 0.0))
            else:
                self.recent.append(now - last)
            self.finish_check(trainer)

        def rate(self) -> float | None:
            return sum(self.recent) / len(self.recent) if len(self.recent) >= 3 else None

        def finish_check(self, trainer) -> None:
            """In the window: the finish from the last steps' rate; off the aim by more than SLACK, the
            fewest steps (at least one more) whose finish reaches the aim."""
            done, elapsed, rate = trainer.global_step, self.spent(), self.rate()
            if rate is None or done >= plan.total_steps or not self.in_window(trainer, elapsed):
                return
            spe, epoch = plan.steps_per_epoch, trainer.current_epoch
            between = plan.val_seconds if self.between is None else self.between
            aim = plan.budget * (1 - MARGIN)

            def finish_at(total):  # the epoch ends still to come (this one's too) cost `between` each
                return elapsed + (total - done) * rate + (math.ceil(total / spe) - epoch) * between + plan.test_seconds

            finish = finish_at(plan.total_steps)
            if abs(finish - aim) <= SLACK * plan.budget:
                return
            total = done + 1
            for _ in range(3):  # the epoch ends depend on the length: settle it
                ends = math.ceil(total / spe) - epoch
                total = done + max(1, math.ceil((aim - elapsed - plan.test_seconds - ends * between) / rate - 1e-9))
            planned = plan.step_seconds[max(plan.step_seconds)]
            self._retarget(trainer, total, f"the finish: the last steps ran at {rate / planned:.0%} of the planned "
                                           f"step time (predicted finish {finish:.0f} s)", finish_at(total))

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
            if self.in_window(trainer, elapsed):
                return  # the finish check re-plans from here, from the latest steps

            def finish_at(total, low_epochs):  # a run of `total` steps, the first `low_epochs` epochs low-res
                low_left = max(0, min(total, low_epochs * spe) - done)
                return (elapsed + (low_left * per_step(plan.low_res) if low_left else 0.0)
                        + (total - done - low_left) * per_step(full) + plan.test_seconds)

            finish = finish_at(plan.total_steps, plan.low_res_epochs)
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
            # the fewest whole steps whose finish reaches the aim, as the first plan
            total = done + low_left + max(1, math.ceil(left / per_step(full) - 1e-9))
            expected, measured = plan.step_seconds[size], so_far[0] / so_far[1]
            plan.step_seconds[size] = measured
            self._retarget(trainer, total, f"{'low-res' if low else 'full-size'} steps so far ran at "
                                           f"{measured / expected:.0%} of the planned step time "
                                           f"(predicted finish {finish:.0f} s)", finish_at(total, low_epochs),
                           low_epochs)

        def _retarget(self, trainer, total: int, why: str, finish: float, low_epochs: int | None = None) -> None:
            before, schedule = plan.total_steps, plan.schedule
            if low_epochs is not None and low_epochs != schedule.low_res_epochs:
                why += f"; {low_epochs} low-res epochs instead of {schedule.low_res_epochs}"
                schedule.low_res_epochs = low_epochs
            elif total == before:
                return
            plan.replanned.append([trainer.global_step, before, total, why])
            plan.finish = finish
            schedule.total_steps = total
            # the finish's small moves, a few steps each, only with --verbose (the record keeps them all)
            say = log.debug if why.startswith("the finish") else log.info
            say(f"time budget: re-planned to {total} steps ({plan.epochs:.2f} epochs): {why}")

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
