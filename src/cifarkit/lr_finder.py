"""The LR range test on Lightning's Tuner: an exponential sweep, the steepest-descent suggestion."""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
from lightning.pytorch.tuner import Tuner

from .errors import CifarkitError


def find_lr(module: L.LightningModule, datamodule: L.LightningDataModule, trainer_kwargs: dict,
            min_lr: float = 1e-5, max_lr: float = 10.0, num_training: int = 200):
    """Run the range test on a throwaway trainer; returns (suggested lr, curve dict, Figure).

    The module's weights come back as they were (Lightning restores them); lookahead is off
    during the sweep so it does not average the sweep's weights. The sweep runs on one device
    even when training will use several (it runs before DDP starts).
    """
    devices = trainer_kwargs.get("devices", "auto")
    one = [devices[0]] if isinstance(devices, (list, tuple)) else 1
    trainer = L.Trainer(**{**trainer_kwargs, "logger": False, "enable_checkpointing": False,
                           "max_epochs": None, "max_steps": -1, "callbacks": [],
                           "devices": one, "num_nodes": 1, "strategy": "auto"})
    cfg = getattr(module, "cfg", None)  # cifarkit's module: no lookahead averaging of the sweep
    lookahead = getattr(cfg, "lookahead", False)
    if cfg is not None:
        cfg.lookahead = False
    try:
        finder = Tuner(trainer).lr_find(module, datamodule=datamodule, min_lr=min_lr, max_lr=max_lr,
                                        num_training=num_training, mode="exponential",
                                        update_attr=False)
    finally:
        if cfg is not None:
            cfg.lookahead = lookahead
            module._ema = None
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None or not math.isfinite(suggestion) or suggestion <= 0:
        raise CifarkitError("the LR range test found no usable learning rate (too few steps or a "
                            "diverging loss); pass --lr with a number instead")
    curve = {"lr": [float(v) for v in finder.results["lr"]],
             "loss": [float(v) for v in finder.results["loss"]], "suggestion": float(suggestion)}
    fig = finder.plot(suggest=True)
    fig.axes[0].set_title(f"LR range test: suggestion {suggestion:.3g}")
    return float(suggestion), curve, fig


def save_lr_find(run_dir: Path, curve: dict, fig) -> None:
    (run_dir / "lr_find.json").write_text(json.dumps(curve))
    fig.savefig(run_dir / "lr_find.png", dpi=120, bbox_inches="tight")
