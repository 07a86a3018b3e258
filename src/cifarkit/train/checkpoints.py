"""Checkpoints a run can always resume from, and the guard that stops a run cleanly.

- AtomicCheckpointIO writes each checkpoint to a temporary file beside its target, fsyncs it and
  renames it over the target: a kill or a full disk mid-write leaves the previous checkpoint whole.
  (Lightning's own writer stages the file in the system temp folder; where that is another
  filesystem the final move is a copy, which a kill can cut short.)
- MetricsLogger writes metrics.csv and continues it across a resume.
- LastCheckpoint writes last.ckpt at every epoch's end (after validation) and every N optimizer
  steps in between. (ModelCheckpoint(save_last=True) refreshes last.ckpt only when it also saves
  a top-k checkpoint.)
- RunGuard puts the global RNG state (augmentation draws from it) and the model name into every
  checkpoint, stops the run after the current step with a checkpoint on Ctrl-C, stops it on a
  non-finite loss before anything saves the broken weights, and ends a fractional last epoch.
- read_checkpoint loads with torch.load(weights_only=True); check_checkpoint names both models when
  a checkpoint does not belong to the run.
"""
from __future__ import annotations

import csv
import errno
import os
import pickle
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from ..console import log
from ..errors import CifarkitError, RunInterrupted
from ..rundir import RunDir, atomic_path
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EIO}


def resume_hint(run_dir: Path) -> str:
    return f"cifarkit train --resume {run_dir}"


def disk_error(exc: OSError, path: Path, run_dir: Path) -> CifarkitError:
    """The one-line message for a write that the disk refused (full, read-only, no permission)."""
    return CifarkitError(f"cannot write {path}: {exc.strerror or exc}; what was saved before is kept: "
                         f"free space or fix the disk, then `{resume_hint(run_dir)}`")


class AtomicCheckpointIO(TorchCheckpointIO):
    def __init__(self, run_dir: Path | None = None):
        super().__init__()
        self.run_dir = run_dir

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint
        except OSError as exc:
            raise disk_error(exc, path, self.run_dir or path.parent.parent) from None


def remove_partial_checkpoints(ckpt_dir: Path) -> None:
    """Temporary files a killed save left behind (rundir.atomic_path's names)."""
    for tmp in ckpt_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


class LastCheckpoint(Checkpoint):
    """checkpoints/last.ckpt at every epoch's end and, mid-epoch, every `every_steps` optimizer steps.

    A Checkpoint, so Lightning calls it after ModelCheckpoint: last.ckpt holds best.ckpt's record.
    """

    def __init__(self, path: Path, every_steps: int = 0):
        self.path, self.every_steps = Path(path), every_steps

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # an epoch's last step is saved by on_train_epoch_end, after validation
        ends_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or trainer.should_stop
        if self.every_steps and trainer.global_step % self.every_steps == 0 and not ends_epoch:
            trainer.save_checkpoint(self.path, weights_only=False)


class RunGuard(Callback):
    """check_every: steps between reads of the device (the divergence check, and Ctrl-C under DDP).
    In between nothing waits on the host: a non-finite loss is recorded on the device as it
    happens (its step and value), and every checkpoint is checked before it is written."""

    def __init__(self, run: RunDir, model: str, classes: list[str], check_every: int = 1):
        self.run, self.model, self.classes, self.check_every = run, model, list(classes), max(1, check_every)
        self.stop_requested = False
        self.saved_at: tuple[int, int] | None = None  # (step, epoch) of the checkpoint a Ctrl-C saved
        self.last_saved_step: int | None = None
        self.schedule = None  # the run's Schedule: its last step ends the run, mid-epoch too
        self._bad: torch.Tensor | None = None  # (step, loss) of the first non-finite loss; step -1: none

    # -- what every checkpoint carries besides Lightning's state ----------------------------------

    def state_dict(self) -> dict:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch_rng"])
        saved, here = list(state.get("cuda_rng") or []), torch.cuda.device_count() if torch.cuda.is_available() else 0
        for i, rng in enumerate(saved[:here]):
            torch.cuda.set_rng_state(rng, i)
        if len(saved) != here and (saved or here):
            log.warning(f"notice: the checkpoint holds the random state of {len(saved)} GPU(s) and this machine "
                        f"has {here}: {min(len(saved), here)} restored, so GPU-side randomness is not bit-exact from here")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._check(trainer, pl_module)  # never write broken weights
        checkpoint["cifarkit"] = {"model": self.model, "classes": self.classes}
        self.last_saved_step = checkpoint["global_step"]

    # -- Ctrl-C: finish the step, checkpoint, stop ----------------------------------------------

    @contextmanager
    def catching_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        except SystemExit:  # Lightning exits on a KeyboardInterrupt (the second Ctrl-C)
            if not self.stop_requested:
                raise
            raise RunInterrupted(self.run.path, "stopped at once, without a new checkpoint") from None
        finally:
            signal.signal(signal.SIGINT, previous)

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        log.warning("\nstopping after this step with a checkpoint (Ctrl-C again to stop at once)")

    # -- every step: the end of a fractional last epoch, Ctrl-C, a diverged loss -----------------

    def on_train_start(self, trainer, pl_module) -> None:
        self._stop_at_the_end(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_at_the_end(trainer)

    def _stop_at_the_end(self, trainer) -> None:
        """Follow the schedule (a time budget may have re-planned it): stop on its last step, and let
        the trainer start every epoch it needs."""
        if self.schedule is None:
            return
        trainer.fit_loop.max_epochs = max(trainer.fit_loop.max_epochs, self.schedule.max_epochs)
        if trainer.global_step >= self.schedule.total_steps:
            trainer.should_stop = True  # validation and the epoch-end checkpoint still run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop_at_the_end(trainer)
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach().float()
        step = trainer.global_step  # optimizer steps done, this one included
        if self._bad is None:
            self._bad = torch.tensor([-1.0, 0.0], device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad[0] < 0)  # device ops: nothing waits here
        self._bad = torch.where(first, torch.stack([torch.full_like(loss, step), loss]), self._bad)
        ends_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or trainer.should_stop
        ctrl_c_now = self.stop_requested and trainer.world_size == 1  # one process: no agreement needed
        if step % self.check_every and not ctrl_c_now:
            return
        if self._check(trainer, pl_module) and not ends_epoch:
            trainer.save_checkpoint(self.run.last_ckpt, weights_only=False)
            self.saved_at = (trainer.global_step, trainer.current_epoch)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.saved_at:  # stop here, once Lightning has logged the step the checkpoint ends with
            step, epoch = self.saved_at
            raise RunInterrupted(self.run.path, f"stopped at step {step} (epoch {epoch}) with a checkpoint")

    def _check(self, trainer, pl_module) -> bool:
        """One read of the device: raise on a non-finite loss or weights; True if Ctrl-C asks to stop
        (every rank takes the same decision, or the others would hang)."""
        params = [p.detach() for p in pl_module.parameters()]
        weights = torch.stack([p.norm() for p in params]).sum()
        bad = self._bad if self._bad is not None else torch.tensor([-1.0, 0.0], device=weights.device)
        flags = torch.stack([torch.tensor(float(self.stop_requested), device=weights.device),
                             (bad[0] >= 0).float(), (~torch.isfinite(weights)).float()])
        if trainer.world_size > 1:
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        stop, bad_loss, bad_weights, bad_step, bad_value, weight_value = \
            torch.cat([flags, bad.to(flags.device), weights[None].to(flags.device)]).tolist()
        if bad_loss and bad_step >= 0:
            raise CifarkitError(self._divergence_message(f"loss became {_kind(bad_value)} at step {int(bad_step)}",
                                                         trainer, pl_module))
        if bad_loss or bad_weights:  # another rank's loss, or the weights
            what = "the loss of another rank" if bad_loss else f"weights became {_kind(weight_value)}"
            raise CifarkitError(self._divergence_message(f"{what} by step {trainer.global_step}", trainer, pl_module))
        return bool(stop)

    def _divergence_message(self, what: str, trainer, pl_module) -> str:
        last = self.run.last_ckpt
        kept = "no checkpoint was saved yet"
        if last.is_file():
            at = f" (step {self.last_saved_step})" if self.last_saved_step is not None else ""
            kept = f"the last good checkpoint {last}{at} is kept"
        return (f"{what} (epoch {trainer.current_epoch}); training stopped and {kept}; "
                f"lower --lr (this run: {pl_module.lr:.3g}) or check the data")


def _kind(value: float) -> str:
    return "nan" if value != value else "inf"


# ---------------------------------------------------------------------------------------------
# metrics.csv, continued across a resume


class MetricsLogger(Logger):
    """RUN_DIR/metrics.csv: one row per logging call (step, epoch and the values logged).

    A resumed run keeps the rows logged before the checkpoint's step and continues the file.
    The file is appended to as rows arrive, and rewritten whole only when a new column appears.
    """

    def __init__(self, path: Path, keep_before_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.rows: list[dict] = []
        self.columns: list[str] = ["epoch", "step"]
        if keep_before_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or self.columns)
                self.rows = [r for r in reader if int(float(r["step"])) < keep_before_step]
        self._written: int | None = None  # rows in the file; None: (re)write it whole at the next save

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> str:
        return ""

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # config.yaml holds them

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if "epoch" in row:
            row["epoch"] = int(row["epoch"])
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._written = None
        self.rows.append(row)

    @rank_zero_only
    def save(self) -> None:
        rewrite = self._written is None
        todo = self.rows if rewrite else self.rows[self._written:]
        if not todo and not rewrite:
            return
        if rewrite:  # new columns: the whole file again, replacing the old one only once written
            with atomic_path(self.path) as tmp:
                self._write(tmp, "w", todo)
        else:
            self._write(self.path, "a", todo)
        self._written = len(self.rows)

    def _write(self, path: Path, mode: str, rows: list[dict]) -> None:
        with open(path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns)
            if mode == "w":
                writer.writeheader()
            writer.writerows(rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()


# ---------------------------------------------------------------------------------------------
# Reading checkpoints


def read_checkpoint(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CifarkitError(f"no checkpoint at {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CifarkitError(f"refused to load {p}: it holds Python objects besides tensors and plain "
                            "values (loaded with weights_only=True); use checkpoints cifarkit wrote") from None
    except Exception as exc:
        raise CifarkitError(f"cannot read checkpoint {p}: {str(exc).splitlines()[0]} "
                            "(truncated, or not a checkpoint?)") from None


def checkpoint_model(ckpt: dict) -> tuple[str, int] | None:
    """(model name, class count) of a checkpoint: from what cifarkit stored, else from its tensors."""
    if "cifarkit" in ckpt:
        return ckpt["cifarkit"]["model"], len(ckpt["cifarkit"]["classes"])
    from ..weights import identify
    net = {k[4:]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith("net.")}
    return identify(net)


def check_checkpoint(path: Path, model: str, num_classes: int) -> dict:
    """The checkpoint at `path`, if it was saved by a run of `model` with `num_classes` classes."""
    ckpt = read_checkpoint(path)
    found = checkpoint_model(ckpt)
    if found != (model, num_classes):
        what = f"'{found[0]}' with {found[1]} classes" if found else "a model cifarkit does not know"
        raise CifarkitError(f"checkpoint {path} is for {what}, not '{model}' with {num_classes} classes "
                            "as this run is configured; resume the run it came from")
    return ckpt
