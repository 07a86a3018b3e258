"""Time-to-accuracy of a preset over several seeds: wall-clock from command start to printed result.

Usage: python bench/fast_time_to_accuracy.py [--preset fast] [--seeds 0 1 2] [--out runs/bench]
Runs `cifarkit train --preset P --seed S --no-report` as a subprocess per seed (data cache warmed
first, so decoding is not counted), and prints test accuracy (with the preset's test-time
augmentation) and wall-clock seconds per seed, then mean and standard deviation.
Run alone on the machine: two trainings on the same cores measure each other.
"""
import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cifarkit.rundir import RunDir
from cifarkit.data.sources import load_arrays

p = argparse.ArgumentParser()
p.add_argument("--preset", default="fast")
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument("--out", default="runs/bench")
p.add_argument("extra", nargs="*", help="more `cifarkit train` flags, after --")
args = p.parse_args()

load_arrays()  # warm the decode cache: the benchmark times training, not the first decode
accs, secs = [], []
for seed in args.seeds:
    out = Path(args.out) / f"{args.preset}-seed{seed}"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cifarkit", "train", "--preset", args.preset, "--seed", str(seed),
                    "--out", str(out), "--no-report", *args.extra], check=True)
    secs.append(time.perf_counter() - t)
    accs.append(RunDir(out).read_results().test_acc)
    print(f"seed {seed}: test accuracy {accs[-1]:.4f}, {secs[-1]:.0f} s wall-clock", flush=True)
sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
print(f"{args.preset}: {statistics.mean(accs):.4f} +- {sd:.4f} test accuracy, "
      f"{statistics.mean(secs):.0f} s mean wall-clock over seeds {args.seeds}")
