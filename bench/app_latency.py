"""p50/p95 latency of the served app under 50 concurrent clients on loopback.

Usage: python bench/app_latency.py RUN_DIR [--clients 50] [--requests 4]
Starts the app (as `cifarkit app` does) on a free loopback port, then each client thread sends
`--requests` calls to /predict and then to /classify (predict + Grad-CAM) with a real test image.
Latency is measured per call, from submit to answer, queueing included. Run alone on the machine.
"""
import argparse
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from gradio_client import Client, handle_file
from PIL import Image

from cifarkit.serve.app import launch
from cifarkit.rundir import RunDir

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--clients", type=int, default=50)
p.add_argument("--requests", type=int, default=4)
args = p.parse_args()

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
demo = launch(args.run_dir, port=port, prevent_thread_lock=True, quiet=True)
url = f"http://127.0.0.1:{port}/"
# One distinct image per client, as real users send (identical requests are tested in tests/test_app.py).
tmp = Path(tempfile.mkdtemp())
rng = np.random.default_rng(0)
base = np.asarray(Image.open(RunDir(args.run_dir).examples()[0]).convert("RGB"))
images = []
for i in range(args.clients):
    noisy = np.clip(base.astype(int) + rng.integers(-8, 9, base.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(tmp / f"{i}.png")
    images.append(handle_file(str(tmp / f"{i}.png")))
calls = {"predict": lambda im: ((im, 3), "/predict"), "classify": lambda im: ((im, 3, 0.5, None, "gradcam"), "/classify")}


def client_run(job):
    endpoint, i = job
    c = Client(url, verbose=False)
    out = []
    inputs, api = calls[endpoint](images[i])
    for _ in range(args.requests):
        t = time.perf_counter()
        c.predict(*inputs, api_name=api)
        out.append(time.perf_counter() - t)
    return out


for endpoint in calls:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        lat = sorted(x for r in pool.map(client_run, [(endpoint, i) for i in range(args.clients)]) for x in r)
    wall = time.perf_counter() - t0
    p95 = lat[int(0.95 * (len(lat) - 1))]
    print(f"{endpoint:9s} {len(lat)} calls from {args.clients} clients: p50 {statistics.median(lat) * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms, throughput {len(lat) / wall:.1f} calls/s ({torch.get_num_threads()} threads)")
demo.close()
