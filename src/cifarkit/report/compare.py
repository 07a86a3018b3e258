"""Runs side by side: which of my runs is better, and why? `cifarkit compare RUN_DIR RUN_DIR... --out DIR`.

compare() returns the data (the settings that differ, the results, each run's curves, per-class
accuracy and test predictions); the figure functions draw it; write_comparison() is the one that
saves: a page that needs nothing but its folder (index.html and its PNGs, no script, nothing
fetched), naming runs and data, never a path of this machine.
Whether a difference is beyond chance (trust/stats.py): the first run against each other, on the
same test images, by McNemar's exact test and a paired bootstrap interval, over all images and per
class; runs of one recipe with different seeds also give that recipe's spread over seeds.
Runs of different models and presets compare; runs tested on different test images, or with
different class lists, do not.
"""
from __future__ import annotations

import dataclasses
import hashlib
import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from ..errors import CifarkitError
from ..presets import TrainConfig
from ..rundir import Results, RunDir
from ..trust import stats

HIDDEN = {"out", "data"}   # always differ or name a path: the data is shown by name instead
# settings that do not make another recipe: the seed, where the run and its data lie, the machine
NOT_RECIPE = HIDDEN | {"seed", "data_name"} | {
    f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("machine")}
SHOWN = 16                 # images per direction in a "one right, the other wrong" grid


@dataclass
class Comparison:
    names: list[str]                            # one per run, in the order given
    settings: list[tuple[str, list[str]]]       # only the settings that differ: (name, one value per run)
    results: list[tuple[str, list[str]]]        # (what, one value per run)
    metrics: list[dict | None]                  # RunDir.read_metrics() of each run; None without metrics.csv
    classes: list[str]
    images: np.ndarray                          # uint8 (N, 32, 32, 3), the shared test set
    labels: np.ndarray                          # (N,)
    probs: np.ndarray                           # (R, N, K) calibrated test probabilities per run
    per_class: np.ndarray                       # (R, K) single-view test accuracy per class
    recipes: list[str] = dataclasses.field(default_factory=list)   # per run: its settings but the seed
    seeds: list[int | None] = dataclasses.field(default_factory=list)
    _differences: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def preds(self) -> np.ndarray:
        return self.probs.argmax(2)                                            # (R, N)

    def right_wrong(self, a: int, b: int) -> np.ndarray:
        """Test indices run a classifies right and run b wrong, b's most confident mistakes first."""
        idx = np.flatnonzero((self.preds[a] == self.labels) & (self.preds[b] != self.labels))
        return idx[np.argsort(-self.probs[b, idx].max(1), kind="stable")]

    def difference(self, a: int, b: int) -> tuple[stats.Difference, list[stats.Difference]]:
        """Run b's single-view accuracy minus run a's, over all test images and per class: a paired
        bootstrap interval and McNemar's exact test (stats.paired_differences)."""
        if (a, b) not in self._differences:
            self._differences[a, b] = stats.paired_differences(self.labels, self.preds[a], self.preds[b],
                                                               len(self.classes))
        return self._differences[a, b]

    def verdicts(self) -> list[str]:
        """One sentence per other run against the first: how far apart, how sure, beyond chance or not."""
        return [stats.verdict(self.names[0], self.names[b], self.difference(0, b)[0])
                for b in range(1, len(self.names))]

    def seed_spread(self) -> list[tuple[list[str], list[int | None], float, float]]:
        """Per recipe given with 2+ seeds: (its runs' names, their seeds, mean and sd of their
        single-view test accuracy)."""
        acc = (self.preds == self.labels).mean(1)                                 # (R,)
        out = []
        for recipe in dict.fromkeys(self.recipes):
            by_seed = {self.seeds[i]: i for i in reversed(range(len(self.recipes))) if self.recipes[i] == recipe}
            if len(by_seed) >= 2:  # a run given twice counts once
                idx = sorted(by_seed.values())
                out.append(([self.names[i] for i in idx], [self.seeds[i] for i in idx], *stats.mean_sd(acc[idx])))
        return out


@dataclass
class _TestSet:
    """What two runs must share to be compared image by image (the images themselves as a hash)."""
    classes: list[str]
    labels: np.ndarray
    images: str


def _test_set(run: RunDir):
    from ..data.sources import load_arrays
    a = load_arrays(*run.data_source())
    images = hashlib.sha1(np.ascontiguousarray(a.test_x).data).hexdigest()
    return _TestSet(list(a.classes), np.asarray(a.test_y), images), a


def _classes(names: list[str]) -> str:
    return f"{len(names)} classes: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"


def _mismatch(first: _TestSet, other: _TestSet) -> str | None:
    """Why two runs cannot be compared image by image, or None."""
    if first.classes != other.classes:
        return f"have different class lists ({_classes(first.classes)} vs {_classes(other.classes)})"
    if len(first.labels) != len(other.labels):
        return f"were tested on different test sets ({len(first.labels):,} vs {len(other.labels):,} test images)"
    if not np.array_equal(first.labels, other.labels):
        return (f"were tested on different test sets (the same {len(first.labels):,} test images in number, "
                f"different labels on {int((first.labels != other.labels).sum()):,} of them)")
    if first.images != other.images:
        return "were tested on different test sets (different test images)"
    return None


def _open(run_dirs) -> tuple[list[RunDir], object]:
    """The runs, refused in one line (before any prediction) unless 2+ runs share one test set and
    one class list."""
    if len(run_dirs) < 2:
        raise CifarkitError(f"compare needs at least two run directories, got {len(run_dirs)}; "
                            "give two or more: cifarkit compare RUN_DIR RUN_DIR ... --out DIR")
    runs = [RunDir.open(d, need=("config", "weights")) for d in run_dirs]
    first, arrays = _test_set(runs[0])
    for run in runs[1:]:
        if why := _mismatch(first, _test_set(run)[0]):
            raise CifarkitError(f"runs {runs[0].name} ({runs[0].data_name()}) and {run.name} ({run.data_name()}) "
                                f"{why}; compare runs of the same data and classes")
    return runs, arrays


def _names(runs: list[RunDir]) -> list[str]:
    names = [r.name for r in runs]
    return [f"{n} ({i + 1})" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _show(v) -> str:
    return json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)


def _recipe(cfg: dict) -> str:
    """A run's settings but its seed, paths and machine: runs alike in this differ by seed alone."""
    return json.dumps({k: _show(v) for k, v in cfg.items() if k not in NOT_RECIPE}, sort_keys=True)


def _settings(runs: list[RunDir]) -> list[tuple[str, list[str]]]:
    show = _show
    configs = [dataclasses.asdict(r.read_config()) for r in runs]
    rows = [("data", [r.data_name() for r in runs])]
    rows += [(k, [show(c.get(k)) for c in configs]) for k in configs[0] if k not in HIDDEN]
    return [(k, vals) for k, vals in rows if len(set(vals)) > 1]


def _results(runs: list[RunDir], probs: np.ndarray, labels: np.ndarray) -> list[tuple[str, list[str]]]:
    from ..trust.calibration import ece
    res = [r.read_results() or Results() for r in runs]

    def fmt(v, spec: str, missing: str = "not recorded") -> str:
        return missing if v is None else format(v, spec)
    return [
        ("test accuracy (the run's own, with its test-time views)", [fmt(r.test_acc, ".2%") for r in res]),
        ("single-view test accuracy", [f"{(p.argmax(1) == labels).mean():.2%}" for p in probs]),
        ("ECE of the calibrated probabilities (15 bins)", [f"{ece(p, labels):.2%}" for p in probs]),
        ("temperature", [fmt(r.temperature, ".3f", "none (run cifarkit calibrate)") for r in res]),
        ("mean corruption accuracy", [fmt(r.mean_corruption_accuracy, ".2%", "not measured (run cifarkit report)")
                                      for r in res]),
        ("seconds", [fmt(r.seconds, ".0f") for r in res]),
        ("model / preset", [f"{r.model} / {r.preset}" for r in res]),
    ]


def compare(run_dirs: list[str | Path]) -> Comparison:
    """Compare 2+ runs tested on the same test set: data for the page and figures below."""
    import torch

    from ..weights import load
    runs, a = _open(run_dirs)
    done: dict[Path, np.ndarray] = {}
    for run in runs:  # a run given twice is predicted once
        key = run.path.resolve()
        if key not in done:
            model = load(run.path)
            model.net.to("cuda" if torch.cuda.is_available() else "cpu")
            done[key] = model.probabilities(a.test_x).numpy()                      # (N, K)
    probs = np.stack([done[r.path.resolve()] for r in runs])                      # (R, N, K)
    k = len(a.classes)
    right = probs.argmax(2) == a.test_y                                            # (R, N)
    per_class = np.stack([np.bincount(a.test_y, weights=ok, minlength=k) for ok in right]) / \
        np.maximum(np.bincount(a.test_y, minlength=k), 1)
    metrics = [r.read_metrics() if r.metrics_file.is_file() else None for r in runs]
    configs = [dataclasses.asdict(r.read_config()) for r in runs]
    return Comparison(_names(runs), _settings(runs), _results(runs, probs, a.test_y), metrics, list(a.classes),
                      a.test_x, a.test_y, probs, per_class, [_recipe(c) for c in configs],
                      [c.get("seed") for c in configs])


# -- figures --------------------------------------------------------------------------------------

def curves_figure(c: Comparison) -> Figure:
    """Training and validation loss and accuracy per epoch, one line per run."""
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2)
    panels = [("train_loss", "Training loss"), ("val_loss", "Validation loss"),
              ("train_acc", "Training accuracy"), ("val_acc", "Validation accuracy")]
    for ax, (key, title) in zip(axes.flat, panels):
        for i, (name, m) in enumerate(zip(c.names, c.metrics)):
            y = None if m is None else m["epoch"].get(key)
            if y is not None and not np.all(np.isnan(y)):
                ax.plot(m["epochs"], y, marker="o", ms=3, color=f"C{i}", label=name)
        if ax.lines:
            ax.legend(fontsize=8)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    missing = [n for n, m in zip(c.names, c.metrics) if m is None]
    if missing:
        fig.suptitle(f"no metrics.csv, so no curves, for: {', '.join(missing)}", color="C3")
    fig.tight_layout()
    return fig


def per_class_figure(c: Comparison) -> Figure:
    """Single-view test accuracy per class, the runs' bars side by side."""
    r, k = c.per_class.shape
    fig = Figure(figsize=(max(8, 0.9 * k + 2), 4.5))
    ax = fig.subplots()
    width = 0.8 / r
    for i, name in enumerate(c.names):
        ax.bar(np.arange(k) + (i - (r - 1) / 2) * width, c.per_class[i], width, label=name, color=f"C{i}")
    ax.set_xticks(np.arange(k), c.classes, rotation=30 if k > 6 else 0)
    ax.set(ylabel="test accuracy", ylim=(0, 1), title="Per-class test accuracy (single view)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def right_wrong_figure(c: Comparison, a: int, b: int, n: int = SHOWN, ncols: int = 8) -> Figure:
    """Up to n test images run a gets right and run b wrong, titled label / b's answer (p)."""
    from ..trust.explain import upscale
    idx = c.right_wrong(a, b)[:n]
    rows = max(-(-len(idx) // ncols), 1)
    fig = Figure(figsize=(1.6 * ncols, 1.9 * rows + 0.5))
    axes = fig.subplots(rows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if len(idx) == 0:
        axes[0, 0].text(0, 0.5, "none", fontsize=12, transform=axes[0, 0].transAxes)
    big = upscale(c.images[idx]) if len(idx) else []
    for j, (ax, i) in enumerate(zip(axes.flat, idx)):
        ax.imshow(big[j])
        ax.set_title(f"{c.classes[c.labels[i]]} /\n{c.classes[c.preds[b, i]]} ({c.probs[b, i].max():.0%})", fontsize=7)
    fig.suptitle(f"{c.names[a]} right, {c.names[b]} wrong: {len(c.right_wrong(a, b)):,} test images")
    fig.tight_layout()
    return fig


# -- the page -------------------------------------------------------------------------------------

def _table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in [k, *vals]) + "</tr>" for k, vals in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


CHANCE = (f"Beyond chance: McNemar's exact test on the test images one run gets right and the other wrong "
          f"gives p < {stats.ALPHA}, and the paired bootstrap {stats.LEVEL:.0%} interval of the difference "
          f"({stats.RESAMPLES:,} resamples of the test images) excludes 0; otherwise within chance. Both measure "
          "the test set's noise for these trained models, not a retraining's: the spread over seeds below does "
          f"that. A share of fewer than {stats.MIN_IMAGES} images gets no interval.")


def _differences_html(c: Comparison) -> str:
    """The verdicts, each pair's per-class differences, and the spread over seeds."""
    parts = ["<h2>Differences beyond chance (single-view test accuracy)</h2>",
             *[f"<p><b>{html.escape(v)}</b></p>" for v in c.verdicts()], f"<p>{html.escape(CHANCE)}</p>"]
    images = np.bincount(c.labels, minlength=len(c.classes))
    for b in range(1, len(c.names)):
        a_name, b_name = c.names[0], c.names[b]
        rows = [(name, [f"{images[k]:,}", f"{d.acc_a:.1%}" if d.acc_a is not None else "n/a",
                        f"{d.acc_b:.1%}" if d.acc_b is not None else "n/a", d.diff.points(), stats.p_text(d.test.p),
                        "beyond chance" if d.beyond_chance else "within chance"])
                for k, (name, d) in enumerate(zip(c.classes, c.difference(0, b)[1]))]
        parts += [f"<h2>Per class: {html.escape(b_name)} against {html.escape(a_name)}</h2>",
                  _table(["class", "test images", a_name, b_name, f"{b_name} - {a_name}", "McNemar",
                          "verdict"], rows),
                  f"<p>Each class is a test of its own ({len(c.classes)} here): when two runs are alike, about "
                  f"1 class in {round(1 / stats.ALPHA)} still reads beyond chance by luck, so trust one per-class "
                  "verdict less than the overall one.</p>"]
    spread = c.seed_spread()
    if spread:
        rows = [(", ".join(names), [", ".join(map(str, seeds)), f"{mean:.2%}", f"{sd * 100:.2f} points"])
                for names, seeds, mean, sd in spread]
        parts += ["<h2>Spread over seeds (runs of one recipe)</h2>",
                  _table(["runs", "seeds", "mean single-view accuracy", "sd over seeds"], rows)]
    return "".join(parts)


def write_comparison(c: Comparison, out: str | Path, n: int = SHOWN) -> Path:
    """OUT/index.html and its PNGs; returns the page's path. The first run is compared with each other."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarkitError(f"cannot write the comparison to {out}: {exc.strerror or exc}") from None
    figs = [("curves.png", "Training curves", curves_figure(c)),
            ("per_class.png", "Per-class accuracy", per_class_figure(c))]
    for b in range(1, len(c.names)):
        for x, y in ((0, b), (b, 0)):
            figs.append((f"right_{x}_wrong_{y}.png", f"{c.names[x]} right, {c.names[y]} wrong",
                         right_wrong_figure(c, x, y, n)))
    for name, _, fig in figs:
        fig.savefig(out / name, dpi=100, bbox_inches="tight")
    header = ["", *c.names]
    diff = (_table(header, c.settings) if c.settings else "<p>none: the runs were configured alike</p>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>cifarkit compare</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 10px}img{max-width:100%}"
            f"</style></head><body><h1>{html.escape(' vs '.join(c.names))}</h1>"
            f"<h2>Settings that differ</h2>{diff}<h2>Results</h2>{_table(header, c.results)}"
            + _differences_html(c)
            + "".join(f'<h2>{html.escape(t)}</h2><img src="{f}" alt="{html.escape(t)}">' for f, t, _ in figs)
            + "</body></html>")
    (out / "index.html").write_text(page)
    return out / "index.html"
