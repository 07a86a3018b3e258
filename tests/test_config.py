"""One declaration per setting: TrainConfig's fields are the CLI's flags and the module's settings;
importing or using cifarkit as a library changes no global state."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import subprocess
import sys
import warnings

import pytest
import torch

from cifarkit import CifarkitError
from cifarkit.cli import add_config_flags, config_from_args
from cifarkit.models import build_model
from cifarkit.train.module import LitClassifier
from cifarkit.train.schedule import Schedule
from cifarkit.presets import PRESETS, TrainConfig, preset_config, setting


def test_a_new_setting_reaches_the_cli_and_the_module():
    Extended = dataclasses.make_dataclass(
        "Extended", [("warmup_images", int, setting(0, "images of linear warm-up"))], bases=(TrainConfig,),
        frozen=True)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, Extended)
    assert "images of linear warm-up" in parser.format_help()
    args = parser.parse_args(["--warmup-images", "2048", "--lr", "0.3", "--no-lookahead"])
    cfg = config_from_args(args, Extended)
    assert (cfg.warmup_images, cfg.lr, cfg.lookahead) == (2048, 0.3, False)
    module = LitClassifier(build_model("fast", 10), 10, cfg)
    module.record(cfg, Schedule.of(cfg, steps_per_epoch=10))          # what every checkpoint's hyperparameters hold
    assert module.cfg.warmup_images == 2048 and module.hparams["warmup_images"] == 2048
    assert module.hparams["schedule"]["total_steps"] == 100


def test_every_setting_has_help_and_every_scalar_one_is_a_flag():
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    flags = {a.dest for a in parser._actions}
    assert "preset" in flags                      # its own flag: it picks the defaults of the others
    for f in dataclasses.fields(TrainConfig)[1:]:
        assert f.metadata["help"], f.name
        assert (f.name in flags) == f.metadata["flag"], f.name


def test_the_subcommands_setting_flags_take_help_type_and_choices_from_trainconfig():
    from cifarkit.cli import build_parser
    parser = build_parser()
    args = parser.parse_args(["test", "run", "--tta", "1", "--tta-threshold", "0.5"])
    assert (args.tta, args.tta_threshold) == (1, 0.5)
    assert parser.parse_args(["lr-find", "--num-training", "50"]).num_training == 50
    helps = {f.name: f.metadata for f in dataclasses.fields(TrainConfig)}
    sub = parser._subparsers._group_actions[0].choices
    tta = {a.dest: a for a in sub["test"]._actions}
    assert tta["tta"].choices == helps["tta"]["choices"] and tta["tta"].help.startswith(helps["tta"]["help"])
    assert tta["tta_threshold"].help == f"{helps['tta_threshold']['help']} (default: the run's)"
    steps = {a.dest: a for a in sub["lr-find"]._actions}["num_training"]
    assert steps.type is int and steps.help.startswith(helps["lr_find"]["keys"]["num_training"])
    with pytest.raises(CifarkitError, match="invalid choice"):
        parser.parse_args(["test", "run", "--tta", "3"])


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


def test_the_data_module_the_augmentation_and_the_lr_sweep_default_to_trainconfigs_declaration():
    from cifarkit.data.augment import Augment
    from cifarkit.data.datamodule import CIFARDataModule
    from cifarkit.train.lr_finder import check_settings, find_lr
    cfg = TrainConfig()
    params = inspect.signature(CIFARDataModule).parameters
    for name in set(params) - {"augment"}:
        assert params[name].default == getattr(cfg, name), name
    aug = Augment([0.5] * 3, [0.25] * 3)
    a = cfg.augment
    assert (aug.flip, aug.pad, aug.pad_mode, aug.pipeline, aug.seed) == (a["flip"], a["pad"], a["pad_mode"],
                                                                          a["pipeline"], cfg.seed)
    assert (aug.cutout[1], aug.holes[0], aug.cutout_p, aug.low_res) == (a["cutout"], a["cutout_holes"],
                                                                         a["cutout_p"], a["low_res"])
    for fn in (check_settings, find_lr):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in cfg.lr_find} == cfg.lr_find, fn.__name__


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
