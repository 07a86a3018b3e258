"""How many of the flagged test images are real label errors: the report's rule before and after.

Usage: python bench/label_errors.py RUN [RUN ...] [--list CSV] [--cache DIR] [--variants] [--show N]

Each RUN is a finished run on CIFAR-10 (the JPEG-q75 copy, or any ImageFolder copy that keeps the
original order within each class folder). The truth is the list of CIFAR-10 test images a human
study put before five Mechanical Turk workers each (bench/data/cifar10_test_label_errors.csv, built
by bench/label_errors_list.py): 275 candidates, of which 54 are confirmed label errors (fewer than 3
of the 5 workers chose the given label). An image the study never showed its workers counts as not
confirmed, so every precision here is a lower bound.

Per run, and for all the runs as one ensemble when there are several:
- before: confident learning's rule on the plain calibrated probabilities (find_label_issues);
- after: rank_label_issues, self-confidence of the given label (what the report now flags);
- with --variants, the signals measured and left out: the six test-time views averaged (for the
  POOL images of lowest plain self-confidence; deeper ones never reach the first 100), per-class
  thresholds t_j from the run's held-out split (p_given / t_given, and cleanlab's subtraction of
  t), and the margin p_suggested - p_given.
Columns: confirmed among the first 20, 50 and 100, the images listed and flagged, recall of the 54
among all listed and among the first 100, and how many of the flagged and of the first 100 the
study's workers saw. Predictions are cached in --cache (one file per run and weights), so a second
call costs no forward pass.
"""
import argparse
import csv
import hashlib
import time
from pathlib import Path

import numpy as np

from cifarkit.data.sources import load_arrays
from cifarkit.rundir import RunDir
from cifarkit.trust import label_issues as li
from cifarkit.trust.calibration import held_out
from cifarkit.weights import load

LIST = Path(__file__).parent / "data" / "cifar10_test_label_errors.csv"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
POOL = 1000   # images given all six views: the lowest plain self-confidence


def views(images: np.ndarray) -> list[np.ndarray]:
    """The six views of test-time augmentation level 2 (train/module.py tta_logits) of uint8 images
    (N, H, W, C): as is, mirrored, shifted one pixel up-left and down-right (reflect padding, which
    commutes with the per-channel normalization), and the mirrors of those."""
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")   # (N, H+2, W+2, C)
    out = []
    for v in (images, padded[:, :h, :w], padded[:, 2:, 2:]):
        out += [np.ascontiguousarray(v), np.ascontiguousarray(v[:, :, ::-1])]
    return out


def read_list(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(confirmed, candidates) as positions in the copy's test split, and position -> row."""
    rows = list(csv.DictReader(open(path, newline="")))
    cand = np.array([int(r["our_index"]) for r in rows])
    conf = np.array([int(r["our_index"]) for r in rows if r["confirmed"] == "1"])
    return conf, cand, {int(r["our_index"]): r for r in rows}


def predictions(run_dir: str, cache: Path) -> dict:
    """Plain probabilities (N, K), all six views (6, N, K; NaN outside the pool), held-out t_j (K; NaN
    for a run that holds no images out)."""
    run = RunDir.open(run_dir, need=("config", "weights"))
    key = hashlib.sha1(f"{run.path.resolve()}:{run.weights_file.stat().st_mtime_ns}:{POOL}".encode()).hexdigest()
    f = cache / f"{run.name}-{key[:12]}.npz"
    if f.is_file():
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    start = time.time()
    arrays = load_arrays(*run.data_source())
    model = load(run.path)
    x, y = arrays.test_x, arrays.test_y
    plain = model.probabilities(x).numpy()                                     # (N, K)
    pool = np.sort(np.argsort(plain[np.arange(len(y)), y], kind="stable")[:POOL])
    all_views = np.full((6, *plain.shape), np.nan)
    all_views[0] = plain
    for v, xv in enumerate(views(x[pool])[1:], start=1):
        all_views[v, pool] = model.probabilities(xv).numpy()
    cfg, t = run.read_config(), np.full(plain.shape[1], np.nan)
    if cfg.calib_size or cfg.val_size:  # a run without either trained on every training image
        idx, _ = held_out(run, arrays)
        t = li.class_thresholds(model.probabilities(arrays.train_x[idx]).numpy(), arrays.train_y[idx])
    out = {"plain": plain, "views": all_views, "labels": y, "thresholds": t}
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(f, **out)
    print(f"{run.name}: predictions in {time.time() - start:.0f} s (cached in {f})", flush=True)
    return out


def ordered(score: np.ndarray, mean: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The images whose averaged prediction is another class, by score, lowest first."""
    idx = np.flatnonzero(mean.argmax(1) != y)
    return idx[np.argsort(score[idx], kind="stable")]


def variants(v: dict, y: np.ndarray) -> list[tuple[str, np.ndarray]]:
    rows = np.arange(len(y))
    mean = np.nanmean(v["views"], 0)                                           # (N, K)
    out = [("after + the six views", li.rank_label_issues(v["views"], y).indices)]
    t = v["thresholds"]
    if not np.isnan(t).any():
        out.append(("after, p_given / t_given", ordered(v["plain"][rows, y] / t[y], v["plain"], y)))
        adjusted = v["plain"] - t + t.max()                                    # cleanlab's adjust_pred_probs
        adjusted /= adjusted.sum(1, keepdims=True)
        out.append(("after, cleanlab's t-adjusted", ordered(adjusted[rows, y], v["plain"], y)))
    others = v["plain"].copy()
    others[rows, y] = -1
    out.append(("after, by margin", ordered(v["plain"][rows, y] - others.max(1), v["plain"], y)))
    others_mean = mean.copy()
    others_mean[rows, y] = -1
    out.append(("after + the six views, by margin", ordered(mean[rows, y] - others_mean.max(1), mean, y)))
    return out


def row(name: str, rule: str, order: np.ndarray, flagged: int, conf: np.ndarray, cand: np.ndarray) -> str:
    hit = np.isin(order, conf)
    firsts = " | ".join(f"{hit[:k].sum()}/{min(k, len(order))}" for k in (20, 50, 100))
    return (f"| {name} | {rule} | {firsts} | {len(order):,} | {flagged:,} | {hit.sum()}/{len(conf)} "
            f"({hit.sum() / len(conf):.0%}) | {hit[:100].sum()}/{len(conf)} ({hit[:100].sum() / len(conf):.0%}) | "
            f"{np.isin(order[:flagged], cand).sum()}/{flagged} | {np.isin(order[:100], cand).sum()}/{min(100, len(order))} |")


def show(issues: li.LabelIssues, n: int, by_index: dict) -> None:
    for r, i in enumerate(issues.indices[:n]):
        s = by_index.get(int(i))
        seen = (f"the study: {s['votes_given']}/5 chose the given label{', CONFIRMED' if s['confirmed'] == '1' else ''}"
                if s else "not checked by the study")
        print(f"    {r + 1:3d}. test {i:5d} {CLASSES[issues.given[r]]} -> {CLASSES[issues.suggested[r]]} "
              f"p_given {issues.p_given[r]:.3f}; {seen}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--list", type=Path, default=LIST)
    p.add_argument("--cache", type=Path, default=Path("runs/label-errors-cache"))
    p.add_argument("--variants", action="store_true", help="also the signals measured and left out")
    p.add_argument("--show", type=int, default=0, help="print the first N of the new ranking of each run")
    args = p.parse_args()
    conf, cand, by_index = read_list(args.list)
    preds = {r: predictions(r, args.cache) for r in args.runs}
    y = next(iter(preds.values()))["labels"]
    if len(y) != 10_000 or any(not np.array_equal(v["labels"], y) for v in preds.values()):
        raise SystemExit("every run must be scored on the same CIFAR-10 test split of 10,000 images")
    if any(r["given_label"] != CLASSES[y[i]] for i, r in by_index.items()):
        raise SystemExit("the listed images carry other labels in this copy: not CIFAR-10 in its original order")
    print("| run | rule | first 20 | first 50 | first 100 | listed | flagged | recall, listed | recall, first 100 | "
          "flagged the study checked | first 100 the study checked |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run, v in preds.items():
        name = Path(run).name
        before = li.find_label_issues(v["plain"], y)
        after = li.rank_label_issues(v["plain"], y)
        print(row(name, "before", before.indices, len(before), conf, cand))
        print(row(name, "after", after.indices, after.flagged, conf, cand))
        for rule, order in variants(v, y) if args.variants else ():
            print(row(name, rule, order, li.FLAGGED, conf, cand))
        if args.show:
            show(after, args.show, by_index)
    if len(preds) > 1:
        name = f"ensemble of {len(preds)}"
        after = li.rank_label_issues(np.stack([v["plain"] for v in preds.values()]), y)
        print(row(name, "after", after.indices, after.flagged, conf, cand))
        if args.variants:
            views_all = np.concatenate([v["views"] for v in preds.values()])   # (6 x runs, N, K)
            print(row(name, "after + the six views", li.rank_label_issues(views_all, y).indices, li.FLAGGED, conf, cand))


if __name__ == "__main__":
    main()
