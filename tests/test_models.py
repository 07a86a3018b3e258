import pytest
import torch

from cifarkit import CifarkitError
from cifarkit.models import build_model, list_models
from cifarkit.presets import FAST


@pytest.mark.parametrize("name,params", [("resnet18_gn", 11_173_962), ("custom_resnet", 6_573_130)])
def test_seed_models_have_the_seed_parameter_counts(name, params):
    assert sum(p.numel() for p in build_model(name).parameters()) == params


def test_fast_net_is_about_two_million_parameters_with_a_frozen_stem():
    net = build_model("fast")
    total = sum(p.numel() for p in net.parameters())
    assert 1.8e6 < total < 2.2e6
    assert not net.whiten.weight.requires_grad


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [10, 100])
def test_every_model_maps_a_batch_to_logits_and_names_its_cam_layers(name, num_classes):
    net = build_model(name, num_classes).eval()
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert net.cam_layers and all(isinstance(getattr(net, layer), torch.nn.Module) for layer in net.cam_layers)


def test_unknown_model_lists_the_choices():
    with pytest.raises(CifarkitError, match="resnet18_gn"):
        build_model("vgg")


def test_whitening_stem_decorrelates_patches():
    torch.manual_seed(0)
    mix = torch.randn(3, 3)
    images = torch.einsum("ij,njhw->nihw", mix, torch.randn(200, 3, 16, 16))  # correlated channels
    net = build_model("fast")
    net.init_from_data(images)
    out = net.whiten(images)[:, :12]                   # (N, 12, 15, 15): one sign of each direction
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12), atol=0.05)
    assert torch.equal(net.whiten.bias, torch.zeros(24))


@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_the_smaller_images_of_low_res_epochs(name):
    net = build_model(name).eval()
    with torch.no_grad():
        for size in (24, 32):
            assert net(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_the_fast_nets_settings_default_to_the_fast_recipes_and_reach_every_batchnorm():
    kw = FAST["model_kwargs"]
    net = build_model("fast", 10)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 6 and all(n.eps == kw["bn_eps"] == 1e-12 and n.momentum == kw["bn_momentum"] for n in norms)
    assert net.head_scale == kw["head_scale"] and net.whiten_eps == kw["whiten_eps"]
    assert all(n.eps == 1e-5 for n in build_model("fast", 10, bn_eps=1e-5).modules()
               if isinstance(n, torch.nn.BatchNorm2d))
