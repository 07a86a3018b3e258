"""What each part of the fast recipe is worth: the fast preset with one thing changed, trained once.

Usage: python bench/recipe_ablation.py VARIANT [VARIANT ...] [--seed 0] [--out runs/ablation]
       python bench/recipe_ablation.py --list
Each variant is the `fast` preset with the overrides below, written to a config file and trained with
`cifarkit train --config FILE --no-report`; it prints test accuracy and wall-clock seconds (command
start to printed result). One run costs 4-15 minutes on 2 CPU cores; run alone on the machine.
"""
import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cifarkit.presets import preset_config
from cifarkit.rundir import RunDir
from cifarkit.data.sources import load_arrays

NO_LOW_RES = {"flip": "alternate", "pad": 2, "pad_mode": "reflect"}
VARIANTS = {
    "fast": {},  # 9 epochs, the first 4 at 24 px
    # the optimizer: SGD for the conv filters too (airbench94's), at the preset's batch of 256
    "sgd-7ep": dict(muon_lr=0.0, epochs=7.0, augment=NO_LOW_RES),
    # full resolution throughout, 6 or 7 epochs
    "muon-6ep": dict(epochs=6.0, augment=NO_LOW_RES),
    "muon-7ep": dict(epochs=7.0, augment=NO_LOW_RES),
    # 8 epochs, the first 2 at 24 px
    "lowres2-8ep": dict(epochs=8.0, augment=dict(NO_LOW_RES, low_res=24, low_res_epochs=2)),
    # a narrower net (0.73x the time per step) for more epochs
    "widths192-9.5ep": dict(epochs=9.5, model_kwargs={"widths": [64, 192, 192]}, augment=NO_LOW_RES),
    # short runs (no test-time augmentation) comparing optimizer settings
    "2ep-sgd": dict(epochs=2.0, tta=0, muon_lr=0.0, augment=NO_LOW_RES),
    "2ep-muon": dict(epochs=2.0, tta=0, augment=NO_LOW_RES),
    "2ep-muon-m0.6": dict(epochs=2.0, tta=0, muon_momentum=0.6, augment=NO_LOW_RES),
    "2ep-muon-m0.95": dict(epochs=2.0, tta=0, muon_momentum=0.95, augment=NO_LOW_RES),
    "2ep-muon-m0.6-lr0.04": dict(epochs=2.0, tta=0, muon_momentum=0.6, muon_lr=0.04, augment=NO_LOW_RES),
    "2ep-muon-m0.6-lr0.16": dict(epochs=2.0, tta=0, muon_momentum=0.6, muon_lr=0.16, augment=NO_LOW_RES),
    "3ep-muon": dict(epochs=3.0, tta=0, augment=NO_LOW_RES),
    "3ep-muon-lr0.12": dict(epochs=3.0, tta=0, muon_lr=0.12, augment=NO_LOW_RES),
    "3ep-muon-lr0.06": dict(epochs=3.0, tta=0, muon_lr=0.06, augment=NO_LOW_RES),
    "3ep-muon-m0.85": dict(epochs=3.0, tta=0, muon_momentum=0.85, augment=NO_LOW_RES),
    "3ep-muon-no-lookahead": dict(epochs=3.0, tta=0, lookahead=False, augment=NO_LOW_RES),
    "3ep-muon-no-warmup": dict(epochs=3.0, tta=0, pct_start=0.01, final_div_factor=1000.0,
                               augment=NO_LOW_RES),
    "3ep-muon-bias-lr36": dict(epochs=3.0, tta=0, bias_lr_scale=36.0, augment=NO_LOW_RES),
    "3ep-muon-whiten-bias-1": dict(epochs=3.0, tta=0, whiten_bias_epochs=1, augment=NO_LOW_RES),
}

p = argparse.ArgumentParser()
p.add_argument("variants", nargs="*")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="runs/ablation")
p.add_argument("--list", action="store_true")
args = p.parse_args()
if args.list or not args.variants:
    for name, overrides in VARIANTS.items():
        print(f"{name:24s} {overrides}")
    sys.exit(0)
unknown = [v for v in args.variants if v not in VARIANTS]
if unknown:
    sys.exit(f"unknown variants {unknown}; see --list")

load_arrays()  # warm the decode cache: the benchmark times training, not the first decode
for name in args.variants:
    cfg = dataclasses.replace(preset_config("fast", seed=args.seed, **VARIANTS[name]), preset=f"fast/{name}")
    out = Path(args.out) / f"{name}-seed{args.seed}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        cfg.to_yaml(Path(f.name))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cifarkit", "train", "--config", f.name, "--out", str(out),
                    "--no-report"], check=True)
    secs = time.perf_counter() - t
    acc = RunDir(out).read_results().test_acc
    print(f"{name}: test accuracy {acc:.4f}, {secs:.0f} s wall-clock (seed {args.seed})", flush=True)
    print(yaml.safe_dump({name: VARIANTS[name]}, default_flow_style=True).strip())
