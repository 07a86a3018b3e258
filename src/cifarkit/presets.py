"""Every training setting, declared once, and the named recipes built from them.

`TrainConfig` is the only place a training setting is named: its fields carry the type, the
default and a one-line help. The CLI's `train` flags, the validation and the LightningModule's
arguments all derive from it; a run's resolved config is saved as `config.yaml` and can be replayed.

Units are PyTorch's: `lr` is the peak rate of SGD on the batch-mean loss, `weight_decay` is SGD's
coupled decay, `bias_lr_scale` multiplies the rate of normalization parameters (their decay is
divided by it, so every parameter decays by the same amount per step).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import CifarkitError


def setting(default=None, help: str = "", *, factory=None, choices: tuple | None = None,
            flag: bool = True, machine: bool = False, parse=None, subkey: str | None = None,
            keys: dict[str, str] | None = None):
    """A TrainConfig field. flag=False: config files only. machine: `--resume` may change it.
    parse: str -> value for the CLI. subkey: for a dict field, the flag sets this one key.
    keys: for a dict field, the help of each key (a subcommand may take one as its own flag)."""
    meta = dict(help=help, choices=choices, flag=flag, machine=machine, parse=parse, subkey=subkey, keys=keys)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def parse_lr(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or 'auto', got '{text}'") from None


def parse_names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"name at least two classes, comma-separated; got '{text}'")
    return names


def parse_devices(text: str):
    if text == "auto":
        return text
    try:
        return int(text) if text.isdigit() else [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto, a count or a list like 0,1; got '{text}'") from None


@dataclass(frozen=True)
class TrainConfig:
    """A run's settings. Frozen: resolved once before the run (`resolve`), then only read; what a
    time budget changes during the run lives in its Schedule (train/schedule.py)."""
    preset: str = setting("fast", "the recipe whose values are the defaults", flag=False)
    # -- model
    model: str = setting("fast", "architecture (see `cifarkit summary --list`)")
    model_kwargs: dict = setting(help="keyword arguments of the model's constructor", factory=dict, flag=False)
    # -- data
    data: str | None = setting(None, "CIFAR python tarball/folder, ImageFolder tree or .tar.gz of one "
                                     "(default: $CIFARKIT_DATA, the cache, then torchvision's download)")
    data_name: str | None = setting(None, "what to call the data in reports and published apps "
                                          "(default: from the source's name)")
    dataset: str = setting("cifar10", "which dataset", choices=("cifar10", "cifar100", "folder"))
    subset: int | None = setting(None, "train on the first N training images, class-balanced")
    classes: list | None = setting(None, "train and test on these classes only (names, comma-separated); the "
                                         "others' test images are then out of distribution", parse=parse_names)
    calib_size: int = setting(0, "training images held out (stratified, seeded) for calibration alone: the "
                                 "temperature, the out-of-distribution threshold and the prediction sets are "
                                 "fitted on them (0: on the validation split)")
    val_size: int = setting(5000, "training images held out for validation, seeded (0 allowed)")
    holdout_fold: list | None = setting(None, "[k, K]: train without fold k of K of the training split, "
                                              "seeded (what `cifarkit audit` sets for its trainings)", flag=False)
    augment: dict = setting(help="augmentation (see augment.Augment); --augment picks the pipeline",
                            factory=lambda: dict(
                                pipeline="batched",   # on the training device (or albumentations: per sample)
                                flip="random",        # none | random | alternate (each image every other epoch)
                                pad=0, pad_mode="reflect",  # translation by up to pad px; reflect | mean borders
                                cutout=0, cutout_holes=1,   # holes of cutout px (or [min, max] px), 1 (or [min, max])
                                cutout_p=1.0,         # the share of images that get holes
                                low_res=0, low_res_epochs=0),  # the first low_res_epochs at low_res px (0: off)
                            choices=("batched", "albumentations"), subkey="pipeline")
    num_workers: int = setting(0, "DataLoader workers (per-sample augmentation only)", machine=True)
    # -- optimization
    epochs: float = setting(10.0, "epochs, may be fractional (the run stops after ceil(epochs x steps))")
    batch_size: int = setting(512, "training batch size (per device)")
    lr: float | str = setting(0.1, "peak learning rate, or 'auto' for the LR range test's suggestion",
                              parse=parse_lr)
    momentum: float = setting(0.9, "SGD momentum (PyTorch's convention)")
    nesterov: bool = setting(False, "Nesterov momentum")
    weight_decay: float = setting(5e-4, "SGD's coupled weight decay")
    bias_lr_scale: float = setting(1.0, "learning-rate multiplier of normalization parameters")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy")
    schedule: str = setting("cosine", "one-cycle anneal", choices=("cosine", "linear"))
    pct_start: float = setting(0.3, "fraction of the steps rising to the peak")
    div_factor: float = setting(25.0, "start lr = peak / div_factor")
    final_div_factor: float = setting(1e4, "final lr = start lr / final_div_factor")
    cycle_momentum: bool = setting(True, "cycle momentum inversely to the learning rate")
    muon_lr: float = setting(0.0, "Muon step for conv filters, a fraction of their norm (0: SGD for them too)")
    muon_momentum: float = setting(0.6, "Muon's Nesterov momentum")
    muon_ns_steps: int = setting(3, "Newton-Schulz iterations orthogonalizing each Muon step")
    lookahead: bool = setting(False, "average the weights every few steps and copy the average back")
    lookahead_every: int = setting(5, "optimizer steps between lookahead updates")
    lookahead_decay: float = setting(0.95, "lookahead's EMA decay per 1,024 training examples "
                                           "(LOOKAHEAD_EXAMPLES)")
    lookahead_power: float = setting(3.0, "the decay is scaled by (step / total) ** power: early on "
                                          "the weights are followed, late they are averaged")
    whiten_bias_epochs: int = setting(0, "epochs the whitening stem's bias trains (fast net)")
    proxy_keep: float = setting(0.0, "train the net on this hardest share of each batch, ranked by the loss of a "
                                     "small proxy net trained beside it (0: off; e.g. 0.5 with twice the batch)")
    proxy_widths: list = setting(help="channels of the proxy net's three conv groups (fast net)",
                                 factory=lambda: [32, 64, 64], flag=False)
    tta: int = setting(0, "test-time views: 0 none, 1 +mirror, 2 +mirror +1-px shifts", choices=(0, 1, 2))
    tta_threshold: float = setting(1.0, "extra test-time views only where the plain top probability is "
                                        "below this (1: every image)")
    lr_find: dict = setting(help="LR range test: min_lr, max_lr, num_training", flag=False,
                            factory=lambda: {"min_lr": 1e-5, "max_lr": 10.0, "num_training": 200},
                            keys=dict(min_lr="the sweep's first learning rate", max_lr="the sweep's last learning rate",
                                      num_training="steps of the sweep"))
    eval_batch_size: int = setting(1000, "batch size of validation and test")
    drop_last: bool = setting(False, "drop each epoch's last, smaller training batch (fixed shapes: "
                                     "cudnn.benchmark and torch.compile plan once)")
    compile: bool = setting(False, "torch.compile the net with static shapes (pays off on a GPU)")
    channels_last: bool = setting(True, "channels-last memory layout for the net and its inputs")
    check_every_steps: int = setting(1, "optimizer steps between reads of the device: the divergence "
                                        "check (and Ctrl-C under DDP); nothing waits on the host between")
    time_budget: str | None = setting(None, "finish training and testing within this time (90s, 10m, 1h30m): "
                                            "the number of epochs is planned from the measured speed")
    plan: dict = setting(help="what the time budget planned (written by training)", factory=dict, flag=False)
    # -- machine and outputs
    seed: int = setting(0, "random seed")
    out: str | None = setting(None, "run directory (default runs/<preset>-<time>)")
    accelerator: str = setting("auto", "auto | cpu | gpu ... (Lightning's)", machine=True)
    devices: Any = setting("auto", "auto, a count, or a list like 0,1 (per node)", machine=True,
                           parse=parse_devices)
    num_nodes: int = setting(1, "machines in a multi-node DDP run", machine=True)
    strategy: str = setting("auto", "auto | ddp | ... (Lightning's strategy names)", machine=True)
    ckpt_every_steps: int = setting(0, "also checkpoint every N optimizer steps (0: every epoch only)")
    precision: str = setting("auto", "auto | 32-true | bf16-mixed | 16-mixed (auto: what the hardware "
                                     "runs fast)")
    logger: str = setting("csv", "csv | tensorboard | mlflow | wandb (metrics.csv is always written; mlflow: "
                                 "MLFLOW_TRACKING_URI or ./mlruns; wandb: offline without WANDB_API_KEY)",
                          choices=("csv", "tensorboard", "mlflow", "wandb"))

    # -- reading and writing

    def to_yaml_text(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)

    def to_yaml(self, path: Path) -> None:
        Path(path).write_text(self.to_yaml_text())

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CifarkitError(f"unknown config keys {sorted(unknown)}; valid keys: {', '.join(sorted(names))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise CifarkitError(f"config {p} does not exist (give a run's config.yaml)")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CifarkitError(f"config {p} is not valid YAML: {exc}".splitlines()[0]) from None
        if not isinstance(d, dict):
            raise CifarkitError(f"config {p} is not a mapping of settings (give a run's config.yaml)")
        return cls.from_dict(d)


def settings(cls=TrainConfig) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every setting, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def default(name: str, cls=TrainConfig) -> Any:
    """A setting's declared default (a new dict or list for those), for a signature that takes it:
    the value is stated here once, never again at the function."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_choices(cfg: TrainConfig) -> None:
    """Every setting that lists its choices holds one of them (one line naming the valid ones)."""
    for f, _ in settings(type(cfg)):
        choices, value = f.metadata.get("choices"), getattr(cfg, f.name)
        if f.metadata.get("subkey"):
            value = value.get(f.metadata["subkey"], choices[0] if choices else None)
        if choices and value not in choices:
            name = f"{f.name}.{f.metadata['subkey']}" if f.metadata.get("subkey") else f.name
            raise CifarkitError(f"unknown {name} '{value}'; choose one of: {', '.join(map(str, choices))}")


# ----------------------------------------------------------------------------------------------
# The recipes. Each is one page: every number of the recipe is here, with its unit.

# airbench94's net, data and tricks, tuned for 2 CPU cores: batch 256 (8% more images/s than 1,024
# there; the same rate per example as lr 1.5 at 1,024), Muon for the conv filters (+0.7 points at
# 7 epochs), 9 epochs of which the first 4 see images downscaled to 24 px (~70 s an epoch instead
# of ~115 s), test-time views only for the images the plain pass is < 70% sure of (a third; the
# same accuracy as viewing all, in 17 s instead of 39 s). Measurements: BENCHMARKS.md.
# Numbers every recipe shares, with their units.
LOOKAHEAD_EXAMPLES = 1024  # training examples per which `lookahead_decay` is given (any batch size)
WHITEN_SAMPLE = 5000       # training images whose 2x2-patch covariance initializes the whitening stem
UNSURE_SHARE = 0.4         # share of test images under the fast recipe's threshold 0.7 (about a third,
                           # measured): what a time budget plans for the test-time views of the unsure
LOW_RES_MAX_SHARE = 0.5    # at most this share of a run's epochs train on low-res images
OOD_METHODS = ("msp", "maxlogit", "energy", "mahalanobis", "knn", "featnorm", "energynorm")  # trust/ood.py's scores
OOD_DEFAULT = "energynorm" # the score "none of these" is decided by: the best measured (BENCHMARKS.md)
OOD_KEEP = 0.95            # share of held-out images of the training distribution its threshold keeps

FAST = dict(
    model="fast",
    model_kwargs=dict(
        widths=[64, 256, 256],       # channels of the three conv groups
        bn_momentum=0.4,             # BatchNorm running statistics: running = 0.6 running + 0.4 batch
        head_scale=1 / 9,            # the logits are the linear head's output times this
        whiten_eps=5e-4,             # added to the 2x2-patch covariance's eigenvalues (whitening stem)
        act="gelu",                  # activation after the stem and every BatchNorm
        bn_eps=1e-12,                # added to BatchNorm's variance (activation units squared): airbench94's, ~0
    ),
    val_size=0,                      # all 50,000 training images, as airbench94 (--val-size 5000 for curves)
    augment=dict(flip="alternate",   # each image mirrored every other epoch
                 pad=2, pad_mode="reflect",  # random translation by up to 2 px, reflected borders
                 low_res=24, low_res_epochs=4),  # the first 4 epochs at 24x24 px
    epochs=9.0,
    batch_size=256,                  # images per optimizer step
    lr=0.375,                        # peak SGD rate on the batch-mean loss (non-filter parameters)
    momentum=0.85, nesterov=True,
    weight_decay=1.33e-3,            # coupled, per step
    bias_lr_scale=64.0,              # BatchNorm biases learn 64x faster, decay 64x less
    label_smoothing=0.2,
    schedule="linear", pct_start=0.23,  # linear one-cycle: 23% of the steps warming up
    div_factor=5.0,                  # starts at lr / 5
    final_div_factor=0.2 / 0.07,     # ends at 0.07 x the peak
    cycle_momentum=False,
    muon_lr=0.08,                    # Muon step: 8% of each filter bank's norm (held at sqrt(out))
    muon_momentum=0.8, muon_ns_steps=3,
    lookahead=True, lookahead_every=5, lookahead_decay=0.95, lookahead_power=3.0,
    whiten_bias_epochs=3,            # the whitening stem's bias trains for 3 epochs, then freezes
    tta=2, tta_threshold=0.7,        # 6 views (mirror x 1-px shifts) for images < 70% sure
    eval_batch_size=250,
)

# What changes on a CUDA GPU, per preset, in one place: batches large enough to keep a GPU busy
# (the same learning rate per example), every test image viewing every test-time view (a fixed
# batch shape, which cudnn.benchmark and torch.compile plan once), torch.compile, and the device
# read every 50 steps instead of every step. Not yet measured on a GPU: see BENCHMARKS.md.
ON_CUDA: dict[str, dict] = {
    "fast": dict(batch_size=1024, lr=1.5, muon_lr=0.16, eval_batch_size=2000, tta_threshold=1.0,
                 drop_last=True, compile=True, check_every_steps=50),
    "seed": dict(eval_batch_size=1000, drop_last=True, check_every_steps=50),
}
ON_CUDA["quick"] = ON_CUDA["fast"]

PRESETS: dict[str, dict] = {
    # The seed project's recipe, unchanged: ResNet-18-GN, pad 4 with the mean colour + crop + 1-2
    # cutout holes of 8-16 px (p 0.8), SGD 0.9 / 5e-4, OneCycle (cosine) from an LR range test.
    "seed": dict(
        model="resnet18_gn", epochs=30, batch_size=512, lr="auto", momentum=0.9, weight_decay=5e-4,
        schedule="cosine", pct_start=0.3, div_factor=25.0, final_div_factor=1e4, cycle_momentum=True,
        augment={"flip": "none", "pad": 4, "pad_mode": "mean", "cutout": [8, 16],
                 "cutout_holes": [1, 2], "cutout_p": 0.8},
    ),
    "fast": FAST,
    # A demo: the fast recipe on a 2-epoch budget at full size, 5,000 images held out for
    # validation curves: 86.0% test accuracy in about 4 minutes on 2 CPU cores (seed 0).
    "quick": dict(FAST, epochs=2.0, val_size=5000, augment=dict(flip="alternate", pad=2, pad_mode="reflect")),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str, device: str = "cpu", **overrides) -> TrainConfig:
    """The preset's config for a device kind ('cpu' or 'cuda'), with `overrides` (None: not given)."""
    if name not in PRESETS:
        raise CifarkitError(f"unknown preset '{name}'; choose one of: {', '.join(list_presets())}")
    values = dict(PRESETS[name], preset=name, **(ON_CUDA.get(name, {}) if device == "cuda" else {}))
    given = {k: v for k, v in overrides.items() if v is not None}
    whole = {k: v for k, v in given.items() if isinstance(v, dict)}  # a dict given here replaces the preset's
    return resolve(TrainConfig.from_dict({**values, **whole}), {k: v for k, v in given.items() if k not in whole})


def resolve(cfg: TrainConfig, overrides: dict | None = None) -> TrainConfig:
    """The run's config, settled once before the run (the CLI and `fit` both call this): `overrides`
    over `cfg` (None: not given; a dict updates the keys it names), then the rules that keep a config
    whole, each saying in one line what it changed:
    - a model other than the preset's drops the preset's model_kwargs (unless they were given);
    - the albumentations pipeline trains at full size throughout (no low-res epochs);
    - at most LOW_RES_MAX_SHARE of the epochs train at low res."""
    from .console import log
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values = dataclasses.asdict(cfg)
    for name, value in given.items():
        values[name] = {**values[name], **value} if isinstance(value, dict) and name in ("augment", "lr_find") else value
    preset = PRESETS.get(values["preset"], {})
    if (values["model"] != preset.get("model", values["model"]) and "model_kwargs" not in given
            and values["model_kwargs"] == preset.get("model_kwargs")):
        values["model_kwargs"] = {}  # the preset's model settings belong to the preset's model
    augment = values["augment"]
    if augment.get("pipeline") == "albumentations" and augment.get("low_res"):
        values["augment"] = {k: v for k, v in augment.items() if k not in ("low_res", "low_res_epochs")}
        log.warning("notice: the albumentations pipeline trains at full size throughout (no low-res epochs)")
    augment, most = values["augment"], int(values["epochs"] * LOW_RES_MAX_SHARE)
    if augment.get("low_res") and augment.get("low_res_epochs", 0) > most:  # e.g. the fast preset with --epochs 4
        values["augment"] = {**augment, "low_res_epochs": most}
        log.warning(f"notice: {most} of the {values['epochs']:g} epochs at {augment['low_res']} px (at most "
                    f"{LOW_RES_MAX_SHARE:.0%} of a run trains on low-res images)")
    return type(cfg).from_dict(values)
