"""Pure PyTorch architectures (no Lightning here) and the registry that names them.

Every model takes a normalized (B, 3, 32, 32) float batch and returns (B, num_classes) logits, and
lists in `cam_layers` the attribute names of the layers Grad-CAM should offer. Its forward is
`head(features(x))`: `features` gives the penultimate layer (B, D) that out-of-distribution scores
read, `head` the logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CifarkitError
from .presets import FAST


# ----------------------------------------------------------------------------------------------
# resnet18_gn: the seed README's ResNet-18 with GroupNorm(1, C), strides 1, 1, 2, 2


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(1, channels)  # one group: LayerNorm over (C, H, W), 2C parameters


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _gn(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _gn(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _gn(c_out))

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18GN(nn.Module):
    cam_layers = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), _gn(64), nn.ReLU(inplace=True))
        widths, strides, c_in = (64, 128, 256, 512), (1, 1, 2, 2), 64
        for i, (w, s) in enumerate(zip(widths, strides), start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(c_in, w, s), BasicBlock(w, w, 1)))
            c_in = w
        self.pool = nn.AdaptiveAvgPool2d(1)  # (B, 512, 8, 8) -> (B, 512, 1, 1); any input size
        self.fc = nn.Linear(512, num_classes)

    def features(self, x):  # (B, 3, 32, 32) -> (B, 512)
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, 8, 8)
        return torch.flatten(self.pool(x), 1)

    def head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------
# custom_resnet: David Page's ResNet-9, as the seed's Lightning code trained it


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x):
        return x + self.body(x)


class CustomResNet(nn.Module):
    cam_layers = ("layer1", "layer2", "layer3")

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.prep = _conv_bn(3, 64)                                              # (B, 64, 32, 32)
        self.layer1 = nn.Sequential(_conv_bn(64, 128, pool=True), Residual(128))   # (B, 128, 16, 16)
        self.layer2 = _conv_bn(128, 256, pool=True)                              # (B, 256, 8, 8)
        self.layer3 = nn.Sequential(_conv_bn(256, 512, pool=True), Residual(512))  # (B, 512, 4, 4)
        self.pool = nn.AdaptiveMaxPool2d(1)  # (B, 512, 4, 4) -> (B, 512, 1, 1); any input size
        self.fc = nn.Linear(512, num_classes)

    def features(self, x):  # (B, 3, 32, 32) -> (B, 512)
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return torch.flatten(self.pool(x), 1)

    def head(self, f):
        return self.fc(f)

    def forward(self, x):
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------
# fast: an airbench-class net. A frozen 2x2 patch-whitening stem, three conv groups without
# residuals, BatchNorm with frozen scale, a scaled linear head. About 2M parameters.


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm that learns only its bias. momentum in PyTorch's convention:
    running = (1 - momentum) * running + momentum * batch."""

    def __init__(self, channels: int, momentum: float, eps: float):
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class DiracConv(nn.Conv2d):
    """3x3 'same' conv whose first c_in filters start as the identity: a deep net that starts shallow."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(c_in, c_out, 3, padding=1, bias=False)
        nn.init.dirac_(self.weight.data[:c_in])


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class ConvGroup(nn.Module):
    def __init__(self, c_in: int, c_out: int, bn_momentum: float, bn_eps: float, act: str):
        super().__init__()
        self.conv1 = DiracConv(c_in, c_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(c_out, bn_momentum, bn_eps)
        self.conv2 = DiracConv(c_out, c_out)
        self.norm2 = FrozenScaleBatchNorm(c_out, bn_momentum, bn_eps)
        self.act = ACTIVATIONS[act]()

    def forward(self, x):
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


FAST_NET = FAST["model_kwargs"]  # the fast recipe states the net's settings, with their units


class FastNet(nn.Module):
    """Its settings default to the fast recipe's (presets.FAST): a run of another recipe with
    --model fast, or weights saved without them, build the recipe's net."""
    cam_layers = ("block1", "block2", "block3")

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = FAST_NET["widths"],
                 bn_momentum: float = FAST_NET["bn_momentum"], head_scale: float = FAST_NET["head_scale"],
                 whiten_eps: float = FAST_NET["whiten_eps"], act: str = FAST_NET["act"],
                 bn_eps: float = FAST_NET["bn_eps"]):
        super().__init__()
        if act not in ACTIVATIONS:
            raise CifarkitError(f"unknown activation '{act}'; choose one of: {', '.join(ACTIVATIONS)}")
        self.whiten_eps = whiten_eps
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)  # 2x2 patches: 12 eigen-directions, +/- each
        self.whiten.weight.requires_grad_(False)
        self.act = ACTIVATIONS[act]()
        w1, w2, w3 = widths
        self.block1 = ConvGroup(24, w1, bn_momentum, bn_eps, act)  # (B, w1, 15, 15)
        self.block2 = ConvGroup(w1, w2, bn_momentum, bn_eps, act)  # (B, w2, 7, 7)
        self.block3 = ConvGroup(w2, w3, bn_momentum, bn_eps, act)  # (B, w3, 3, 3)
        self.pool = nn.AdaptiveMaxPool2d(1)  # (B, w3, 3, 3) -> (B, w3, 1, 1); any input size (low-res epochs)
        self.fc = nn.Linear(w3, num_classes, bias=False)
        self.head_scale = head_scale
        self.stem_bias_trains = True  # the training module turns it off after its epochs

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the stem to whiten 2x2 patches of `images` (N, 3, H, W), normalized like training."""
        patches = images.float().unfold(2, 2, 1).unfold(3, 2, 1)         # (N, 3, H-1, W-1, 2, 2)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)      # (P, 12)
        cov = patches.T @ patches / len(patches)                         # (12, 12)
        eigval, eigvec = torch.linalg.eigh(cov)                          # ascending
        filters = (eigvec.T / torch.sqrt(eigval + self.whiten_eps)[:, None]).reshape(12, 3, 2, 2)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).flip(0))
        self.whiten.bias.zero_()

    def features(self, x):  # (B, 3, 32, 32) -> (B, w3)
        # a frozen stem bias is detached: backward then stops at block1 and skips its input gradient
        bias = self.whiten.bias if self.stem_bias_trains else self.whiten.bias.detach()
        x = self.act(F.conv2d(x, self.whiten.weight, bias))             # (B, 24, 31, 31)
        x = self.block3(self.block2(self.block1(x)))
        return torch.flatten(self.pool(x), 1)

    def head(self, f):
        return self.fc(f) * self.head_scale

    def forward(self, x):
        return self.head(self.features(x))


# ----------------------------------------------------------------------------------------------

MODELS: dict[str, type[nn.Module]] = {
    "resnet18_gn": ResNet18GN,
    "custom_resnet": CustomResNet,
    "fast": FastNet,
}


def list_models() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise CifarkitError(f"unknown model '{name}'; choose one of: {', '.join(list_models())}")
    return MODELS[name](num_classes=num_classes, **kwargs)
