"""Final weights as safetensors with the metadata needed to use them: model, classes, mean/std, size.

Reading never unpickles; everything downstream of training (test, predict, report, app, export)
starts from `load(path)` on a run directory or a .safetensors file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import CifarkitError
from .models import MODELS, build_model

WEIGHTS_NAME = "model.safetensors"
MAX_PIXELS = 40_000_000  # larger uploads are refused rather than decoded (40 MP, e.g. 8000x5000)
Image.MAX_IMAGE_PIXELS = 2 * MAX_PIXELS  # Pillow's own bomb guard stays above ours


@dataclass
class Loaded:
    net: nn.Module
    classes: list[str]
    mean: list[float]
    std: list[float]
    meta: dict

    def normalize(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 32, 32, 3) -> normalized float (B, 3, 32, 32), as in training."""
        from .augment import Augment
        return Augment(self.mean, self.std).normalize(torch.as_tensor(x))

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images of any size/mode -> normalized (B, 3, 32, 32) float batch."""
        return self.normalize(np.stack([np.asarray(to_rgb32(im), dtype=np.uint8) for im in images]))

    @torch.no_grad()
    def probabilities(self, images: list[Image.Image]) -> torch.Tensor:
        self.net.eval()
        return torch.softmax(self.net(self.preprocess(images)).float(), dim=1)  # (B, K)


def to_rgb32(img: Image.Image, size: int = 32) -> Image.Image:
    """Any PIL image (grayscale, RGBA, palette, 16-bit) as 32x32 RGB; alpha composited on white."""
    if img.width * img.height > MAX_PIXELS:
        raise CifarkitError(f"image is {img.width}x{img.height}: over the {MAX_PIXELS:,}-pixel limit")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        span = max(a.max() - a.min(), 1e-9)
        img = Image.fromarray(((a - a.min()) / span * 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    img = img.convert("RGB")
    if img.size != (size, size):
        img.draft("RGB", (size * 4, size * 4))  # JPEG: decode at a reduced scale first
        img = img.resize((size, size), Image.BICUBIC)
    return img


def open_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, or raise a one-line CifarkitError.

    The size is checked from the header, before decoding, so a huge image costs nothing."""
    try:
        img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise CifarkitError(f"image {Path(path).name} is {img.width}x{img.height}: over the "
                                f"{MAX_PIXELS:,}-pixel limit; downscale it first")
        img.load()
        return img
    except FileNotFoundError:
        raise CifarkitError(f"no such image: {path}") from None
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as exc:
        raise CifarkitError(f"cannot read image {Path(path).name}: {str(exc).splitlines()[0]}") from None


def save_weights(net: nn.Module, path: Path, model: str, classes: list[str], mean, std,
                 model_kwargs: dict | None = None, extra: dict | None = None) -> None:
    meta = {"model": model, "classes": json.dumps(list(classes)), "mean": json.dumps(list(mean)),
            "std": json.dumps(list(std)), "input_size": "32", "model_kwargs": json.dumps(model_kwargs or {}),
            "cifarkit_version": __version__}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    tmp = Path(path).with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def weights_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise CifarkitError(f"no weights at {p}: give a finished run directory or a .safetensors file")
    return p


def identify(tensors: dict[str, torch.Tensor]) -> tuple[str, int] | None:
    """(model, class count) of the registered architecture whose state_dict these tensors fill."""
    for name in MODELS:
        ref = build_model(name, 1).state_dict()
        if ref.keys() != tensors.keys():
            continue
        head = [k for k in ref if ref[k].shape != tensors[k].shape]  # only the classifier's shapes differ
        if all(ref[k].shape[1:] == tensors[k].shape[1:] for k in head):
            return name, (tensors[head[0]].shape[0] if head else 1)
    return None


def _describe(found: tuple[str, int] | None) -> str:
    return f"'{found[0]}' with {found[1]} classes" if found else "a model cifarkit does not know"


def load(path: str | Path, expect: tuple[str, int] | None = None) -> Loaded:
    """A ready model (eval mode, CPU) with its classes and normalization, from a run dir or file.

    `expect` = (model, class count) the caller needs; other weights are a one-line error naming both.
    """
    p = weights_path(path)
    try:
        from safetensors import safe_open
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, Exception) as exc:
        raise CifarkitError(f"cannot read weights {p}: {str(exc).splitlines()[0]}") from None
    if "model" not in meta or "classes" not in meta:
        raise CifarkitError(f"{p} has no cifarkit metadata (model name and classes)")
    classes = json.loads(meta["classes"])
    said = (meta["model"], len(classes))
    if expect is not None and tuple(expect) != said:
        raise CifarkitError(f"weights {p} are for {_describe(said)}, not {_describe(tuple(expect))}; "
                            "give the weights of a run of that model")
    net = build_model(meta["model"], len(classes), **json.loads(meta.get("model_kwargs", "{}")))
    try:
        net.load_state_dict(tensors)
    except RuntimeError:
        raise CifarkitError(f"weights {p} hold {_describe(identify(tensors))}, but their metadata says "
                            f"{_describe(said)}; the file was altered: use the run's own weights") from None
    return Loaded(net.eval(), classes, json.loads(meta["mean"]), json.loads(meta["std"]), meta)
