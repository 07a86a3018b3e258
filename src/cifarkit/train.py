"""fit(config) -> a run directory: config, metrics, checkpoints, final weights, results.

Run directory layout:
    config.yaml        the resolved TrainConfig (replay with `cifarkit train --config`)
    metrics.csv        per-epoch train/val loss and accuracy, per-step lr, test at the end
    checkpoints/       last.ckpt and best.ckpt (by val accuracy) for resuming
    model.safetensors  final weights + metadata (model, classes, mean/std, input size)
    results.json       test_acc, test_loss, epochs, seconds, preset, model, data, seed, version
    lr_find.png/json   when the LR range test ran
"""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from . import __version__
from .augment import Augment
from .data import CIFARDataModule
from .errors import CifarkitError
from .lr_finder import find_lr, save_lr_find
from .models import MODELS, build_model, list_models
from .module import LitClassifier
from .presets import TrainConfig
from .weights import WEIGHTS_NAME, save_weights

MODULE_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "bias_lr_scale", "label_smoothing",
               "schedule", "pct_start", "div_factor", "final_div_factor", "cycle_momentum",
               "lookahead", "whiten_bias_epochs", "tta")


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto' -> bf16 autocast where the hardware runs it fast, else fp32."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_bf16() else "32-true"


def make_run_dir(cfg: TrainConfig) -> Path:
    run_dir = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.preset}-{datetime.now():%Y%m%d-%H%M%S}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise CifarkitError(f"cannot write the run directory {run_dir}: {exc.strerror or exc}; "
                            "pass --out with a writable path") from None
    return run_dir


def build_datamodule(cfg: TrainConfig) -> CIFARDataModule:
    return CIFARDataModule(cfg.data, cfg.dataset, cfg.batch_size, cfg.val_size, cfg.subset, cfg.seed,
                           cfg.augment, cfg.eval_batch_size, cfg.num_workers).prepare()


def build_module(cfg: TrainConfig, dm: CIFARDataModule, lr: float) -> LitClassifier:
    net = build_model(cfg.model, len(dm.classes), **cfg.model_kwargs)
    if hasattr(net, "init_from_data"):  # data-dependent init (the whitening stem)
        net.init_from_data(dm.sample_images(5000))
    net = net.to(memory_format=torch.channels_last)
    kwargs = {k: getattr(cfg, k) for k in MODULE_KEYS}
    return LitClassifier(net, len(dm.classes), **dict(kwargs, lr=lr))


def trainer_kwargs(cfg: TrainConfig) -> dict:
    return dict(accelerator=cfg.accelerator, devices=cfg.devices,
                precision=resolve_precision(cfg.precision, cfg.accelerator),
                num_sanity_val_steps=0, enable_model_summary=False, log_every_n_steps=1,
                deterministic=False, benchmark=torch.cuda.is_available())


def _loggers(cfg: TrainConfig, run_dir: Path) -> list:
    loggers = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if cfg.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    return loggers


def validate(cfg: TrainConfig) -> None:
    """Catch a bad choice before any data is decoded."""
    if cfg.model not in MODELS:
        raise CifarkitError(f"unknown model '{cfg.model}'; choose one of: {', '.join(list_models())}")
    if cfg.dataset not in ("cifar10", "cifar100", "folder"):
        raise CifarkitError(f"unknown dataset '{cfg.dataset}'; choose cifar10, cifar100 or folder")
    if cfg.logger not in ("csv", "tensorboard"):
        raise CifarkitError(f"unknown logger '{cfg.logger}'; choose csv or tensorboard")
    if cfg.lr != "auto" and not isinstance(cfg.lr, (int, float)):
        raise CifarkitError(f"--lr must be a number or 'auto', got '{cfg.lr}'")
    if cfg.epochs <= 0 or cfg.batch_size <= 0:
        raise CifarkitError("--epochs and --batch-size must be positive")


def fit(cfg: TrainConfig) -> Path:
    """Train per `cfg`, test, and write everything into the run directory; returns its path."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*hparams.*")
    start = time.time()
    validate(cfg)
    L.seed_everything(cfg.seed, verbose=False)
    run_dir = make_run_dir(cfg)
    try:
        dm = build_datamodule(cfg)
    except CifarkitError:
        if not any(run_dir.iterdir()):
            run_dir.rmdir()  # nothing was written: leave no empty run behind
        raise
    cfg.to_yaml(run_dir / "config.yaml")
    tkw = trainer_kwargs(cfg)

    lr = cfg.lr
    if lr == "auto":
        module = build_module(cfg, dm, lr=1e-3)
        lr, curve, fig = find_lr(module, dm, tkw, **cfg.lr_find)
        save_lr_find(run_dir, curve, fig)
        print(f"LR range test suggests peak lr {lr:.4g}")
    else:
        lr = float(lr)
        module = build_module(cfg, dm, lr=lr)
    module.lr = lr

    steps_per_epoch = math.ceil(len(dm.train_idx) / cfg.batch_size)
    has_val = len(dm.val_idx) > 0
    ckpt = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", save_last=True,
                           monitor="val_acc" if has_val else None, mode="max", save_top_k=1)
    trainer = L.Trainer(**tkw, max_epochs=math.ceil(cfg.epochs),
                        max_steps=math.ceil(cfg.epochs * steps_per_epoch),
                        callbacks=[ckpt], logger=_loggers(cfg, run_dir), default_root_dir=str(run_dir))
    trainer.fit(module, datamodule=dm)
    test = trainer.test(module, datamodule=dm, verbose=False)[0]

    if trainer.is_global_zero:
        save_weights(module.net, run_dir / WEIGHTS_NAME, cfg.model, dm.classes, dm.mean, dm.std,
                     cfg.model_kwargs, extra={"test_acc": f"{test['test_acc']:.4f}"})
        results = {"test_acc": test["test_acc"], "test_loss": test["test_loss"], "epochs": cfg.epochs,
                   "steps": trainer.global_step, "seconds": round(time.time() - start, 1),
                   "preset": cfg.preset, "model": cfg.model, "lr": lr, "data": dm.arrays.source,
                   "train_images": len(dm.train_idx), "val_images": len(dm.val_idx),
                   "test_images": len(dm.arrays.test_y), "seed": cfg.seed, "tta": cfg.tta,
                   "precision": tkw["precision"], "cifarkit_version": __version__,
                   "torch_version": torch.__version__, "threads": torch.get_num_threads(),
                   "cpu_count": os.cpu_count()}
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return run_dir


def evaluate(run_dir: str | Path, data: str | None = None, tta: int | None = None) -> dict:
    """Test accuracy/loss of a finished run's final weights on its data source's test set."""
    from .weights import load
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CifarkitError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = TrainConfig.from_yaml(cfg_file)
    dm = build_datamodule(TrainConfig.from_dict({**cfg.__dict__, "data": data or cfg.data}))
    loaded = load(run_dir, expect=(cfg.model, len(dm.classes)))
    dm.augment = Augment(loaded.mean, loaded.std)  # the statistics the weights were trained with
    level = cfg.tta if tta is None else tta
    module = LitClassifier(loaded.net.to(memory_format=torch.channels_last), len(loaded.classes), tta=level)
    trainer = L.Trainer(**trainer_kwargs(cfg), logger=False, enable_checkpointing=False)
    return trainer.test(module, datamodule=dm, verbose=False)[0]
