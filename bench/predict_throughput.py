"""Images/s of `cifarkit predict`-style batch prediction, PyTorch vs onnxruntime, side by side.

Usage: python bench/predict_throughput.py RUN_DIR [--n 2000] [--batch-size 256] [--repeat 3]
Writes N test images of the run's data source as PNG files into a temporary folder, then times
predict_files() (decode + resize + normalize + forward) for the PyTorch weights and the ONNX export,
alternating the two so that machine noise hits both. Run alone on the machine.
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from cifarkit.trust.analysis import load_test_split
from cifarkit.serve.export import OnnxModel, export
from cifarkit.serve.predict import predict_files
from cifarkit.weights import load

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--n", type=int, default=2000)
p.add_argument("--batch-size", type=int, default=256)
p.add_argument("--repeat", type=int, default=3)
args = p.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    x, _ = load_test_split(Path(args.run_dir))
    paths = []
    for i, im in enumerate(x[: args.n]):
        paths.append(Path(tmp) / f"{i:05d}.png")
        Image.fromarray(im).save(paths[-1])
    models = {"pytorch": load(args.run_dir), "onnxruntime": OnnxModel(export(args.run_dir, "onnx", Path(tmp) / "m.onnx"))}
    rates = {k: [] for k in models}
    for _ in range(args.repeat):
        for name, model in models.items():
            t = time.perf_counter()
            results, errors = predict_files(model, paths, batch_size=args.batch_size)
            rates[name].append(len(results) / (time.perf_counter() - t))
    for name, r in rates.items():
        print(f"{name:12s} {statistics.median(r):7.0f} images/s (median of {args.repeat}; "
              f"min {min(r):.0f}, max {max(r):.0f}; {args.n} PNG files, batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads)")
    print(f"ratio onnxruntime / pytorch: {statistics.median(rates['onnxruntime']) / statistics.median(rates['pytorch']):.2f}")
