"""The seed preset versus the seed project's own pipeline, side by side: images/s, or accuracy per epoch.

Usage:
  python bench/seed_pipeline.py [--batch-size 128] [--steps 10] [--rounds 2]   # images/s (CPU set)
  python bench/seed_pipeline.py --epochs 30 [--workers 4]                       # accuracy (a GPU job)

Baseline (written here, as the seed project trained): the seed's Albumentations pipeline applied per
sample in a DataLoader (pad 4 with the mean colour, random crop, 1-2 cutout holes of 8-16 px with
p 0.8, normalize, to tensor), fp32, a plain LightningModule (cross-entropy, accuracy logged per
step) around ResNet-18-GN, SGD 0.9 / 5e-4 with OneCycle (cosine, pct_start 0.3).
Ours: `--preset seed` as `cifarkit train` runs it: the same net, schedule and augmentation
statistics (tests/test_augment.py checks them), batched on the device, bf16 autocast where the
hardware has it, channels_last, our LitClassifier.

Images/s: both train on the same real images (CIFAR-10 copy from $CIFARKIT_DATA); the first 2 steps
of each run are warm-up; rounds alternate the two so machine noise hits both; the best round counts.
Accuracy: `cifarkit train --preset seed --epochs E` first (its LR range test picks the peak rate),
then the baseline for the same epochs, split, peak rate and test set; both print test accuracy and
seconds per epoch. Run alone on the machine.
"""
import argparse
import dataclasses
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from albumentations import Normalize
from albumentations.pytorch import ToTensorV2
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from _common import StepTimer
from cifarkit.data.augment import Augment
from cifarkit.models import build_model
from cifarkit.presets import preset_config
from cifarkit.train.fit import build_datamodule, build_module, fit, trainer_kwargs

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, default=None, help="128 for images/s, the preset's 512 for accuracy")
p.add_argument("--steps", type=int, default=10, help="images/s: timed steps per run, after 2 warm-up steps")
p.add_argument("--rounds", type=int, default=2)
p.add_argument("--epochs", type=int, default=None, help="train both this many epochs and compare accuracy")
p.add_argument("--subset", type=int, default=None, help="accuracy: train on this many images (a smoke run)")
p.add_argument("--workers", type=int, default=0, help="baseline DataLoader workers")
p.add_argument("--out", default="runs/bench")
args = p.parse_args()
WARMUP = 2
accuracy_mode = args.epochs is not None
batch = args.batch_size or (512 if accuracy_mode else 128)
subset = args.subset if accuracy_mode else batch * (args.steps + WARMUP)
cfg = preset_config("seed", batch_size=batch, subset=subset, epochs=args.epochs,
                    **({} if accuracy_mode else dict(val_size=0, lr=0.1)))
dm = build_datamodule(cfg)  # the same images and split for both sides


class SeedImages(Dataset):
    """uint8 HWC images through the seed's per-sample Albumentations transform (None: test-time)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, train: bool = True):
        aug = Augment(dm.mean, dm.std, pipeline="albumentations", **cfg.augment)
        self.pad_crop_cut = aug.per_sample() if train else None
        self.to_tensor = [Normalize(mean=dm.mean, std=dm.std), ToTensorV2()]  # [0, 1] units, max 255
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        img = self.x[i] if self.pad_crop_cut is None else self.pad_crop_cut(image=self.x[i])["image"]
        for t in self.to_tensor:
            img = t(image=img)["image"]
        return img, int(self.y[i])


class SeedModule(L.LightningModule):
    def __init__(self, lr: float):
        super().__init__()
        self.net = build_model("resnet18_gn", len(dm.classes))
        self.lr = lr
        self.acc, self.test_acc = (MulticlassAccuracy(len(dm.classes), average="micro") for _ in range(2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.acc)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self.net(x), y)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, pct_start=0.3,
                                                    total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(x, y, train: bool) -> DataLoader:
    return DataLoader(SeedImages(x, y, train), batch_size=batch, shuffle=train, num_workers=args.workers,
                      persistent_workers=args.workers > 0)


def trainer(**kw) -> L.Trainer:
    return L.Trainer(**{**dict(precision="32-true", logger=False, enable_checkpointing=False), **kw})


def images_per_second() -> None:
    def run(module, **fit_kwargs) -> float:
        timer = StepTimer(WARMUP)
        kw = trainer_kwargs(cfg) if "datamodule" in fit_kwargs else {}
        kw.update(max_steps=args.steps + WARMUP, max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, callbacks=[timer])
        trainer(**kw).fit(module, **fit_kwargs)
        return batch / timer.per_step

    a, rates = dm.arrays, {"baseline": [], "ours": []}
    for _ in range(args.rounds):
        rates["baseline"].append(run(SeedModule(0.1), train_dataloaders=loader(
            a.train_x[dm.train_idx], a.train_y[dm.train_idx], True)))
        rates["ours"].append(run(build_module(dataclasses.replace(cfg, lr=0.1), dm), datamodule=dm))
    b, o = max(rates["baseline"]), max(rates["ours"])
    print(f"images/s (best of {args.rounds}): seed pipeline {b:.1f}, --preset seed {o:.1f}; ratio {o / b:.2f}x "
          f"(batch {batch}, {trainer_kwargs(cfg)['precision']} vs 32-true, {torch.get_num_threads()} threads)")


def accuracy_per_epoch() -> None:
    L.seed_everything(cfg.seed, verbose=False)
    run = fit(preset_config("seed", epochs=args.epochs, batch_size=batch, data=cfg.data, subset=subset,
                            out=f"{args.out}/seed-preset-{args.epochs}ep"))
    ours = run.read_results().to_dict()
    a = dm.arrays
    t = time.perf_counter()
    module = SeedModule(ours["lr"])
    tr = trainer(max_epochs=args.epochs, enable_progress_bar=False)
    tr.fit(module, train_dataloaders=loader(a.train_x[dm.train_idx], a.train_y[dm.train_idx], True))
    seconds = time.perf_counter() - t
    base = tr.test(module, dataloaders=loader(a.test_x, a.test_y, False), verbose=False)[0]
    print(f"{args.epochs} epochs, peak lr {ours['lr']:.4g}: seed pipeline {base['test_acc']:.4f} test accuracy, "
          f"{seconds / args.epochs:.1f} s/epoch; --preset seed {ours['test_acc']:.4f}, "
          f"{ours['seconds'] / args.epochs:.1f} s/epoch (incl. its LR range test and validation)")


accuracy_per_epoch() if accuracy_mode else images_per_second()
