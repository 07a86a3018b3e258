"""Sweeps for real: worker processes sharing a journal file and a PostgreSQL server (started here),
a worker killed mid-trial, and one small sweep of real trainings from the command line. Slow: they
start processes and a server; the trainings of the workers are the fake trainer's (fake_trainer.py),
on real time."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port, make_image_folder
from fake_trainer import SPACE, FakeClock, FakeTrainer

from cifarkit.presets import preset_config
from cifarkit.rundir import RunDir, SweepDir
from cifarkit.sweep import study as studies

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow


def start_worker(out: Path, budget: str, storage: str, study: str, scale: float = 1.0, heartbeat: int = 1):
    """`fake_trainer.py` as its own process: a sweep of the fake trainer, a fake second `scale` s long."""
    return subprocess.Popen([sys.executable, str(HERE / "fake_trainer.py"), str(out), budget, storage, study,
                             str(scale), str(heartbeat)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(worker) -> str:
    stdout, stderr = worker.communicate(timeout=300)
    assert worker.returncode == 0, stderr[-3000:]
    return stderr


def check_two_workers_shared(storage: str, name: str, out: Path) -> None:
    study = studies.optuna().load_study(storage=studies.open_storage(storage), study_name=name)
    trials = study.trials
    workers = {t.user_attrs["worker"] for t in trials}
    assert len(workers) == 2, workers                                    # both took trials ...
    settings = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(settings)) == len(settings)                           # ... each its own
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    finals = studies.finals(studies.open_storage(storage), name)
    assert finals and all("test_acc" in r for r in finals.values())     # each best trained once, tested
    trained = [p for p in (out / "final").iterdir()]
    assert sorted(p.name for p in trained) == sorted(f"trial-{n:04d}" for n in finals)


def test_two_worker_processes_share_a_journal_file_and_run_distinct_trials(tmp_path):
    out, journal = tmp_path / "sweep", str(tmp_path / "shared.journal")
    workers = [start_worker(out, "30s", journal, "cifar") for _ in range(2)]
    logs = [finish(w) for w in workers]
    check_two_workers_shared(journal, "cifar", out)
    assert sum("final training of trial" in log for log in logs) >= 2  # one trains it, the other says whose


# -- a real PostgreSQL server ---------------------------------------------------------------------


def postgres_programs() -> Path:
    """The folder of Debian's PostgreSQL server programs (initdb, pg_ctl)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or \
        ([Path(shutil.which("initdb"))] if shutil.which("initdb") else [])
    if not found:
        pytest.fail("PostgreSQL's server programs (initdb, pg_ctl) are not installed: `make test` installs them "
                    "(Debian: apt-get install -y postgresql)")
    return found[-1].parent


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server of its own, on a free port of 127.0.0.1, for the length of this module. As
    root it runs as the `postgres` user that Debian's package creates (PostgreSQL refuses root)."""
    programs = postgres_programs()
    root = Path(tempfile.mkdtemp(prefix="cifarkit-pg-"))  # pytest's folders are root's alone
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()
    subprocess.run([*as_user, programs / "initdb", "-D", data, "-U", "cifarkit", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*as_user, programs / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60",
                    "-o", f"-p {port} -h 127.0.0.1 -k {root}", "start"], check=True, capture_output=True, timeout=120)
    try:
        yield f"postgresql://cifarkit@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, programs / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_a_study_in_a_postgresql_server(tmp_path, postgres_url):
    outs = [tmp_path / "machine-a", tmp_path / "machine-b"]  # as on two machines: each its own folder
    workers = [start_worker(out, "30s", postgres_url, "cifar-pg") for out in outs]
    logs = [finish(w) for w in workers]
    study = studies.optuna().load_study(storage=postgres_url, study_name="cifar-pg")
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    settings = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(settings)) == len(settings)
    finals = studies.finals(studies.open_storage(postgres_url), "cifar-pg")
    trained = [p.name for out in outs if (out / "final").is_dir() for p in (out / "final").iterdir()]
    assert sorted(trained) == sorted(f"trial-{n:04d}" for n in finals) and finals
    assert all("test_acc" in r for r in finals.values()) and sum("final training" in log for log in logs) >= 2


def test_a_study_created_elsewhere_with_another_space_is_refused_by_the_server(tmp_path, postgres_url):
    from cifarkit.errors import CifarkitError
    from cifarkit.sweep.run import run_sweep
    from cifarkit.sweep.space import parse_space
    cfg = preset_config("fast")
    fake = FakeTrainer(FakeClock())
    run_sweep(cfg, "30m", tmp_path / "a", parse_space(SPACE, cfg), postgres_url, "other", trainer=fake.bundle(),
              clock=fake.clock, report=False)
    with pytest.raises(CifarkitError, match="another search space"):
        run_sweep(cfg, "30m", tmp_path / "b", parse_space({"lr": {"low": 0.1, "high": 1.0}}, cfg), postgres_url,
                  "other", trainer=FakeTrainer(FakeClock()).bundle(), clock=fake.clock, report=False)


# -- a worker killed mid-trial -------------------------------------------------------------------


def test_a_killed_workers_trial_is_marked_failed_and_the_study_goes_on(tmp_path):
    from cifarkit.sweep.run import run_sweep
    from cifarkit.sweep.space import parse_space
    out = tmp_path / "sweep"
    journal = str(SweepDir(out).journal)
    worker = start_worker(out, "120s", journal, "sweep", scale=2.0)  # trials of 10 s
    deadline = time.monotonic() + 120
    running = []
    try:
        while not running and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.5)
            storage = studies.open_storage(journal) if Path(journal).is_file() else None
            if storage and "sweep" in studies.optuna().get_all_study_names(storage):
                study = studies.optuna().load_study(storage=storage, study_name="sweep")
                running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"
                           and studies.BEAT in t.system_attrs]
    finally:
        worker.send_signal(signal.SIGKILL)  # mid-trial (and never left running)
        worker.communicate(timeout=60)
    assert running, "the worker never started a trial"
    killed = running[0].number
    time.sleep(studies.GRACE * 1 + 1)  # its heartbeat is now older than the grace period
    # the same command again (the fake trainer's, in this process): it goes on with the study
    cfg = preset_config("quick")
    fake = FakeTrainer(FakeClock(), startup=1.0, epoch=1.0, test=1.0, epochs=4)
    r = run_sweep(cfg, "60s", out, parse_space(SPACE, cfg), trainer=fake.bundle(), clock=fake.clock, heartbeat=1,
                  report=False)
    states = {t.number: t.state.name for t in r.study.trials}
    assert states[killed] == "FAIL"
    assert min(n for n in states if n > killed) == killed + 1 and list(states.values()).count("COMPLETE") >= 2
    assert len(fake.finals) == 1


# -- one small sweep of real trainings ----------------------------------------------------------------


def test_a_small_real_sweep_ends_within_its_budget_with_a_report_and_a_replayable_best(tmp_path, capsys):
    """`cifarkit sweep` on a toy ImageFolder (4 classes, 180 training images) and a narrow fast net:
    real budgeted trials, validated and never tested, the final training tested once, the report,
    the best setting's config.yaml."""
    import dataclasses

    from cifarkit.cli import build_parser, config_from_args, main
    data = make_image_folder(tmp_path / "data", n_train=45, n_test=25)
    recipe = preset_config("quick", data=str(data), val_size=40, batch_size=16, tta=0, eval_batch_size=100)
    recipe = dataclasses.replace(recipe, model_kwargs={**recipe.model_kwargs, "widths": [16, 32, 32]})
    recipe.to_yaml(tmp_path / "recipe.yaml")
    out = tmp_path / "sweep"
    budget = 150  # trials of 30 s: on a busy machine a few timed steps can be off several times over
    start = time.time()
    code = main(["sweep", "--config", str(tmp_path / "recipe.yaml"), "--time-budget", f"{budget}s",
                 "--trial-budget", "30s", "--out", str(out)])
    seconds = time.time() - start
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert seconds <= budget * 1.1, seconds  # a shared machine's clock noise aside, within its budget
    sweep = SweepDir(out)
    trials = sorted(sweep.trials_dir.iterdir())
    assert len(trials) >= 2
    for t in trials:
        res = RunDir(t).read_results()
        if res is not None:  # a trial that finished its run directory: validated, never tested
            assert res.test_acc is None and res.val_acc is not None and res.val_images == 40
        assert not RunDir(t).checkpoints.exists()
    finals = list(sweep.finals_dir.iterdir())
    assert len(finals) == 1
    final = RunDir(finals[0]).read_results()
    assert final.test_acc is not None and final.val_images == 0 and final.train_images == 180
    assert RunDir(finals[0]).read_config().model_kwargs["widths"] == [16, 32, 32]
    page = (sweep.report_dir / "index.html").read_text()
    assert "Best setting" in page and "Final training" in page
    best = captured.out.split("best: trial ", 1)[1].split(",", 1)[0]
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(sweep.best_config)]))
    trial_cfg = RunDir(sweep.trial(int(best))).read_config()
    assert (cfg.lr, cfg.weight_decay, cfg.muon_lr, cfg.label_smoothing) == \
        (trial_cfg.lr, trial_cfg.weight_decay, trial_cfg.muon_lr, trial_cfg.label_smoothing)
    assert cfg.val_size == 0 and cfg.data == str(data)
