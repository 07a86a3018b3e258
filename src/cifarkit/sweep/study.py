"""Where a sweep's Optuna study lives, who may join it, and which worker trains the final model.

`--storage WHERE` is a file path (an Optuna journal file: safe for several processes on one
machine; the default is `study.journal` in the sweep's folder) or an SQLAlchemy database URL
(`postgresql://user@host/db`, `mysql+pymysql://...`) that workers on several machines reach. Each
worker runs the same command; the study remembers the recipe, the search space and the trials'
budget it was created with, and a worker that brings another is refused in one line.

A running trial beats a heartbeat into the storage; a trial whose heartbeat stops (its worker was
killed) is marked failed by the next worker that starts a trial, or by the same command run again,
which resumes the study. Optuna's database storage has that heartbeat built in; its journal file
does not yet (optuna#6615), so `JournalStorage` gets the same few methods here, the beat kept as a
system attribute of the trial.

The final training of the best setting is claimed by creating a study named `NAME:final-N` (N: the
best trial's number): creating a study is atomic in both storages, so one worker trains it; the
claim then records where its run is and, when tested, its test accuracy.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..errors import CifarkitError
from ..presets import TrainConfig
from .space import Space

HEARTBEAT = 30        # seconds between a running trial's beats
GRACE = 3             # a trial is failed after this many beats missed
BEAT = "cifarkit:heartbeat"  # the journal's beat: a system attribute of the trial (time.time())
WORKER = f"{socket.gethostname()}:{os.getpid()}"
# what a study remembers (user attributes), and what a worker that joins must share
RECIPE, SPACE, TRIAL_BUDGET = "cifarkit.recipe", "cifarkit.space", "cifarkit.trial_budget"
# settings a worker may have of its own: where the data and the outputs are, the machine it runs on
OWN_SETTINGS = {"data", "data_name", "out", "accelerator", "devices", "num_nodes", "strategy", "num_workers",
                "logger", "time_budget", "plan", "precision", "compile", "check_every_steps", "eval_batch_size"}
CONNECT_TIMEOUT = 15  # seconds a database server has to answer
JOIN_WAIT = 10.0      # seconds a joining worker waits for the creator to record the study's settings


def optuna():
    """Optuna, or one line saying how to install it (it is an extra)."""
    try:
        import optuna as module
    except ImportError:
        raise CifarkitError("cifarkit sweep needs Optuna: pip install 'cifarkit[sweep]'") from None
    return module


@contextmanager
def _quiet():
    """Optuna's experimental-feature warnings (the heartbeat, the plots), for the length of a call."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna().exceptions.ExperimentalWarning)
        yield


def is_url(where: str) -> bool:
    return "://" in where


def shown(where: str) -> str:
    """WHERE as a message may show it: a database URL without its password."""
    if not is_url(where):
        return where
    try:
        from sqlalchemy.engine import make_url
        return make_url(where).render_as_string(hide_password=True)
    except Exception:
        return where.split("://", 1)[0] + "://..."


@functools.cache
def _journal_class():
    from optuna.storages import JournalStorage
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    class HeartbeatJournal(JournalStorage, BaseHeartbeat):
        """A journal file whose running trials beat, as Optuna's database storage does."""

        def __init__(self, backend, heartbeat: int):
            super().__init__(backend)
            self.heartbeat = heartbeat

        def record_heartbeat(self, trial_id: int) -> None:
            self.set_trial_system_attr(trial_id, BEAT, time.time())

        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            now, grace = time.time(), GRACE * self.heartbeat
            running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
            return [t._trial_id for t in running
                    if now - t.system_attrs.get(BEAT, t.datetime_start.timestamp()) > grace]

        def get_heartbeat_interval(self) -> int:
            return self.heartbeat

        def get_heartbeat_stale_trial_callback(self):
            return None

    return HeartbeatJournal


def open_storage(where: str, heartbeat: int = HEARTBEAT):
    """The Optuna storage WHERE names, with heartbeats; one line when it cannot be opened or reached."""
    optuna()
    if is_url(where):
        try:
            return _database(where, heartbeat)
        except ImportError as exc:
            raise CifarkitError(f"the storage {shown(where)} needs a database driver that is not installed "
                                "(PostgreSQL: pip install 'psycopg[binary]', as in the sweep extra; MySQL: pip install "
                                "pymysql and write mysql+pymysql://...)") from None
        except Exception as exc:  # SQLAlchemy's errors: the server, the network, the URL, the credentials
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CifarkitError(f"cannot reach the study storage {shown(where)}: {first} (check the URL, that the "
                                "server is up and that this machine may connect)") from None
    from optuna.storages.journal import JournalFileBackend
    path = Path(where)
    if not path.parent.is_dir():
        raise CifarkitError(f"the study storage {path}: its folder {path.parent} does not exist")
    try:
        return _journal_class()(JournalFileBackend(str(path)), heartbeat)
    except OSError as exc:
        raise CifarkitError(f"cannot open the study storage {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # a file that is not a journal
        raise CifarkitError(f"{path} is not an Optuna journal file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                            "give another --storage") from None


def _database(url: str, heartbeat: int, tries: int = 5):
    """Optuna's database storage. Workers that start together on a new database race to create its
    tables: the ones that lose find them made, a moment later."""
    from optuna.storages import RDBStorage
    from sqlalchemy.exc import IntegrityError, ProgrammingError
    engine = {"pool_pre_ping": True}
    if url.startswith(("postgresql", "mysql")):  # a host that does not answer: one line, not minutes of silence
        engine["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT}
    for attempt in range(tries):
        try:
            with _quiet():
                return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=GRACE * heartbeat,
                                  engine_kwargs=engine)
        except (IntegrityError, ProgrammingError):
            if attempt == tries - 1:
                raise
            time.sleep(1.0 + attempt)


def _recipe(cfg: TrainConfig) -> dict:
    """The settings every worker of a study shares, as the storage keeps them (JSON)."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in OWN_SETTINGS}))


def sampler(seed: int | None = None):
    """TPE after a few random trials; with several workers each pretends the running trials did
    badly (constant liar), so that they do not all draw the same point."""
    with _quiet():
        return optuna().samplers.TPESampler(n_startup_trials=5, seed=seed, constant_liar=True)


def open_study(storage, name: str, cfg: TrainConfig, space: Space, trial_budget: float, pruner, seed=None):
    """Create the study, or join it: (study, the trials' budget in seconds, created?). A study made by
    something else, or with another recipe or search space, is one line."""
    opt = optuna()
    try:
        study = opt.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler(seed),
                                 pruner=pruner)
    except opt.exceptions.DuplicatedStudyError:
        study = opt.load_study(storage=storage, study_name=name, sampler=sampler(seed), pruner=pruner)
        return study, _join(study, name, cfg, space), False
    study.set_user_attr(RECIPE, _recipe(cfg))
    study.set_user_attr(SPACE, space.key())
    study.set_user_attr(TRIAL_BUDGET, trial_budget)  # last: a joining worker waits for it
    return study, trial_budget, True


def known_budget(storage, name: str, cfg: TrainConfig, space: Space) -> float | None:
    """The trials' budget of study `name` when it exists (checked against this worker's recipe and
    space, before anything is measured), or None for a study still to be created."""
    opt = optuna()
    if name not in opt.get_all_study_names(storage):
        return None
    return _join(opt.load_study(storage=storage, study_name=name), name, cfg, space)


def _join(study, name: str, cfg: TrainConfig, space: Space) -> float:
    """The study's trial budget, once its settings are known to match this worker's."""
    deadline = time.monotonic() + JOIN_WAIT
    while TRIAL_BUDGET not in (attrs := study.user_attrs):  # its creator is writing them, or it is not ours
        if time.monotonic() > deadline:
            raise CifarkitError(f"study '{name}' was not created by cifarkit sweep (it records no recipe); "
                                "choose another --study")
        time.sleep(0.5)
    theirs, ours = attrs[RECIPE], _recipe(cfg)
    if theirs.get("preset") != ours["preset"]:
        raise CifarkitError(f"study '{name}' was created for the {theirs.get('preset')} preset, not {ours['preset']}: "
                            f"run with --preset {theirs.get('preset')}, or choose another --study")
    differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    if differ:
        k = differ[0]
        raise CifarkitError(f"study '{name}' was created with another recipe: {k} is {theirs.get(k)!r} there and "
                            f"{ours.get(k)!r} here{f' ({len(differ) - 1} more differ)' if len(differ) > 1 else ''}; "
                            "give the same flags, or choose another --study")
    if attrs[SPACE] != space.key():
        raise CifarkitError(f"study '{name}' was created with another search space ({attrs[SPACE]}); "
                            "give the same --space, or choose another --study")
    return float(attrs[TRIAL_BUDGET])


def fail_stale(study) -> None:
    """Mark failed the running trials whose heartbeat stopped (their worker was killed)."""
    with _quiet():
        optuna().storages.fail_stale_trials(study)


# -- the final training ---------------------------------------------------------------------------


def final_name(name: str, number: int) -> str:
    return f"{name}:final-{number}"


def claim_final(storage, name: str, number: int, run_dir: Path) -> tuple[bool, dict]:
    """(this worker trains the final of trial `number`?, the claim's record). A claim left by this
    same folder on this machine (a run that was stopped) is this worker's again."""
    opt = optuna()
    here = {"host": socket.gethostname(), "dir": str(Path(run_dir).resolve())}
    try:
        claim = opt.create_study(storage=storage, study_name=final_name(name, number), direction="maximize")
    except opt.exceptions.DuplicatedStudyError:
        claim = opt.load_study(storage=storage, study_name=final_name(name, number))
        deadline = time.monotonic() + JOIN_WAIT
        while "dir" not in claim.user_attrs and time.monotonic() < deadline:
            time.sleep(0.5)
            claim = opt.load_study(storage=storage, study_name=final_name(name, number))
        record = dict(claim.user_attrs)
        mine = {k: record.get(k) for k in here} == here and "test_acc" not in record
        return mine, record
    for k, v in {**here, "worker": WORKER}.items():
        claim.set_user_attr(k, v)
    return True, dict(claim.user_attrs)


def record_final(storage, name: str, number: int, results: dict) -> None:
    claim = optuna().load_study(storage=storage, study_name=final_name(name, number))
    for k in ("test_acc", "test_loss", "seconds", "epochs"):
        if results.get(k) is not None:
            claim.set_user_attr(k, results[k])


def finals(storage, name: str) -> dict[int, dict]:
    """Every final training of the study: trial number -> its claim's record."""
    out = {}
    for s in optuna().get_all_study_summaries(storage, include_best_trial=False):
        if s.study_name.startswith(f"{name}:final-"):
            out[int(s.study_name.rsplit("-", 1)[1])] = dict(s.user_attrs)
    return out
