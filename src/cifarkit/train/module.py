"""One LightningModule around any registered net: loss, metrics, SGD + OneCycle, lookahead, TTA.

Every number of a recipe comes from its TrainConfig (presets.py); nothing here has a default of
its own. The run's length (total steps, whitening-bias epochs, lookahead shape) comes from its
Schedule (schedule.py), which a time budget may re-plan while the run trains: the module reads it.
"""
from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from ..console import log
from .optim import MuonSGD
from .schedule import Schedule
from ..presets import TrainConfig

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def tta_logits(net: nn.Module, x: torch.Tensor, level: int = 0, threshold: float = 1.0,
               plain: torch.Tensor | None = None) -> torch.Tensor:
    """Logits averaged over test-time views: 0 = as is, 1 = + mirror, 2 = + mirror of 1-px shifts.

    With threshold < 1, only the images whose plain prediction has a top probability below it get
    the extra views (the confident ones keep their plain logits): most of the time, same accuracy.
    """
    plain = net(x) if plain is None else plain                  # (B, K)
    if level == 0:
        return plain
    if threshold >= 1.0:
        return _views(net, x, level, plain)
    unsure = torch.softmax(plain.float(), dim=1).amax(dim=1) < threshold
    out = plain.clone()
    if unsure.any():
        out[unsure] = _views(net, x[unsure], level, plain[unsure]).to(out.dtype)
    return out


def _views(net: nn.Module, x: torch.Tensor, level: int, plain: torch.Tensor) -> torch.Tensor:
    def mirror(v, logits):  # logits: net(v), already computed
        return 0.5 * logits + 0.5 * net(v.flip(-1))

    out = mirror(x, plain)
    if level >= 2:
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")         # (B, 3, H+2, W+2)
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]    # up-left and down-right by 1 px
        out = 0.5 * out + 0.5 * torch.stack([mirror(v, net(v)) for v in shifted]).mean(0)
    return out


class OneCycle(torch.optim.lr_scheduler.OneCycleLR):
    """torch's two-phase one-cycle, whose length a time budget may re-plan while it runs."""

    def retarget(self, total_steps: int) -> None:
        """End the schedule on step total_steps - 1. In the warm-up, a shorter run's warm-up keeps its
        share of the steps (or peaks now) and a longer run's warm-up ends where it was; past it, the
        anneal goes on from where it is (the rate is continuous) to its final value on the new last
        step. The optimizer's rates are set for the next step."""
        s, first, last = self.last_epoch, self._schedule_phases[0], self._schedule_phases[1]
        if s <= first["end_step"]:  # its share of a shorter run (the peak now at the latest), never longer
            warmup = (first["end_step"] + 1) / self.total_steps  # pct_start
            first["end_step"] = max(min(float(warmup * total_steps) - 1, first["end_step"]), s)
        else:  # the same fraction of the anneal done at step s, on the new length
            done = (s - first["end_step"]) / (last["end_step"] - first["end_step"])
            first["end_step"] = min((s - done * (total_steps - 1)) / (1 - done), s - 1) if done < 1 else s - 1
        self.total_steps = total_steps
        last["end_step"] = total_steps - 1
        with warnings.catch_warnings():  # get_lr outside step() warns; here it is the point
            warnings.simplefilter("ignore")
            for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
                group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def hardest(x: torch.Tensor, y: torch.Tensor, losses: torch.Tensor, keep: float):
    """The examples with the highest loss, the `keep` share of the batch: (x, y) aligned, (K, ...)."""
    idx = losses.topk(max(1, round(keep * len(y)))).indices     # (K,)
    return x[idx], y[idx]


class LitClassifier(L.LightningModule):
    def __init__(self, net: nn.Module, num_classes: int, cfg: TrainConfig, proxy: nn.Module | None = None,
                 schedule: Schedule | None = None):
        super().__init__()
        self.cfg = cfg
        self.net = net
        self.proxy = proxy  # cfg.proxy_keep: a small net that ranks each batch's examples by its loss
        # the peak rate (configure_optimizers reads it); with lr 'auto', the LR range test's first rate
        # until the test sets its suggestion (the groups' ratios to it are what the sweep keeps)
        self.lr = float(cfg.lr) if cfg.lr != "auto" else float(cfg.lr_find["min_lr"])
        # the run's length; None: the trainer's (every epoch whole), the config's whitening and lookahead
        self.schedule = schedule
        self.train_acc, self.val_acc, self.test_acc = (
            MulticlassAccuracy(num_classes, average="micro", validate_args=False) for _ in range(3))
        # epoch means of training metrics live in checkpoints: a mid-epoch resume keeps the whole epoch
        self.train_loss = MeanMetric(nan_strategy="disable")  # its NaN check would read the device
        for m in (self.train_loss, self.train_acc):
            m.persistent(True)
        self._ema: dict[str, torch.Tensor] | None = None
        self._batch = cfg.batch_size  # examples per optimizer step of the net, as of the latest batch
        self._lookahead_on = cfg.lookahead
        self._lrs: list[tuple[int, float]] = []  # (step, lr) not yet handed to the loggers
        self.plain_logits: dict[str, list[torch.Tensor]] = {"val": [], "test": []}  # single-view, in order
        # the training step's net: compiled with static shapes (--compile; see compiling.py), kept out
        # of the module's children so checkpoints hold the plain net
        object.__setattr__(self, "_net", net)
        if cfg.compile:
            try:
                object.__setattr__(self, "_net", torch.compile(net, dynamic=False))
            except RuntimeError as exc:  # torch.compile refuses up front, e.g. on a Python it does not support
                self.uncompile(exc)

    def forward(self, x):
        return self.net(x)

    @property
    def compiled(self) -> bool:
        return self._net is not self.net

    def uncompile(self, exc: Exception) -> None:
        """Train the plain net: torch.compile cannot build here (said in one line)."""
        object.__setattr__(self, "_net", self.net)
        why = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        log.warning(f"notice: --compile: torch.compile cannot build here ({why[:200]}); training uncompiled")

    def record(self, cfg: TrainConfig, schedule: Schedule) -> None:
        """The run's resolved config and schedule, once planned: what every checkpoint's hyperparameters
        hold (as plain values), and the schedule the module reads from here on."""
        self.cfg, self.schedule = cfg, schedule
        self.save_hyperparameters({**dataclasses.asdict(cfg), "schedule": schedule.to_dict()})

    @contextmanager
    def scratch(self, schedule: Schedule | None = None, lookahead: bool = True):
        """Fits inside leave no trace: weights, buffers and metric states come back, and the lookahead
        average and the rates not yet logged are dropped. schedule: the length fits inside follow;
        lookahead=False: no weight averaging inside (an LR sweep's steps would be blended in)."""
        saved = copy.deepcopy(self.state_dict())
        before = self.schedule, self._lookahead_on
        self.schedule = schedule or self.schedule
        self._lookahead_on = self._lookahead_on and lookahead
        try:
            yield self
        finally:
            self.load_state_dict(saved)
            self.schedule, self._lookahead_on = before
            self._ema, self._lrs = None, []

    # -- steps: nothing here reads a value back from the device -----------------------------------

    def training_step(self, batch, batch_idx):
        x, y = batch
        extra = 0.0
        if self.proxy is not None:  # it learns from the whole batch; the net from its hardest share
            per_example = F.cross_entropy(self.proxy(x), y, label_smoothing=self.cfg.label_smoothing,
                                          reduction="none")                             # (B,)
            x, y = hardest(x, y, per_example.detach(), self.cfg.proxy_keep)
            if self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            extra = per_example.mean()
        self._batch = len(y) * self.trainer.world_size  # examples per optimizer step of the net
        logits = self._net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        self.train_acc.update(logits, y)
        self.train_loss.update(loss.detach().float(), weight=len(y))
        self.log("train_loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self._lrs.append((self.global_step, self.optimizers().param_groups[0]["lr"]))  # a Python float
        return loss + extra

    def _flush_lrs(self) -> None:
        """The per-step learning rates, to the loggers at epoch ends and checkpoints (logging them
        through self.log every step would make a device tensor of each)."""
        for logger in self.loggers:
            for step, lr in self._lrs:
                logger.log_metrics({"lr": lr}, step=step)
            logger.save()
        self._lrs.clear()

    def _eval_step(self, batch, stage: str, metric, tta: int):
        # the plain net, compiled or not: a pass over the test set never repays an eval-mode compile,
        # whose time would fall after the budget's plan, and whose shapes vary with the unsure views
        x, y = batch
        plain = self.net(x)                                      # (B, K)
        self.plain_logits[stage].append(plain.detach().float())  # for calibration: no second pass
        logits = tta_logits(self.net, x, tta, self.cfg.tta_threshold, plain)
        metric(logits, y)
        self.log(f"{stage}_loss", F.cross_entropy(logits.float(), y), on_epoch=True, sync_dist=True)
        self.log(f"{stage}_acc", metric, on_epoch=True, prog_bar=True)

    def on_validation_epoch_start(self):
        self.plain_logits["val"] = []  # the last validation's only

    def on_test_epoch_start(self):
        self.plain_logits["test"] = []

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val", self.val_acc, 0)

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test", self.test_acc, self.cfg.tta)

    # -- optimizer and schedule ------------------------------------------------------------------

    def _param_groups(self) -> list[dict]:
        hp = self.cfg
        nets = self._nets()  # the proxy, if any, by the same rules as the net
        norm_ids = {id(p) for net in nets for m in net.modules() if isinstance(m, NORM_TYPES) for p in m.parameters()}
        params = [p for net in nets for p in net.parameters() if p.requires_grad]
        filters = [p for p in params if p.ndim == 4 and id(p) not in norm_ids] if hp.muon_lr else []
        not_other = norm_ids | {id(p) for p in filters}
        other = [p for p in params if id(p) not in not_other]
        norm = [p for p in params if id(p) in norm_ids]
        groups = [dict(params=other, lr=self.lr, weight_decay=hp.weight_decay)]
        if filters:  # Muon: the rate is the step's fraction of the (normalized) filter bank
            groups.append(dict(params=filters, lr=hp.muon_lr, momentum=hp.muon_momentum, muon=True))
        if norm:
            groups.append(dict(params=norm, lr=self.lr * hp.bias_lr_scale,
                               weight_decay=hp.weight_decay / hp.bias_lr_scale))
        return groups

    def total_steps(self) -> int:
        return self.schedule.total_steps if self.schedule is not None else int(self.trainer.estimated_stepping_batches)

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        hp = self.cfg
        if hp.muon_lr:
            return MuonSGD(groups, lr=self.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                           ns_steps=hp.muon_ns_steps, renorm_every=hp.muon_renorm_every)
        return torch.optim.SGD(groups, lr=self.lr, momentum=hp.momentum, nesterov=hp.nesterov)

    def configure_optimizers(self):
        hp = self.cfg
        self.lr = float(self.trainer.strategy.broadcast(self.lr, src=0))  # every rank takes rank 0's
        groups = self._param_groups()
        opt = self._optimizer(groups)
        sched = OneCycle(
            opt, max_lr=[g["lr"] for g in groups], total_steps=self.total_steps(),
            pct_start=hp.pct_start, anneal_strategy="cos" if hp.schedule == "cosine" else "linear",
            div_factor=hp.div_factor, final_div_factor=hp.final_div_factor,
            cycle_momentum=hp.cycle_momentum, three_phase=False)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # -- fast-recipe hooks -----------------------------------------------------------------------

    def on_train_batch_start(self, batch, batch_idx):
        for config in self.trainer.lr_scheduler_configs:  # a re-planned length: the one-cycle follows
            if isinstance(config.scheduler, OneCycle) and config.scheduler.total_steps != self.total_steps():
                config.scheduler.retarget(self.total_steps())

    def on_train_start(self):
        self._epoch_start = time.perf_counter()  # a run resumed inside an epoch times from here
        if self._ema is not None:  # restored from a checkpoint, on the CPU
            self._ema = {k: v.to(self.device) for k, v in self._ema.items()}

    def on_train_epoch_start(self):
        self._epoch_start = time.perf_counter()
        self.train_loss.reset()  # a fresh epoch: forget state restored from an epoch-end checkpoint
        self.train_acc.reset()
        # The whitening stem's bias trains for its first epochs only. On one device the net then
        # detaches it, which also spares backward block1's full-resolution input gradient. Under DDP the
        # set of trained parameters must stay fixed: the gradient is computed and dropped instead.
        for net in self._nets():
            if hasattr(net, "stem_bias_trains"):
                net.stem_bias_trains = self._stem_bias_trains() or self.trainer.world_size > 1

    def on_train_epoch_end(self):
        self._flush_lrs()
        # wall-clock seconds of the epoch, its validation included (a resumed epoch counts from the
        # resume); the one column in which two runs of one seed differ
        self.log("epoch_seconds", time.perf_counter() - self._epoch_start, on_epoch=True, sync_dist=True)

    def _stem_bias_trains(self) -> bool:
        if self.schedule is not None:
            return self.schedule.whiten_bias_trains(self.current_epoch)
        return self.current_epoch < self.cfg.whiten_bias_epochs

    def _nets(self) -> list[nn.Module]:
        return [self.net] + ([self.proxy] if self.proxy is not None else [])

    def on_before_optimizer_step(self, optimizer):
        for net in self._nets():
            stem = getattr(net, "whiten", None)
            if stem is not None and stem.bias is not None and not self._stem_bias_trains():
                stem.bias.grad = None  # SGD skips it: no step, no weight decay

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        # here rather than in on_train_batch_end: a checkpoint taken after this step includes it
        if self._lookahead_on:
            self._lookahead_step(self.global_step + 1)  # Lightning counts the step after this hook

    def _lookahead_step(self, step: int) -> None:
        if self._ema is None:
            self._ema = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        # without a run's schedule: the config's lookahead over the trainer's steps
        schedule = self.schedule or Schedule.of(self.cfg, steps_per_epoch=1, epochs=self.total_steps())
        decay = schedule.lookahead_decay_at(step, self._batch)
        if decay is not None:
            self._lookahead(decay)

    @torch.no_grad()
    def _lookahead(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * w; then w <- ema (early: follow w, late: average). With
        weight_average 'ema' the weights go on alone, and become the average at the last step (decay 1)."""
        take = self.cfg.weight_average == "lookahead" or decay == 1.0
        for k, w in self.net.state_dict().items():
            if w.dtype.is_floating_point:
                self._ema[k].lerp_(w, 1 - decay)
                if take:
                    w.copy_(self._ema[k])

    def on_save_checkpoint(self, checkpoint):
        self._flush_lrs()  # metrics.csv holds every step the checkpoint holds
        if self._ema is not None:
            checkpoint["lookahead"] = self._ema

    def on_load_checkpoint(self, checkpoint):
        self._ema = checkpoint.get("lookahead")
