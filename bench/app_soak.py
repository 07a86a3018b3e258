"""Soak the served app: mixed traffic from many clients for a long while, then check that the
server's resident memory, open file descriptors and files in Gradio's cache stayed near where they
were after warm-up, and print p50/p95 latency per endpoint.

Usage: python bench/app_soak.py RUN_DIR                 # 20 minutes, 20 clients (BENCHMARKS.md)
       python bench/app_soak.py RUN_DIR --short         # 1 minute, 5 clients (the test suite runs this)
       python bench/app_soak.py RUN_DIR --seconds 300 --clients 10 --warmup 90 --cache-seconds 30

The app runs in a child process (`cifarkit.serve.app.launch` on 127.0.0.1 and a free port, as `cifarkit
app` runs it) with its own Gradio cache folder, so what is measured is the server alone. Its cache
deletes uploads and answers older than --cache-seconds (the app's default is 600; shorter here so
the cache reaches its steady state within the warm-up). Each client thread loops until the time is
up over: /classify and /predict (half with one of 20 images seen before, half with a new one), /mistakes, /gradcam_gallery, /run_summary, bad uploads (not an image,
truncated, over the pixel limit: each must get its one-line message) and uploads over the size limit
(HTTP 413). Answers' images are downloaded and decoded in full. Exits 1 if a bound below is
exceeded or a call fails in a way it should not; traffic goes only to 127.0.0.1.
"""
from __future__ import annotations

import argparse
import os
import http.client
import random
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

# Bounds, end of the run against the first sample after warm-up
RSS_GROWTH_MB = 150          # resident memory may grow this much (allocator slack, torch caches)
FD_GROWTH = 16               # open file descriptors
CACHE_FACTOR = 1.5           # files (and folders) in Gradio's cache: at most this times the warm-up count, + 20
SAMPLE_EVERY = 5             # seconds between samples of the server
OVERSIZE = 21 * 2**20        # bytes of an upload over the app's 20 MB default limit
MIX = {"classify": 30, "predict": 25, "mistakes": 12, "gradcam_gallery": 8, "run_summary": 5,
       "bad_upload": 15, "oversize_upload": 5}  # relative frequency of each call


# -- the server (child process) and what is measured of it ------------------------------------------


def serve(run_dir: str, port: int, cache_seconds: int) -> None:
    from cifarkit.serve.app import launch
    launch(run_dir, port=port, cache_seconds=cache_seconds, quiet=True)  # blocks until killed


def sample(pid: int, cache: Path) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    files = sum(len(f) for _, _, f in os.walk(cache))
    folders = sum(len(d) for _, d, _ in os.walk(cache))
    return {"rss_mb": rss_kb / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")), "cache_files": files,
            "cache_folders": folders}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, limit: float = 180) -> None:
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            sys.exit(f"the app exited with {proc.returncode} before answering")
        try:
            urllib.request.urlopen(url + "config", timeout=5)
            return
        except OSError:
            time.sleep(1)
    sys.exit(f"the app did not answer within {limit:.0f} s")


# -- the clients --------------------------------------------------------------------------------------


def make_inputs(run_dir: Path, folder: Path) -> dict[str, list[str]]:
    """Good images (the run's examples and noisy copies) and bad ones, written once."""
    rng = np.random.default_rng(0)
    examples = sorted((run_dir / "examples").glob("*.png"))
    good = [str(p) for p in examples]
    for i, p in enumerate(examples):
        base = np.asarray(Image.open(p).convert("RGB").resize((64, 48)), dtype=int)
        noisy = np.clip(base + rng.integers(-10, 11, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"user-{i}.jpg")
        good.append(str(folder / f"user-{i}.jpg"))
    (folder / "notes.png").write_text("not an image")
    raw = Path(examples[0]).read_bytes()
    (folder / "cut.png").write_bytes(raw[: len(raw) // 2])
    Image.new("L", (9000, 5000)).save(folder / "huge.png", compress_level=9)  # 45 MP: over the limit
    return {"good": good, "bad": [str(folder / n) for n in ("notes.png", "cut.png", "huge.png")], "folder": folder}


def read_image(path: str) -> None:
    with Image.open(path) as im:
        im.load()                      # a download cut short raises here
    os.unlink(path)                    # the client's copy; keeps the client's folder small


def upload_status(port: int, name: str, size: int) -> tuple[int, str]:
    """POST an upload of `size` bytes to /gradio_api/upload; (status, body). A server that refuses
    it answers before reading it all: stop sending as soon as the answer arrives, then read it."""
    boundary = "cifarkit-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    body = head + b"\x89PNG" + bytes(size - 4) + f"\r\n--{boundary}--\r\n".encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    try:
        sock.sendall((f"POST /gradio_api/upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: "
                      f"multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode())
        for i in range(0, len(body), 2**16):
            if select.select([sock], [], [], 0)[0]:
                break                                   # the answer came before the whole body
            try:
                sock.sendall(body[i:i + 2**16])
            except (BrokenPipeError, ConnectionResetError):
                break
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        sock.close()


def oversize_upload(port: int) -> None:
    status, _ = upload_status(port, "big.png", OVERSIZE)
    if status != 413:
        raise AssertionError(f"an upload over the limit answered {status}, not 413")


def new_image(folder: Path, rng: random.Random) -> str:
    """An image no one sent before, as most visitors' images are (each gets a folder in Gradio's cache)."""
    path = folder / f"new-{rng.getrandbits(64):016x}.jpg"
    pixels = np.random.default_rng(rng.getrandbits(32)).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def good_image(inputs: dict, rng: random.Random) -> str:
    """Half the time an image seen before (the examples row), half the time a new one."""
    return rng.choice(inputs["good"]) if rng.random() < 0.5 else new_image(inputs["folder"], rng)


def call(client, kind: str, inputs: dict, rng: random.Random, url: str) -> None:
    from gradio_client import handle_file
    if kind == "classify":
        label, overlay, view, set_line = client.predict(handle_file(good_image(inputs, rng)), rng.randint(1, 10),
                                                        0.5, rng.choice(["block1", "block2", "block3"]), "gradcam",
                                                        rng.choice(["off", "80%", "90%", "95%"]), api_name="/classify")
        assert label["label"], label
        read_image(overlay)
        read_image(view)
    elif kind == "predict":
        assert client.predict(handle_file(good_image(inputs, rng)), 3, api_name="/predict")["label"]
    elif kind == "mistakes":
        for item in client.predict(rng.randint(1, 30), "any", "any", api_name="/mistakes"):
            read_image(item["image"])
    elif kind == "gradcam_gallery":
        for item in client.predict(rng.randint(1, 8), 0.5, "block3", rng.choice(["mistakes", "correct", "random"]),
                                   api_name="/gradcam_gallery"):
            read_image(item["image"])
    elif kind == "run_summary":
        assert "Test accuracy" in client.predict(api_name="/run_summary")
    elif kind == "bad_upload":
        try:
            client.predict(handle_file(rng.choice(inputs["bad"])), 3, api_name="/predict")
        except Exception as exc:  # the one-line message, naming the file and nothing of the server
            text = str(exc)
            if not ("cannot read image" in text or "pixel limit" in text) or "/tmp" in text:
                raise AssertionError(f"bad upload answered: {text[:200]}") from None
            return
        raise AssertionError("a bad upload was classified")
    elif kind == "oversize_upload":
        oversize_upload(int(url.rsplit(":", 1)[1].strip("/")))


def client_loop(i: int, url: str, inputs: dict, deadline: float, downloads: Path, out: dict, lock) -> None:
    from gradio_client import Client
    rng = random.Random(i)
    folder = downloads / str(i)
    client = Client(url, verbose=False, download_files=str(folder))
    kinds, weights = list(MIX), list(MIX.values())
    while time.time() < deadline:
        kind = rng.choices(kinds, weights)[0]
        t = time.perf_counter()
        try:
            call(client, kind, inputs, rng, url)
            ok = True
        except Exception as exc:
            ok = False
            with lock:
                out["failures"].append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
        with lock:
            out["latency"].setdefault(kind, []).append((time.perf_counter() - t, ok))


# -- the run ------------------------------------------------------------------------------------------


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=1200, help="traffic, warm-up included")
    p.add_argument("--warmup", type=float, default=180, help="seconds before the first sample that counts")
    p.add_argument("--cache-seconds", type=int, default=60, help="the app's cache lifetime for this run")
    p.add_argument("--short", action="store_true", help="1 minute, 5 clients, 30 s warm-up, 20 s cache")
    p.add_argument("--serve", nargs=2, metavar=("PORT", "CACHE_SECONDS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.run_dir, int(args.serve[0]), int(args.serve[1]))
        return 0
    if args.short:
        args.clients, args.seconds, args.warmup, args.cache_seconds = 5, 60, 30, 20

    work = Path(tempfile.mkdtemp(prefix="cifarkit-soak-"))
    cache, downloads, images = work / "gradio-cache", work / "downloads", work / "inputs"
    for d in (cache, downloads, images):
        d.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_TEMP_DIR": str(cache), "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, __file__, args.run_dir, "--serve", str(port), str(args.cache_seconds)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(work / "server.log", "w"))
    try:
        wait_until_up(url, server)
        inputs = make_inputs(Path(args.run_dir), images)
        out, lock = {"latency": {}, "failures": []}, threading.Lock()
        t0 = time.time()
        deadline = t0 + args.seconds
        threads = [threading.Thread(target=client_loop, args=(i, url, inputs, deadline, downloads, out, lock),
                                    daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        timeline = []
        while any(t.is_alive() for t in threads) and time.time() < deadline + 300:
            timeline.append((time.time() - t0, sample(server.pid, cache)))
            time.sleep(SAMPLE_EVERY)
        end = sample(server.pid, cache)
        stuck = sum(t.is_alive() for t in threads)
    finally:
        server.terminate()
        server.wait(timeout=60)
    warm = next((s for t, s in timeline if t >= args.warmup), timeline[-1][1])
    return report(args, warm, end, timeline, out, stuck, work)


def report(args, warm: dict, end: dict, timeline, out: dict, stuck: int, work: Path) -> int:
    print(f"soak: {args.clients} clients, {args.seconds:.0f} s of traffic, warm-up {args.warmup:.0f} s, "
          f"cache lifetime {args.cache_seconds} s")
    print(f"{'endpoint':16s} {'calls':>6s} {'failed':>6s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for kind in MIX:
        lat = out["latency"].get(kind, [])
        if lat:
            xs = [t for t, _ in lat]
            print(f"{kind:16s} {len(lat):6d} {sum(not ok for _, ok in lat):6d} "
                  f"{statistics.median(xs) * 1000:8.0f} {percentile(xs, 0.95) * 1000:8.0f}")
    peak = {k: max(s[k] for _, s in timeline) for k in warm}
    print(f"{'server':16s} {'warm-up':>10s} {'end':>10s} {'peak':>10s} bound")
    bounds = {"rss_mb": warm["rss_mb"] + RSS_GROWTH_MB, "fds": warm["fds"] + FD_GROWTH,
              "cache_files": CACHE_FACTOR * warm["cache_files"] + 20,
              "cache_folders": CACHE_FACTOR * warm["cache_folders"] + 20}
    problems = []
    for k in warm:
        b = bounds[k]
        print(f"{k:16s} {warm[k]:10.0f} {end[k]:10.0f} {peak[k]:10.0f} {'' if b is None else f'<= {b:.0f}'}")
        if b is not None and end[k] > b:
            problems.append(f"{k} ended at {end[k]:.0f}, over its bound {b:.0f}")
    step = max(1, len(timeline) // 12)
    print("timeline (s: rss MB / fds / cache files / cache folders): " + ", ".join(
        f"{t:.0f}: {x['rss_mb']:.0f}/{x['fds']}/{x['cache_files']}/{x['cache_folders']}" for t, x in timeline[::step]))
    calls = sum(len(v) for v in out["latency"].values())
    if calls == 0:
        problems.append("no call completed")
    if stuck:
        problems.append(f"{stuck} clients still waiting at the end")
    if out["failures"]:
        problems.append(f"{len(out['failures'])} calls failed, first: {out['failures'][0]}")
    for line in problems:
        print(f"FAIL: {line}")
    if not problems:
        shutil.rmtree(work, ignore_errors=True)
        print("ok: every bound held")
    else:
        print(f"kept for a look: {work} (server.log)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
