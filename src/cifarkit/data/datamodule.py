"""The held-out split, the resumable epoch order and the Lightning DataModule.

Data flows one way: a source -> a cached uint8 array (`sources.py`) -> the training device. With the
batched augmentation (every preset), the whole uint8 training set is copied to the training device
once (150 MB for CIFAR-10, as airbench does on a GPU); the DataLoader yields only step numbers, and
each batch is indexed from the device-resident copy and augmented there (`augment.py`), so no
image crosses from the host during training. The per-sample Albumentations pipeline keeps a
classic DataLoader of uint8 batches.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, RandomSampler

from .augment import Augment
from ..errors import CifarkitError
from ..presets import default
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


def split_calibration(train_idx: np.ndarray, labels: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, calibration indices): n // K images of each of the K classes drawn at random
    (seeded) from the training indices and held out from training."""
    if not n:
        return train_idx, train_idx[:0]
    classes = np.unique(labels[train_idx])
    per_class = n // len(classes)
    if per_class < 1 or n >= len(train_idx):
        raise CifarkitError(f"--calib-size {n} must hold at least one image of each of the {len(classes)} classes "
                            f"and leave some of the {len(train_idx)} to train on")
    rng = np.random.default_rng(seed + 1)  # not the validation split's draw
    picked = np.concatenate([rng.permutation(train_idx[labels[train_idx] == c])[:per_class] for c in classes])
    return np.setdiff1d(train_idx, picked), np.sort(picked)


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


def out_of_fold_splits(n: int, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train_idx, held_out_idx) pairs over range(n): every index is held out exactly once."""
    if k < 2:
        raise CifarkitError(f"--folds must be at least 2 (got {k}): one fold leaves nothing to train on")
    if k > n:
        raise CifarkitError(f"--folds {k} is more than the {n} images: use at most {n} folds")
    folds = np.array_split(np.random.default_rng(seed).permutation(n), k)
    return [(np.sort(np.concatenate(folds[:i] + folds[i + 1:])), np.sort(f)) for i, f in enumerate(folds)]


def without_fold(train_idx: np.ndarray, fold: list, seed: int) -> np.ndarray:
    """The training indices without fold k of K (out_of_fold_splits, seeded)."""
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
        order = epoch_order(len(self.data_source), self.seed, self.epoch)[self.start:]
        self.start = 0  # the next pass over this epoch (or the next epoch) is whole
        yield from order.tolist()


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffle of one epoch: a function of (seed, epoch) alone, never of the global RNG."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class EpochSteps(IterableDataset):
    """The step numbers of an epoch, 0..steps-1 (from `start` on the first pass after a resume).

    An iterable dataset: Lightning gives it no DistributedSampler (each rank draws its own share
    of the epoch's order on its device), and a batch of it is a plain int that nothing copies."""

    def __init__(self, steps: int, start: int = 0):
        self.steps, self.start = steps, start

    def __len__(self):
        return self.steps

    def __iter__(self):
        start, self.start = self.start, 0
        yield from range(start, self.steps)


class CIFARDataModule(L.LightningDataModule):
    """The data settings of a TrainConfig; one not given takes TrainConfig's default (augment: see Augment)."""

    def __init__(self, data: str | None = default("data"), dataset: str = default("dataset"),
                 batch_size: int = default("batch_size"), val_size: int = default("val_size"),
                 subset: int | None = default("subset"), seed: int = default("seed"),
                 augment: dict | None = None, eval_batch_size: int = default("eval_batch_size"),
                 num_workers: int = default("num_workers"), drop_last: bool = default("drop_last"),
                 holdout_fold: list | None = default("holdout_fold"), classes: list | None = default("classes"),
                 calib_size: int = default("calib_size")):
        super().__init__()
        self.holdout_fold, self.class_names, self.calib_size = holdout_fold, classes, calib_size
        self.data, self.dataset, self.batch_size = data, dataset, batch_size
        self.val_size, self.subset, self.seed = val_size, subset, seed
        self.augment_cfg, self.eval_batch_size, self.num_workers = augment or {}, eval_batch_size, num_workers
        self.drop_last = drop_last  # a fixed batch shape (GPU: cudnn.benchmark and torch.compile plan once)
        self.arrays: Arrays | None = None
        self._position = self._resume_at = (0, 0)  # (epoch, training batches done in it)
        self._device_set: tuple[torch.Tensor, torch.Tensor] | None = None  # uint8 (N, 32, 32, 3), (N,)
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, this rank's sample order)
        self.steps_per_epoch = 0

    def prepare(self) -> "CIFARDataModule":
        """Load (cached) arrays and make the splits; safe to call more than once."""
        if self.arrays is not None:
            return self
        a = self.arrays = load_arrays(self.data, self.dataset, self.class_names)
        self.classes = a.classes
        train_idx, val_idx = split_train_val(a.train_y, self.val_size, self.seed)
        train_idx, self.calib_idx = split_calibration(train_idx, a.train_y, self.calib_size, self.seed)
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

    def _loader(self, x, y, batch_size, transform=None, sampler=None, drop_last=False):
        ds = UInt8Batches(torch.from_numpy(x), torch.from_numpy(y), transform)
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # its own generator: starting an iterator must not draw on the global RNG (augmentation does)
        return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          collate_fn=as_batch, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=on_gpu,
                          generator=torch.Generator().manual_seed(self.seed))

    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self):
        epoch, batches = self._position = self._resume_at  # each fit counts from where it starts
        self._resume_at = (0, 0)
        if RECORD_BATCHES in os.environ:
            self._record_file().unlink(missing_ok=True)  # a new fit (the LR range test is one)
        self.steps_per_epoch = self.steps_for(self._rank()[1])
        if self.augment.pipeline == "batched":
            self._order = None
            return DataLoader(EpochSteps(self.steps_per_epoch, batches), batch_size=None,
                              generator=torch.Generator().manual_seed(self.seed))  # not the global RNG
        a = self.arrays
        ds_x, ds_y = a.train_x[self.train_idx], a.train_y[self.train_idx]
        sampler = EpochShuffle(range(len(ds_y)), self.seed, epoch, batches * self.batch_size)
        return self._loader(ds_x, ds_y, self.batch_size, self.augment.per_sample(), sampler, self.drop_last)

    def steps_for(self, world: int = 1) -> int:
        """Optimizer steps per epoch for each of `world` processes."""
        per_rank = math.ceil(len(self.train_idx) / world)  # DistributedSampler's share, padded
        return per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)

    def device_set(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The uint8 training split (N, 32, 32, 3) and its labels, on `device` (copied once)."""
        if self._device_set is None or self._device_set[0].device != device:
            a = self.arrays
            self._device_set = (torch.from_numpy(a.train_x[self.train_idx]).to(device),
                                torch.from_numpy(a.train_y[self.train_idx]).to(device))
        return self._device_set

    def _epoch_share(self, epoch: int, device: torch.device) -> torch.Tensor:
        """This rank's sample order for the epoch, on the device (one copy per epoch)."""
        if self._order is None or self._order[0] != epoch:
            order = epoch_order(len(self.train_idx), self.seed, epoch)
            rank, world = self._rank()
            if world > 1:  # as DistributedSampler: pad to a multiple of the ranks, then deal out
                total = math.ceil(len(order) / world) * world
                order = torch.cat([order, order[: total - len(order)]])[rank::world]
            self._order = (epoch, order.to(device))
        return self._order[1]

    def _device_batch(self, step: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        x_all, y_all = self.device_set(device)
        idx = self._epoch_share(epoch, device)[step * self.batch_size:(step + 1) * self.batch_size]  # (B,)
        return x_all[idx], y_all[idx], idx

    def val_dataloader(self):
        a = self.arrays
        if len(self.val_idx) == 0:
            return []
        return self._loader(a.train_x[self.val_idx], a.train_y[self.val_idx], self.eval_batch_size)

    def test_dataloader(self):
        a = self.arrays
        return self._loader(a.test_x, a.test_y, self.eval_batch_size)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        training = self.trainer is not None and self.trainer.training
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if isinstance(batch, int):  # a step number: the batch is drawn on the device
            batch = self._device_batch(batch, epoch)
        x, y, idx = batch
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
        if batches >= self.steps_per_epoch:
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
        """n training images drawn at random (seeded), normalized (N, 3, 32, 32): for data-dependent
        inits. At random, not the first n: an ImageFolder source is sorted by class."""
        pick = np.random.default_rng(self.seed).permutation(len(self.train_idx))[:n]
        x = torch.from_numpy(self.arrays.train_x[self.train_idx[np.sort(pick)]])
        return self.augment.normalize(x)
