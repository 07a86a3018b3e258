"""Can the robustness table (6 corruptions x 5 severities) run in under 2 minutes on this CPU?

Usage: python bench/robustness_speed.py [RUN_DIR] [--n 2000] [--batches 4]
Times the fast net's forward pass (eval, channels_last, bf16 autocast, batch 1000), then one whole
robustness.evaluate() on N seeded test images, and prints the time 10,000 images would take.
Without RUN_DIR an untrained fast net is timed (same speed; its accuracies mean nothing).
Run alone on the machine.
"""
import argparse
import time

import numpy as np
import torch

from cifarkit.trust import robustness
from cifarkit.data.augment import Augment
from cifarkit.models import build_model

p = argparse.ArgumentParser()
p.add_argument("run_dir", nargs="?")
p.add_argument("--n", type=int, default=2000)
p.add_argument("--batches", type=int, default=4)
p.add_argument("--data", default="../shared/data/cifar10-jpeg.tar.gz")
args = p.parse_args()

if args.run_dir:
    from cifarkit.trust.analysis import load_test_split
    from cifarkit.weights import load
    model = load(args.run_dir)
    net, normalize = model.net, model.normalize
    images, labels = load_test_split(args.run_dir)
else:
    from cifarkit.data.sources import load_arrays
    a = load_arrays(args.data)
    images, labels = a.test_x, a.test_y
    net, normalize = build_model("fast"), Augment((0.4913, 0.4821, 0.4465), (0.2452, 0.2428, 0.2606)).normalize
net = net.eval().to(memory_format=torch.channels_last)


@torch.inference_mode()
def predict(batch: np.ndarray) -> torch.Tensor:
    x = normalize(torch.from_numpy(batch)).contiguous(memory_format=torch.channels_last)  # (B, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return net(x).float().argmax(1)                                                   # (B,)


x = images[:1000]
predict(x)  # warm-up: oneDNN picks its kernels
rates = []
for _ in range(args.batches):
    t = time.perf_counter()
    predict(x)
    rates.append(1000 / (time.perf_counter() - t))
rate = float(np.median(rates))
print(f"forward: {rate:.0f} images/s median of {args.batches} batches of 1000 ({torch.get_num_threads()} threads)")
print(f"  -> 31 x 10,000 forward passes (30 settings + clean) alone: {310_000 / rate:.0f} s")

r = robustness.evaluate(predict, images, labels, n=args.n)
print(f"evaluate(n={r.n}): {r.seconds:.1f} s end to end (corruptions + predictions), "
      f"{r.seconds / r.n * 10_000:.0f} s at 10,000; clean {r.clean_accuracy:.1%}, "
      f"mean corruption accuracy {r.mean_corruption_accuracy:.1%}")
print(f"largest n for 120 s at this rate: {int(120 / r.seconds * r.n):,}")
