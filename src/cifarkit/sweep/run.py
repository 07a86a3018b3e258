"""`cifarkit sweep`: the best recipe in the minutes you have.

The budget, counted from the start of the command, holds everything: timing the recipe here, the
trials, and the final training of the best setting on all the training images, tested once.

1. The recipe's first steps are timed (`train.trial.measure_cost`): what a training costs here.
2. The trials' budget: the recipe's own length here, but at most a fifth of what is left (so that
   four whole trials and the final fit; pruned trials free time for more), and at least one epoch.
   A budget that holds fewer than two trials and the final is refused in one line before any
   training. A study keeps the trials' budget it was created with: every worker's trials are alike.
3. Trials: Optuna's TPE sampler draws a setting from the space; the trial is a budgeted `fit` on
   the training images less a validation split (the planner picks its epochs from the measured step
   speed). Its validation accuracy after each epoch goes to the study, and successive halving
   (rungs at epochs 1, 3, 9, ...) stops a trial that is behind the others at its rung, once two
   trials have finished. The test set is never looked at. A trial starts only while it and the
   final training still fit in the budget.
4. The final: the best trial's setting with val_size 0, on the trials' budget plus the test's time,
   tested once (`fit`), by the one worker that claims it (see `study`). The report and the best
   setting as a replayable config.yaml are written at the end (`report`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..console import log
from ..errors import CifarkitError
from ..presets import TrainConfig, default
from ..rundir import SweepDir, atomic_write
from ..train.budget import format_seconds, parse_budget
from ..train.trial import Cost, Report, TrialOutcome, measure_cost, train_final, train_trial
from . import study as studies
from .space import Space, default_space

MIN_TRIALS = 2        # a sweep is at least this many trials beside its final training
TRIAL_SHARE = 5       # a trial's budget is at most this share of what is left: 4 whole trials and the final
RESERVE = 0.02        # of the budget kept against the clock's noise (a training may end a little past its plan)
STARTUP_TRIALS = 2    # no trial is pruned before this many have finished: the first ones set the bar
FIRST_FAILS = 3       # a sweep stops when its first trials all fail (the recipe or the machine is wrong, not a setting)
VAL_SIZE = default("val_size")  # images a trial holds out when the recipe holds out none


@dataclass(frozen=True)
class Trainer:
    """What a sweep trains with: `fit` through train/trial.py, or stand-ins (a test's)."""
    measure: Callable[[TrainConfig], Cost] = measure_cost
    trial: Callable[[TrainConfig, Report], TrialOutcome] = train_trial
    final: Callable[[TrainConfig, bool], tuple[Any, dict]] = train_final


@dataclass
class SweepResult:
    sweep: SweepDir
    study: Any                   # the Optuna study
    trial_budget: float          # seconds of each trial
    best: Any                    # the best finished trial (optuna FrozenTrial)
    best_config: TrainConfig     # its setting as the final training runs it
    final_run: Path | None       # the final training's run directory, when this worker trained it
    final_results: dict | None   # its results.json
    report: Path | None


class TrialFailed(Exception):
    """A trial's training stopped with an error of its own (e.g. a loss that became nan)."""


def pruner():
    """Successive halving (Optuna's) on the epochs' validation accuracy, quiet until STARTUP_TRIALS
    trials have finished."""
    optuna = studies.optuna()

    class AfterStartup(optuna.pruners.BasePruner):
        def __init__(self):
            self.halving = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)

        def prune(self, study, trial) -> bool:
            stop = self.halving.prune(study, trial)  # records the trial's value at its rung either way
            done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            return stop and len(done) >= STARTUP_TRIALS

    return AfterStartup()


def plan_trials(budget: float, spent: float, cost: Cost, asked: float | None = None) -> float:
    """Seconds of each trial in a sweep of `budget` seconds of which `spent` are gone (the final
    training is as long, plus its test); one line when fewer than MIN_TRIALS trials and the final fit."""
    least = cost.least()
    if asked is not None and asked < least:
        raise CifarkitError(f"a trial budget of {format_seconds(asked)} is less than one epoch of this recipe here "
                            f"({format_seconds(least)} with its start)")
    left = budget * (1 - RESERVE) - spent
    seconds = asked if asked is not None else max(least, min(cost.recipe, left / TRIAL_SHARE))
    need = (MIN_TRIALS + 1) * seconds + cost.test
    if need > left:
        raise CifarkitError(f"a sweep budget of {format_seconds(budget)} leaves {format_seconds(max(left, 0))} here, "
                            f"too little for {MIN_TRIALS} trials and the final training of {format_seconds(seconds)} "
                            f"each (one epoch takes {format_seconds(cost.epoch)}); give at least about "
                            f"--time-budget {format_seconds((need + spent) / (1 - RESERVE))}")
    return seconds


def trial_setting(base: TrainConfig, space: Space, values: dict, seconds: float, out: Path, val_size: int) -> TrainConfig:
    """The recipe with a trial's (or the final's) values, budget, validation split and run directory."""
    cfg = space.apply(base, values)
    return dataclasses.replace(cfg, time_budget=f"{seconds:.1f}s", val_size=val_size, plan={},
                               out=str(out) if out else None)


def _values(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


@contextmanager
def _optuna_quiet():
    """Optuna's own lines off for the length of the sweep: the sweep prints its own."""
    studies.optuna()  # its import sets its logger's level: first
    logger = logging.getLogger("optuna")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check_base(base: TrainConfig, space: Space) -> None:
    from ..train.fit import validate
    validate(base)
    if base.lr == "auto" and "lr" not in space.names:
        raise CifarkitError("this recipe's lr is 'auto' (an LR range test in every trial): give lr a range in "
                            "the search space, or pass --lr")
    if base.devices not in ("auto", 1, [0]) or base.num_nodes > 1:
        raise CifarkitError("a sweep's trainings run on one device each: run one worker per device "
                            "(the same command, with CUDA_VISIBLE_DEVICES set per worker)")


def run_sweep(base: TrainConfig, budget: str, out: str | Path, space: Space | None = None,
              storage: str | None = None, study_name: str | None = None, trial_budget: str | None = None,
              trainer: Trainer = Trainer(), clock: Callable[[], float] = time.time, started: float | None = None,
              seed: int | None = None, heartbeat: int = studies.HEARTBEAT, report: bool = True) -> SweepResult:
    """Sweep `space` around the recipe `base` for `budget` ('1h', '90m'), then train the best
    setting once on all the training images. `storage`/`study_name`: the shared study to join
    (default: a journal file in `out`, study 'sweep'). `started`: the clock() the budget counts from."""
    with _optuna_quiet():
        return _sweep(base, budget, out, space, storage, study_name, trial_budget, trainer, clock,
                      clock() if started is None else started, seed, heartbeat, report)


def _sweep(base, budget, out, space, storage, study_name, trial_budget, trainer, clock, start, seed, heartbeat,
           report) -> SweepResult:
    total = parse_budget(budget)
    space = space or default_space(base)
    check_base(base, space)
    asked = parse_budget(trial_budget) if trial_budget else None
    if storage and not study_name:
        raise CifarkitError("--storage needs --study NAME: the study every worker joins")
    sweep = SweepDir.create(out)
    where = storage or str(sweep.journal)
    _mark(sweep, studies.shown(where) if studies.is_url(where) else str(Path(where).resolve()), study_name or "sweep")
    store = studies.open_storage(where, heartbeat)
    name = study_name or "sweep"
    deadline = start + total * (1 - RESERVE)
    known = studies.known_budget(store, name, base, space)  # a study to join: its settings first
    if known is not None and asked is not None and abs(asked - known) > 0.5:
        log.warning(f"notice: study '{name}' runs trials of {format_seconds(known)}; --trial-budget is ignored")

    cost = trainer.measure(base)
    log.info(f"sweep: a training here starts in {cost.startup:.0f} s, an epoch takes {cost.epoch:.0f} s and the "
             f"recipe's own length {format_seconds(cost.recipe)}")
    seconds = plan_trials(total, clock() - start, cost, known if known is not None else asked)
    study, seconds, created = studies.open_study(store, name, base, space, seconds, pruner(), seed)
    if not created and known is None:  # created by another worker meanwhile: its trials must fit here too
        plan_trials(total, clock() - start, cost, seconds)
    final_seconds = seconds + cost.test
    atomic_write(sweep.space_file, space.to_yaml_text())
    log.info(f"sweep: study '{name}' in {studies.shown(where)} ({'new' if created else 'joined'}), trials of "
             f"{format_seconds(seconds)}, the final training {format_seconds(final_seconds)}, budget "
             f"{format_seconds(total)}")

    val_size = base.val_size or VAL_SIZE
    ran: list[str] = []  # the states of this worker's trials

    def objective(trial) -> float:
        values = space.suggest(trial)
        cfg = trial_setting(base, space, values, seconds, sweep.trial(trial.number), val_size)
        for key, value in {"budget_seconds": seconds, "worker": studies.WORKER,
                           "run_dir": str(sweep.trial(trial.number))}.items():
            trial.set_user_attr(key, value)
        log.info(f"trial {trial.number}: {_values(values)}")

        def report(epoch: int, acc: float, last: bool) -> bool:
            trial.report(acc, epoch)
            return not last and trial.should_prune()

        try:
            outcome = trainer.trial(cfg, report)
        except CifarkitError as exc:
            trial.set_user_attr("failed", str(exc).splitlines()[0])
            raise TrialFailed(str(exc)) from None
        trial.set_user_attr("planned_epochs", outcome.planned_epochs)
        trial.set_user_attr("epochs", outcome.epochs)
        trial.set_user_attr("seconds", round(outcome.seconds, 1))
        if outcome.val_acc is None or math.isnan(outcome.val_acc):
            trial.set_user_attr("failed", "no validation accuracy")
            raise TrialFailed("no validation accuracy")
        if outcome.stopped_at:
            trial.set_user_attr("pruned_at", outcome.stopped_at)
            raise studies.optuna().TrialPruned(f"pruned after epoch {outcome.stopped_at}")
        return outcome.val_acc

    def after(study, frozen) -> None:
        state = frozen.state.name.lower()
        ran.append(state)
        what = {"complete": f"val accuracy {frozen.value:.2%}" if frozen.value is not None else "complete",
                "pruned": f"pruned after epoch {frozen.user_attrs.get('pruned_at', '?')}",
                "fail": f"failed: {frozen.user_attrs.get('failed', 'see the log')}"}.get(state, state)
        log.info(f"trial {frozen.number} {what}; {_progress(study)}, {format_seconds(max(deadline - clock(), 0))} left")
        if clock() + seconds + final_seconds > deadline or _all_failed(ran):
            study.stop()

    studies.fail_stale(study)
    if clock() + seconds + final_seconds <= deadline:
        study.optimize(objective, callbacks=[after], catch=(TrialFailed,))
    studies.fail_stale(study)
    if _all_failed(ran):
        last = study.trials[-1].user_attrs.get("failed", "")
        raise CifarkitError(f"the sweep stopped: its first {FIRST_FAILS} trials failed (the last: {last})")
    return _finish(study, store, name, sweep, base, space, seconds, final_seconds, cost, trainer, clock, deadline,
                   report)


def _all_failed(states: list[str]) -> bool:
    return len(states) >= FIRST_FAILS and set(states) == {"fail"}


def _mark(sweep: SweepDir, where: str, name: str) -> None:
    """SWEEP/study.json: the study this folder's trials belong to (trial folders are numbered per study)."""
    mine = {"storage": where, "study": name}
    if sweep.study_file.is_file():
        theirs = json.loads(sweep.study_file.read_text())
        if theirs != mine:
            raise CifarkitError(f"{sweep.path} holds the trials of study '{theirs.get('study')}' in "
                                f"{theirs.get('storage')}; choose another --out for study '{name}' in {where}")
    atomic_write(sweep.study_file, json.dumps(mine))


def _progress(study) -> str:
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    done = sum(s in ("COMPLETE", "PRUNED", "FAIL") for s in states)
    running = states.count("RUNNING")
    best = next((f"best {study.best_value:.2%} (trial {study.best_trial.number})" for _ in [0]
                 if "COMPLETE" in states), "none finished yet")
    return (f"{done} trials done ({states.count('PRUNED')} pruned, {states.count('FAIL')} failed"
            + (f", {running} running" if running else "") + f"), {best}")


def _finish(study, store, name: str, sweep: SweepDir, base: TrainConfig, space: Space, seconds: float,
            final_seconds: float, cost: Cost, trainer: Trainer, clock, deadline: float, report: bool) -> SweepResult:
    """The final training of the best setting (when this worker claims it), the report."""
    try:
        best = study.best_trial
    except ValueError:
        raise CifarkitError("no trial finished within the budget: give the sweep more time (--time-budget)") from None
    final_dir = sweep.final(best.number)
    best_config = trial_setting(base, space, best.params, final_seconds, final_dir, 0)
    log.info(f"best: trial {best.number}, val accuracy {best.value:.2%}: {_values(best.params)}")
    mine, claim = studies.claim_final(store, name, best.number, final_dir)
    final_run = final_results = failed = None
    left = deadline - clock()
    if not mine:
        done = f"tested: {claim['test_acc']:.2%}" if "test_acc" in claim else "training"
        log.info(f"final training of trial {best.number}: another worker's ({claim.get('host')}:{claim.get('dir')}, {done})")
    elif left < cost.least() + cost.test:
        log.warning(f"notice: {format_seconds(max(left, 0))} left, too little for the final training; replay the "
                    f"best setting with `cifarkit train --config {sweep.best_config}`")
    else:
        resume = (Path(final_dir) / "config.yaml").is_file()
        cfg = best_config if left >= final_seconds else dataclasses.replace(best_config, time_budget=f"{left:.1f}s")
        log.info(f"final training of trial {best.number}'s setting on all the training images "
                 f"({format_seconds(min(left, final_seconds))}){', resumed' if resume else ''}")
        try:
            final_run, final_results = trainer.final(cfg, resume)
        except CifarkitError as exc:
            failed = f"the final training stopped: {str(exc).splitlines()[0]}"
        else:
            studies.record_final(store, name, best.number, final_results)
    page = None
    if report:
        from .report import write_sweep_report
        page = write_sweep_report(study, store, sweep, dataclasses.replace(best_config, out=None, plan={}))
    if failed:
        raise CifarkitError(f"{failed}; the report is written, and `cifarkit train --config {sweep.best_config}` "
                            "trains the best setting")
    return SweepResult(sweep, study, seconds, best, best_config, Path(final_run) if final_run else None,
                       final_results, page)
