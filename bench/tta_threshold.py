"""Test accuracy and seconds of test-time augmentation with and without the confidence threshold.

Usage: python bench/tta_threshold.py RUN_DIR [RUN_DIR ...] [--thresholds 1.0 0.7]
For each finished run, `cifarkit test` at TTA level 2 with each threshold: 1.0 gives every test
image all 6 views; below 1, only the images whose plain prediction is less sure than the threshold
get the other 5. Run alone: a training on the same cores measures itself into these seconds.
"""
import argparse
import time

from cifarkit.train.fit import evaluate

p = argparse.ArgumentParser()
p.add_argument("run_dirs", nargs="+")
p.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.7])
args = p.parse_args()
for run in args.run_dirs:
    for th in args.thresholds:
        t = time.perf_counter()
        res = evaluate(run, tta=2, tta_threshold=th)
        print(f"{run}: threshold {th:g}: test accuracy {res['test_acc']:.4f} in {time.perf_counter() - t:.1f} s",
              flush=True)
