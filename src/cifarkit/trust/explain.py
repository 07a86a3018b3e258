"""Class-activation maps on pytorch-grad-cam: heatmaps (B, H, W) in [0, 1] and colour overlays.

The library's pitfalls, handled here: constructing a CAM puts the model in eval() (we restore the
mode), it wants one target per image, grad mode (not inference mode) and fp32 (we turn autocast
off), the uncompiled module (we unwrap `_orig_mod`), and its hooks must be removed (`with`).
"""
from __future__ import annotations

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn

from ..errors import CifarkitError

METHODS = ("gradcam", "gradcam++", "eigencam", "layercam", "scorecam")
DISPLAY_SIZE = 128  # 32x32 images are upscaled 4x (bicubic) so grids are legible


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM
    classes = dict(zip(METHODS, (GradCAM, GradCAMPlusPlus, EigenCAM, LayerCAM, ScoreCAM)))
    if method not in classes:
        raise CifarkitError(f"unknown CAM method '{method}'; choose one of: {', '.join(METHODS)}")
    return classes[method]


def cam_layers(net: nn.Module) -> list[str]:
    return list(getattr(net, "cam_layers", ()))


def resolve_layer(net: nn.Module, layer: str | None) -> str:
    """The named layer, or the model's deepest CAM layer when None."""
    names = cam_layers(net)
    if not names:
        raise CifarkitError(f"{type(net).__name__} names no Grad-CAM layers")
    if layer is None:
        return names[-1]
    if layer not in names:
        raise CifarkitError(f"unknown layer '{layer}'; this model offers: {', '.join(names)}")
    return layer


def heatmaps(net: nn.Module, x: torch.Tensor, targets: list[int] | torch.Tensor, layer: str | None = None,
             method: str = "gradcam") -> np.ndarray:
    """CAMs for a normalized batch x (B, 3, H, W), one target class per image -> (B, H, W) in [0, 1]."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    net = getattr(net, "_orig_mod", net)
    cam_cls = _cam_class(method)
    module = getattr(net, resolve_layer(net, layer))
    targets = [ClassifierOutputTarget(int(t)) for t in targets]
    if len(targets) != len(x):
        raise ValueError(f"{len(targets)} targets for {len(x)} images: give one target per image")
    was_training = net.training
    try:
        with torch.enable_grad(), torch.autocast("cpu", enabled=False), \
                cam_cls(model=net, target_layers=[module]) as cam:
            if method == "scorecam":
                cam.batch_size = 64
            maps = cam(input_tensor=x.float(), targets=targets)            # (B, H, W)
    finally:
        net.train(was_training)
    return np.clip(np.nan_to_num(maps.astype(np.float32)), 0.0, 1.0)


def explain_top_class(model, arr: np.ndarray, layer: str | None = None, method: str = "gradcam"):
    """For uint8 images (B, 32, 32, 3) and a loaded model: softmax probabilities (B, K) and the CAM
    of each image's top class (B, 32, 32)."""
    probs = model.probabilities(arr)
    return probs, heatmaps(model.net, model.normalize(arr), probs.argmax(1), layer, method)


def upscale(images: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """uint8 (B, h, w, 3) -> uint8 (B, size, size, 3), bicubic."""
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC)) for im in images])


def overlay(images: np.ndarray, maps: np.ndarray, alpha: float = 0.5, size: int = DISPLAY_SIZE) -> np.ndarray:
    """Blend jet-coloured maps (B, h, w) onto uint8 images (B, h, w, 3): alpha is the map's weight."""
    if not 0.0 <= alpha <= 1.0:
        raise CifarkitError(f"--alpha must be in [0, 1], got {alpha}")
    big = upscale(images, size).astype(np.float32) / 255                              # (B, S, S, 3)
    maps_big = np.stack([np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.BILINEAR))
                         for m in maps])                                                # (B, S, S)
    heat = colormaps["jet"](np.clip(maps_big, 0, 1))[..., :3]
    return (np.clip((1 - alpha) * big + alpha * heat, 0, 1) * 255).round().astype(np.uint8)
