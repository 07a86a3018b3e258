"""The prepared GPU check: cifarkit against airbench94 on one GPU, in one sitting, within a deadline.

Usage (see bench/gpu_check.sh, which installs what it needs first):
  python bench/gpu_check.py --out OUT [--seeds 5] [--deadline 540] [--airbench .airbench] [--smoke]

Writes OUT/gpu_check.json and OUT/gpu_check.md:
1. the card, driver, torch and CUDA versions;
2. `cifarkit train --preset fast` over the seeds: test accuracy (mean +- sd), seconds (results.json:
   fit start to tested weights, compile included) and training seconds (the epochs alone);
3. airbench94's legacy script and its Muon variant, run unmodified from a copy of their public
   repository placed in --airbench (git-ignored; never committed), on the same data (written here
   as their train.pt / test.pt, in a fixed shuffled order); their own per-run timers are parsed
   from their printed tables and the first --seeds runs kept; the Muon variant's compile is reported
   apart (its warm-up run minus a timed run). A script that cannot finish before the deadline is
   stopped and the table says so;
4. resnet18_gn: `--preset seed` for --seed-epochs epochs (seconds per epoch, accuracy, the layout
   channels_last against contiguous for one epoch) and bench/seed_pipeline.py, the seed project's
   own pipeline (needs albumentations; skipped with a note where it is missing).
--smoke (or GPU_CHECK_SMOKE=1): every step on the CPU on a small subset, in about 2 minutes, so no
GPU time is spent on a typo. The airbench scripts need CUDA: in smoke mode their data files are
written and their output parser runs on the CPU port's table format, but they are not started.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def parse_airbench(text: str) -> list[dict]:
    """Per-run rows of an airbench script's printed table: [{run, tta_acc, seconds}], in order.

    The table's header names the columns (legacy: total_time_seconds; Muon: time_seconds); a run's
    last row has epoch 'eval' and holds its test-time-augmented accuracy and its own timer."""
    runs, cols, run = [], None, None
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "epoch" in cells and "run" in cells:
            cols = {name: i for i, name in enumerate(cells)}
            continue
        if cols is None or len(cells) != len(cols):
            continue
        run = cells[cols["run"]] or run
        if cells[cols["epoch"]] == "eval":
            seconds = cells[cols.get("total_time_seconds", cols.get("time_seconds"))]
            runs.append({"run": run, "tta_acc": float(cells[cols["tta_val_acc"]]), "seconds": float(seconds)})
    return runs


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


class Check:
    def __init__(self, args):
        self.args, self.out, self.start = args, Path(args.out), time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.result: dict = {"smoke": args.smoke, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", CIFARKIT_DATA=str(args.data))

    def left(self) -> float:
        return self.args.deadline - (time.time() - self.start)

    def run(self, cmd: list[str], timeout: float, cwd=None) -> tuple[int, str, float]:
        """(exit code or -1 when stopped at the timeout, output, seconds); the output goes to a log too."""
        t = time.time()
        log = self.out / f"log-{len(list(self.out.glob('log-*')))}.txt"
        with open(log, "w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            try:
                code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=self.env,
                                      timeout=max(timeout, 1)).returncode
            except subprocess.TimeoutExpired:
                code = -1
        return code, log.read_text(), time.time() - t

    # -- 1. the machine ----------------------------------------------------------------------------

    def machine(self) -> None:
        m = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cpu_count": os.cpu_count()}
        if torch.cuda.is_available():
            m["gpu"] = torch.cuda.get_device_name(0)
            m["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
            try:
                m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                             capture_output=True, text=True, timeout=30).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                m["driver"] = "unknown"
        else:
            m["gpu"] = "none (CPU)"
        self.result["machine"] = m

    # -- 2. the fast preset ----------------------------------------------------------------------

    def train(self, name: str, flags: list[str], timeout: float) -> dict:
        from cifarkit.rundir import RunDir
        out = self.out / "runs" / name
        code, text, wall = self.run([sys.executable, "-m", "cifarkit", "train", *flags, "--out", str(out),
                                     "--no-report", *self.args.smoke_flags], timeout)
        res = RunDir(out).read_results() if code == 0 else None
        if res is None:
            return {"name": name, "error": f"exit {code}: {text.strip().splitlines()[-1] if text.strip() else ''}"}
        epochs = RunDir(out).read_metrics()["epoch"].get("epoch_seconds", [])
        return {"name": name, "test_acc": res.test_acc, "seconds": res.seconds, "wall_seconds": round(wall, 1),
                "train_seconds": round(float(np.nansum(epochs)), 1), "epoch_seconds": [round(e, 2) for e in epochs],
                "precision": res.precision}

    def fast(self) -> None:
        runs = []
        for seed in range(self.args.seeds):
            if self.left() < 60:
                break
            runs.append(self.train(f"fast-seed{seed}", ["--preset", "fast", "--seed", str(seed)], self.left() - 30))
        ok = [r for r in runs if "test_acc" in r]
        summary = {"runs": runs}
        if ok:
            summary["test_acc"] = mean_sd([r["test_acc"] for r in ok])
            summary["seconds"] = mean_sd([r["seconds"] for r in ok])
            summary["train_seconds"] = mean_sd([r["train_seconds"] for r in ok])
        self.result["fast"] = summary

    # -- 3. airbench94, legacy and Muon ----------------------------------------------------------------

    def airbench_data(self, folder: Path) -> None:
        """Its train.pt / test.pt from the same decoded copy, in a fixed shuffled order (the original
        CIFAR-10 files are shuffled; an ImageFolder copy is sorted by class, which would give its
        whitening layer 5,000 images of one class)."""
        from cifarkit.data.sources import load_arrays
        a = load_arrays(str(self.args.data))
        order = np.random.default_rng(0).permutation(len(a.train_y))
        (folder / "cifar10").mkdir(parents=True, exist_ok=True)
        for split, x, y in (("train", a.train_x[order], a.train_y[order]), ("test", a.test_x, a.test_y)):
            torch.save({"images": torch.from_numpy(x), "labels": torch.from_numpy(y), "classes": a.classes},
                       folder / "cifar10" / f"{split}.pt")

    def airbench(self) -> None:
        folder = Path(self.args.airbench)
        scripts = {"airbench94": folder / "airbench94.py", "airbench94_muon": folder / "airbench94_muon.py"}
        if not all(p.is_file() for p in scripts.values()):
            self.result["airbench"] = {"skipped": f"no copy of airbench's scripts in {folder} (see bench/gpu_check.sh)"}
            return
        self.airbench_data(folder)
        if not torch.cuda.is_available():
            sample = "|  run   |  epoch  |  tta_val_acc  |  total_time_seconds  |\n|  0  |  eval  |  0.9100  |  3.8000  |"
            assert parse_airbench(sample) == [{"run": "0", "tta_acc": 0.91, "seconds": 3.8}]
            self.result["airbench"] = {"skipped": "needs CUDA (smoke mode: data written, parser checked)"}
            return
        out = {}
        for k, (name, script) in enumerate(scripts.items()):
            budget = (self.left() - 120) / (len(scripts) - k)  # 2 minutes stay for step 4
            log, t, first_row_at = self.out / f"{name}.log", time.time(), None
            with open(log, "w") as f:
                proc = subprocess.Popen([sys.executable, script.name], cwd=folder, env=self.env,
                                        stdout=f, stderr=subprocess.STDOUT)
                while proc.poll() is None and time.time() - t < budget:
                    time.sleep(1)
                    runs = parse_airbench(log.read_text())
                    if runs and first_row_at is None:
                        first_row_at = time.time() - t
                    if len([r for r in runs if r["run"] != "warmup"]) >= self.args.seeds:
                        break
                proc.kill()
                proc.wait()
            runs = parse_airbench(log.read_text())
            timed = [r for r in runs if r["run"] != "warmup"][: self.args.seeds]
            entry = {"runs": timed, "stopped_after_seconds": round(time.time() - t, 1)}
            if timed:
                entry["tta_acc"] = mean_sd([r["tta_acc"] for r in timed])
                entry["seconds"] = mean_sd([r["seconds"] for r in timed])
            warm = [r for r in runs if r["run"] == "warmup"]
            if warm and timed:  # compiled with max-autotune during its warm-up run
                entry["compile_seconds"] = round(warm[0]["seconds"] - entry["seconds"][0], 1)
                entry["seconds_to_first_row"] = round(first_row_at or 0, 1)
            if len(timed) < self.args.seeds:
                entry["note"] = f"stopped after {len(timed)} of {self.args.seeds} runs, at its share of the deadline"
            out[name] = entry
        self.result["airbench"] = out

    # -- 4. resnet18_gn: the seed preset and the seed's own pipeline ----------------------------------

    def seed(self) -> None:
        e = str(self.args.seed_epochs)
        res = {"preset": self.train("seed", ["--preset", "seed", "--epochs", e], max(self.left() - 60, 45))}
        res["contiguous_layout"] = self.train("seed-contiguous", ["--preset", "seed", "--epochs", "1",
                                                                  "--no-channels-last", "--lr", "0.1"],
                                              max(self.left() - 30, 30))
        try:
            import albumentations  # noqa: F401
        except ImportError:
            res["seed_pipeline"] = {"skipped": "albumentations is not installed (the seed pipeline's library)"}
        else:
            # smoke: its images/s mode for a few steps (its accuracy mode starts with an LR range test)
            how = ["--steps", "2", "--rounds", "1", "--batch-size", "16"] if self.args.smoke else \
                ["--epochs", e, "--workers", "8", "--out", str(self.out / "runs")]
            code, text, wall = self.run([sys.executable, str(ROOT / "bench" / "seed_pipeline.py"), *how],
                                        max(self.left() - 10, 30))
            line = [ln for ln in text.splitlines() if "seed pipeline" in ln]
            res["seed_pipeline"] = {"line": line[-1] if line else f"exit {code}", "wall_seconds": round(wall, 1)}
        self.result["seed"] = res

    # -- the report ---------------------------------------------------------------------------------

    def write(self) -> None:
        self.result["seconds"] = round(time.time() - self.start, 1)
        (self.out / "gpu_check.json").write_text(json.dumps(self.result, indent=2))
        (self.out / "gpu_check.md").write_text(markdown(self.result))


def _pm(pair, scale=1.0, fmt="{:.2f}") -> str:
    return f"{fmt.format(pair[0] * scale)} +- {fmt.format(pair[1] * scale)}" if pair else "-"


def markdown(r: dict) -> str:
    m = r.get("machine", {})
    lines = [f"# GPU check, {r['date']}{' (smoke mode, CPU)' if r['smoke'] else ''}", "",
             f"{m.get('gpu')} (capability {m.get('capability', '-')}, driver {m.get('driver', '-')}), torch "
             f"{m.get('torch')}, CUDA {m.get('cuda')}, Python {m.get('python')}; {r.get('seconds')} s in all.", "",
             "| run | test accuracy (%) | seconds | training seconds | note |", "| --- | --- | --- | --- | --- |"]
    f = r.get("fast", {})
    n = len([x for x in f.get("runs", []) if "test_acc" in x])
    lines.append(f"| cifarkit `--preset fast` ({n} seeds) | {_pm(f.get('test_acc'), 100)} | {_pm(f.get('seconds'))} | "
                 f"{_pm(f.get('train_seconds'))} | results.json seconds: fit start to tested weights |")
    ab = r.get("airbench", {})
    if "skipped" in ab:
        lines.append(f"| airbench94 | - | - | - | {ab['skipped']} |")
    for name, e in ab.items() if "skipped" not in ab else []:
        note = "; ".join(x for x in (e.get("note"), f"compile {e['compile_seconds']} s" if "compile_seconds" in e
                                     else None) if x)
        lines.append(f"| {name} ({len(e['runs'])} runs) | {_pm(e.get('tta_acc'), 100)} | {_pm(e.get('seconds'))} | "
                     f"- | its own timer; {note or 'unmodified script'} |")
    s = r.get("seed", {})
    for key in ("preset", "contiguous_layout"):
        e = s.get(key, {})
        lines.append(f"| resnet18_gn `--preset seed` ({key}) | {100 * e['test_acc']:.2f} | {e['seconds']} | "
                     f"{e['train_seconds']} | epochs: {e['epoch_seconds']} s |" if "test_acc" in e else
                     f"| resnet18_gn ({key}) | - | - | - | {e.get('error', 'not run')} |")
    sp = s.get("seed_pipeline", {})
    lines.append(f"| seed pipeline (bench/seed_pipeline.py) | - | - | - | {sp.get('line') or sp.get('skipped', 'not run')} |")
    return "\n".join(lines) + "\n"


def smoke_data(source, root: Path, per_class: tuple[int, int] = (10, 5)) -> Path:
    """A small ImageFolder copy of the data (10 training and 5 test images per class), so that
    smoke mode's trainings and tests take seconds on a CPU."""
    from PIL import Image

    from cifarkit.data.sources import load_arrays
    a = load_arrays(str(source))
    for split, x, y, n in (("train", a.train_x, a.train_y, per_class[0]), ("test", a.test_x, a.test_y, per_class[1])):
        for c, name in enumerate(a.classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in np.flatnonzero(y == c)[:n]:
                Image.fromarray(x[i]).save(root / split / name / f"{i:05d}.png")
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--seed-epochs", type=int, default=4)
    p.add_argument("--deadline", type=float, default=540, help="seconds for the whole check")
    p.add_argument("--airbench", default=str(ROOT / ".airbench"), help="folder with airbench's two scripts")
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA") or ROOT.parent / "shared/data/cifar10-jpeg.tar.gz")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("GPU_CHECK_SMOKE") == "1")
    args = p.parse_args()
    args.smoke_flags = []
    if args.smoke:  # the CPU, a small subset, tiny schedules: every step runs, nothing measures
        args.seeds, args.seed_epochs, args.deadline = 2, 1, min(args.deadline, 170)
        args.smoke_flags = ["--accelerator", "cpu", "--val-size", "0", "--epochs", "1", "--batch-size", "50",
                            "--eval-batch-size", "100", "--lr", "0.05", "--muon-lr", "0"]
    check = Check(args)
    if args.smoke:
        check.env["CIFARKIT_DATA"] = args.data = str(smoke_data(args.data, check.out / "smoke-data"))
    try:
        for step in (check.machine, check.fast, check.airbench, check.seed):
            step()
            check.write()
    finally:
        check.write()
    print((check.out / "gpu_check.md").read_text())


if __name__ == "__main__":
    main()
