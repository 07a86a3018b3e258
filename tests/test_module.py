import lightning as L
import pytest
import torch
from torch import nn

from cifarkit.data.datamodule import CIFARDataModule
from cifarkit.models import build_model
from cifarkit.train.module import LitClassifier, tta_logits
from cifarkit.presets import TrainConfig


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.fc = nn.Linear(3 * 32 * 32, 4)

    def forward(self, x):
        self.calls += 1
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("level, passes", [(0, 1), (1, 2), (2, 6)])
def test_tta_makes_the_stated_number_of_views(level, passes):
    net = Counting()  # level 2: plain + mirror, and each of two 1-px shifts with its mirror
    out = tta_logits(net, torch.randn(5, 3, 32, 32), level)
    assert out.shape == (5, 4) and net.calls == passes


class Seen(nn.Module):
    """Logits from the image's mean (confident for bright images); records each batch size."""
    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(len(x))
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([10 * m, -10 * m, x[:, 0, 0, 0], x[:, 1, 0, -1]], dim=1)


def test_tta_threshold_gives_extra_views_only_to_unsure_images():
    x = torch.rand(6, 3, 32, 32) * 0.2
    x[:2] += 2.0                                       # two images the net is sure about
    net = Seen()
    full = tta_logits(net, x, 2)
    net.sizes.clear()
    gated = tta_logits(net, x, 2, threshold=0.9)
    assert net.sizes == [6, 4, 4, 4, 4, 4]              # the plain pass, then 5 views of the 4 unsure
    assert torch.equal(gated[:2], net(x)[:2])           # the sure ones keep their plain logits
    assert torch.allclose(gated[2:], full[2:], atol=1e-6)
    assert torch.equal(tta_logits(net, x, 2, threshold=1.0), full)


def test_tta_of_a_mirror_invariant_net_equals_the_plain_prediction():
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(tta_logits(net, x, 1), net(x), atol=1e-6)


def test_lookahead_update_rule():
    net = nn.Linear(3, 2)
    module = LitClassifier(net, 2, TrainConfig(lookahead=True))
    module._ema = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    w0 = net.weight.detach().clone()
    module._lookahead(0.75)                           # ema = 0.75 * 0 + 0.25 * w; w <- ema
    assert torch.allclose(module._ema["weight"], 0.25 * w0)
    assert torch.allclose(net.weight, 0.25 * w0)
    module._lookahead(1.0)                            # decay 1: the net takes the average as is
    assert torch.allclose(net.weight, 0.25 * w0)


def test_an_ema_keeps_the_average_apart_until_the_last_step():
    """weight_average 'ema': the same average as the lookahead's, but the weights go on alone until
    the last step (decay 1), when the net becomes the average."""
    net = nn.Linear(3, 2)
    module = LitClassifier(net, 2, TrainConfig(lookahead=True, weight_average="ema"))
    module._ema = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    w0 = net.weight.detach().clone()
    module._lookahead(0.75)                           # ema = 0.25 w; the weights stay as they are
    assert torch.allclose(module._ema["weight"], 0.25 * w0) and torch.equal(net.weight, w0)
    module._lookahead(1.0)                            # the last step: the net takes the average
    assert torch.allclose(net.weight, 0.25 * w0)


def test_the_whitening_stem_is_fitted_on_the_configured_number_of_images(image_folder, monkeypatch):
    from cifarkit.models import FastNet
    from cifarkit.presets import preset_config
    from cifarkit.train.fit import build_datamodule, build_module
    seen = []
    monkeypatch.setattr(FastNet, "init_from_data", lambda self, images: seen.append(tuple(images.shape)))
    cfg = preset_config("fast", data=str(image_folder), val_size=8, whiten_images=17)
    build_module(cfg, build_datamodule(cfg))
    assert seen == [(17, 3, 32, 32)]


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def _fit(folder, tmp_path, epochs=2, callbacks=(), batch_size=8, **kw):
    L.seed_everything(0)
    dm = CIFARDataModule(str(folder), batch_size=batch_size, val_size=8, augment={"flip": "random"}).prepare()
    net = build_model("fast", len(dm.classes), widths=(8, 16, 16))
    net.init_from_data(dm.sample_images(32))
    proxy = build_model("fast", len(dm.classes), widths=kw["proxy_widths"]) if kw.get("proxy_keep") else None
    module = LitClassifier(net, len(dm.classes), TrainConfig(lr=0.2, **kw), proxy)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path,
                        callbacks=list(callbacks))
    trainer.fit(module, datamodule=dm)
    return trainer, module


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_one_cycle_ends_exactly_on_the_trainers_last_step(image_folder, tmp_path, schedule):
    rec = RecordLR()
    trainer, module = _fit(image_folder, tmp_path, callbacks=[rec], schedule=schedule, div_factor=10,
                           final_div_factor=100)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert trainer.global_step == trainer.estimated_stepping_batches == 10   # 40 images / 8 x 2 epochs
    assert sched.total_steps == trainer.estimated_stepping_batches
    assert sched.last_epoch == trainer.global_step
    assert len(rec.lrs) == 10
    assert rec.lrs[0] == pytest.approx(0.2 / 10)                    # starts at peak / div_factor
    assert max(rec.lrs) <= 0.2 + 1e-9
    assert rec.lrs[-1] == pytest.approx(0.2 / 10 / 100, rel=1e-6)   # the last step uses the final lr


class RecordBias(L.Callback):
    def __init__(self):
        self.biases = []

    def on_train_epoch_end(self, trainer, module):
        self.biases.append(module.net.whiten.bias.detach().clone())


@pytest.mark.slow
def test_whitening_bias_trains_only_for_its_epochs(image_folder, tmp_path):
    rec = RecordBias()
    _, module = _fit(image_folder, tmp_path, epochs=3, callbacks=[rec], whiten_bias_epochs=1)
    assert not torch.equal(rec.biases[0], torch.zeros_like(rec.biases[0]))  # trained in epoch 0
    assert torch.equal(rec.biases[0], rec.biases[1]) and torch.equal(rec.biases[1], rec.biases[2])
    assert module.net.whiten.bias.requires_grad  # frozen by its gradient: DDP's parameter set is fixed
    assert module.net.stem_bias_trains is False   # on one device the stem is detached once frozen


def test_a_detached_stem_bias_gets_no_gradient_and_backward_stops_at_block1():
    net = build_model("fast", 10)
    x = torch.randn(4, 3, 32, 32)
    for trains in (True, False):
        net.zero_grad(set_to_none=True)
        net.stem_bias_trains = trains
        seen = []
        handle = net.block1.register_full_backward_hook(lambda m, gin, gout: seen.append(gin[0]))
        net(x).sum().backward()
        handle.remove()
        assert (net.whiten.bias.grad is not None) == trains
        assert (seen[0] is not None) == trains  # the gradient w.r.t. block1's input is computed only if needed
        assert net.block1.conv1.weight.grad is not None


@pytest.mark.slow
def test_lookahead_runs_and_the_last_step_makes_the_net_the_average(image_folder, tmp_path):
    trainer, module = _fit(image_folder, tmp_path, epochs=2, batch_size=6, whiten_bias_epochs=1, lookahead=True)
    assert trainer.global_step == 14 and 14 % module.cfg.lookahead_every  # the last step is no regular update
    assert module._ema is not None
    for k, v in module.net.state_dict().items():    # after the last step the net is the average
        if v.dtype.is_floating_point:
            assert torch.equal(v, module._ema[k])


def test_the_proxy_selection_keeps_labels_aligned_and_picks_the_highest_loss_share():
    from cifarkit.train.module import hardest
    x = torch.arange(8).float().view(8, 1, 1, 1).expand(8, 3, 2, 2)   # image i is filled with i
    y = torch.arange(8) * 10                                          # its label is 10 i
    losses = torch.tensor([0.1, 5.0, 0.3, 4.0, 0.2, 3.0, 0.0, 2.0])
    xs, ys = hardest(x, y, losses, 0.5)
    assert sorted(ys.tolist()) == [10, 30, 50, 70]                    # the four highest losses
    assert torch.equal(xs[:, 0, 0, 0] * 10, ys.float())               # each image with its own label
    assert len(hardest(x, y, losses, 0.25)[1]) == 2


@pytest.mark.slow
def test_with_a_proxy_the_net_learns_from_half_of_each_batch_and_the_proxy_from_all(image_folder, tmp_path):
    seen = []

    class Spy(L.Callback):
        def on_train_start(self, trainer, module):
            module.net.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))

    trainer, module = _fit(image_folder, tmp_path, epochs=1, callbacks=[Spy()], proxy_keep=0.5,
                           proxy_widths=[8, 8, 8])
    assert module.proxy is not None and seen[:5] == [4] * 5  # 40 images in batches of 8: the net trains on 4 of each
    ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert all(id(p) in ids for p in module.proxy.parameters() if p.requires_grad)  # the proxy trains too
