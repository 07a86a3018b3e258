"""The LR range test on small synthetic problems whose good learning rate is known, on the CPU."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cifarkit.errors import CifarkitError
from cifarkit.train.lr_finder import (DIVERGE_OVER_BEST, DIVERGE_OVER_START, MUON_REFUSAL, LRFind, LRFindRefused,
                                check_settings, check_sweepable, find_lr, load_lr_find, plot_lr_find,
                                save_lr_find, smooth, suggest)

CURVATURE = 4.0  # the bowl's Hessian is CURVATURE * I: plain SGD is fastest at 1 / CURVATURE


class Tensors(L.LightningDataModule):
    def __init__(self, x, y, batch_size):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))


def bowl_data(dim=8, n=2048, batch_size=256) -> Tensors:
    """Least squares with exact targets and features of covariance CURVATURE * I: a quadratic bowl
    whose one curvature makes 1 / CURVATURE the best plain-SGD rate and ~2 / CURVATURE divergence."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g) * math.sqrt(CURVATURE)
    return Tensors(x, x @ torch.randn(dim, generator=g), batch_size)


class Bowl(L.LightningModule):
    def __init__(self, dim=8, lr=1e-3):
        super().__init__()
        self.lr = lr
        self.w = nn.Parameter(torch.zeros(dim))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * ((x @ self.w - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Classifier(L.LightningModule):
    """An MLP with BatchNorm (buffers), two parameter groups (the head at 10x) and a OneCycle schedule,
    as LitClassifier has; it records the rates each step trained with."""

    def __init__(self, lr=1e-3):
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(2, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.rates, self.momenta, self.moved = [], [], False

    def training_step(self, batch, batch_idx):
        self.rates.append([g["lr"] for g in self.optimizers().param_groups])
        self.momenta.append([g["momentum"] for g in self.optimizers().param_groups])
        x, y = batch
        return F.cross_entropy(self.head(self.body(x)), y)

    def on_train_end(self):
        self.moved = bool((self.head.weight != self._initial).any())

    def on_train_start(self):
        self._initial = self.head.weight.detach().clone()

    def configure_optimizers(self):
        opt = torch.optim.SGD([dict(params=self.body.parameters(), lr=self.lr),
                               dict(params=self.head.parameters(), lr=self.lr * 10)], momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[self.lr, self.lr * 10], total_steps=1000)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def blobs(n=1536, batch_size=128) -> Tensors:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    centres = torch.tensor([[0.0, 3.0], [2.6, -1.5], [-2.6, -1.5]])
    return Tensors(centres[y] + torch.randn(n, 2, generator=g), y, batch_size)


class Flat(L.LightningModule):
    """A loss that no rate can move: batch noise around ln 10."""

    def __init__(self, lr=1e-3):
        super().__init__()
        self.lr = lr
        self.w = nn.Parameter(torch.zeros(1))
        self.g = torch.Generator().manual_seed(1)

    def training_step(self, batch, batch_idx):
        return (self.w * 0).sum() + math.log(10) + 0.05 * torch.randn((), generator=self.g)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer_kwargs(tmp_path) -> dict:
    return dict(accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path))


def sweep(tmp_path, module=None, data=None, **kw) -> LRFind:
    L.seed_everything(0, verbose=False)
    return find_lr(module or Bowl(), data or bowl_data(), trainer_kwargs(tmp_path), **kw)


# ---------------------------------------------------------------------------------------------
# The curve


def test_smoothed_loss_is_a_debiased_average_whose_first_point_is_the_first_raw_loss():
    assert smooth([2.3] * 5, 0.98) == pytest.approx([2.3] * 5)  # Lightning's first point: 0.505 * 2.3
    raw = [2.3, 2.1, 2.4, 1.9, 1.7]
    for k, s in enumerate(smooth(raw, 0.9)):
        w = [0.9 ** (k - j) for j in range(k + 1)]
        assert s == pytest.approx(sum(wj * r for wj, r in zip(w, raw)) / sum(w))


def test_suggestion_is_before_the_minimum_even_when_a_plateau_after_divergence_dips():
    # the seed's sweep: flat, a real descent, divergence to a plateau near 4.7 with a small dip in it
    lr = list(np.geomspace(1e-5, 10, 200))
    raw = [2.3] * 60 + list(np.linspace(2.3, 1.5, 80)) + list(np.linspace(1.5, 4.8, 20)) \
        + [4.8 - 0.3 * math.sin(k / 3) for k in range(40)]
    raw = [r + 0.01 * math.sin(7 * k) for k, r in enumerate(raw)]
    s, reason, facts = suggest(lr, raw, 0.77)
    assert s < facts["min_loss_lr"] and facts["suggestion_loss"] < raw[0]
    assert lr[60] <= s < lr[140] and "steepest descent" in reason


# ---------------------------------------------------------------------------------------------
# Sweeps


@pytest.mark.slow  # the sweep runs a Lightning fit
@pytest.mark.parametrize("min_lr,num_training", [(1e-4, 100), (1e-3, 20)])
def test_suggestion_on_a_quadratic_bowl_is_within_3x_of_its_best_rate(tmp_path, min_lr, num_training):
    r = sweep(tmp_path, min_lr=min_lr, max_lr=10.0, num_training=num_training)
    best = 1 / CURVATURE
    assert best / 3 <= r.suggestion <= best * 3, r.curve
    c = r.curve
    assert c["smooth_loss"][0] == c["raw_loss"][0]


@pytest.mark.slow  # the sweep runs a Lightning fit
def test_diverging_sweep_stops_early_records_the_rate_and_suggests_before_the_minimum(tmp_path):
    r = sweep(tmp_path, min_lr=1e-4, max_lr=100.0, num_training=100)
    c = r.curve
    assert c["diverged_at"] is not None and len(c["lr"]) < 100  # 2 / CURVATURE is ~0.5
    assert c["diverged_at"] == c["lr"][-1] < 100.0
    last, best, start = c["smooth_loss"][-1], min(c["smooth_loss"]), c["smooth_loss"][0]
    assert not math.isfinite(last) or last > min(DIVERGE_OVER_BEST * best, DIVERGE_OVER_START * start)
    assert r.suggestion < c["min_loss_lr"]
    k = c["lr"].index(r.suggestion)
    assert c["smooth_loss"][k] < start and c["suggestion_loss"] == c["smooth_loss"][k]
    assert f"{c['diverged_at']:.3g}" in r.summary()


@pytest.mark.slow  # the sweep runs a Lightning fit
def test_sweep_restores_weights_buffers_keeps_the_groups_ratio_and_the_built_momentum(tmp_path):
    module = Classifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    r = sweep(tmp_path, module, blobs(), min_lr=1e-4, max_lr=10.0, num_training=60)
    assert module.moved  # the sweep did train the net ...
    for k, v in module.state_dict().items():  # ... and put every weight and BN statistic back
        assert torch.equal(v, before[k]), k
    rates = np.array(module.rates[:len(r.curve["lr"])])
    np.testing.assert_allclose(rates[:, 0], r.curve["lr"], rtol=1e-12)  # not OneCycle's rates
    np.testing.assert_allclose(rates[:, 1], 10 * rates[:, 0], rtol=1e-12)
    assert np.all(np.array(module.momenta) == 0.9)  # the optimizer's, not OneCycle's 0.95 -> 0.85
    assert math.isfinite(r.suggestion) and 1e-4 <= r.suggestion < r.curve["min_loss_lr"]


def test_short_sweep_is_refused_in_one_line_before_training(tmp_path):
    module = Bowl()
    with pytest.raises(CifarkitError) as e:
        sweep(tmp_path, module, num_training=5)
    msg = str(e.value)
    assert "\n" not in msg and "5-step" in msg and "--lr" in msg
    assert module._trainer is None  # refused before any trainer touched it


@pytest.mark.slow  # the sweep runs a Lightning fit
def test_flat_noisy_sweep_is_refused_in_one_line(tmp_path):
    with pytest.raises(LRFindRefused, match="too short or too noisy") as e:
        sweep(tmp_path, Flat(), min_lr=1e-4, max_lr=10.0, num_training=100)
    assert "\n" not in str(e.value) and "--lr" in str(e.value) and isinstance(e.value, CifarkitError)
    assert len(e.value.curve["raw_loss"]) == 100 and "suggestion" not in e.value.curve  # to draw, not to use
    assert "no suggestion" in plot_lr_find(e.value.curve).axes[0].get_title()


@pytest.mark.slow  # the sweep runs a Lightning fit
def test_sweep_starting_past_divergence_is_refused(tmp_path):
    with pytest.raises(CifarkitError, match="did not fall before it rose"):
        sweep(tmp_path, min_lr=3.0, max_lr=100.0, num_training=40)


def test_muon_is_refused_with_the_shared_message(tmp_path):
    check_sweepable(0.0)
    check_settings(1e-5, 10.0, 200, muon_lr=0.0)
    for refuse in (lambda: check_sweepable(0.08), lambda: check_settings(muon_lr=0.08)):
        with pytest.raises(CifarkitError) as e:
            refuse()
        assert str(e.value) == MUON_REFUSAL
    module = Bowl()
    module.save_hyperparameters({"muon_lr": 0.08})
    with pytest.raises(CifarkitError) as e:
        sweep(tmp_path, module)
    assert str(e.value) == MUON_REFUSAL


# ---------------------------------------------------------------------------------------------
# Records and figures


def lines(fig: Figure) -> list:
    ax = fig.axes[0]
    return [(ln.get_label(), np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
            for ln in ax.get_lines()] + [ax.get_title()]


def assert_same_figure(a: Figure, b: Figure) -> None:
    la, lb = lines(a), lines(b)
    assert la[-1] == lb[-1] and len(la) == len(lb)
    for (na, xa, ya), (nb, xb, yb) in zip(la[:-1], lb[:-1]):
        assert na == nb
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)  # NaN equals NaN here


@pytest.mark.slow  # the sweep runs a Lightning fit
def test_saved_json_round_trips_into_the_same_figure(tmp_path):
    r = sweep(tmp_path, min_lr=1e-4, max_lr=100.0, num_training=100)
    save_lr_find(tmp_path, r)
    saved = json.loads((tmp_path / "lr_find.json").read_text())  # strict JSON: no NaN/Infinity
    assert {"lr", "raw_loss", "smooth_loss", "suggestion", "reason", "diverged_at", "beta"} <= set(saved)
    assert (tmp_path / "lr_find.png").stat().st_size > 1000
    loaded = load_lr_find(tmp_path / "lr_find.json")
    assert loaded["suggestion"] == r.suggestion and loaded["reason"] == r.reason
    fig = plot_lr_find(r.curve)
    assert_same_figure(fig, plot_lr_find(loaded))
    labels = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert labels[0] == "loss per step" and any(x.startswith("suggestion") for x in labels)
    assert any(x.startswith("minimum") for x in labels) and fig.axes[0].get_xscale() == "log"


def test_non_finite_losses_round_trip(tmp_path):
    curve = dict(lr=[1e-3, 1e-2, 1e-1, 1.0], raw_loss=[2.3, 2.0, 1.5, math.inf],
                 smooth_loss=[2.3, 2.1, 1.8, math.nan], suggestion=1e-2, reason="r", diverged_at=1.0, beta=0.5)
    save_lr_find(tmp_path, curve)
    assert "Infinity" not in (tmp_path / "lr_find.json").read_text()
    assert_same_figure(plot_lr_find(curve), plot_lr_find(load_lr_find(tmp_path / "lr_find.json")))


def test_an_older_record_still_reads_and_draws(tmp_path):
    old = tmp_path / "lr_find.json"  # what cifarkit wrote before: Lightning's smoothed loss only
    old.write_text(json.dumps({"lr": [1e-3, 1e-2, 1e-1], "loss": [1.2, 1.9, 1.4], "suggestion": 0.0123}))
    d = load_lr_find(old)
    assert d["suggestion"] == 0.0123 and d["raw_loss"] == [] and d["smooth_loss"] == [1.2, 1.9, 1.4]
    assert [ln.get_label() for ln in plot_lr_find(d).axes[0].get_lines()][0].startswith("smoothed")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CifarkitError, match="not an LR range test record"):
        load_lr_find(tmp_path / "bad.json")


def test_reading_and_drawing_a_record_touch_neither_pyplot_nor_lightning(tmp_path):
    (tmp_path / "lr_find.json").write_text(json.dumps(dict(lr=[1e-3, 1e-2, 1e-1], raw_loss=[2.3, 2.1, 2.4],
                                                           smooth_loss=[2.3, 2.2, 2.3], suggestion=1e-2)))
    record, png = str(tmp_path / "lr_find.json"), str(tmp_path / "x.png")
    code = ("import sys; from cifarkit.train.lr_finder import load_lr_find, plot_lr_find; "
            f"plot_lr_find(load_lr_find({record!r})).savefig({png!r}); "
            "print(sorted(m for m in ('lightning', 'matplotlib.pyplot') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
