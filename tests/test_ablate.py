"""bench/ablate.py: paired statistics over seeds, variants checked before any run, a sitting that
resumes, and (slow) two tiny variants trained for real."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, bench_module, make_image_folder
from cifarkit.errors import CifarkitError
from cifarkit.rundir import Results, RunDir

ablate = bench_module("ablate")


def test_the_paired_interval_and_sign_test_of_known_differences():
    """Five seeds, the variant ahead by 0.2, 0.4, 0.3, 0.1 and 0.5 points: mean 0.3, sd 0.158, the
    95% t-interval 0.3 +- 2.776 x 0.158 / sqrt(5) = [0.104, 0.496]; 5 wins of 5, p = 2 / 32."""
    base = {0: 0.900, 1: 0.910, 2: 0.920, 3: 0.905, 4: 0.915}
    ahead = {s: base[s] + d for s, d in zip(base, (0.002, 0.004, 0.003, 0.001, 0.005))}
    p = ablate.paired(base, ahead)
    assert p.n == 5 and p.mean == pytest.approx(0.003)
    assert p.low == pytest.approx(0.003 - 0.0019633, abs=1e-6) and p.high == pytest.approx(0.003 + 0.0019633, abs=1e-6)
    assert (p.wins, p.losses, p.p) == (5, 0, pytest.approx(0.0625)) and p.verdict == "take"
    behind = ablate.paired(ahead, base)                       # the other way round: worse
    assert behind.high == pytest.approx(-p.low) and behind.verdict == "worse" and behind.losses == 5


def test_an_interval_across_zero_ties_and_too_few_pairs():
    base = {0: 0.90, 1: 0.91, 2: 0.92, 3: 0.93}
    mixed = {0: 0.91, 1: 0.90, 2: 0.92, 3: 0.935}              # +1, -1, 0 (a tie), +0.5 points
    p = ablate.paired(base, mixed)
    assert p.low < 0 < p.high and p.verdict == "not shown"
    assert (p.wins, p.losses) == (2, 1) and p.p == pytest.approx(1.0)  # the tie left out: 2 of 3
    one = ablate.paired(base, {0: 0.95, 7: 0.5})               # seed 7 has no base: one pair
    assert (one.n, one.low, one.high) == (1, None, None) and one.mean == pytest.approx(0.05)
    assert one.verdict == "1 pair: no interval"
    assert ablate.paired(base, {}).verdict == "0 pairs: no interval"


def test_the_table_marks_only_an_interval_above_zero_take():
    rows = [dict(variant=v, seed=s, test_acc=a, corruption_acc=c, steps=100, steps_per_second=2.0,
                 compile_seconds=None)
            for v, accs in (("base", (0.90, 0.91, 0.92)), ("up", (0.905, 0.916, 0.924)), ("same", (0.91, 0.90, 0.92)))
            for s, (a, c) in enumerate(zip(accs, (0.7, 0.71, 0.72)))]
    summary = ablate.summarize(rows, ["base", "up", "same"])
    lines = ablate.table(summary, {"base": {}, "up": {"label_smoothing": 0.09}, "same": {"model_kwargs": {"act": "silu"}}})
    base, up, same = lines.splitlines()[2:]
    assert base.startswith("| base | (base) | 3 | 91.00% |") and base.endswith("| base |")
    assert up.startswith('| up | label_smoothing=0.09 | 3 | 91.50% | +0.50 (') and "3-0, p=0.250" in up
    assert up.endswith("| take |") and same.endswith("| not shown |") and '{"act": "silu"}' in same
    assert "| 71.00% | +0.00 | 2.00 |" in up


def test_variants_resolve_over_the_preset_with_the_sittings_budget():
    name, over = ablate.parse_variant("narrow:model_kwargs.widths=[64, 192, 192],label_smoothing=0.09")
    assert name == "narrow" and over == {"model_kwargs": {"widths": [64, 192, 192]}, "label_smoothing": 0.09}
    cfg = ablate.variant_config(name, over, {"proxy_keep": 0.5}, "fast", "cpu", 3, "5m")
    assert cfg.model_kwargs["widths"] == [64, 192, 192] and cfg.model_kwargs["act"] == "gelu"  # one key changed
    assert (cfg.label_smoothing, cfg.proxy_keep, cfg.seed, cfg.time_budget) == (0.09, 0.5, 3, "5m")
    assert ablate.parse_variant("base:") == ("base", {})


@pytest.mark.parametrize("file", ["levers.yaml", "recipe.yaml"])
def test_every_variant_of_the_prepared_files_resolves(file):
    variants = ablate.load_variants(str(ROOT / "bench" / "ablations" / file))
    assert len(variants) >= 7 and next(iter(variants.values())) == {}  # the base first
    for name, over in variants.items():
        ablate.variant_config(name, over, {}, "fast", "cpu", 0, "5m" if file == "levers.yaml" else None)


@pytest.mark.parametrize("variant, says", [
    ("x:label_smoothin=0.1", "variant 'x': unknown setting 'label_smoothin'"),
    ("x:label_smoothing=abc", "variant 'x': label_smoothing='abc' is not a float"),
    ("x:model_kwargs.act=swish", "variant 'x': unknown activation 'swish'"),
    ("x:model_kwargs.actt=silu", "variant 'x': FastNet.__init__() got an unexpected keyword argument 'actt'"),
    ("x:augment.flip=sideways", "variant 'x': unknown flip 'sideways'"),
    ("x:tta=5", "variant 'x': unknown tta '5'"),
    ("x:seed=3", "variant 'x': seed is the sitting's, the same for every variant (give --seeds)"),
    ("x:lr", "variant 'x': 'lr' is not SETTING=VALUE"),
    ("x", "--variant 'x' must look like NAME:SETTING=VALUE"),
])
def test_a_bad_variant_is_one_line_and_exit_code_2_before_any_run(variant, says, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("nothing may run"))
    monkeypatch.setattr(ablate, "run_one", lambda *a, **k: pytest.fail("nothing may run"))
    out = tmp_path / "sitting"
    assert ablate.main(["--variant", "base:", "--variant", variant, "--seeds", "0", "1", "--time-budget", "5m",
                        "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ablate: error: {says}"), err
    assert not out.exists()


def _finished(run_dir: Path, acc: float) -> None:
    run = RunDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run.write_results(Results(test_acc=acc, steps=120, epochs=2.0, train_seconds=60.0, seconds=80.0,
                              mean_corruption_accuracy=0.6, corruption_images=1000))


def test_a_sitting_resumes_finished_runs_and_restarts_a_cut_one(monkeypatch, tmp_path, capsys):
    """Seed 0 of both variants finished before, seed 1 of 'ls' was cut short (no results.json): only
    that run trains again, from a fresh directory; the table pairs both seeds."""
    out = tmp_path / "sitting"
    for name, seed, acc in (("base", 0, 0.90), ("ls", 0, 0.91), ("base", 1, 0.92)):
        _finished(out / name / f"seed{seed}", acc)
    (out / "ls" / "seed1").mkdir(parents=True)
    (out / "ls" / "seed1" / "metrics.csv").write_text("half an epoch\n")
    trained = []

    def train(cmd, check):
        run_dir = Path(cmd[cmd.index("--out") + 1])
        assert not (run_dir / "metrics.csv").exists()               # the cut run's leftovers are gone
        trained.append(run_dir.relative_to(out).as_posix())
        _finished(run_dir, 0.925)
    monkeypatch.setattr(subprocess, "run", train)
    monkeypatch.setattr("cifarkit.data.sources.load_arrays", lambda *a: None)
    args = ["--variant", "base:", "--variant", "ls:label_smoothing=0.1", "--seeds", "0", "1", "--out", str(out),
            "--no-corruption"]
    assert ablate.main(args) == 0
    assert trained == ["ls/seed1"]
    record = json.loads((out / "ablate.json").read_text())
    assert len(record["runs"]) == 4 and record["variants"] == {"base": {}, "ls": {"label_smoothing": 0.1}}
    ls = record["summary"][1]
    assert ls["paired"]["n"] == 2 and ls["paired"]["mean"] == pytest.approx(0.0075)
    assert "| ls | label_smoothing=0.1 | 2 |" in (out / "ablate.md").read_text()
    capsys.readouterr()
    assert ablate.main(["--variant", "base:", "--variant", "ls:label_smoothing=0.2", "--seeds", "0",
                        "--out", str(out)]) == 2                      # the same name, other settings: refused
    assert "variant 'ls' ran in" in capsys.readouterr().err


@pytest.mark.slow
def test_two_tiny_variants_train_for_real_and_a_rerun_trains_nothing(tmp_path):
    """base and ls (label smoothing 0.05), seed 0, one epoch of a toy folder each, as `cifarkit train`
    processes; their corruption accuracy measured; run again, nothing trains."""
    data = make_image_folder(tmp_path / "toy", n_train=20, n_test=10)
    out = tmp_path / "sitting"
    args = ["--variant", "base:", "--variant", "ls:label_smoothing=0.05", "--seeds", "0", "--out", str(out),
            "--set", f"data={data},epochs=1,batch_size=16,val_size=16,lr=0.05,tta=0"]
    assert ablate.main(args) == 0
    record = json.loads((out / "ablate.json").read_text())
    runs = {r["variant"]: r for r in record["runs"]}
    assert set(runs) == {"base", "ls"}
    for r in runs.values():
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["corruption_acc"] <= 1 and r["corruption_images"] == 40
        assert r["steps"] == 4 and r["steps_per_second"] > 0 and r["wall_seconds"] > 0
    assert RunDir(out / "ls" / "seed0").read_config().label_smoothing == 0.05
    assert "1 pair: no interval" in (out / "ablate.md").read_text()
    assert ablate.main(args) == 0                                   # resumed: every run finished
    again = json.loads((out / "ablate.json").read_text())["runs"]
    assert len(again) == 2 and all(r["wall_seconds"] is None for r in again)
