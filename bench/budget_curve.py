"""Accuracy against time on this machine: `--preset fast --time-budget B` beside airbench94 scaled to B.

Usage:
  python bench/budget_curve.py --budgets 3m 5m 8m 12m 15m 20m [--seeds 0] [--out runs/curve] \
      [--airbench "python /path/to/airbench94_cpu.py" --airbench-dir DIR --airbench-line W1 W99]
  python bench/budget_curve.py --seeds 0 1 2 --airbench ... --airbench-epochs 9.9 --share 0.75   # headline
  python bench/budget_curve.py --merge runs/curve-short runs/curve-headline --out bench/figures/curve  # one picture

For each budget and seed, interleaved: `cifarkit train --preset fast --time-budget B --seed S`
(wall-clock from command start to printed test accuracy, the data already decoded), then, when
--airbench is given, airbench94 with its epoch count chosen so that its wall-clock lands on the
same budget: its command is run as `CMD SEED EPOCHS` in --airbench-dir and prints
`RESULT seed=S epochs=E tta_acc=A ...` (a port of its own script kept outside this repository; see
BENCHMARKS.md for what it changes). Its epochs for a budget come from the straight line through two
measured points, --airbench-line W1 W99: its wall-clock seconds at 1 and at 9.9 epochs.
The headline, --share 0.75 with --airbench-epochs 9.9: for each seed airbench94 runs its own recipe
first, and cifarkit's budget is 0.75x the wall-clock it just took (both rows grouped as "headline").
Writes OUT/curve.json, OUT/curve.md and OUT/curve.png (--merge: the same from several such folders'
curve.json, without running anything; a budget with several seeds is drawn at their mean). Run alone
on the machine.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from matplotlib.figure import Figure

from cifarkit.train.budget import parse_budget
from cifarkit.rundir import RunDir
from cifarkit.data.sources import load_arrays


def run_cifarkit(budget: str, seed: int, out: Path, extra: list[str]) -> dict:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cifarkit", "train", "--preset", "fast", "--time-budget", budget,
                    "--seed", str(seed), "--out", str(out), "--no-report", "--quiet", *extra], check=True)
    wall = time.perf_counter() - t
    res = RunDir(out).read_results()
    return {"system": "cifarkit", "budget": parse_budget(budget), "seed": seed, "test_acc": res.test_acc,
            "wall_seconds": round(wall, 1), "epochs": res.plan["epochs"] if res.plan else res.epochs}


def airbench_epochs(budget: float, w1: float, w99: float) -> float:
    """Epochs whose predicted wall-clock is the budget, on the line through (1, w1) and (9.9, w99)."""
    return max(0.2, 1 + (budget - w1) * (9.9 - 1) / (w99 - w1))


def run_airbench(cmd: str, folder: str, budget: float, seed: int, line, epochs: float | None = None) -> dict:
    epochs = epochs or round(airbench_epochs(budget, *line), 2)
    t = time.perf_counter()
    r = subprocess.run([*shlex.split(cmd), str(seed), str(epochs)], cwd=folder, capture_output=True, text=True,
                       check=True)
    wall = time.perf_counter() - t
    m = re.search(r"RESULT seed=\d+ epochs=([\d.]+) tta_acc=([\d.]+)", r.stdout)
    return {"system": "airbench94", "budget": budget, "seed": seed, "test_acc": float(m.group(2)),
            "wall_seconds": round(wall, 1), "epochs": float(m.group(1))}


def means(rows: list[dict], system: str) -> list[tuple[float, float]]:
    """(wall-clock minutes, test accuracy %) per budget (or group) of one system, the mean over its seeds,
    by time."""
    by_budget: dict[float | str, list[dict]] = {}
    for r in rows:
        if r["system"] == system:
            by_budget.setdefault(r.get("group", r["budget"]), []).append(r)
    return sorted((sum(r["wall_seconds"] for r in rs) / len(rs) / 60, 100 * sum(r["test_acc"] for r in rs) / len(rs))
                  for rs in by_budget.values())


def label(row: dict) -> str:
    """The budget column: its minutes, or the group and cifarkit's budget (the headline)."""
    if "group" in row:
        return row["group"] + (f" ({row['budget']:.0f} s budget)" if row["system"] == "cifarkit" else "")
    return f"{row['budget'] / 60:g} min"


def figure(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for system, marker in (("cifarkit", "o"), ("airbench94", "s")):
        pts = means(rows, system)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=system if system == "airbench94" else "cifarkit --preset fast "
                    "--time-budget")
    ax.set(xlabel="wall-clock minutes (command start to printed test accuracy)",
           ylabel="test accuracy (%)", title="CIFAR-10, JPEG-q75 copy, 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", nargs="+", default=["3m", "5m", "8m", "12m", "15m", "20m"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", default="runs/curve")
    p.add_argument("--airbench", help="command of an airbench94 CPU port: CMD SEED EPOCHS")
    p.add_argument("--airbench-dir", default=".")
    p.add_argument("--airbench-line", type=float, nargs=2, metavar=("W1", "W99"),
                   help="its measured wall-clock seconds at 1 and at 9.9 epochs")
    p.add_argument("--airbench-epochs", type=float, help="run it for these epochs at every budget instead "
                                                          "(e.g. 9.9, its own recipe, for the headline comparison)")
    p.add_argument("extra", nargs="*", help="more `cifarkit train` flags, after --")
    p.add_argument("--share", type=float, help="the headline: cifarkit's budget is this share of the "
                                                "wall-clock of the airbench94 run just before it")
    p.add_argument("--merge", nargs="+", metavar="DIR", help="draw and tabulate these folders' curve.json "
                                                              "together instead of running")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for d in args.merge for r in json.loads((Path(d) / "curve.json").read_text())] if args.merge else []
    if not args.merge:
        load_arrays()  # warm the decode cache: the curve times training, not the first decode

    def record(row: dict) -> dict:  # each run's row as soon as it ends: an interrupted curve keeps it
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "curve.json").write_text(json.dumps(rows, indent=2))
        return row

    if args.share:
        if not (args.airbench and args.airbench_epochs):
            p.error("--share needs --airbench and --airbench-epochs")
        for seed in args.seeds:
            ab = record({**run_airbench(args.airbench, args.airbench_dir, 0.0, seed, None, args.airbench_epochs),
                         "group": "headline"})
            budget = f"{round(args.share * ab['wall_seconds'])}s"
            record({**run_cifarkit(budget, seed, out / f"fast-share{args.share:g}-seed{seed}", args.extra),
                    "group": "headline"})
    for budget in [] if args.merge or args.share else args.budgets:
        for seed in args.seeds:
            record(run_cifarkit(budget, seed, out / f"fast-{budget}-seed{seed}", args.extra))
            if args.airbench:
                record(run_airbench(args.airbench, args.airbench_dir, parse_budget(budget), seed,
                                    args.airbench_line, args.airbench_epochs))
    table = ["| budget | system | seed | epochs | test accuracy | wall-clock s |", "| --- | --- | --- | --- | --- | --- |"]
    rows.sort(key=lambda r: ("group" in r, r["budget"] if "group" not in r else 0, r["system"] != "cifarkit", r["seed"]))
    (out / "curve.json").write_text(json.dumps(rows, indent=2))
    table += [f"| {label(r)} | {r['system']} | {r['seed']} | {r['epochs']:.2f} | {100 * r['test_acc']:.2f}% | "
              f"{r['wall_seconds']:.0f} |" for r in rows]
    (out / "curve.md").write_text("\n".join(table) + "\n")
    figure(rows).savefig(out / "curve.png", dpi=120, bbox_inches="tight")
    print("\n".join(table))


if __name__ == "__main__":
    main()
