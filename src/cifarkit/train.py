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
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from . import __version__
from .augment import Augment
from .checkpoints import (DISK_ERRNOS, LAST, AtomicCheckpointIO, LastCheckpoint, RunCSVLogger, RunGuard,
                          check_checkpoint, disk_error, remove_partial_checkpoints)
from .data import CIFARDataModule
from .errors import CifarkitError
from .lr_finder import find_lr, save_lr_find
from .models import MODELS, build_model, list_models
from .module import LitClassifier
from .presets import TrainConfig
from .weights import WEIGHTS_NAME, save_weights

MODULE_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "bias_lr_scale", "label_smoothing",
               "schedule", "pct_start", "div_factor", "final_div_factor", "cycle_momentum",
               "lookahead", "whiten_bias_epochs", "tta", "tta_threshold", "muon_lr", "muon_momentum")
RUN_DIR_ENV = "CIFARKIT_RUN_DIR"  # rank 0's run directory, for the ranks Lightning's launcher starts


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
    return dict(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                strategy=cfg.strategy, precision=resolve_precision(cfg.precision, cfg.accelerator),
                num_sanity_val_steps=0, enable_model_summary=False, log_every_n_steps=1,
                deterministic=False, benchmark=torch.cuda.is_available())


def _loggers(cfg: TrainConfig, run_dir: Path, resumed_step: int | None) -> list:
    loggers = [RunCSVLogger(run_dir, keep_before_step=resumed_step)]
    if cfg.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    return loggers


def _check_tta_threshold(value: float, name: str) -> None:
    if not 0 < value <= 1:
        raise CifarkitError(f"{name} must be in (0, 1] (1: every test image gets every view), got {value}")


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
    if cfg.ckpt_every_steps < 0 or cfg.num_nodes < 1:
        raise CifarkitError("--ckpt-every-steps must be >= 0 and --num-nodes >= 1")
    if cfg.tta not in (0, 1, 2):
        raise CifarkitError(f"tta must be 0, 1 or 2 (test-time views level), got {cfg.tta}")
    _check_tta_threshold(cfg.tta_threshold, "tta_threshold")
    if cfg.muon_lr < 0:
        raise CifarkitError(f"--muon-lr must be >= 0 (0 turns Muon off), got {cfg.muon_lr}")
    if cfg.muon_lr and cfg.lr == "auto":
        raise CifarkitError("--lr auto sweeps one rate for every parameter, Muon's filters included; "
                            "give --lr a number, or pass --muon-lr 0")
    if cfg.muon_lr and cfg.cycle_momentum:
        raise CifarkitError("Muon keeps a fixed momentum, but this recipe cycles momentum (cycle_momentum); "
                            "pass --muon-lr 0, or use the fast or quick preset")


# ---------------------------------------------------------------------------------------------
# Several processes: Lightning's launcher re-runs this command for the other local ranks;
# torchrun and srun start every rank themselves. Only rank 0 writes the run directory.


def is_follower() -> bool:
    """True in every process but global rank 0 (as the launcher's environment variables say)."""
    return any(int(os.environ.get(v) or 0) > 0 for v in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def launched_externally() -> bool:
    """torchrun or srun started several ranks at once (Lightning's own launcher starts the rest later)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
    if TorchElasticEnvironment.detect():
        return int(os.environ.get("WORLD_SIZE", 1)) > 1
    return SLURMEnvironment.detect() and int(os.environ.get("SLURM_NTASKS", 1)) > 1


def _run_directory(cfg: TrainConfig, resume: bool, follower: bool) -> Path:
    if resume:
        return Path(cfg.out)
    if follower:  # rank 0's directory (Lightning's launcher passes it on); nothing is created here
        return Path(os.environ.get(RUN_DIR_ENV) or cfg.out or "runs/rank0")
    return make_run_dir(cfg)


@contextmanager
def _shared_with_ranks(run_dir: Path):
    """Lightning's launcher starts the other ranks inside trainer.fit, with this environment."""
    os.environ[RUN_DIR_ENV] = str(run_dir.resolve())
    try:
        yield
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


@contextmanager
def _machine_errors():
    """Lightning's complaints about --accelerator/--devices/--num-nodes/--strategy, as one line."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    try:
        yield
    except (MisconfigurationException, ValueError) as exc:
        raise CifarkitError(f"cannot train on this machine as asked: {str(exc).splitlines()[0]} "
                            "(check --accelerator, --devices, --num-nodes and --strategy)") from None


@contextmanager
def _disk_errors(run_dir: Path):
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        raise disk_error(exc, Path(exc.filename or run_dir), run_dir) from None


# ---------------------------------------------------------------------------------------------
# fit


def _peak_lr(cfg: TrainConfig, dm: CIFARDataModule, module: LitClassifier, run_dir: Path,
             follower: bool) -> float:
    """The number, the LR range test's suggestion recorded in the run, or a new range test."""
    if cfg.lr != "auto":
        return float(cfg.lr)
    if follower:
        return math.nan  # configure_optimizers replaces it with rank 0's
    recorded = run_dir / "lr_find.json"
    if recorded.is_file():  # a resumed run keeps the rate it started with
        return float(json.loads(recorded.read_text())["suggestion"])
    with _machine_errors():
        lr, curve, fig = find_lr(module, dm, trainer_kwargs(cfg), **cfg.lr_find)
    save_lr_find(run_dir, curve, fig)
    print(f"LR range test suggests peak lr {lr:.4g}")
    return lr


def _resume_point(run_dir: Path, cfg: TrainConfig, dm: CIFARDataModule,
                  follower: bool) -> tuple[Path | None, int]:
    """(last.ckpt, its global step) to continue from, or (None, 0) when no checkpoint was saved."""
    if (run_dir / "results.json").is_file():
        raise CifarkitError(f"{run_dir} already finished (it has results.json): nothing to resume")
    ckpt = run_dir / "checkpoints" / LAST
    if not ckpt.is_file():
        if not follower:
            print(f"notice: {run_dir} has no checkpoint yet: training from the start", file=sys.stderr)
        return None, 0
    step = check_checkpoint(ckpt, cfg.model, len(dm.classes))["global_step"]
    if not follower:
        print(f"resuming {run_dir} from step {step}", file=sys.stderr)
    return ckpt, step


def _trainer(cfg: TrainConfig, dm: CIFARDataModule, module: LitClassifier, run_dir: Path,
             resumed_step: int | None) -> tuple[L.Trainer, RunGuard]:
    ckpt_dir = run_dir / "checkpoints"
    guard = RunGuard(run_dir, cfg.model, dm.classes)
    callbacks = [guard, ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", save_top_k=1, mode="max",
                                        monitor="val_acc" if len(dm.val_idx) else None,
                                        enable_version_counter=False),
                 LastCheckpoint(ckpt_dir, cfg.ckpt_every_steps)]
    # Epoch-bounded, never max_steps: Lightning resumes a step-bounded run from an epoch-end
    # checkpoint by replaying that epoch's end. A fractional last epoch stops via the guard.
    with _machine_errors():
        trainer = L.Trainer(**trainer_kwargs(cfg), max_epochs=math.ceil(cfg.epochs), callbacks=callbacks,
                            logger=_loggers(cfg, run_dir, resumed_step), default_root_dir=str(run_dir),
                            plugins=[AtomicCheckpointIO(run_dir)])
    if cfg.epochs != int(cfg.epochs):  # each rank sees 1/world_size of the data per epoch
        per_rank = math.ceil(len(dm.train_idx) / trainer.world_size)
        module.steps = guard.stop_at_step = math.ceil(cfg.epochs * math.ceil(per_rank / cfg.batch_size))
    return trainer, guard


def _write_results(cfg, dm, module, trainer, test: dict, lr: float, run_dir: Path, start: float,
                   resumed_step: int | None) -> None:
    save_weights(module.net, run_dir / WEIGHTS_NAME, cfg.model, dm.classes, dm.mean, dm.std,
                 cfg.model_kwargs, extra={"test_acc": f"{test['test_acc']:.4f}"})
    results = {"test_acc": test["test_acc"], "test_loss": test["test_loss"], "epochs": cfg.epochs,
               "steps": trainer.global_step, "seconds": round(time.time() - start, 1),
               "preset": cfg.preset, "model": cfg.model, "lr": lr, "data": dm.arrays.source,
               "train_images": len(dm.train_idx), "val_images": len(dm.val_idx),
               "test_images": len(dm.arrays.test_y), "seed": cfg.seed, "tta": cfg.tta,
               "tta_threshold": cfg.tta_threshold,
               "precision": trainer_kwargs(cfg)["precision"], "world_size": trainer.world_size,
               "resumed_from_step": resumed_step, "cifarkit_version": __version__,
               "torch_version": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count()}
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))


def fit(cfg: TrainConfig, resume: bool = False) -> Path:
    """Train per `cfg`, test, and write everything into the run directory; returns its path.

    resume: continue the run in `cfg.out` (config from its config.yaml) from its last checkpoint.
    """
    for pattern in (".*does not have many workers.*", ".*hparams.*", ".*dataloader is not resumable.*",
                    ".*Total length of `list` across ranks is zero.*"):  # --val-size 0: no validation
        warnings.filterwarnings("ignore", pattern)  # the DataModule resumes the batch order itself
    start = time.time()
    validate(cfg)
    if cfg.lr == "auto" and not resume and launched_externally():
        raise CifarkitError("torchrun and srun start every rank at once, so the LR range test cannot run "
                            "before DDP: run `cifarkit lr-find` on one device and pass its rate with --lr")
    L.seed_everything(cfg.seed, verbose=False)
    follower = is_follower()
    run_dir = _run_directory(cfg, resume, follower)
    try:
        dm = build_datamodule(cfg)
    except CifarkitError:
        if not resume and not follower and not any(run_dir.iterdir()):
            run_dir.rmdir()  # nothing was written: leave no empty run behind
        raise
    ckpt, resumed_step = _resume_point(run_dir, cfg, dm, follower) if resume else (None, None)
    with _disk_errors(run_dir):
        if not follower:
            remove_partial_checkpoints(run_dir / "checkpoints")
            if not resume:
                cfg.to_yaml(run_dir / "config.yaml")
        module = build_module(cfg, dm, lr=1e-3)
        module.lr = _peak_lr(cfg, dm, module, run_dir, follower)
        trainer, guard = _trainer(cfg, dm, module, run_dir, resumed_step)
        with guard.catching_sigint(), _shared_with_ranks(run_dir):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        test = trainer.test(module, datamodule=dm, verbose=False)[0]
        if trainer.is_global_zero:
            _write_results(cfg, dm, module, trainer, test, module.lr, run_dir, start, resumed_step)
    return run_dir


def evaluate(run_dir: str | Path, data: str | None = None, tta: int | None = None,
             tta_threshold: float | None = None) -> dict:
    """Test accuracy/loss of a finished run's final weights on its data source's test set."""
    from .weights import load
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    if not cfg_file.is_file():
        raise CifarkitError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = TrainConfig.from_yaml(cfg_file)
    threshold = cfg.tta_threshold if tta_threshold is None else tta_threshold
    _check_tta_threshold(threshold, "--tta-threshold")
    dm = build_datamodule(TrainConfig.from_dict({**cfg.__dict__, "data": data or cfg.data}))
    loaded = load(run_dir, expect=(cfg.model, len(dm.classes)))
    dm.augment = Augment(loaded.mean, loaded.std)  # the statistics the weights were trained with
    level = cfg.tta if tta is None else tta
    module = LitClassifier(loaded.net.to(memory_format=torch.channels_last), len(loaded.classes), tta=level,
                           tta_threshold=threshold)
    one_device = {"devices": 1, "num_nodes": 1, "strategy": "auto"}  # a DDP run is tested on one
    with _machine_errors():
        trainer = L.Trainer(**{**trainer_kwargs(cfg), **one_device}, logger=False, enable_checkpointing=False)
    return trainer.test(module, datamodule=dm, verbose=False)[0]
