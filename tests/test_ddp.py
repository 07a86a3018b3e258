"""Scale-out on Lightning's DDP: a real 2-process run on the CPU (gloo) over 1,000 real images."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cifarkit.train.checkpoints import read_checkpoint
from cifarkit.data.sources import load_arrays
from cifarkit.weights import load
from conftest import narrow_config


@pytest.mark.slow
def test_two_process_ddp_run_is_complete_loads_and_ranks_train_on_different_batches(tmp_path, cifar_path):
    load_arrays(str(cifar_path))  # decode once here, not in each rank
    config = tmp_path / "ddp.yaml"  # lr auto with a short range test: it must run once, on rank 0
    narrow_config(config, "fast", data=str(cifar_path), subset=1000, val_size=500, epochs=2, batch_size=100,
                  tta=0, eval_batch_size=1000, lr="auto", muon_lr=0.0,
                  lr_find={"min_lr": 1e-3, "max_lr": 10.0, "num_training": 20})  # DDP's work alike at any width
    record = tmp_path / "batches"
    env = {**os.environ, "CIFARKIT_RECORD_BATCHES": str(record)}
    r = subprocess.run([sys.executable, "-m", "cifarkit", "train", "--config", str(config), "--out", "run",
                        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--no-report"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert out.count("LR range test suggests") == 1 and out.count("run directory:") == 1

    run = tmp_path / "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batches", "ddp.yaml", "run"]  # one run dir
    for name in ("config.yaml", "metrics.csv", "lr_find.json", "model.safetensors", "results.json",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 2 * 5  # 500 images per rank, batch 100
    assert results["lr"] == json.loads((run / "lr_find.json").read_text())["suggestion"]
    assert 0 <= results["test_acc"] <= 1 and results["test_images"] == 10_000
    assert len(load(run).classes) == 10
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 10

    seen = {}  # rank -> epoch -> sample indices
    for rank in (0, 1):
        for line in (record / f"rank{rank}.txt").read_text().splitlines():
            epoch, *idx = map(int, line.split())
            seen.setdefault(rank, {}).setdefault(epoch, []).extend(idx)
    for epoch in (0, 1):
        a, b = seen[0][epoch], seen[1][epoch]
        assert len(a) == len(b) == 500 and not set(a) & set(b)  # DistributedSampler: disjoint halves
        assert sorted(a + b) == list(range(1000))
    assert seen[0][0] != seen[0][1]  # reshuffled per epoch
