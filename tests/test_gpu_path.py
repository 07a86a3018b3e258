"""The GPU path, checked on the CPU: precision per card, no host synchronisation inside a training
step, the dataset on the training device, resuming onto a machine with other GPUs, GPU settings."""
from __future__ import annotations

import dataclasses
import traceback

import lightning as L
import pytest
import torch

from cifarkit.train.checkpoints import RunGuard
from cifarkit.data.datamodule import CIFARDataModule
from cifarkit.train.module import LitClassifier
from cifarkit.presets import preset_config
from cifarkit.rundir import RunDir
from cifarkit.train.fit import build_module, choose_precision


@pytest.mark.parametrize("cap, expect", [((6, 1), "32-true"), ((7, 5), "16-mixed"), ((8, 0), "bf16-mixed"),
                                         ((9, 0), "bf16-mixed")])
def test_precision_auto_follows_the_cards_capability(monkeypatch, cap, expect):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    precision, why = choose_precision("auto", "auto")
    assert precision == expect and f"{cap[0]}.{cap[1]}" in why
    assert choose_precision("32-true", "gpu") == ("32-true", "as asked")


@pytest.mark.parametrize("has_bf16, expect", [(True, "bf16-mixed"), (False, "32-true")])
def test_precision_auto_on_the_cpu(monkeypatch, has_bf16, expect):
    monkeypatch.setattr("cifarkit.train.fit.cpu_has_bf16", lambda: has_bf16)
    assert choose_precision("auto", "cpu")[0] == expect


SYNCS = ("item", "tolist", "cpu", "__bool__")


class CountSyncs(L.Callback):
    """Counts .item(), .tolist(), .cpu() and bool() on tensors from an epoch's start to its end:
    every step (drawing and augmenting the batch on the device, forward, backward, optimizer,
    lookahead, scheduler, the other callbacks' batch ends), keeping where each came from."""

    def __init__(self):
        self.calls, self.steps, self._on = [], 0, False
        self._saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def _patch(self):
        for name, real in self._saved.items():
            def counting(t, *a, _real=real, _name=name, **k):
                if self._on:
                    where = "".join(traceback.format_stack(limit=8)[:-1])
                    if "torch/utils/data/dataloader.py" not in where:  # seeding a new epoch's iterator
                        self.calls.append((_name, where))           # draws on a CPU generator, once
                return _real(t, *a, **k)
            setattr(torch.Tensor, name, counting)

    def restore(self):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)

    def on_train_start(self, trainer, module):
        self._patch()

    def on_train_epoch_start(self, trainer, module):
        self._on = True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps += 1

    def on_train_epoch_end(self, trainer, module):
        self._on = False


class Leaky(LitClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        print(f"loss {loss.item():.3f}")  # what a well-meant progress line does: a read every step
        return loss


@pytest.mark.slow  # two Lightning fits
@pytest.mark.parametrize("leaky", [False, True])
def test_a_training_step_never_waits_on_the_device(image_folder, tmp_path, leaky):
    cfg = preset_config("fast", data=str(image_folder), batch_size=8, val_size=0, epochs=2, tta=0,
                        check_every_steps=1000, model_kwargs=dict(widths=[8, 16, 16]))
    dm = CIFARDataModule(str(image_folder), batch_size=8, val_size=0, augment=cfg.augment).prepare()
    module = build_module(cfg, dm)
    if leaky:  # the counter sees a read when there is one
        module = Leaky(module.net, len(dm.classes), cfg)
    counter = CountSyncs()
    guard = RunGuard(RunDir(tmp_path), cfg.model, dm.classes, check_every=cfg.check_every_steps)
    trainer = L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=True, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path, callbacks=[guard, counter])  # counter's batch end runs last
    try:
        trainer.fit(module, datamodule=dm)
    finally:
        counter.restore()
    assert counter.steps == 12 and trainer.global_step == 12  # 48 images, batches of 8, 2 epochs
    if leaky:
        assert [name for name, _ in counter.calls] == ["item"] * 12
        return
    assert counter.calls == [], counter.calls[0]
    # the training images live on the module's device, and the loader carried none of them
    x_dev, _ = dm.device_set(module.device)
    assert x_dev.device == module.device and x_dev.dtype == torch.uint8 and len(x_dev) == 48


def test_resuming_onto_a_machine_with_fewer_gpus_restores_what_fits(monkeypatch, tmp_path, notices):
    guard = RunGuard(RunDir(tmp_path), "fast", ["a", "b"])
    state = {"torch_rng": torch.get_rng_state(), "cuda_rng": [torch.zeros(16, dtype=torch.uint8)] * 4}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda rng, i: restored.append(i))
    guard.load_state_dict(state)
    assert restored == [0] and "holds the random state of 4 GPU(s) and this machine has 1" in notices()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    guard.load_state_dict(state)                       # no GPU at all: the CPU state only, and a notice
    assert restored == [0] and "this machine has 0" in notices()


# What the GPU may change in a preset: throughput and machine settings, never the recipe.
MACHINE = {"batch_size", "lr", "muon_lr", "eval_batch_size", "tta_threshold", "drop_last", "compile",
           "check_every_steps"}


def test_the_gpu_settings_of_each_preset_are_stated_once_and_keep_the_rate_per_example(monkeypatch):
    """On a CUDA machine the command line resolves each preset to fixed-shape batches read every 50
    steps, with the same learning rate per example and the same recipe; the module compiles its net
    and the Trainer gets the card's precision and cudnn.benchmark."""
    from cifarkit.cli import build_parser, config_from_args
    from cifarkit.models import build_model
    from cifarkit.train.fit import trainer_kwargs

    def resolved(name):
        return config_from_args(build_parser().parse_args(["train", "--preset", name]))

    cpus = {name: resolved(name) for name in ("fast", "quick", "seed")}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    for name, cpu in cpus.items():
        gpu = resolved(name)
        changed = {f.name for f in dataclasses.fields(cpu) if getattr(gpu, f.name) != getattr(cpu, f.name)}
        assert changed <= MACHINE, (name, changed - MACHINE)  # epochs, augment, model, schedule: as on the CPU
        assert gpu.drop_last and not cpu.drop_last             # one batch shape for the whole run
        assert (gpu.check_every_steps, cpu.check_every_steps) == (50, 1)
        assert gpu.eval_batch_size >= cpu.eval_batch_size
        if name == "seed":                                      # lr 'auto' and batch 512: as on the CPU
            assert changed == {"drop_last", "check_every_steps"}
            continue
        assert gpu.batch_size == 4 * cpu.batch_size == 1024
        assert gpu.lr / gpu.batch_size == pytest.approx(cpu.lr / cpu.batch_size)
        assert gpu.muon_lr > cpu.muon_lr > 0
        assert gpu.tta_threshold == 1.0 and cpu.tta_threshold < 1.0  # every image sees every view: one shape
        assert gpu.compile and not cpu.compile
        assert gpu.epochs == cpu.epochs and gpu.augment == cpu.augment and gpu.model_kwargs == cpu.model_kwargs
        net = build_model(gpu.model, 10, **gpu.model_kwargs)
        assert isinstance(LitClassifier(net, 10, gpu)._net, torch._dynamo.eval_frame.OptimizedModule)
        assert LitClassifier(net, 10, cpu)._net is net
        kw = trainer_kwargs(gpu)
        assert kw["precision"] == "bf16-mixed" and kw["benchmark"] is True
    assert cpus["quick"].epochs == 2.0 and resolved("quick").epochs == 2.0  # quick keeps its own length


def test_the_command_line_takes_the_gpu_settings_only_where_cuda_trains(monkeypatch):
    from cifarkit.cli import build_parser, config_from_args
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert config_from_args(build_parser().parse_args(["train", "--preset", "fast"])).batch_size == 1024
    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "fast", "--accelerator", "cpu"]))
    assert cfg.batch_size == 256
    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "fast", "--batch-size", "512"]))
    assert cfg.batch_size == 512 and cfg.compile          # a flag still wins over the GPU setting
