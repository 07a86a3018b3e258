"""THE contract of a run directory: every writer and reader of a run goes through `RunDir`.

    config.yaml        the resolved TrainConfig (replay with `cifarkit train --config`)
    metrics.csv        per-epoch train/val loss and accuracy, per-step lr, test at the end
    checkpoints/       last.ckpt (resume) and best.ckpt (by validation accuracy)
    model.safetensors  final weights + metadata (model, classes, mean/std, input size)
    results.json       test accuracy and loss, seconds, the recipe, the data, the machine; calibration,
                       per-class statistics and top confusions once calibrated
    lr_find.json/.png  when the LR range test ran
    gallery.npz        test images and predictions the app shows (written by the report)
    examples/          one test image per class (written by the report)
    report/            index.html, summary.md, the figures (RunDir.FIGURES, each <name>.png) and
                       label_issues.csv; `cifarkit report --out` puts the same names elsewhere
    tensorboard/       TensorBoard's event files, with --logger tensorboard
    wandb/             W&B's offline run folders, with --logger wandb (unless WANDB_DIR says elsewhere)
    trackers.json      where the MLflow or W&B run of --logger mlflow/wandb is (ids, store; never a token)
    audit/             `cifarkit audit`: label_issues_train.csv/.png (or under --out)
    gradcam/           `cifarkit gradcam`: an overlay per image (or under --out)

A sweep's folder (`cifarkit sweep --out`) holds run directories; `SweepDir` names its files:

    study.journal      the Optuna study, when --storage does not name another place
    study.json         which study (and storage) the folder's trials belong to
    space.yaml         the search space it ran
    trials/trial-N/    each trial's run directory (config, metrics, weights; never tested, no checkpoints)
    final/trial-N/     the final training of the best setting (trial N), on all training images, tested once
    report/            index.html, its figures (SweepDir.FIGURES), trials.csv and config.yaml: the best
                       setting, which `cifarkit train --config` replays

The weights, results.json, the checkpoints, metrics.csv's rewrites, the gallery and the data cache
are written whole or not at all (`atomic_write`, `atomic_path`): a kill or a full disk mid-write
leaves the previous file, never half of one.

`results.json` and `config.yaml` keep the data's path, for replay; what is published (a Space, a
Hub folder) takes `Results.public()`, which names the data and holds no path of this machine.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CifarkitError
from .presets import TrainConfig

WEIGHTS_NAME = "model.safetensors"


@dataclass
class Results:
    """results.json. Older files lack some keys (None here); unknown keys are kept in `extra`."""
    test_acc: float | None = None
    test_loss: float | None = None
    val_acc: float | None = None          # the last validation's accuracy (a sweep's trials are judged by it)
    epochs: float | None = None
    steps: int | None = None
    seconds: float | None = None
    preset: str | None = None
    model: str | None = None
    lr: float | None = None
    data: str | None = None               # the source's path (or torchvision:<dataset>): for replay
    data_name: str | None = None          # what reports and published apps call it
    train_images: int | None = None
    val_images: int | None = None
    test_images: int | None = None
    seed: int | None = None
    tta: int | None = None
    tta_threshold: float | None = None
    precision: str | None = None
    world_size: int | None = None
    resumed_from_step: int | None = None
    time_budget: float | None = None      # seconds asked for with --time-budget
    plan: dict | None = None              # what the time budget planned (budget.Plan)
    cifarkit_version: str | None = None
    torch_version: str | None = None
    threads: int | None = None
    cpu_count: int | None = None
    train_seconds: float | None = None    # wall-clock of training (trainer.fit: epochs, validation, checkpoints)
    compiled: bool | None = None          # --compile: whether the training step ran compiled (None: not asked)
    compile_seconds: float | None = None  # --compile: seconds torch.compile spent building (inside the budget)
    # calibration (`cifarkit calibrate`, run by `fit` at the end): T and where it was fitted, and the
    # test set's expected calibration error (15 bins) and NLL before and after it
    temperature: float | None = None
    calibration_fitted_on: str | None = None
    ece_before: float | None = None
    ece_after: float | None = None
    nll_before: float | None = None
    nll_after: float | None = None
    # fitted beside T on the same held-out images: the out-of-distribution score (method, threshold,
    # share kept) and the prediction sets' test coverage and mean size at 80/90/95%
    ood: dict | None = None
    coverage: dict | None = None
    # robustness (written by the report): mean accuracy over 6 corruptions x 5 severities, and the
    # test images each setting was measured on
    mean_corruption_accuracy: float | None = None
    corruption_images: int | None = None
    # per class on the test set (trust/stats.py; written by calibrate and refreshed by the report):
    # precision, recall and F1 with bootstrap intervals, the ECE within the class after T; and the
    # most frequent (true, predicted) confusions
    per_class: dict | None = None
    confusions: list | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "Results":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}

    def public(self) -> dict:
        """What a published copy may hold: the data by name, no path of this machine."""
        d = self.to_dict()
        d["data"] = self.data_name or data_name(self.data)
        d.pop("data_name", None)
        return {k: v for k, v in d.items() if not (isinstance(v, str) and os.path.isabs(v))}


def data_name(source: str | None) -> str:
    """A name for a data source that says what it is without saying where it lies."""
    if not source:
        return "unknown data"
    if source.startswith("torchvision:"):
        ds = source.split(":", 1)[1]
        return {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(ds, ds) + " (torchvision download)"
    base = Path(source).name
    known = {"cifar10-jpeg.tar.gz": "CIFAR-10, JPEG-q75 copy", "cifar10-jpeg": "CIFAR-10, JPEG-q75 copy",
             "cifar-10-python.tar.gz": "CIFAR-10", "cifar-10-batches-py": "CIFAR-10",
             "cifar-100-python.tar.gz": "CIFAR-100", "cifar-100-python": "CIFAR-100"}
    if base in known:
        return known[base]
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


class RunDir:
    """Paths and typed reads/writes of one run directory."""

    # the report's files, by name: in RUN/report, or wherever `cifarkit report --out` puts them
    REPORT_PAGE, REPORT_SUMMARY, LABEL_ISSUES_CSV = "index.html", "summary.md", "label_issues.csv"
    FIGURES = ("curves", "lr", "lr_find", "confusion", "misclassified", "gradcam", "gradcam_correct",
               "calibration", "label_issues", "robustness")
    APP_FIGURES = ("curves", "confusion")  # what the app shows, and so what a published copy takes
    # `cifarkit audit`'s files: in RUN/audit, or wherever its --out puts them
    AUDIT_CSV, AUDIT_FIGURE = "label_issues_train.csv", "label_issues_train.png"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / "config.yaml"
        self.results_file = self.path / "results.json"
        self.metrics_file = self.path / "metrics.csv"
        self.weights_file = self.path / WEIGHTS_NAME
        self.checkpoints = self.path / "checkpoints"
        self.last_ckpt = self.checkpoints / "last.ckpt"
        self.best_ckpt = self.checkpoints / "best.ckpt"
        self.lr_find_json = self.path / "lr_find.json"
        self.lr_find_png = self.path / "lr_find.png"
        self.gallery_file = self.path / "gallery.npz"
        self.examples_dir = self.path / "examples"
        self.report_dir = self.path / "report"
        self.tensorboard_dir = self.path / "tensorboard"
        self.trackers_file = self.path / "trackers.json"
        self.audit_dir = self.path / "audit"
        self.gradcam_dir = self.path / "gradcam"

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, other) -> Path:
        return self.path / other

    def __str__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    @classmethod
    def figure_name(cls, figure: str) -> str:
        """The file name of one of the report's FIGURES."""
        if figure not in cls.FIGURES:
            raise ValueError(f"unknown report figure '{figure}'; RunDir.FIGURES names them")
        return f"{figure}.png"

    def figure(self, figure: str) -> Path:
        """Where the report in RUN/report keeps one of its FIGURES."""
        return self.report_dir / self.figure_name(figure)

    # -- creating and opening --------------------------------------------------------------------

    @classmethod
    def create(cls, cfg: TrainConfig) -> "RunDir":
        """A new, writable run directory (never one that already holds a run)."""
        run = cls(cfg.out or Path("runs") / f"{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}")
        if run.is_run():
            raise CifarkitError(f"{run.path} already holds a run; choose a new --out, or continue it with "
                                f"`cifarkit train --resume {run.path}`")
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            probe = run.path / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise CifarkitError(f"cannot write the run directory {run.path}: {exc.strerror or exc}; "
                                "pass --out with a writable path") from None
        return run

    def is_run(self) -> bool:
        return any(f.is_file() for f in (self.config_file, self.results_file, self.weights_file))

    @classmethod
    def open(cls, path: str | Path, need: tuple[str, ...] = ()) -> "RunDir":
        """An existing run directory that holds what `need` names ('config', 'weights', 'results',
        'gallery', 'metrics'); otherwise one line saying what is missing and what to do."""
        run = cls(path)
        if not run.path.is_dir():
            raise CifarkitError(f"{run.path} is not a directory; give a run directory that `cifarkit train` wrote")
        if not run.is_run():
            raise CifarkitError(f"{run.path} is not a cifarkit run directory (no config.yaml, results.json "
                                f"or {WEIGHTS_NAME}); give a directory that `cifarkit train` wrote")
        for what in need:
            run._require(what)
        return run

    def _require(self, what: str) -> None:
        files = {"config": self.config_file, "weights": self.weights_file, "results": self.results_file,
                 "gallery": self.gallery_file, "metrics": self.metrics_file}
        if files[what].is_file():
            return
        if what in ("weights", "results") and self.config_file.is_file():
            todo = f"the run did not finish: continue it with `cifarkit train --resume {self.path}`"
        elif what == "gallery":
            todo = f"write it with `cifarkit report {self.path}` where the run's data is available"
        else:
            todo = "give a complete run directory"
        raise CifarkitError(f"{self.path} has no {files[what].name}; {todo}")

    # -- typed reads and writes ------------------------------------------------------------------

    def read_config(self) -> TrainConfig:
        self._require("config")
        return TrainConfig.from_yaml(self.config_file)

    def write_config(self, cfg: TrainConfig) -> None:
        atomic_write(self.config_file, cfg.to_yaml_text())

    def read_results(self) -> Results | None:
        if not self.results_file.is_file():
            return None
        try:
            return Results.from_dict(json.loads(self.results_file.read_text()))
        except (json.JSONDecodeError, TypeError, AttributeError):
            raise CifarkitError(f"{self.results_file} is not valid JSON results; it was altered or cut "
                                "short: run `cifarkit test` on the run to measure it again") from None

    def write_results(self, results: Results) -> None:
        atomic_write(self.results_file, json.dumps(results.to_dict(), indent=2))

    def read_metrics(self) -> dict:
        """metrics.csv -> {'epochs': [1..], 'epoch': {name: [per-epoch]}, 'lr': (steps, lrs), 'test': {}}."""
        self._require("metrics")
        return read_metrics(self.metrics_file)

    def data_source(self) -> tuple[str | None, str, list[str] | None]:
        """(data path or None for torchvision's download, dataset, the classes it kept or None for all)
        the run was trained on: what `load_arrays` takes."""
        cfg = self.read_config() if self.config_file.is_file() else TrainConfig()
        res = self.read_results()
        source = (res.data if res and res.data else None) or cfg.data
        if source and source.startswith("torchvision:"):
            return None, source.split(":", 1)[1], cfg.classes
        return source, cfg.dataset, cfg.classes

    def data_name(self) -> str:
        res = self.read_results()
        if res and res.data_name:
            return res.data_name
        cfg = self.read_config() if self.config_file.is_file() else None
        if cfg and cfg.data_name:
            return cfg.data_name
        return data_name(res.data if res and res.data else (cfg.data if cfg else None))

    def examples(self) -> list[Path]:
        return sorted(self.examples_dir.glob("*.png"))

    # -- publishing -----------------------------------------------------------------------------

    def published_files(self) -> list[str]:
        """Relative paths a published copy of this run takes (results.json goes as `public()`)."""
        fixed = [self.weights_file, self.gallery_file, *map(self.figure, self.APP_FIGURES)]
        files = [f for f in fixed if f.is_file()] + self.examples()
        return [f.relative_to(self.path).as_posix() for f in files]

    def publish(self, dest: Path) -> None:
        """Copy the published files into `dest`, with results.json holding no path of this machine."""
        for rel in self.published_files():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.path / rel, dest / rel)
        self.publish_results(dest)

    def publish_results(self, dest: Path) -> None:
        """dest/results.json as `public_results()` holds it; nothing for a run without results."""
        public = self.public_results()
        if public is not None:
            atomic_write(Path(dest) / self.results_file.name, json.dumps(public, indent=2))

    def public_results(self) -> dict | None:
        """results.json as a published copy holds it: the data by name, no path of this machine."""
        res = self.read_results()
        if res is None:
            return None
        return Results.from_dict({**res.to_dict(), "data_name": self.data_name()}).public()


class SweepDir:
    """Paths of one sweep's folder (see the module's docstring)."""

    FIGURES = ("history", "intermediate", "importances", "parallel")  # the report's, each <name>.png
    REPORT_PAGE, TRIALS_CSV, BEST_CONFIG = "index.html", "trials.csv", "config.yaml"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.journal = self.path / "study.journal"
        self.study_file = self.path / "study.json"
        self.space_file = self.path / "space.yaml"
        self.trials_dir = self.path / "trials"
        self.finals_dir = self.path / "final"
        self.report_dir = self.path / "report"
        self.best_config = self.report_dir / self.BEST_CONFIG

    def __str__(self) -> str:
        return str(self.path)

    def trial(self, number: int) -> Path:
        return self.trials_dir / f"trial-{number:04d}"

    def final(self, number: int) -> Path:
        return self.finals_dir / f"trial-{number:04d}"

    def figure(self, name: str) -> Path:
        if name not in self.FIGURES:
            raise ValueError(f"unknown sweep figure '{name}'; SweepDir.FIGURES names them")
        return self.report_dir / f"{name}.png"

    @classmethod
    def create(cls, path: str | Path) -> "SweepDir":
        """The sweep's folder, made if needed (a sweep run again in its folder goes on with its study)."""
        sweep = cls(path)
        try:
            sweep.path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=sweep.path, prefix=".write-test-"):  # one per worker: workers
                pass                                                                # start together here
        except OSError as exc:
            raise CifarkitError(f"cannot write the sweep folder {sweep.path}: {exc.strerror or exc}; "
                                "pass --out with a writable path") from None
        if RunDir(sweep.path).is_run():
            raise CifarkitError(f"{sweep.path} holds a training run, not a sweep; choose another --out")
        return sweep


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; renamed over `path` when the block ends,
    removed when it raises. The rename is atomic on one filesystem: a reader (or a kill, or a full
    disk) sees the old file or the new one, never half of one. The name is hidden and per process
    (ranks may race) and ends in `.tmp` + suffix (np.savez appends .npz to any other name)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text or bytes to `path` whole or not at all (see atomic_path)."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)


def read_metrics(path: Path) -> dict:
    epochs: dict[int, dict] = {}
    steps, lrs, test = [], [], {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            vals: dict[str, Any] = {k: float(v) for k, v in row.items()
                                    if v not in ("", None) and k not in ("epoch", "step")}
            if "lr" in vals:
                steps.append(int(float(row["step"])))
                lrs.append(vals.pop("lr"))
            for k in [k for k in vals if k.startswith("test_")]:
                test[k] = vals.pop(k)
            if vals and row.get("epoch"):
                epochs.setdefault(int(float(row["epoch"])), {}).update(vals)
    names = sorted({k for e in epochs.values() for k in e})
    order = sorted(epochs)
    per_epoch = {n: [epochs[e].get(n, np.nan) for e in order] for n in names}
    return {"epochs": [e + 1 for e in order], "epoch": per_epoch, "lr": (steps, lrs), "test": test}
