"""Faults a run survives: kill -9, Ctrl-C, a diverging loss, a killed or refused checkpoint write,
checkpoints and weights of another model; and same-seed CPU runs that agree to the last bit.
(A corrupt data cache and a wrong archive: tests/test_data.py.)

Training runs use the toy ImageFolder (40 training images, batches of 10: 4 steps per epoch) and, but
for the determinism test's, the narrow fast net of conftest.TINY_WIDTHS: what a fault leaves behind
does not depend on the width, and each run costs 10 CPU-s instead of 25."""
from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cifarkit import CifarkitError
from cifarkit.train.checkpoints import AtomicCheckpointIO, read_checkpoint
from cifarkit.cli import main
from cifarkit.models import build_model
from cifarkit.presets import preset_config
from cifarkit.weights import save_weights
from conftest import make_image_folder, narrow_config

STEPS_PER_EPOCH = 4


def toy_args(data: Path, epochs: int = 3, report: bool = False, **extra) -> list[str]:
    """The flags of a toy run; with config=PATH, the narrow net's config (the `narrow` fixture) under them."""
    args = ["train", "--data", str(data), "--epochs", str(epochs), "--batch-size", "10", "--val-size", "8",
            "--lr", "0.05", "--seed", "3"] + ([] if report else ["--no-report"])
    for flag, value in extra.items():
        args += [f"--{flag.replace('_', '-')}", str(value)]
    return args


def rows(run: Path) -> list[dict]:
    """metrics.csv without its clock column (epoch_seconds differs from run to run)."""
    with open(run / "metrics.csv", newline="") as f:
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in csv.DictReader(f)]


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same test result to the last bit; every metrics row the resumed run has is the reference's."""
    a, b = (json.loads((r / "results.json").read_text()) for r in (reference, resumed))
    assert (b["test_acc"], b["test_loss"]) == (a["test_acc"], a["test_loss"])
    ref_rows, got = rows(reference), rows(resumed)
    assert all(r in ref_rows for r in got)  # no value differs, nothing is logged twice
    epoch_rows = [r for r in ref_rows if r["val_acc"] or r["test_acc"]]
    assert all(r in got for r in epoch_rows)  # every validation and the test are there


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("toy") / "toy")


@pytest.fixture(scope="module")
def narrow(tmp_path_factory) -> Path:
    """The fast preset's config with the narrow net, for --config."""
    return narrow_config(tmp_path_factory.mktemp("narrow") / "narrow.yaml", "fast")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, toy, narrow) -> Path:
    """An uninterrupted run of the arguments the kill and Ctrl-C tests interrupt."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert main(toy_args(toy, out=out, ckpt_every_steps=3, config=narrow)) == 0
    return out


def start(toy: Path, out: Path, **extra) -> subprocess.Popen:
    """`cifarkit train` in a real process; its stderr goes to <out>.err (a pipe nobody reads can fill)."""
    err = open(f"{out}.err", "w")
    return subprocess.Popen([sys.executable, "-m", "cifarkit", *toy_args(toy, out=out, **extra)],
                            stdout=subprocess.DEVNULL, stderr=err)


def stop_after_a_mid_epoch_checkpoint(proc: subprocess.Popen, last: Path, sig: int) -> int:
    """Pause the run whenever last.ckpt changes; send `sig` once it holds a mid-epoch step."""
    seen, deadline = None, time.time() + 90
    while proc.poll() is None and time.time() < deadline:
        if last.exists() and last.stat().st_mtime_ns != seen:
            proc.send_signal(signal.SIGSTOP)
            seen = last.stat().st_mtime_ns
            step = read_checkpoint(last)["global_step"]
            if step % STEPS_PER_EPOCH:
                proc.send_signal(sig)
                proc.send_signal(signal.SIGCONT)
                return step
            proc.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the run never wrote a mid-epoch checkpoint")


# ---------------------------------------------------------------------------------------------
# Interrupted runs


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, toy, narrow, reference):
    run = tmp_path / "run"
    proc = start(toy, run, ckpt_every_steps=3, config=narrow)
    step = stop_after_a_mid_epoch_checkpoint(proc, run / "checkpoints" / "last.ckpt", signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (run / "results.json").exists()
    assert main(["train", "--resume", str(run), "--no-report"]) == 0
    assert json.loads((run / "results.json").read_text())["resumed_from_step"] == step
    assert_same_run(run, reference)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_writes_the_report_and_prints_the_resume_command(tmp_path, toy, narrow, reference):
    run = tmp_path / "run"
    proc = start(toy, run, ckpt_every_steps=3, report=True, config=narrow)
    stop_after_a_mid_epoch_checkpoint(proc, run / "checkpoints" / "last.ckpt", signal.SIGINT)
    proc.wait(timeout=90)
    err = Path(f"{run}.err").read_text()
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == f"resume with: cifarkit train --resume {run}"
    step = read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    assert step % STEPS_PER_EPOCH  # it stopped mid-epoch, after a whole step
    assert (run / "report" / "curves.png").is_file() and not (run / "results.json").exists()
    assert main(["train", "--resume", str(run), "--no-report"]) == 0
    assert_same_run(run, reference)


@pytest.mark.slow
def test_resume_before_any_checkpoint_keeps_the_recorded_lr_and_runs_no_new_range_test(tmp_path, toy, capsys):
    run = tmp_path / "run"  # killed after the LR range test, before the first checkpoint
    run.mkdir()
    narrow_config(run / "config.yaml", "fast", data=str(toy), epochs=1, batch_size=10, val_size=8, lr="auto",
                  muon_lr=0.0, out=str(run))
    (run / "lr_find.json").write_text(json.dumps({"lr": [], "loss": [], "suggestion": 0.0123}))
    assert main(["train", "--resume", str(run), "--no-report"]) == 0
    captured = capsys.readouterr()
    assert "no checkpoint yet" in captured.err and "LR range test" not in captured.out
    assert json.loads((run / "results.json").read_text())["lr"] == 0.0123


@pytest.mark.slow
def test_nonfinite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, toy, narrow, capsys):
    run = tmp_path / "run"
    code = main(toy_args(toy, out=run, ckpt_every_steps=1, config=narrow) + ["--lr", "1e6"])  # the last --lr wins
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and re.match(r"cifarkit: error: (loss became (nan|inf) at|weights became (nan|inf) by) step \d+", err), err
    bad_step = int(re.search(r" (?:at|by) step (\d+)", err).group(1))
    kept = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert kept["global_step"] < bad_step and str(run / "checkpoints" / "last.ckpt") in err
    assert all(torch.isfinite(t).all() for t in kept["state_dict"].values() if t.is_floating_point())
    assert not (run / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Checkpoint writes


SAVER = """
import sys, torch
from pathlib import Path
from cifarkit.train.checkpoints import AtomicCheckpointIO
io, path = AtomicCheckpointIO(), Path(sys.argv[1])
for i in range(10_000):
    io.save_checkpoint({"global_step": i, "w": torch.full((16_000_000,), float(i))}, path)  # 64 MB
    print(i, flush=True)
"""


@pytest.mark.slow
def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_whole(tmp_path):
    last = tmp_path / "checkpoints" / "last.ckpt"
    for delay in (0.3, 0.5, 0.7, 0.9, 1.1):  # until a kill lands mid-write (a partial file is left)
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(last)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # one checkpoint is complete; the next ones are being written
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        if list(last.parent.glob(".last.ckpt.*.tmp")):
            break
    else:
        pytest.fail("no kill landed during a write")
    ckpt = read_checkpoint(last)
    assert torch.equal(ckpt["w"], torch.full((16_000_000,), float(ckpt["global_step"])))


@pytest.mark.slow
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_mid_run_is_one_line_and_keeps_what_was_saved(tmp_path, toy, narrow, capsys,
                                                                                monkeypatch, code):
    # Simulated: tests run as root without mount rights, so the second checkpoint write fails the way
    # a full (ENOSPC) or read-only (EROFS) disk makes write() fail, after writing part of the file.
    run, real_save, calls = tmp_path / "run", torch.save, []

    def failing_save(obj, f):
        calls.append(1)
        if len(calls) == 1:
            return real_save(obj, f)
        f.write(b"part of a checkpoint")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing_save)
    assert main(toy_args(toy, out=run, ckpt_every_steps=1, config=narrow)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("cifarkit: error: cannot write") and os.strerror(code) in err[-1]
    assert f"--resume {run}" in err[-1] and "Traceback" not in "\n".join(err)
    monkeypatch.setattr(torch, "save", real_save)
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]  # no partial file
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()


def test_atomic_write_failure_names_the_file_and_the_reason(tmp_path, monkeypatch):
    io, last = AtomicCheckpointIO(tmp_path), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, last)

    def no_space(obj, f):
        f.write(b"xx")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(CifarkitError, match="cannot write .*last.ckpt: No space left on device") as exc:
        io.save_checkpoint({"global_step": 2}, last)
    assert "\n" not in str(exc.value)
    monkeypatch.undo()
    assert read_checkpoint(last)["global_step"] == 1


# ---------------------------------------------------------------------------------------------
# Loading


def fake_run(root: Path, model: str, classes: list[str], data: Path) -> Path:
    """A run directory as training leaves it, without training: config, weights, a checkpoint."""
    root.mkdir(parents=True)
    preset_config("fast", model=model, data=str(data), val_size=8, out=str(root)).to_yaml(root / "config.yaml")
    net = build_model(model, len(classes))
    save_weights(net, root / "model.safetensors", model, classes, [0.5] * 3, [0.25] * 3)
    (root / "checkpoints").mkdir()
    torch.save({"global_step": 3, "cifarkit": {"model": model, "classes": classes},
                "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}},
               root / "checkpoints" / "last.ckpt")
    return root


def test_checkpoint_of_another_model_or_class_count_names_both(tmp_path, capsys, toy):
    run = fake_run(tmp_path / "a", "fast", ["a", "b", "c", "d"], toy)
    other = fake_run(tmp_path / "b", "custom_resnet", ["x", "y"], toy)
    shutil.copy(other / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'custom_resnet' with 2 classes" in err and "'fast' with 4 classes" in err


def test_weights_of_another_model_or_class_count_name_both(tmp_path, capsys, toy):
    run = fake_run(tmp_path / "a", "fast", ["a", "b", "c", "d"], toy)
    shutil.copy(fake_run(tmp_path / "b", "custom_resnet", ["x", "y"], toy) / "model.safetensors", run)
    assert main(["test", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'custom_resnet' with 2 classes" in err and "'fast' with 4 classes" in err


def test_weights_whose_tensors_do_not_match_their_metadata_name_both(tmp_path, toy):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from cifarkit.weights import load
    other = fake_run(tmp_path / "b", "custom_resnet", ["x", "y"], toy) / "model.safetensors"
    run = fake_run(tmp_path / "a", "fast", ["a", "b", "c", "d"], toy)
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(other)), str(run / "model.safetensors"), metadata=meta)
    with pytest.raises(CifarkitError, match="hold 'custom_resnet' with 2 classes.*says 'fast' with 4"):
        load(run)


def test_checkpoint_holding_pickled_objects_is_refused(tmp_path, toy, capsys):
    import argparse
    run = fake_run(tmp_path / "a", "fast", ["a", "b", "c", "d"], toy)
    torch.save({"global_step": 3, "trap": argparse.Namespace(x=1)}, run / "checkpoints" / "last.ckpt")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refused to load" in err and "weights_only=True" in err


# ---------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.slow
def test_same_seed_on_cpu_gives_identical_metrics(tmp_path, toy):
    """The default (full-width) net, as a person's two runs of the same command."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert main(toy_args(toy, epochs=2, out=out, accelerator="cpu")) == 0
    assert "epoch_seconds" in (runs[0] / "metrics.csv").read_text().splitlines()[0].split(",")
    assert rows(runs[0]) == rows(runs[1])  # everything but the clock
    a, b = (json.loads((r / "results.json").read_text()) for r in runs)
    assert (a["test_acc"], a["test_loss"]) == (b["test_acc"], b["test_loss"])
