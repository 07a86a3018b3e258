"""Seconds to write a full report (predictions on 10k test images, confusion, mistakes, Grad-CAM grids).

Usage: python bench/report_time.py RUN_DIR [--repeat 3]
Run alone: a second training on the same cores measures itself into this number.
"""
import argparse
import statistics
import tempfile
import time

import torch

from cifarkit.report.report import write_report

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--repeat", type=int, default=3)
args = p.parse_args()
times = []
for _ in range(args.repeat):
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        write_report(args.run_dir, out=out)
        times.append(time.perf_counter() - t)
print(f"report seconds over {args.repeat} runs: median {statistics.median(times):.1f}, "
      f"min {min(times):.1f}, max {max(times):.1f} ({torch.get_num_threads()} threads)")
