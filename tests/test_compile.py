"""--compile: the training step compiled up front, its seconds counted apart, and a machine where the
compiler cannot build trains uncompiled after one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import make_image_folder
from cifarkit.models import build_model
from cifarkit.presets import preset_config
from cifarkit.train.compiling import CompileClock, training_states
from cifarkit.train.module import LitClassifier
from cifarkit.train.schedule import Schedule


def test_a_compile_that_torch_refuses_up_front_trains_the_plain_net(monkeypatch, notices):
    """torch.compile raises at the call on a Python it does not support: one line, the plain net."""
    def refuse(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on Python 3.99+\n(more detail on a second line)")
    monkeypatch.setattr(torch, "compile", refuse)
    net = build_model("fast", 10)
    module = LitClassifier(net, 10, preset_config("fast", compile=True))
    assert not module.compiled and module._net is net
    said = notices().splitlines()
    assert said == ["notice: --compile: torch.compile cannot build here (torch.compile is not supported on "
                    "Python 3.99+); training uncompiled"]


def test_a_compiled_module_trains_the_compiled_net_and_evaluates_the_plain_one():
    net = build_model("fast", 10)
    module = LitClassifier(net, 10, preset_config("fast", compile=True))
    assert module.compiled and module._net is not net and list(module.children())[0] is net
    assert not LitClassifier(build_model("fast", 10), 10, preset_config("fast")).compiled


def test_the_compile_runs_at_every_size_and_whitening_state_the_recipe_trains_with():
    """The fast recipe: 4 low-res epochs, the stem's bias training for 3; quick: all at 32 px, the bias
    training throughout; a net without the stem: by size only."""
    fast = Schedule.of(preset_config("fast"), 196)
    assert training_states(fast, stem=True) == [(24, True), (24, False), (32, False)]
    assert training_states(fast, stem=False) == [(24, False), (32, False)]
    assert training_states(Schedule.of(preset_config("quick"), 196), stem=True) == [(32, True)]
    short = Schedule.of(preset_config("fast", epochs=2.0), 196)  # 1 low-res epoch, the bias for all
    assert training_states(short, stem=True) == [(24, True), (32, True)]


def test_the_compile_clock_sums_dynamos_compile_sessions_and_leaves_no_callback():
    handler = torch._dynamo.callback_handler
    before = (len(handler.start_callbacks), len(handler.end_callbacks))
    trigger = torch._dynamo.callback.CallbackTrigger.DYNAMO
    with CompileClock() as clock:
        for _ in range(2):
            with handler.install_callbacks(trigger, "0/0"):
                time.sleep(0.05)
        time.sleep(0.1)                                            # not compiling: not counted
    assert 0.1 <= clock.seconds < 0.2
    assert (len(handler.start_callbacks), len(handler.end_callbacks)) == before


@pytest.mark.slow
def test_a_machine_without_a_cpp_compiler_trains_uncompiled_inside_its_budget(tmp_path):
    """Inductor needs a C++ compiler on a CPU; with CXX naming none, `cifarkit train --compile` says so
    in one line and trains the plain net, and the failed attempt is counted inside the time budget
    (spent before training) and reported apart."""
    data = make_image_folder(tmp_path / "toy", n_train=45, n_test=25)
    out = tmp_path / "run"
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "cifarkit", "train", "--data", str(data), "--compile",
                           "--time-budget", "90s", "--batch-size", "16", "--val-size", "20", "--lr", "0.05",
                           "--tta", "0", "--out", str(out), "--no-report"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if "--compile" in line]
    assert len(said) == 1 and "torch.compile cannot build here" in said[0] and "C++ compiler" in said[0], said
    assert "Traceback" not in proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["compiled"] is False and res["compile_seconds"] > 0 and res["train_seconds"] > 0
    assert res["plan"]["spent"] >= res["compile_seconds"]              # the attempt came out of the budget
    assert res["test_acc"] is not None and res["steps"] == res["plan"]["total_steps"]
