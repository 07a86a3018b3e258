"""The held-out split, uint8 batches, the resumable epoch order and the Lightning DataModule.

Data flows one way: a source -> a cached uint8 array (`sources.py`) -> uint8 batches -> the training
device, where `augment.py` turns them into normalized float batches.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from .augment import Augment
from .errors import CifarkitError
from .sources import Arrays, load_arrays

RECORD_BATCHES = "CIFARKIT_RECORD_BATCHES"  # env: a folder to record each rank's training indices


# ---------------------------------------------------------------------------------------------
# Splits and the DataModule


def split_train_val(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val) of a seeded random held-out split of the training set."""
    if not 0 <= val_size < len(labels):
        raise CifarkitError(f"--val-size {val_size} must be in [0, {len(labels) - 1}]")
    perm = np.random.default_rng(seed).permutation(len(labels))
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def balanced_subset(indices: np.ndarray, labels: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """The first n // num_classes indices of each class (n rounded down to whole classes)."""
    per_class = n // num_classes
    picked = []
    for c in range(num_classes):
        of_c = indices[labels[indices] == c]
        if per_class > len(of_c) or per_class == 0:
            raise CifarkitError(f"--subset {n} asks {per_class} images of class {c}, but the "
                                f"training split has {len(of_c)}; use at most "
                                f"{num_classes * min((labels[indices] == k).sum() for k in range(num_classes))}")
        picked.append(of_c[:per_class])
    return np.sort(np.concatenate(picked))


def without_fold(train_idx: np.ndarray, fold: list, seed: int) -> np.ndarray:
    """The training indices without fold k of K (label_issues.out_of_fold_splits, seeded)."""
    from .label_issues import out_of_fold_splits
    if len(fold) != 2 or not 0 <= fold[0] < fold[1]:
        raise CifarkitError(f"holdout_fold must be [k, K] with 0 <= k < K, got {fold}")
    keep, _ = out_of_fold_splits(len(train_idx), int(fold[1]), seed)[int(fold[0])]
    return train_idx[keep]


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images (N, H, W, 3), in [0, 1] units."""
    flat = torch.from_numpy(x).reshape(-1, 3).float() / 255
    return flat.mean(0).tolist(), flat.std(0).tolist()


class UInt8Batches(Dataset):
    """Whole batches by index, with no per-sample Python work (DataLoader calls __getitems__)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=None):
        self.x, self.y, self.transform = x, y, transform  # (N, 32, 32, 3) uint8, (N,) int64

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, idx):
        idx = torch.as_tensor(idx)
        x = self.x[idx]
        if self.transform is not None:  # per-sample pipeline (Albumentations), uint8 in and out
            x = torch.from_numpy(np.stack([self.transform(image=im)["image"] for im in x.numpy()]))
        return x, self.y[idx], idx


def as_batch(batch):
    return batch  # __getitems__ already built the batch


class EpochShuffle(RandomSampler):
    """A shuffle that is a function of (seed, epoch) alone, and can start part-way into an epoch.

    The order never draws on the global RNG, so a run resumed from a mid-epoch checkpoint sees
    exactly the batches the uninterrupted run would have. Under DDP Lightning swaps it for its
    DistributedSampler (it is a RandomSampler), which is seeded by epoch too.
    """

    def __init__(self, data_source, seed: int = 0, epoch: int = 0, start: int = 0):
        super().__init__(data_source)
        self.seed, self.epoch, self.start = seed, epoch, start  # start: samples already trained

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.data_source), generator=g)[self.start:]
        self.start = 0  # the next pass over this epoch (or the next epoch) is whole
        yield from order.tolist()


class CIFARDataModule(L.LightningDataModule):
    def __init__(self, data: str | None = None, dataset: str = "cifar10", batch_size: int = 512,
                 val_size: int = 5000, subset: int | None = None, seed: int = 0,
                 augment: dict | None = None, eval_batch_size: int = 1000, num_workers: int = 0,
                 holdout_fold: list | None = None):
        super().__init__()
        self.holdout_fold = holdout_fold
        self.data, self.dataset, self.batch_size = data, dataset, batch_size
        self.val_size, self.subset, self.seed = val_size, subset, seed
        self.augment_cfg, self.eval_batch_size, self.num_workers = augment or {}, eval_batch_size, num_workers
        self.arrays: Arrays | None = None
        self._position = self._resume_at = (0, 0)  # (epoch, training batches done in it)

    def prepare(self) -> "CIFARDataModule":
        """Load (cached) arrays and make the splits; safe to call more than once."""
        if self.arrays is not None:
            return self
        a = self.arrays = load_arrays(self.data, self.dataset)
        self.classes = a.classes
        train_idx, val_idx = split_train_val(a.train_y, self.val_size, self.seed)
        if self.subset:
            train_idx = balanced_subset(train_idx, a.train_y, self.subset, len(a.classes))
        if self.holdout_fold:  # `cifarkit audit`: fold k of K is left out, to be predicted out of sample
            train_idx = without_fold(train_idx, self.holdout_fold, self.seed)
        self.train_idx, self.val_idx = train_idx, val_idx
        self.mean, self.std = channel_stats(a.train_x[train_idx])
        self.augment = Augment(self.mean, self.std, seed=self.seed, **self.augment_cfg)
        return self

    def setup(self, stage: str | None = None):
        self.prepare()

    def _loader(self, x, y, batch_size, transform=None, sampler=None):
        ds = UInt8Batches(torch.from_numpy(x), torch.from_numpy(y), transform)
        # its own generator: starting an iterator must not draw on the global RNG (augmentation does)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=False,
                          collate_fn=as_batch, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(self.seed))

    def train_dataloader(self):
        a = self.arrays
        ds_x, ds_y = a.train_x[self.train_idx], a.train_y[self.train_idx]
        epoch, batches = self._position = self._resume_at  # each fit counts from where it starts
        self._resume_at = (0, 0)
        sampler = EpochShuffle(range(len(ds_y)), self.seed, epoch, batches * self.batch_size)
        if RECORD_BATCHES in os.environ:
            self._record_file().unlink(missing_ok=True)  # a new fit (the LR range test is one)
        return self._loader(ds_x, ds_y, self.batch_size, self.augment.per_sample(), sampler)

    def val_dataloader(self):
        a = self.arrays
        if len(self.val_idx) == 0:
            return []
        return self._loader(a.train_x[self.val_idx], a.train_y[self.val_idx], self.eval_batch_size)

    def test_dataloader(self):
        a = self.arrays
        return self._loader(a.test_x, a.test_y, self.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y, idx = batch
        training = self.trainer is not None and self.trainer.training
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if not training:
            return self.augment.normalize(x), y
        done_epoch, done = self._position
        self._position = (epoch, done + 1 if done_epoch == epoch else 1)
        if RECORD_BATCHES in os.environ:
            self._record(epoch, idx)
        return self.augment(x, idx, epoch), y

    # -- resuming: where the training order stands, saved in every checkpoint -----------------

    def state_dict(self) -> dict:
        epoch, batches = self._position
        if batches >= math.ceil(len(self.train_idx) / self.batch_size):
            epoch, batches = epoch + 1, 0  # an epoch-end checkpoint: the next epoch starts whole
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = self._position = (int(state["epoch"]), int(state["batches"]))

    def _record_file(self) -> Path:
        """Debugging aid: $CIFARKIT_RECORD_BATCHES/rank<R>.txt, one line per training batch of the
        latest fit: the epoch, then the sample indices (into the training split) of the batch."""
        out = Path(os.environ[RECORD_BATCHES])
        out.mkdir(parents=True, exist_ok=True)
        return out / f"rank{self.trainer.global_rank}.txt"

    def _record(self, epoch: int, idx: torch.Tensor) -> None:
        with open(self._record_file(), "a") as f:
            f.write(f"{epoch} " + " ".join(map(str, idx.tolist())) + "\n")

    def sample_images(self, n: int = 5000) -> torch.Tensor:
        """The first n training images, normalized (N, 3, 32, 32): for data-dependent inits."""
        x = torch.from_numpy(self.arrays.train_x[self.train_idx[:n]])
        return self.augment.normalize(x)
