"""Batched augmentation on the training device, over uint8 batches (B, H, W, 3).

Pad-and-crop and flip are one gather: each output pixel reads a shifted (and possibly mirrored)
source pixel, with reflection or the mean colour where the shift leaves the image. Cutout then
paints holes in the mean colour. The seed's per-sample Albumentations pipeline is available behind
the same object (`pipeline="albumentations"`): it runs in the DataLoader, and only normalization
runs here.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..images import normalize
from ..presets import default

FLIPS = ("none", "random", "alternate")
PIPELINES = ("batched", "albumentations")
SETTINGS = default("augment")  # TrainConfig declares every augmentation setting and its default


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


def _flip_bits(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed pseudo-random bit per sample index (a multiplicative hash): same every epoch."""
    return (((idx.long() * 2654435761 + seed * 97) >> 13) & 1).bool()


class Augment:
    """The augmentation TrainConfig.augment names; a setting not named takes TrainConfig's default."""

    def __init__(self, mean, std, flip: str = SETTINGS["flip"], pad: int = SETTINGS["pad"],
                 pad_mode: str = SETTINGS["pad_mode"], cutout: tuple[int, int] | int = SETTINGS["cutout"],
                 cutout_holes: tuple[int, int] | int = SETTINGS["cutout_holes"],
                 cutout_p: float = SETTINGS["cutout_p"], pipeline: str = SETTINGS["pipeline"],
                 seed: int = default("seed"),
                 low_res: int = SETTINGS["low_res"], low_res_epochs: int = SETTINGS["low_res_epochs"]):
        from ..errors import CifarkitError
        if flip not in FLIPS:
            raise CifarkitError(f"unknown flip '{flip}'; choose one of: {', '.join(FLIPS)}")
        if pipeline not in PIPELINES:
            raise CifarkitError(f"unknown augmentation '{pipeline}'; choose one of: {', '.join(PIPELINES)}")
        if pad_mode not in ("reflect", "mean"):
            raise CifarkitError(f"unknown pad mode '{pad_mode}'; choose reflect or mean")
        if low_res and pipeline != "batched":
            raise CifarkitError("low_res training needs the batched augmentation (augment: pipeline: batched)")
        self.mean, self.std = torch.tensor(mean), torch.tensor(std)   # (3,), [0, 1] units
        self.flip, self.pad, self.pad_mode, self.pipeline, self.seed = flip, pad, pad_mode, pipeline, seed
        self.cutout = tuple(cutout) if isinstance(cutout, (list, tuple)) else (cutout, cutout)
        self.holes = tuple(cutout_holes) if isinstance(cutout_holes, (list, tuple)) else (cutout_holes,) * 2
        self.cutout_p = cutout_p
        # progressive resizing: the first low_res_epochs see the whole image downscaled to
        # low_res x low_res (fewer pixels, same content), then full size
        self.low_res, self.low_res_epochs = low_res, low_res_epochs
        self.schedule = None  # a run's Schedule, once attached: its low-res epochs replace the configured ones
        self.fill = (self.mean * 255).round().to(torch.uint8)          # (3,) mean colour

    @contextmanager
    def following(self, schedule):
        """Inside, the low-res epochs are `schedule`'s (anything with `at_low_res(epoch)` and `low_res`)."""
        before, self.schedule = self.schedule, schedule
        try:
            yield self
        finally:
            self.schedule = before

    def low_res_at(self, epoch: int) -> int:
        """px of this epoch's images when it trains at low res, else 0."""
        if self.schedule is not None:
            return self.schedule.low_res if self.schedule.at_low_res(epoch) else 0
        return self.low_res if self.low_res and epoch < self.low_res_epochs else 0

    # -- the parts -------------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H, W), channels_last in memory."""
        return normalize(x, self.mean, self.std)

    def crop_flip(self, x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Random translation by up to `pad` pixels, and mirror where flip (B,) is True."""
        b, h, w, _ = x.shape
        dev = x.device
        dy = torch.randint(-self.pad, self.pad + 1, (b, 1), device=dev)
        dx = torch.randint(-self.pad, self.pad + 1, (b, 1), device=dev)
        cols0 = torch.arange(w, device=dev).expand(b, w)
        cols0 = torch.where(flip[:, None], w - 1 - cols0, cols0)                # (B, W)
        rows, cols = torch.arange(h, device=dev) + dy, cols0 + dx               # (B, H), (B, W)
        if self.pad_mode == "reflect":
            rows, cols = _reflect(rows, h), _reflect(cols, w)
            inside = None
        else:
            inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
            rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        bi = torch.arange(b, device=dev)[:, None, None]
        out = x[bi, rows[:, :, None], cols[:, None, :]]                        # (B, H, W, 3)
        if inside is not None:
            out = torch.where(inside[..., None], out, self.fill.to(dev))
        return out

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """Up to holes[1] rectangles of side cutout[0]..cutout[1], filled with the mean colour."""
        b, h, w, _ = x.shape
        dev = x.device
        apply = torch.rand(b, device=dev) < self.cutout_p
        n_holes = torch.randint(self.holes[0], self.holes[1] + 1, (b,), device=dev)
        ys, xs = torch.arange(h, device=dev), torch.arange(w, device=dev)
        mask = torch.zeros(b, h, w, dtype=torch.bool, device=dev)
        for k in range(self.holes[1]):
            hh = torch.randint(self.cutout[0], self.cutout[1] + 1, (b, 1), device=dev)
            ww = torch.randint(self.cutout[0], self.cutout[1] + 1, (b, 1), device=dev)
            y0 = (torch.rand(b, 1, device=dev) * (h - hh + 1)).long()
            x0 = (torch.rand(b, 1, device=dev) * (w - ww + 1)).long()
            in_y = (ys >= y0) & (ys < y0 + hh)                                   # (B, H)
            in_x = (xs >= x0) & (xs < x0 + ww)                                   # (B, W)
            on = (apply & (k < n_holes))[:, None, None]
            mask |= on & in_y[:, :, None] & in_x[:, None, :]
        return torch.where(mask[..., None], self.fill.to(dev), x)

    def flips_for(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.flip == "random":
            return torch.rand(len(idx), device=idx.device) < 0.5
        if self.flip == "alternate":  # each image flips every other epoch: more variety than coin flips
            return _flip_bits(idx, self.seed) ^ bool(epoch % 2)
        return torch.zeros(len(idx), dtype=torch.bool, device=idx.device)

    # -- the whole pipeline ----------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, idx: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        """A training batch: uint8 (B, H, W, 3) + sample indices -> normalized float (B, 3, S, S)."""
        if self.pipeline == "batched":
            if self.pad or self.flip != "none":  # a setting, not the data: no step waits on the device
                x = self.crop_flip(x, self.flips_for(idx.to(x.device), epoch))
            if self.cutout[1] > 0 and self.cutout_p > 0:
                x = self.cut(x)
        x = self.normalize(x)
        if size := self.low_res_at(epoch):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
        return x

    def per_sample(self):
        """The seed's Albumentations pipeline (uint8 HWC in and out), or None for batched."""
        if self.pipeline != "albumentations":
            return None
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
        try:
            import albumentations as A
            import cv2
        except ImportError:
            from ..errors import CifarkitError
            raise CifarkitError("--augment albumentations needs the extra: "
                                "pip install 'cifarkit[albumentations]'") from None
        fill = tuple(int(v) for v in self.fill)
        size = 32 + 2 * self.pad
        steps = [A.PadIfNeeded(min_height=size, min_width=size, border_mode=cv2.BORDER_CONSTANT, fill=fill),
                 A.RandomCrop(height=32, width=32)]
        if self.flip != "none":
            steps.append(A.HorizontalFlip(p=0.5))
        if self.cutout[1] > 0:
            steps.append(A.CoarseDropout(num_holes_range=self.holes, hole_height_range=self.cutout,
                                         hole_width_range=self.cutout, fill=fill, p=self.cutout_p))
        return A.Compose(steps, strict=True)
