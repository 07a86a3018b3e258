"""One declaration per setting: TrainConfig's fields are the CLI's flags and the module's settings;
importing or using cifarkit as a library changes no global state."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import warnings

import pytest
import torch

from cifarkit.cli import add_config_flags, config_from_args
from cifarkit.models import build_model
from cifarkit.train.module import LitClassifier
from cifarkit.presets import PRESETS, TrainConfig, preset_config, setting


def test_a_new_setting_reaches_the_cli_and_the_module():
    Extended = dataclasses.make_dataclass(
        "Extended", [("warmup_images", int, setting(0, "images of linear warm-up"))], bases=(TrainConfig,))
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Extended)
    assert "images of linear warm-up" in parser.format_help()
    args = parser.parse_args(["--warmup-images", "2048", "--lr", "0.3", "--no-lookahead"])
    cfg = config_from_args(args, Extended)
    assert (cfg.warmup_images, cfg.lr, cfg.lookahead) == (2048, 0.3, False)
    module = LitClassifier(build_model("fast", 10), 10, cfg)
    assert module.cfg.warmup_images == 2048 and module.hparams["warmup_images"] == 2048


def test_every_setting_has_help_and_every_scalar_one_is_a_flag():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    flags = {a.dest for a in parser._actions}
    assert "preset" in flags                      # its own flag: it picks the defaults of the others
    for f in dataclasses.fields(TrainConfig)[1:]:
        assert f.metadata["help"], f.name
        assert (f.name in flags) == f.metadata["flag"], f.name


def test_flags_override_the_preset_and_bad_values_are_one_line(capsys):
    from cifarkit.cli import build_parser, main
    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "quick", "--tta", "1",
                                                      "--muon-ns-steps", "5", "--devices", "0,1"]))
    assert (cfg.preset, cfg.epochs, cfg.tta, cfg.muon_ns_steps, cfg.devices) == ("quick", 2.0, 1, 5, [0, 1])
    assert main(["train", "--schedule", "cubic"]) == 2  # a choice not listed: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'cubic'" in err[0] and "cifarkit train --help" in err[0]
    assert main(["train", "--lr", "fast"]) == 2
    assert "argument --lr: must be a number or 'auto', got 'fast'" in capsys.readouterr().err


def test_each_preset_is_a_valid_config_and_model_kwargs_reach_the_built_net(image_folder, tmp_path):
    """Every preset resolves; model_kwargs other than the net's defaults build that net, and its weights
    file rebuilds the same net."""
    from cifarkit.data.datamodule import CIFARDataModule
    from cifarkit.train.fit import build_module
    from cifarkit.weights import load, save_weights
    for name in PRESETS:
        preset_config(name)
    kwargs = dict(widths=[8, 16, 24], bn_momentum=0.1, head_scale=0.5, whiten_eps=0.01, act="relu")
    cfg = preset_config("fast", data=str(image_folder), model_kwargs=kwargs)
    dm = CIFARDataModule(str(image_folder), batch_size=8, val_size=0).prepare()
    net = build_module(cfg, dm).net
    save_weights(net, tmp_path / "w.safetensors", cfg.model, dm.classes, [0.5] * 3, [0.25] * 3, cfg.model_kwargs)
    for net in (net, load(tmp_path / "w.safetensors").net):  # as trained, and as the app and report rebuild it
        assert [net.block1.conv1.out_channels, net.block2.conv1.out_channels,
                net.block3.conv1.out_channels, net.fc.in_features] == [8, 16, 24, 24]
        assert net.block1.norm1.momentum == net.block3.norm2.momentum == 0.1
        assert net.head_scale == 0.5 and net.whiten_eps == 0.01
        assert isinstance(net.act, torch.nn.ReLU) and isinstance(net.block2.act, torch.nn.ReLU)
        assert net.fc.out_features == 4                              # the toy folder's 4 classes
    default = build_model("fast", 10)                               # what ignoring model_kwargs would build
    assert default.block1.conv1.out_channels != 8 and not isinstance(default.act, torch.nn.ReLU)


def test_the_lookahead_settings_drive_the_module(monkeypatch):
    cfg = TrainConfig(lookahead=True, lookahead_every=2, lookahead_decay=0.5, lookahead_power=1.0)
    module = LitClassifier(torch.nn.Linear(2, 2), 2, cfg)
    module._batch = 1024
    monkeypatch.setattr(module, "total_steps", lambda: 10)
    seen = []
    monkeypatch.setattr(module, "_lookahead", seen.append)
    for step in range(1, 11):
        module._lookahead_step(step)
    # every 2 steps: decay 0.5 per 1,024 images, twice, times (step / 10) ** 1; the last step: 1
    assert seen == pytest.approx([0.25 * 0.2, 0.25 * 0.4, 0.25 * 0.6, 0.25 * 0.8, 1.0])


def test_importing_cifarkit_leaves_the_matplotlib_backend_warnings_and_logging_alone():
    code = """
import logging, warnings, matplotlib
matplotlib.use("svg")
import torch, torchvision, lightning, gradio, pytorch_grad_cam  # their own filters: not cifarkit's doing
filters, handlers = list(warnings.filters), list(logging.getLogger().handlers)
import cifarkit, cifarkit.report.plots, cifarkit.report.report, cifarkit.train.fit, cifarkit.serve.app, cifarkit.cli
from cifarkit.report import plots
import numpy as np
fig = plots.confusion_matrix(np.eye(3, dtype=int) * 5, ["a", "b", "c"])
import matplotlib.pyplot as plt
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert plt.get_fignums() == [], "a figure was left in pyplot's registry"
assert list(warnings.filters) == filters, "warning filters changed"
assert list(logging.getLogger().handlers) == handlers, "root logger changed"
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_the_command_line_restores_the_warning_filters_it_changes():
    from cifarkit.cli import main
    before = list(warnings.filters)
    assert main(["summary", "--list"]) == 0
    assert list(warnings.filters) == before
