"""The one way any image becomes what a model sees: 32x32 RGB uint8, then normalized floats.

The dataset decoder (data/sources.py), `predict`, `gradcam`, the app and `load().probabilities` all call
`rgb_array`, so a model is served the same conversion it was trained on:
- a file, bytes or an open PIL image; the size is checked from the header before decoding
  (`MAX_PIXELS`), and a truncated or unknown file is one line naming the file;
- EXIF orientation applied; the first frame of an animation;
- 16-bit and 32-bit grayscale scaled to 8 bits (65535 -> 255), floats in [0, 1] scaled by 255;
- alpha (RGBA, LA, PA, transparent palettes) composited on white; palette, grayscale, bilevel and
  CMYK converted to RGB;
- other sizes resized to 32x32 (bicubic, antialiased).
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import CifarkitError

SIZE = 32
MAX_PIXELS = 40_000_000  # larger images are refused rather than decoded (40 MP, e.g. 8000x5000)
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                  Image.DecompressionBombError)
# a folder part of a path ('/tmp/gradio/ab12/' or 'C:\\Users\\me\\'): error messages keep only the file's name
_FOLDERS = re.compile(r"(?:[A-Za-z]:)?[\\/](?:[^\\/\s'\"<>]+[\\/])+")


class UnreadableImage(CifarkitError):
    """An image that cannot be used; `reason` says why without naming the file (for skip lists)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def _name(source) -> str:
    """What an error message may call the image: its file name, never the folder it lies in."""
    return Path(source).name if isinstance(source, (str, Path)) else "image"


def _too_big(name: str, width: int, height: int) -> UnreadableImage:
    reason = f"{width}x{height}: over the {MAX_PIXELS:,}-pixel limit"
    return UnreadableImage(f"image {name} is {reason}; downscale it first", reason)


def _reason(exc: BaseException) -> str:
    """The first line of a decoder's complaint, with no folder of this machine in it (Pillow puts
    the full path of the file in some messages, e.g. 'cannot identify image file /tmp/...')."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a known image format"
    text = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
    return _FOLDERS.sub("", text)


def open_image(source, name: str | None = None) -> Image.Image:
    """A file path, bytes or file object -> a fully decoded PIL image, or a one-line CifarkitError.

    The pixel count is read from the header before anything is decoded, so a huge or hostile
    image costs nothing."""
    name = name or _name(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():  # Pillow's own bomb warning: the limit below is the one that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source)
        if img.width * img.height > MAX_PIXELS:
            raise _too_big(name, img.width, img.height)
        img.load()
        return img
    except FileNotFoundError:
        raise UnreadableImage(f"no such image: {name}", "no such file") from None
    except Image.DecompressionBombError:
        reason = f"over the {MAX_PIXELS:,}-pixel limit"
        raise UnreadableImage(f"image {name} is {reason}; downscale it first", reason) from None
    except _DECODE_ERRORS as exc:
        reason = _reason(exc)
        raise UnreadableImage(f"cannot read image {name}: {reason}", reason) from None


def _eight_bit(img: Image.Image) -> Image.Image:
    """High-bit-depth grayscale ('I;16*', 'I', 'F') -> 'L', scaled rather than clipped."""
    a = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.max(initial=0) > 255):
        a = a / 257                         # 0..65535 -> 0..255
    elif img.mode == "F" and a.max(initial=0) <= 1.0:
        a = a * 255                         # floats in [0, 1]
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image, name: str = "image", size: int = SIZE) -> Image.Image:
    """Any PIL image -> size x size RGB, by the rules in this module's docstring."""
    if img.width * img.height > MAX_PIXELS:
        raise _too_big(name, img.width, img.height)
    try:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            img = _eight_bit(img)
        if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB")
    except (ValueError, OSError) as exc:  # e.g. a colour mode Pillow cannot convert
        reason = _reason(exc)
        raise UnreadableImage(f"cannot read image {name}: {reason}", reason) from None
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img


def rgb_array(source, name: str | None = None, size: int = SIZE) -> np.ndarray:
    """THE conversion: a file path, bytes or PIL image -> uint8 (size, size, 3)."""
    name = name or _name(source)
    img = source if isinstance(source, Image.Image) else open_image(source, name)
    return np.asarray(to_rgb(img, name, size), dtype=np.uint8)


def rgb_batch(images, size: int = SIZE) -> np.ndarray:
    """A uint8 array (B, size, size, 3) as is, or a list of paths / bytes / PIL images converted."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise CifarkitError(f"expected uint8 images (B, {size}, {size}, 3), got {images.dtype} {images.shape}")
        return images
    return np.stack([rgb_array(im, size=size) for im in images])


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), channels_last in memory: ((x / 255) - mean) / std."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device)
    return ((x.float() / 255 - mean) / std).permute(0, 3, 1, 2)
