"""cifarkit sweep on a fake trainer and a fake clock: the search space, the trials' budget, pruning,
the study's checks, the final training, the report and the replayable best setting."""
from __future__ import annotations

import time

import pytest
import yaml

from cifarkit.errors import CifarkitError
from cifarkit.presets import TrainConfig, preset_config
from cifarkit.rundir import SweepDir
from cifarkit.train.budget import MARGIN
from cifarkit.sweep import study as studies
from cifarkit.sweep.run import MIN_TRIALS, VAL_SIZE, plan_trials, run_sweep
from cifarkit.sweep.space import default_space, load_space, parse_space
from cifarkit.train.budget import parse_budget
from cifarkit.train.trial import Cost
from fake_trainer import BEST_LR, BEST_SMOOTHING, SPACE, FakeClock, FakeTrainer

FAST = preset_config("fast")


def sweep(tmp_path, budget="3h", space=SPACE, fake=None, cfg=FAST, **kw):
    clock = fake.clock if fake else FakeClock()
    fake = fake or FakeTrainer(clock)
    kw.setdefault("report", False)
    result = run_sweep(cfg, budget, tmp_path / "sweep", parse_space(space, cfg), trainer=fake.bundle(),
                       clock=clock, seed=0, **kw)
    return result, fake


# -- the search space -------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["fast", "quick", "seed"])
def test_each_presets_default_space_prints_as_yaml_that_reads_back_the_same(preset, tmp_path):
    cfg = preset_config(preset)
    space = default_space(cfg)
    assert len(space.params) >= 3 and "lr" in space.names
    (tmp_path / "space.yaml").write_text(space.to_yaml_text())
    assert load_space(tmp_path / "space.yaml", cfg).key() == space.key()
    lr = next(p for p in space.params if p.name == "lr")
    if cfg.lr != "auto":  # around the preset's own rate
        assert lr.low < cfg.lr < lr.high and lr.log


@pytest.mark.parametrize("space, message", [
    ({"lrr": {"low": 0.1, "high": 1}}, "unknown setting 'lrr' (did you mean 'lr'?)"),
    ({"seed": [0, 1]}, "'seed' says where or how a run happens"),
    ({"val_size": [1000, 5000]}, "'val_size' says where or how"),
    ({"lr": {"low": 1.0, "high": 0.1}}, "low 1.0 is not below high 0.1"),
    ({"lr": {"low": 0.0, "high": 1.0, "log": True}}, "log scale needs low > 0"),
    ({"lr": []}, "empty list of values"),
    ({"lr": 0.3}, "needs a range"),
    ({"lr": {"low": 0.1}}, "takes low, high"),
    ({"lr": {"low": 0.1, "high": 1, "sigma": 2}}, "takes low, high"),
    ({"nesterov": {"low": 0, "high": 1}}, "is not a number"),
    ({"batch_size": {"low": 1.5, "high": 8}}, "whole number"),
    ({"augment": [1, 2]}, "is a group of settings"),
    ({"augment.nope": [1, 2]}, "unknown setting 'augment.nope'"),
    ({"augment.pad": [0, 2], "augment": [1]}, "is a group of settings"),
    ({"schedule": ["cosine", "bogus"]}, "schedule = 'bogus' is refused"),
    ({"muon_lr": {"low": -0.1, "high": 0.1}}, "muon_lr = -0.1 is refused: --muon-lr must be >= 0"),
    ({}, "is empty"),
    ([1, 2], "must map settings to ranges"),
])
def test_a_bad_search_space_is_one_line(space, message):
    with pytest.raises(CifarkitError) as info:
        parse_space(space, FAST)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_empty_or_missing_space_file_is_one_line(tmp_path):
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(CifarkitError, match="is empty"):
        load_space(tmp_path / "empty.yaml", FAST)
    with pytest.raises(CifarkitError, match="does not exist"):
        load_space(tmp_path / "nope.yaml", FAST)
    (tmp_path / "bad.yaml").write_text("lr: {low: [\n")
    with pytest.raises(CifarkitError, match="not valid YAML"):
        load_space(tmp_path / "bad.yaml", FAST)


def test_numbers_that_yaml_reads_as_words_are_numbers(tmp_path):
    (tmp_path / "space.yaml").write_text("weight_decay: {low: 1e-4, high: 1e-2, log: true}\nlr: [3e-1, 0.5]\n")
    space = load_space(tmp_path / "space.yaml", FAST)
    assert space.to_dict() == {"weight_decay": {"low": 1e-4, "high": 1e-2, "log": True}, "lr": [0.3, 0.5]}


def test_a_key_of_a_dict_setting_is_set_and_the_rest_of_it_kept():
    space = parse_space({"augment.pad": [0, 4], "model_kwargs.bn_momentum": {"low": 0.2, "high": 0.6}}, FAST)
    cfg = space.apply(FAST, {"augment.pad": 4, "model_kwargs.bn_momentum": 0.3})
    assert cfg.augment == {**FAST.augment, "pad": 4}
    assert cfg.model_kwargs == {**FAST.model_kwargs, "bn_momentum": 0.3}
    assert parse_space({"batch_size": {"low": 128, "high": 512, "step": 128}}, FAST).params[0].integer


# -- the budget -------------------------------------------------------------------------------------

COST = Cost(startup=10, epoch=60, recipe=550, test=20)


def test_trials_run_the_recipes_length_or_a_fifth_of_what_is_left_and_at_least_one_epoch():
    assert plan_trials(10_000, 30, COST) == 550                         # time enough: the recipe's own length
    assert plan_trials(2000, 40, COST) == pytest.approx((2000 * 0.98 - 40) / 5)  # four whole trials and the final
    least = COST.least()
    assert least == pytest.approx(70 / (1 - MARGIN))                 # one epoch and the start, the planner's reserve kept
    tight = (3 * least + 20 + 30) / 0.98
    assert plan_trials(tight, 30, COST) == pytest.approx(least)       # two trials and the final, one epoch each
    assert plan_trials(5000, 30, COST, asked=300) == 300


def test_a_budget_too_small_for_two_trials_says_the_least_that_fits():
    with pytest.raises(CifarkitError) as info:
        plan_trials(3 * COST.least(), 30, COST)
    assert f"too little for {MIN_TRIALS} trials" in str(info.value) and "\n" not in str(info.value)
    least = parse_budget(str(info.value).rsplit("--time-budget ", 1)[1])
    plan_trials(least, 30, COST)  # what it says is enough
    with pytest.raises(CifarkitError, match="less than one epoch"):
        plan_trials(5000, 30, COST, asked=30)


def test_a_too_small_budget_is_refused_before_any_training(tmp_path):
    with pytest.raises(CifarkitError, match="too little for 2 trials") as info:
        _, fake = sweep(tmp_path, budget="3m")
    assert "\n" not in str(info.value)


# -- a whole sweep on the fake clock ----------------------------------------------------------------


def test_a_sweep_finds_the_optimum_region_and_ends_within_its_budget(tmp_path):
    clock = FakeClock()
    fake = FakeTrainer(clock)
    start = clock()
    r, _ = sweep(tmp_path, budget="3h", fake=fake)
    assert clock() - start <= parse_budget("3h")                   # trials, the final and its test
    assert clock() - start > 0.9 * parse_budget("3h")              # and little of it unused
    trials = r.study.trials
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") >= 4 and states.count("PRUNED") >= 5, states
    assert len(fake.trials) == len(trials)
    # the optimum region: the best is near where the fake accuracy peaks, better than the first (random) ones
    assert 0.5 * BEST_LR < r.best.params["lr"] < 2 * BEST_LR
    assert abs(r.best.params["label_smoothing"] - BEST_SMOOTHING) < 0.06
    assert r.best.value > max(t.value for t in trials[:2]) and r.best.value > 0.88
    # trials are budgeted alike, validated on held-out images; the pruned ones stopped early
    assert {c.time_budget for c in fake.trials} == {f"{r.trial_budget:.1f}s"} and r.trial_budget == 550
    assert {c.val_size for c in fake.trials} == {VAL_SIZE}     # the fast preset holds none out: trials do
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert all(t.user_attrs["pruned_at"] == t.last_step < t.user_attrs["planned_epochs"] for t in pruned)
    # the final: the best setting on all the training images, tested once
    (final, resume), = fake.finals
    assert final.val_size == 0 and not resume and final.lr == r.best.params["lr"]
    assert parse_budget(final.time_budget) == r.trial_budget + COST.test
    assert r.final_results["test_acc"] > 0.8 and r.final_run == SweepDir(tmp_path / "sweep").final(r.best.number)


def test_no_trial_is_pruned_before_two_have_finished(tmp_path):
    r, _ = sweep(tmp_path, budget="1h")
    assert [t.state.name for t in r.study.trials[:2]] == ["COMPLETE", "COMPLETE"]


def test_a_diverging_trial_fails_and_the_sweep_goes_on(tmp_path):
    clock = FakeClock()
    fake = FakeTrainer(clock)
    trial = fake.trial

    def diverging(cfg, report):
        if cfg.lr > 1:
            clock.advance(300)
            raise CifarkitError("loss became nan at step 12 (epoch 0); training stopped")
        return trial(cfg, report)
    fake.trial = diverging
    r, _ = sweep(tmp_path, budget="2h", fake=fake)
    failed = [t for t in r.study.trials if t.state.name == "FAIL"]
    assert failed and all(t.params["lr"] > 1 and "loss became nan" in t.user_attrs["failed"] for t in failed)
    assert r.best.params["lr"] < 1 and len(r.study.trials) > len(failed) + 3


def test_a_sweep_whose_first_trials_all_fail_stops_in_one_line(tmp_path):
    clock = FakeClock()
    fake = FakeTrainer(clock)

    def broken(cfg, report):
        clock.advance(5)
        raise CifarkitError("cannot write the run directory")
    fake.trial = broken
    with pytest.raises(CifarkitError, match="its first 3 trials failed .*cannot write the run directory"):
        sweep(tmp_path, fake=fake)
    assert len(fake.finals) == 0


def test_a_rerun_goes_on_with_the_study_and_trains_a_final_only_for_a_new_best(tmp_path):
    first, fake = sweep(tmp_path, budget="1h")
    n = len(first.study.trials)
    again, fake2 = sweep(tmp_path, budget="1h")
    assert len(again.study.trials) > n and again.study.trials[n].number == n
    assert again.trial_budget == first.trial_budget
    finals = studies.finals(studies.open_storage(str(SweepDir(tmp_path / "sweep").journal)), "sweep")
    assert first.best.number in finals and "test_acc" in finals[first.best.number]
    if again.best.number == first.best.number:  # the same best: already trained and tested
        assert fake2.finals == []
    else:
        assert len(fake2.finals) == 1 and again.best.number in finals


# -- the study: who may join --------------------------------------------------------------------------


def test_joining_with_another_space_preset_or_recipe_is_one_line(tmp_path):
    sweep(tmp_path, budget="1h")
    cases = [(dict(space={"lr": {"low": 0.1, "high": 1.0, "log": True}}), "another search space"),
             (dict(cfg=preset_config("quick")), "created for the fast preset, not quick"),
             (dict(cfg=preset_config("fast", batch_size=512)), "batch_size is 256 there and 512 here")]
    for kw, message in cases:
        fake = FakeTrainer(FakeClock())
        with pytest.raises(CifarkitError, match=message) as info:
            sweep(tmp_path, budget="1h", fake=fake, **kw)
        assert "\n" not in str(info.value) and fake.trials == [] and fake.measured == 0  # before anything runs


def test_an_unreachable_database_is_one_line_without_its_password():
    with pytest.raises(CifarkitError) as info:
        studies.open_storage("postgresql://cifarkit:s3cret@127.0.0.1:9/sweeps")
    text = str(info.value)
    assert text.startswith("cannot reach the study storage postgresql://cifarkit:***@127.0.0.1:9/sweeps")
    assert "s3cret" not in text and "\n" not in text
    with pytest.raises(CifarkitError, match="its folder .* does not exist"):
        studies.open_storage("/no/such/folder/study.journal")


def test_a_database_storage_needs_a_study_name(tmp_path):
    with pytest.raises(CifarkitError, match="--storage needs --study"):
        sweep(tmp_path, storage="sqlite:///" + str(tmp_path / "s.db"))


def test_an_sqlalchemy_url_holds_the_study(tmp_path):
    r, _ = sweep(tmp_path, budget="40m", storage="sqlite:///" + str(tmp_path / "s.db"), study_name="cifar")
    again = studies.optuna().load_study(storage="sqlite:///" + str(tmp_path / "s.db"), study_name="cifar")
    assert len(again.trials) == len(r.study.trials) and again.best_trial.number == r.best.number


def test_a_trial_whose_heartbeat_stopped_is_failed_and_the_study_goes_on(tmp_path):
    """A worker killed mid-trial leaves a running trial that nothing updates: once its heartbeat is
    older than the grace period, the next worker marks it failed (the killed process itself is
    test_sweep_workers')."""
    out = SweepDir.create(tmp_path / "sweep")
    space = parse_space(SPACE, FAST)
    store = studies.open_storage(str(out.journal), heartbeat=1)
    study, _, _ = studies.open_study(store, "sweep", FAST, space, 550.0, None)
    orphan = study.ask()
    store.record_heartbeat(orphan._trial_id)
    time.sleep(studies.GRACE * 1 + 0.5)
    r, _ = sweep(tmp_path, budget="1h", heartbeat=1)
    states = {t.number: t.state.name for t in r.study.trials}
    assert states[orphan.number] == "FAIL"
    assert list(states.values()).count("COMPLETE") >= 2


def test_the_sweeps_folder_belongs_to_one_study(tmp_path):
    sweep(tmp_path, budget="1h")
    with pytest.raises(CifarkitError, match="holds the trials of study 'sweep'"):
        sweep(tmp_path, budget="1h", storage=str(tmp_path / "other.journal"), study_name="other")


# -- what it writes -----------------------------------------------------------------------------------


def test_the_report_shows_the_study_and_the_best_config_replays_its_setting(tmp_path):
    from cifarkit.cli import build_parser, config_from_args
    r, _ = sweep(tmp_path, budget="1h", report=True)
    folder = SweepDir(tmp_path / "sweep")
    page = (folder.report_dir / "index.html").read_text()
    for name in SweepDir.FIGURES:
        assert folder.figure(name).is_file() and f'src="{name}.png"' in page
    assert f"Best setting: trial {r.best.number}" in page and "pruned" in page and "Final training" in page
    rows = (folder.report_dir / SweepDir.TRIALS_CSV).read_text().splitlines()
    assert len(rows) == 1 + len(r.study.trials) and "pruned after epoch" in rows[0]
    assert yaml.safe_load(folder.space_file.read_text()) == SPACE
    # `cifarkit train --config report/config.yaml` is the final training of the best trial's setting
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(folder.best_config)]))
    assert cfg.lr == r.best.params["lr"] and cfg.label_smoothing == r.best.params["label_smoothing"]
    assert cfg.val_size == 0 and cfg.time_budget == r.best_config.time_budget and cfg.out is None
    assert {k: v for k, v in vars(cfg).items() if k not in ("lr", "label_smoothing", "val_size", "time_budget")} \
        == {k: v for k, v in vars(FAST).items() if k not in ("lr", "label_smoothing", "val_size", "time_budget")}


def test_a_report_with_one_finished_trial_says_what_it_cannot_draw(tmp_path):
    from cifarkit.sweep.report import write_sweep_report
    folder = SweepDir.create(tmp_path / "sweep")
    store = studies.open_storage(str(folder.journal))
    study, _, _ = studies.open_study(store, "sweep", FAST, parse_space(SPACE, FAST), 550.0, None)
    study.enqueue_trial({"lr": 0.3, "label_smoothing": 0.1})
    study.optimize(lambda t: parse_space(SPACE, FAST).suggest(t)["lr"], n_trials=1)
    page = write_sweep_report(study, store, folder, None).read_text()
    assert "Parameter importances: not drawn" in page and "1 trials" in page


# -- the command line ---------------------------------------------------------------------------------


def test_the_command_prints_the_space_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    from cifarkit.cli import main
    assert main(["sweep", "--preset", "quick", "--show-space"]) == 0
    shown = capsys.readouterr().out
    assert yaml.safe_load(shown) == default_space(preset_config("quick")).to_dict()
    (tmp_path / "space.yaml").write_text("lrr: {low: 0.1, high: 1}\n")
    assert main(["sweep", "--space", str(tmp_path / "space.yaml"), "--time-budget", "1h"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'lrr'" in err and len(err.strip().splitlines()) == 1
    assert main(["sweep", "--preset", "fast"]) == 2
    assert "give --time-budget" in capsys.readouterr().err
    assert main(["sweep", "--time-budget", "1h", "--storage", str(tmp_path / "j"), "--out", str(tmp_path / "s")]) == 2
    assert "--storage needs --study" in capsys.readouterr().err


def test_a_trial_trains_without_testing_and_stops_when_told(monkeypatch, tmp_path):
    """train_trial runs fit with no test and a callback that stops it after the epoch `report` says."""
    from types import SimpleNamespace

    from cifarkit.rundir import Results, RunDir
    from cifarkit.train import fit as fit_module
    from cifarkit.train.trial import train_trial
    seen = {}

    def fake_fit(cfg, callbacks=(), test=True, **kw):
        seen["test"] = test
        reporter, = callbacks
        trainer = SimpleNamespace(sanity_checking=False, should_stop=False, callback_metrics={})
        for epoch, acc in enumerate([0.3, 0.5, 0.6], 1):
            trainer.callback_metrics["val_acc"] = acc
            reporter.on_validation_end(trainer, None)
            if trainer.should_stop:
                break
        run = RunDir.create(cfg)
        (run.checkpoints).mkdir()
        run.write_results(Results(epochs=3.0, val_acc=acc))
        return run
    monkeypatch.setattr(fit_module, "fit", fake_fit)
    calls = []
    cfg = TrainConfig(out=str(tmp_path / "t"), val_size=100)
    outcome = train_trial(cfg, lambda e, acc, last: calls.append((e, acc, last)) or e == 2)
    assert seen["test"] is False and calls == [(1, 0.3, False), (2, 0.5, False)]
    assert outcome.stopped_at == 2 and outcome.history == [0.3, 0.5] and outcome.val_acc == 0.5
    assert not RunDir(cfg.out).checkpoints.exists()  # a trial is never resumed


def test_one_worker_claims_the_final_and_a_stopped_one_is_its_folders_again(tmp_path):
    folder = SweepDir.create(tmp_path / "sweep")
    store = studies.open_storage(str(folder.journal))
    mine, _ = studies.claim_final(store, "sweep", 7, folder.final(7))
    assert mine
    theirs, record = studies.claim_final(store, "sweep", 7, tmp_path / "elsewhere" / "final" / "trial-0007")
    assert not theirs and record["dir"] == str(folder.final(7).resolve())
    again, _ = studies.claim_final(store, "sweep", 7, folder.final(7))  # the same folder, not yet tested: resume
    assert again
    studies.record_final(store, "sweep", 7, {"test_acc": 0.91, "seconds": 600.0})
    done, record = studies.claim_final(store, "sweep", 7, folder.final(7))
    assert not done and record["test_acc"] == 0.91
    assert studies.finals(store, "sweep")[7]["test_acc"] == 0.91
