"""fit(config) -> a run directory (see rundir.py): config, metrics, checkpoints, weights, results."""
from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ..version import __version__
from ..data.augment import Augment
from .budget import (Plan, budget_callback, measure_eval, measure_steps, overrun_notice, parse_budget,
                     plan_schedule, planned_config, views_per_image)
from ..trust.calibration import TRAIN_SLICE, calibrate_after_training
from .compiling import CompileClock, compile_up_front
from .checkpoints import (DISK_ERRNOS, AtomicCheckpointIO, LastCheckpoint, MetricsLogger, RunGuard,
                          check_checkpoint, disk_error, remove_partial_checkpoints)
from ..console import lightning_bar, log
from ..data.datamodule import CIFARDataModule
from ..errors import CifarkitError
from .lr_finder import MUON_REFUSAL, check_settings, find_lr, load_lr_find, save_lr_find
from ..models import MODELS, build_model, list_models
from .module import LitClassifier
from .schedule import Schedule
from .trackers import check_tracker, log_results, record, tracker_loggers
from ..presets import TrainConfig, check_choices, resolve
from ..rundir import Results, RunDir, data_name
from ..weights import save_weights

RUN_DIR_ENV = "CIFARKIT_RUN_DIR"  # rank 0's run directory, for the ranks Lightning's launcher starts


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def on_cuda(accelerator: str) -> bool:
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def choose_precision(precision: str, accelerator: str) -> tuple[str, str]:
    """(Lightning precision, why). 'auto': bf16 autocast where the hardware runs bf16 natively (CUDA
    capability 8.0 and newer, CPUs with AVX-512-BF16 or AMX), fp16 autocast with a gradient scaler on
    capability 7.x (bf16 there is emulated and slow), fp32 otherwise."""
    if precision != "auto":
        return precision, "as asked"
    if on_cuda(accelerator):
        cap = torch.cuda.get_device_capability()
        if cap >= (8, 0):
            return "bf16-mixed", f"CUDA capability {cap[0]}.{cap[1]} runs bf16 natively"
        if cap >= (7, 0):
            return "16-mixed", f"CUDA capability {cap[0]}.{cap[1]}: fp16 with a gradient scaler (bf16 is emulated)"
        return "32-true", f"CUDA capability {cap[0]}.{cap[1]} has no fast half precision"
    if cpu_has_bf16():
        return "bf16-mixed", "this CPU has AVX-512-BF16 or AMX bf16 instructions"
    return "32-true", "this CPU has no bf16 instructions"


def resolve_precision(precision: str, accelerator: str) -> str:
    return choose_precision(precision, accelerator)[0]


def build_datamodule(cfg: TrainConfig) -> CIFARDataModule:
    return CIFARDataModule(cfg.data, cfg.dataset, cfg.batch_size, cfg.val_size, cfg.subset, cfg.seed,
                           cfg.augment, cfg.eval_batch_size, cfg.num_workers, cfg.drop_last,
                           cfg.holdout_fold, cfg.classes, cfg.calib_size).prepare()


def build_module(cfg: TrainConfig, dm: CIFARDataModule) -> LitClassifier:
    def build(**kwargs):
        net = build_model(cfg.model, len(dm.classes), **{**cfg.model_kwargs, **kwargs})
        if hasattr(net, "init_from_data"):  # data-dependent init (the whitening stem)
            net.init_from_data(dm.sample_images(cfg.whiten_images))
        return net.to(memory_format=torch.channels_last) if cfg.channels_last else net
    proxy = build(widths=cfg.proxy_widths) if cfg.proxy_keep else None
    return LitClassifier(build(), len(dm.classes), cfg, proxy)


def trainer_kwargs(cfg: TrainConfig) -> dict:
    """The machine part of every Trainer a run makes. No progress bar: the trainers that show one
    add console.lightning_bar() (Lightning's own default bar would print to stdout)."""
    return dict(accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes,
                strategy=cfg.strategy, precision=resolve_precision(cfg.precision, cfg.accelerator),
                num_sanity_val_steps=0, enable_model_summary=False, log_every_n_steps=1,
                deterministic=False, benchmark=torch.cuda.is_available(), enable_progress_bar=False)


def with_bar(kwargs: dict, callbacks: list) -> dict:
    """Trainer keyword arguments with the console's progress bar, where bars are on."""
    bar = lightning_bar()
    return {**kwargs, "callbacks": callbacks + ([bar] if bar else []), "enable_progress_bar": bar is not None}


def _loggers(cfg: TrainConfig, run: RunDir, resumed_step: int | None) -> list:
    loggers = [MetricsLogger(run.metrics_file, keep_before_step=resumed_step)]
    if cfg.logger == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger
        tb = run.tensorboard_dir
        loggers.append(TensorBoardLogger(save_dir=str(tb.parent), name=tb.name, version=""))
    return loggers + tracker_loggers(cfg, run)


def _check_tta_threshold(value: float, name: str) -> None:
    if not 0 < value <= 1:
        raise CifarkitError(f"{name} must be in (0, 1] (1: every test image gets every view), got {value}")


def validate(cfg: TrainConfig) -> None:
    """Catch a bad choice before any data is decoded."""
    if cfg.model not in MODELS:
        raise CifarkitError(f"unknown model '{cfg.model}'; choose one of: {', '.join(list_models())}")
    check_choices(cfg)
    check_tracker(cfg.logger)
    if cfg.lr != "auto" and not isinstance(cfg.lr, (int, float)):
        raise CifarkitError(f"--lr must be a number or 'auto', got '{cfg.lr}'")
    if cfg.epochs <= 0 or cfg.batch_size <= 0:
        raise CifarkitError("--epochs and --batch-size must be positive")
    if cfg.ckpt_every_steps < 0 or cfg.num_nodes < 1:
        raise CifarkitError("--ckpt-every-steps must be >= 0 and --num-nodes >= 1")
    _check_tta_threshold(cfg.tta_threshold, "tta_threshold")
    if cfg.proxy_keep and (cfg.model != "fast" or not 0 < cfg.proxy_keep < 1):
        raise CifarkitError(f"--proxy-keep must be in (0, 1) and needs the fast net (its proxy is a narrow copy), "
                            f"got {cfg.proxy_keep} with model '{cfg.model}'")
    if cfg.time_budget:
        parse_budget(cfg.time_budget)
        if cfg.devices not in ("auto", 1, [0]) or cfg.num_nodes > 1 or cfg.strategy not in ("auto", "single_device"):
            raise CifarkitError("--time-budget plans the schedule of one process; for several devices give "
                                "--epochs (the plan of a one-device run, in its config.yaml, is a start)")
    if cfg.muon_renorm_every < 1 or cfg.whiten_images < 1:
        raise CifarkitError(f"--muon-renorm-every and --whiten-images must be >= 1, got {cfg.muon_renorm_every} "
                            f"and {cfg.whiten_images}")
    if cfg.muon_lr < 0:
        raise CifarkitError(f"--muon-lr must be >= 0 (0 turns Muon off), got {cfg.muon_lr}")
    if cfg.muon_lr and cfg.lr == "auto":
        raise CifarkitError(MUON_REFUSAL)
    if cfg.lr == "auto":
        check_settings(**cfg.lr_find)
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


def _run_directory(cfg: TrainConfig, resume: bool, follower: bool) -> RunDir:
    if resume:
        return RunDir(cfg.out)
    if follower:  # rank 0's directory (Lightning's launcher passes it on); nothing is created here
        return RunDir(os.environ.get(RUN_DIR_ENV) or cfg.out or "runs/rank0")
    return RunDir.create(cfg)


@contextmanager
def _shared_with_ranks(run: RunDir):
    """Lightning's launcher starts the other ranks inside trainer.fit, with this environment."""
    os.environ[RUN_DIR_ENV] = str(run.path.resolve())
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
def _disk_errors(run: RunDir):
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        raise disk_error(exc, Path(exc.filename or run.path), run.path) from None


# ---------------------------------------------------------------------------------------------
# fit


def _peak_lr(cfg: TrainConfig, dm: CIFARDataModule, module: LitClassifier, run: RunDir,
             follower: bool) -> float:
    """The number, the LR range test's suggestion recorded in the run, or a new range test."""
    if cfg.lr != "auto":
        return float(cfg.lr)
    if follower:
        return math.nan  # configure_optimizers replaces it with rank 0's
    if run.lr_find_json.is_file():  # a resumed run keeps the rate it started with
        return load_lr_find(run.lr_find_json)["suggestion"]
    with _machine_errors():
        result = find_lr(module, dm, trainer_kwargs(cfg), **cfg.lr_find)
    save_lr_find(run.path, result)
    log.info(result.summary())
    log.info(f"LR range test suggests peak lr {result.suggestion:.4g}: {result.reason}")
    return result.suggestion


def _resume_point(run: RunDir, cfg: TrainConfig, dm: CIFARDataModule,
                  follower: bool) -> tuple[Path | None, int]:
    """(last.ckpt, its global step) to continue from, or (None, 0) when no checkpoint was saved."""
    if run.results_file.is_file():
        raise CifarkitError(f"{run.path} already finished (it has {run.results_file.name}): nothing to resume")
    if not run.last_ckpt.is_file():
        if not follower:
            log.warning(f"notice: {run.path} has no checkpoint yet: training from the start")
        return None, 0
    step = check_checkpoint(run.last_ckpt, cfg.model, len(dm.classes))["global_step"]
    if not follower:
        log.info(f"resuming {run.path} from step {step}")
    return run.last_ckpt, step


def measure_speed(cfg: TrainConfig, dm: CIFARDataModule, module: LitClassifier,
                  test: bool = True) -> tuple[dict, float, float, Schedule]:
    """What a budget plans from, measured on the run's own net: (seconds per optimizer step at each
    image size the recipe trains at, seconds of the test with its views and of calibration (0 for a
    run that is not tested), seconds of one validation pass, the schedule's shape)."""
    shape = Schedule.of(cfg, dm.steps_for(1))
    sizes = [shape.low_res, 32] if shape.low_res else [32]
    steps = measure_steps(module, dm, trainer_kwargs(cfg), shape, sizes)
    eval_seconds = measure_eval(module, dm, resolve_precision(cfg.precision, cfg.accelerator))
    val = eval_seconds(len(dm.val_idx))
    if not test:
        return steps, 0.0, val, shape
    tested = eval_seconds(len(dm.arrays.test_y), views_per_image(cfg.tta, cfg.tta_threshold))
    # calibration passes over its held-out images (the calibration split, the validation split, or a
    # training slice) in fp32 for the out-of-distribution score (about twice the bf16 batch timed), and
    # once more in bf16 for the temperature unless the last validation's logits are those images'
    held = len(dm.calib_idx) or len(dm.val_idx) or min(TRAIN_SLICE, len(dm.arrays.train_y))
    calibration = (2 + (1 if dm.calib_size or not len(dm.val_idx) else 0)) * eval_seconds(held)
    return steps, tested + calibration, val, shape


def _plan(cfg: TrainConfig, dm: CIFARDataModule, module: LitClassifier, start: float, resume: bool,
          test: bool = True) -> Plan:
    """--time-budget: measure this machine's speed and plan the schedule (a resumed run starts from the
    plan its config.yaml recorded; its checkpoint then gives the latest, and what is left is re-planned
    when training starts). A run that is not tested keeps no time for the test."""
    if resume and cfg.plan:
        return Plan.from_dict(cfg.plan, cfg)
    steps, tested, val, shape = measure_speed(cfg, dm, module, test)
    plan = plan_schedule(parse_budget(cfg.time_budget), time.time() - start, steps, tested, val,
                         cfg.batch_size, shape, shape.low_res_epochs / cfg.epochs, recipe_epochs=cfg.epochs)
    log.info(plan.describe())
    return plan


def _trainer(cfg: TrainConfig, dm: CIFARDataModule, module: LitClassifier, run: RunDir,
             resumed_step: int | None, plan: Plan | None = None, start: float = 0.0,
             extra: tuple = ()) -> tuple[L.Trainer, RunGuard]:
    """The run's trainer and guard, and the schedule the module, augmentation and guard read from here on
    (`extra`: the caller's own callbacks, after the guard's)."""
    guard = RunGuard(run, cfg.model, dm.classes, cfg.check_every_steps)
    callbacks = [guard, *extra, ModelCheckpoint(dirpath=str(run.best_ckpt.parent), filename=run.best_ckpt.stem,
                                        save_top_k=1, mode="max", monitor="val_acc" if len(dm.val_idx) else None,
                                        enable_version_counter=False),
                 LastCheckpoint(run.last_ckpt, cfg.ckpt_every_steps)]
    if plan is not None:  # before the guard: a re-plan at an epoch end is what the guard reads then
        callbacks.insert(0, budget_callback(plan, start))
    # Epoch-bounded, never max_steps: Lightning resumes a step-bounded run from an epoch-end
    # checkpoint by replaying that epoch's end. A fractional last epoch stops via the guard.
    with _machine_errors():
        trainer = L.Trainer(**with_bar(trainer_kwargs(cfg), callbacks), max_epochs=math.ceil(cfg.epochs),
                            logger=_loggers(cfg, run, resumed_step), default_root_dir=str(run.path),
                            plugins=[AtomicCheckpointIO(run.path)])
    # each rank sees 1/world_size of the data per epoch; a time budget plans one process
    schedule = plan.schedule if plan is not None else Schedule.of(cfg, dm.steps_for(trainer.world_size))
    module.record(cfg, schedule)
    dm.augment.schedule = guard.schedule = schedule
    return trainer, guard


def _start_block(cfg: TrainConfig, dm: CIFARDataModule, module: LitClassifier, run: RunDir,
                 trainer: L.Trainer) -> None:
    """What is about to happen, in a few lines of cifarkit's own."""
    precision, why = choose_precision(cfg.precision, cfg.accelerator)
    steps = dm.steps_for(trainer.world_size)
    params = sum(p.numel() for p in module.net.parameters())
    device = trainer.strategy.root_device
    where = f"{device.type} x{trainer.world_size}" + (f" ({torch.cuda.get_device_name(device)})"
                                                        if device.type == "cuda" else "")
    views = {0: "none", 1: "mirror", 2: "6 views"}[cfg.tta] + (f" below {cfg.tta_threshold:.0%} confidence"
                                                              if cfg.tta and cfg.tta_threshold < 1 else "")
    log.info("\n".join([
        f"training {run.path} (preset {cfg.preset}, seed {cfg.seed})",
        f"  data      {cfg.data_name or data_name(dm.arrays.source)}: {len(dm.train_idx):,} training images, "
        f"{len(dm.val_idx):,} held out for validation, {len(dm.arrays.test_y):,} test images",
        f"  model     {cfg.model}: {params:,} parameters",
        f"  machine   {where}, {torch.get_num_threads()} threads, {precision} ({why})",
        f"  schedule  {cfg.epochs:g} epoch{'s' * (cfg.epochs != 1)} of {steps} steps of {cfg.batch_size} images "
        f"({module.total_steps():,} steps), peak lr {module.lr:.4g}; test-time views: {views}"]))


def _write_results(cfg: TrainConfig, dm: CIFARDataModule, module: LitClassifier, trainer: L.Trainer,
                   test: dict | None, val_acc: float | None, run: RunDir, start: float, resumed_step: int | None,
                   plan: Plan | None, timing: dict) -> None:
    """The weights and results.json (a run that was not tested: no test numbers)."""
    test = test or {}
    save_weights(module.net, run.weights_file, cfg.model, dm.classes, dm.mean, dm.std,
                 cfg.model_kwargs, extra={"test_acc": f"{test['test_acc']:.4f}"} if test else None)
    run.write_results(Results(
        test_acc=test.get("test_acc"), test_loss=test.get("test_loss"),
        val_acc=val_acc, epochs=round(module.schedule.epochs, 4),
        steps=trainer.global_step,
        seconds=round(time.time() - start, 1), preset=cfg.preset, model=cfg.model, lr=module.lr,
        data=dm.arrays.source, data_name=cfg.data_name or data_name(dm.arrays.source),
        train_images=len(dm.train_idx), val_images=len(dm.val_idx), test_images=len(dm.arrays.test_y),
        seed=cfg.seed, tta=cfg.tta, tta_threshold=cfg.tta_threshold,
        precision=trainer_kwargs(cfg)["precision"], world_size=trainer.world_size,
        resumed_from_step=resumed_step, time_budget=parse_budget(cfg.time_budget) if cfg.time_budget else None,
        plan=plan.to_dict() if plan is not None else None, cifarkit_version=__version__, torch_version=torch.__version__,
        threads=torch.get_num_threads(), cpu_count=os.cpu_count(), **timing))


def fit(cfg: TrainConfig, resume: bool = False, started: float | None = None, callbacks: tuple = (),
        test: bool = True) -> RunDir:
    """Train per `cfg`, test, and write everything into the run directory; returns it.

    resume: continue the run in `cfg.out` (config from its config.yaml) from its last checkpoint.
    started: the time.time() a time budget counts from (the command line passes its process's start,
    so that the budget holds the imports too); default: now.
    callbacks: more Lightning callbacks for the run's trainer (a sweep's trial reports each epoch).
    test: False trains and validates only: no test, no calibration, and a time budget keeps no time
    for them (a sweep's trials are judged on validation, never on the test set).
    """
    start = time.time()
    clock = min(start, started) if started is not None else start  # what --time-budget counts from
    cfg = resolve(cfg)
    validate(cfg)
    if cfg.lr == "auto" and not resume and launched_externally():
        raise CifarkitError("torchrun and srun start every rank at once, so the LR range test cannot run "
                            "before DDP: run `cifarkit lr-find` on one device and pass its rate with --lr")
    L.seed_everything(cfg.seed, verbose=False)
    follower = is_follower()
    run = _run_directory(cfg, resume, follower)
    try:
        dm = build_datamodule(cfg)
    except CifarkitError:
        if not resume and not follower and not any(run.path.iterdir()):
            run.path.rmdir()  # nothing was written: leave no empty run behind
        raise
    ckpt, resumed_step = _resume_point(run, cfg, dm, follower) if resume else (None, None)
    with _disk_errors(run), CompileClock() as compiling:
        if not follower:
            remove_partial_checkpoints(run.checkpoints)
        module = build_module(cfg, dm)
        if module.compiled:  # before anything is measured or trained: a budget counts it as spent
            compile_up_front(module, dm, trainer_kwargs(cfg), Schedule.of(cfg, dm.steps_for(1)))
        module.lr = _peak_lr(cfg, dm, module, run, follower)
        plan = _plan(cfg, dm, module, clock, resume, test) if cfg.time_budget else None
        if plan is not None:
            cfg = planned_config(cfg, plan)
        trainer, guard = _trainer(cfg, dm, module, run, resumed_step, plan, clock, tuple(callbacks))
        if not follower and not resume:
            run.write_config(cfg)  # once, after planning: what a replay or a resume starts from
        if not follower:
            _start_block(cfg, dm, module, run, trainer)
        training = time.time()
        with guard.catching_sigint(), _shared_with_ranks(run):
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt, weights_only=True)
        fitted = time.time()
        val_acc = trainer.callback_metrics.get("val_acc") if len(dm.val_idx) else None  # the last validation's
        val_acc = None if val_acc is None else round(float(val_acc), 6)
        tested = trainer.test(module, datamodule=dm, verbose=False)[0] if test else None
        if trainer.is_global_zero:
            timing = dict(train_seconds=round(fitted - training, 1),
                          compiled=module.compiled if cfg.compile else None,
                          compile_seconds=round(compiling.seconds, 1) if cfg.compile else None)
            _write_results(cfg, dm, module, trainer, tested, val_acc, run, start, resumed_step, plan, timing)
            if test:  # T in the weights' metadata: predictions are calibrated (from this run's own logits)
                calibrate_after_training(run, *_held_out_and_test_logits(module, trainer))
            record(run, trainer.loggers)
            log_results(trainer.loggers, run.read_results(), trainer.global_step)
            if plan is not None and resumed_step is None:  # the calibration pass is in the plan's test
                now = time.time()
                if notice := overrun_notice(plan, now - clock, fitted - clock - plan.spent, now - fitted):
                    log.warning(notice)
    return run


def _held_out_and_test_logits(module: LitClassifier, trainer: L.Trainer):
    """The plain logits the last validation and the test computed, in data order (one process only)."""
    if trainer.world_size > 1:
        return None, None
    val, test = (torch.cat(module.plain_logits[k]).cpu() if module.plain_logits[k] else None for k in ("val", "test"))
    return (None if module.cfg.calib_size else val), test  # a calibration split is predicted there


def evaluate(run_dir: str | Path, data: str | None = None, tta: int | None = None,
             tta_threshold: float | None = None) -> dict:
    """Test accuracy/loss of a finished run's final weights on its data source's test set."""
    from ..weights import load
    run = RunDir.open(run_dir, need=("config", "weights"))
    cfg = run.read_config()
    threshold = cfg.tta_threshold if tta_threshold is None else tta_threshold
    _check_tta_threshold(threshold, "--tta-threshold")
    cfg = dataclasses.replace(cfg, data=data or cfg.data, tta=cfg.tta if tta is None else tta,
                              tta_threshold=threshold)
    dm = build_datamodule(cfg)
    loaded = load(run.path, expect=(cfg.model, len(dm.classes)))
    dm.augment = Augment(loaded.mean, loaded.std)  # the statistics the weights were trained with
    module = LitClassifier(loaded.net.to(memory_format=torch.channels_last), len(loaded.classes), cfg)
    one_device = {"devices": 1, "num_nodes": 1, "strategy": "auto"}  # a DDP run is tested on one
    with _machine_errors():
        trainer = L.Trainer(**with_bar({**trainer_kwargs(cfg), **one_device}, []), logger=False,
                            enable_checkpointing=False)
    return trainer.test(module, datamodule=dm, verbose=False)[0]
