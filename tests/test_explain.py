import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarkit import CifarkitError
from cifarkit.trust.explain import METHODS, heatmaps, overlay
from cifarkit.models import build_model


class Tiny(nn.Module):
    cam_layers = ("conv1", "conv2")

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)   # (B, 16, 16, 16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        a = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(a.mean((2, 3)))


def direct_gradcam(net, x, targets):
    """ReLU of gradient-weighted activations of conv2, min-max scaled, upsampled bilinearly."""
    acts = {}
    h = net.conv2.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o))
    out = net(x)
    h.remove()
    a = acts["a"]
    grads = torch.autograd.grad(out[torch.arange(len(x)), targets].sum(), a)[0]
    cam = torch.relu((grads.mean((2, 3), keepdim=True) * a).sum(1))        # (B, 16, 16)
    cam = cam - cam.amin((1, 2), keepdim=True)
    cam = cam / (cam.amax((1, 2), keepdim=True) + 1e-7)
    up = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    up = up - up.amin((1, 2), keepdim=True)
    return (up / (up.amax((1, 2), keepdim=True) + 1e-7)).detach().numpy()


def test_gradcam_matches_a_direct_computation():
    torch.manual_seed(0)
    net = Tiny().eval()
    x = torch.randn(6, 3, 32, 32)
    targets = torch.tensor([0, 1, 2, 3, 0, 1])
    maps = heatmaps(net, x, targets, "conv2", "gradcam")
    assert maps.shape == (6, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert np.allclose(maps, direct_gradcam(net, x, targets), atol=0.02)


class Spot(nn.Module):
    """Class 0's logit is the mean of a feature that fires on red, class 1's on blue: a map for a
    class must light up where that class's colour is."""
    cam_layers = ("features",)

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1, bias=False)      # (B, 2, 32, 32): channel 0 red, 1 blue
        with torch.no_grad():
            self.features.weight.copy_(torch.tensor([[1.0, -1, -1], [-1, -1, 1]]).view(2, 3, 1, 1))

    def forward(self, x):
        return torch.relu(self.features(x)).mean((2, 3)) * 10  # (B, 2)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_lights_up_where_the_target_class_is(method):
    x = torch.zeros(2, 3, 32, 32)
    x[:, 0, 2:10, 2:10] = 1.0                             # a red square top-left
    x[:, 2, 22:30, 22:30] = 1.0                           # a blue square bottom-right
    maps = heatmaps(Spot().eval(), x, [0, 1], "features", method)  # image 0 asks red, image 1 blue
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    red, blue = (slice(2, 10), slice(2, 10)), (slice(22, 30), slice(22, 30))
    if method != "eigencam":                              # EigenCAM ignores the target class
        assert maps[0][red].mean() > 0.5 > maps[0][blue].mean()
        assert maps[1][blue].mean() > 0.5 > maps[1][red].mean()
    inside = np.zeros((32, 32), bool)
    inside[red] = inside[blue] = True
    assert maps[:, inside].mean() > 3 * maps[:, ~inside].mean()  # the squares, not the background


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", ["fast", "resnet18_gn"])
def test_every_method_runs_on_the_real_models_and_restores_them(method, model):
    """One image: a batch with a target per image is the test above's, for every method; Score-CAM's
    cost here is a forward pass per channel of the layer per image (512 for resnet18_gn)."""
    torch.manual_seed(0)
    net = build_model(model, 10).train()
    maps = heatmaps(net, torch.randn(1, 3, 32, 32), [3], net.cam_layers[-1], method)
    assert maps.shape == (1, 32, 32) and np.isfinite(maps).all()
    assert net.training                                   # mode restored
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())  # hooks removed


def test_eval_mode_is_kept_too():
    net = Tiny().eval()
    heatmaps(net, torch.randn(1, 3, 32, 32), [0], "conv1")
    assert not net.training


def test_unknown_layer_and_method_list_the_choices():
    net = Tiny()
    with pytest.raises(CifarkitError, match="conv1, conv2"):
        heatmaps(net, torch.randn(1, 3, 32, 32), [0], "fc")
    with pytest.raises(CifarkitError, match="layercam"):
        heatmaps(net, torch.randn(1, 3, 32, 32), [0], "conv1", "magic")


def test_overlay_upscales_and_blends():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    maps = np.ones((2, 32, 32), np.float32)
    out = overlay(images, maps, alpha=0.5, size=128)
    assert out.shape == (2, 128, 128, 3) and out.dtype == np.uint8
    assert np.array_equal(overlay(images, maps, alpha=0.0), np.zeros((2, 128, 128, 3), np.uint8))
    assert out.max() > 0
    with pytest.raises(CifarkitError):
        overlay(images, maps, alpha=1.5)
