import pytest
import torch
from torch import nn

from cifarkit.models import build_model
from cifarkit.train.module import LitClassifier
from cifarkit.train.optim import MuonSGD, orthogonalize
from cifarkit.presets import TrainConfig


@pytest.mark.parametrize("shape", [(64, 576), (576, 64), (256, 2304)])
def test_orthogonalize_brings_every_singular_value_near_one(shape):
    torch.manual_seed(0)
    r = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r))
    g = u @ torch.diag(torch.logspace(-1, 0, r)) @ v.T             # singular values over a decade
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o.float())
    assert o.shape == g.shape and o.dtype == g.dtype
    assert s.min() > 0.5 and s.max() < 1.5          # three iterations: near one, not exactly one


def _pair(weight):
    a, b = nn.Parameter(weight.clone()), nn.Parameter(weight.clone())
    return a, b


def test_sgd_groups_step_exactly_like_torch_sgd():
    torch.manual_seed(0)
    a, b = _pair(torch.randn(10, 5))
    ours = MuonSGD([dict(params=[a])], lr=0.1, momentum=0.85, nesterov=True, weight_decay=5e-3)
    ref = torch.optim.SGD([b], lr=0.1, momentum=0.85, nesterov=True, weight_decay=5e-3)
    for _ in range(4):
        g = torch.randn(10, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_a_muon_step_keeps_the_filter_norm_and_moves_every_direction_alike():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(32, 16, 3, 3) * 5)
    opt = MuonSGD([dict(params=[w], muon=True)], lr=0.1, momentum=0.0)
    before = w.detach().clone()
    w.grad = torch.randn(32, 16, 3, 3) * torch.logspace(-1, 0, 32)[:, None, None, None]
    opt.step()
    normalized = before * (32 ** 0.5 / before.norm())            # the bank is held at norm sqrt(out)
    step = (normalized - w.detach()).reshape(32, -1) / 0.1
    s = torch.linalg.svdvals(step)
    assert s.min() > 0.5 and s.max() < 1.5                        # orthogonalized, not the raw gradient
    w.grad = torch.zeros_like(w)
    opt.step()                                                    # momentum 0, zero gradient: only renormalize
    assert w.detach().norm() == pytest.approx(32 ** 0.5, rel=1e-4)


def test_muon_takes_the_conv_filters_and_sgd_the_rest():
    net = build_model("fast", 10, widths=(8, 16, 16))
    module = LitClassifier(net, 10, TrainConfig(lr=0.5, bias_lr_scale=4.0, muon_lr=0.05))
    groups = module._param_groups()
    muon = [g for g in groups if g.get("muon")]
    assert len(muon) == 1 and muon[0]["lr"] == 0.05
    assert {id(p) for p in muon[0]["params"]} == {id(p) for p in net.parameters()
                                                  if p.ndim == 4 and p.requires_grad}
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in net.parameters() if p.requires_grad)  # each once
    plain = LitClassifier(net, 10, TrainConfig(lr=0.5, bias_lr_scale=4.0))._param_groups()
    assert not any(g.get("muon") for g in plain)


def test_muon_renormalizes_the_filter_bank_every_few_steps_when_asked():
    """renorm_every 3: the bank is brought to norm sqrt(out) before its 1st, 4th, 7th... step only
    (momentum 0 and a zero gradient: the steps themselves move nothing)."""
    w = nn.Parameter(torch.randn(32, 16, 3, 3) * 5)
    opt = MuonSGD([dict(params=[w], muon=True)], lr=0.1, momentum=0.0, renorm_every=3)
    norms = []
    for step in range(1, 8):
        w.grad = torch.zeros_like(w)
        opt.step()
        norms.append(round(w.detach().norm().item() / 32 ** 0.5, 3))
        with torch.no_grad():
            w.mul_(2.0)                                           # drift the norm between steps
    assert norms == [1.0, 2.0, 4.0, 1.0, 2.0, 4.0, 1.0]


def test_a_renormalization_interval_below_one_is_one_line(capsys):
    from cifarkit.cli import main
    assert main(["train", "--muon-renorm-every", "0", "--no-report"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cifarkit: error: --muon-renorm-every and --whiten-images must be >= 1, got 0 and 5000"]
