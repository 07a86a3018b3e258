"""Named, documented training recipes as one plain dataclass, saved with every run and replayable.

Hyperparameters are in ordinary PyTorch units: `lr` is the peak rate of SGD on the batch-mean loss,
`weight_decay` is SGD's coupled decay, `bias_lr_scale` multiplies the rate of normalization biases
(their decay is divided by it, so every parameter decays by the same amount per step).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import CifarkitError


@dataclass
class TrainConfig:
    preset: str = "fast"
    model: str = "fast"
    model_kwargs: dict = field(default_factory=dict)
    # data
    data: str | None = None            # path; None -> $CIFARKIT_DATA -> cache -> torchvision download
    dataset: str = "cifar10"           # cifar10 | cifar100 | folder
    subset: int | None = None          # first N training images, class-balanced
    val_size: int = 5000               # held out from the training set, seeded
    augment: dict = field(default_factory=dict)  # see augment.Augment
    num_workers: int = 0
    # optimization
    epochs: float = 10.0               # may be fractional: the run stops after ceil(epochs * steps)
    batch_size: int = 512
    lr: float | str = 0.1              # a number, or "auto" for the LR range test's suggestion
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    bias_lr_scale: float = 1.0
    label_smoothing: float = 0.0
    schedule: str = "cosine"           # OneCycle anneal: cosine | linear
    pct_start: float = 0.3             # fraction of steps rising to the peak
    div_factor: float = 25.0           # start lr = peak / div_factor
    final_div_factor: float = 1e4      # final lr = start lr / final_div_factor
    cycle_momentum: bool = True
    muon_lr: float = 0.0               # > 0: Muon for conv filters, this fraction of their norm per step
    muon_momentum: float = 0.6
    lookahead: bool = False            # EMA of weights every 5 steps, copied back (fast recipe)
    whiten_bias_epochs: int = 0        # epochs the whitening stem's bias trains (fast net)
    tta: int = 0                       # test-time views: 0 none, 1 +mirror, 2 +mirror +translate
    tta_threshold: float = 1.0         # extra views only where the plain top probability is below this
    lr_find: dict = field(default_factory=lambda: {"min_lr": 1e-5, "max_lr": 10.0, "num_training": 200})
    # machine and outputs
    seed: int = 0
    out: str | None = None
    accelerator: str = "auto"
    devices: Any = "auto"              # per node; DDP: batch_size is per device
    num_nodes: int = 1
    strategy: str = "auto"             # auto | ddp | ... (Lightning's strategies)
    ckpt_every_steps: int = 0          # also refresh checkpoints/last.ckpt every N steps (0: epochs only)
    precision: str = "auto"            # auto: bf16-mixed where it is faster, else 32-true
    logger: str = "csv"                # csv | tensorboard (metrics.csv is always written)
    eval_batch_size: int = 1000

    def to_yaml(self, path: Path) -> None:
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

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
        return cls.from_dict(d)


# The fast recipe: an airbench-class net and its training tricks, in mean-loss units for a batch
# of 256 (peak lr 0.375 on the mean; the same rate per example as 1.5 at batch 1024, and on 2 CPU
# cores batch 256 runs 8% more images/s). Conv filters train with Muon: +0.7 points at 7 epochs.
# Test-time views go only to the images the plain pass gives < 70% (a third of them): on four
# trained nets, the same test accuracy as viewing all in 17 s instead of 39 s (2 CPU cores).
_FAST = dict(
    model="fast", batch_size=256, lr=0.375, momentum=0.85, nesterov=True, weight_decay=1.33e-3,
    bias_lr_scale=64.0, label_smoothing=0.2, schedule="linear", pct_start=0.23, div_factor=5.0,
    final_div_factor=0.2 / 0.07, cycle_momentum=False, lookahead=True, whiten_bias_epochs=3, tta=2,
    tta_threshold=0.7, muon_lr=0.08, muon_momentum=0.8, eval_batch_size=250,
    augment={"flip": "alternate", "pad": 2, "pad_mode": "reflect"},
)

PRESETS: dict[str, dict] = {
    # The seed project's recipe, unchanged: ResNet-18-GN, pad 4 with the mean colour + crop +
    # 1-2 cutout holes of 8-16 px (p 0.8), SGD 0.9 / 5e-4, OneCycle (cosine) from an LR range test.
    "seed": dict(
        model="resnet18_gn", epochs=30, batch_size=512, lr="auto", momentum=0.9, weight_decay=5e-4,
        schedule="cosine", pct_start=0.3, div_factor=25.0, final_div_factor=1e4, cycle_momentum=True,
        augment={"flip": "none", "pad": 4, "pad_mode": "mean", "cutout": [8, 16],
                 "cutout_holes": [1, 2], "cutout_p": 0.8},
    ),
    # All 50,000 training images, no per-epoch validation (add --val-size 5000 for curves): the
    # data airbench94 uses. The first 4 of 9 epochs see images downscaled to 24 px (an epoch
    # takes ~70 s there instead of ~115 s on 2 CPU cores); see BENCHMARKS.md for the ablation.
    "fast": dict(_FAST, epochs=9.0, val_size=0,
                 augment=dict(_FAST["augment"], low_res=24, low_res_epochs=4)),
    # A demo: the fast recipe on a 2-epoch budget, about 4 minutes on 2 CPU cores (86.0% test
    # accuracy there, seed 0), at full size throughout.
    "quick": dict(_FAST, epochs=2.0),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise CifarkitError(f"unknown preset '{name}'; choose one of: {', '.join(list_presets())}")
    values = dict(PRESETS[name], preset=name)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(values)
