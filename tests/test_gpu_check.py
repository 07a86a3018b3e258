"""The prepared GPU check: its parser of airbench's tables, and its smoke mode end to end on the CPU."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, real_data

sys.path.insert(0, str(ROOT / "bench"))
from gpu_check import parse_airbench  # noqa: E402

LEGACY = """\
---------------------------------------------------------------------------------------------
|  run     |  epoch  |  train_loss  |  train_acc  |  val_acc  |  tta_val_acc  |  total_time_seconds  |
---------------------------------------------------------------------------------------------
|       0  |      0  |      1.6153  |     0.4980  |   0.5690  |               |              0.9802  |
|          |      9  |      0.9055  |     0.9150  |   0.9392  |               |              3.4211  |
|          |   eval  |      0.9055  |     0.9150  |   0.9392  |       0.9409  |              3.8312  |
|       1  |      0  |      1.6200  |     0.4920  |   0.5702  |               |              0.9511  |
|          |   eval  |      0.9101  |     0.9140  |   0.9380  |       0.9398  |              3.8047  |
Mean: 0.9404    Std: 0.0008
"""
MUON = """\
|  run     |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |
|  warmup  |      0  |     0.1010  |           |               |      95.1000  |
|          |   eval  |     0.1010  |           |       0.1000  |     101.2000  |
|       0  |      0  |     0.5200  |           |               |       0.3000  |
|          |   eval  |     0.9300  |           |       0.9401  |       2.6000  |
"""


def test_the_airbench_tables_are_read_run_by_run():
    assert parse_airbench(LEGACY) == [{"run": "0", "tta_acc": 0.9409, "seconds": 3.8312},
                                      {"run": "1", "tta_acc": 0.9398, "seconds": 3.8047}]
    assert parse_airbench(MUON) == [{"run": "warmup", "tta_acc": 0.1, "seconds": 101.2},
                                    {"run": "0", "tta_acc": 0.9401, "seconds": 2.6}]
    assert parse_airbench(LEGACY[:LEGACY.index("|       1")]) == parse_airbench(LEGACY)[:1]  # a cut log
    assert parse_airbench("Traceback (most recent call last):\n  CUDA error") == []


@pytest.mark.slow
def test_the_smoke_mode_runs_every_step_on_the_cpu(tmp_path):
    fake = tmp_path / "airbench"  # stand-ins for the two scripts: smoke mode never starts them
    fake.mkdir()
    for name in ("airbench94.py", "airbench94_muon.py"):
        (fake / name).write_text("raise SystemExit('not to be run in smoke mode')\n")
    out = tmp_path / "out"
    env = dict(os.environ, GPU_CHECK_SMOKE="1", PYTHON=sys.executable, CIFARKIT_DATA=str(real_data()))
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--airbench", str(fake)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["smoke"] and res["machine"]["torch"] == torch.__version__
    assert [x["name"] for x in res["fast"]["runs"]] == ["fast-seed0", "fast-seed1"]
    assert all(0 <= x["test_acc"] <= 1 and x["train_seconds"] > 0 for x in res["fast"]["runs"])
    assert len(res["fast"]["test_acc"]) == 2                      # mean and sd
    assert "needs CUDA" in res["airbench"]["skipped"]
    train = torch.load(fake / "cifar10" / "train.pt")            # their data format, shuffled
    assert train["images"].dtype == torch.uint8 and train["images"].shape[1:] == (32, 32, 3)
    assert len(set(train["labels"][:20].tolist())) > 3            # not sorted by class
    assert "test_acc" in res["seed"]["preset"]
    table = (out / "gpu_check.md").read_text()
    assert "cifarkit `--preset fast` (2 seeds)" in table and "resnet18_gn" in table
