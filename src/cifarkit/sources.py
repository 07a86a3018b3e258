"""Dataset sources and the decode-once uint8 cache.

A source (python tarball or folder, ImageFolder tree or .tar.gz of one, or torchvision's download)
is decoded once into uint8 arrays (N, 32, 32, 3) + labels, cached, checksummed, and rebuilt when the
source or the cache format changes.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CifarkitError
from .images import SIZE, SUFFIXES, open_image, rgb_array
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


@dataclass
class Arrays:
    """A decoded dataset: uint8 images (N, 32, 32, 3) and int64 labels, train and test."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: str


# ---------------------------------------------------------------------------------------------
# Readers: each returns Arrays from one kind of source


def _unpickle(raw: bytes) -> dict:
    return pickle.loads(raw, encoding="latin1")


def _python_batches(files: dict[str, bytes], source: str) -> Arrays:
    """CIFAR-10 / CIFAR-100 'python version' batches, by file name -> raw bytes."""
    def rows(d):
        x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1)
        y = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
        return x, y

    if "batches.meta" in files:  # CIFAR-10
        classes = _unpickle(files["batches.meta"])["label_names"]
        train = [rows(_unpickle(files[f"data_batch_{i}"])) for i in range(1, 6)]
        test = rows(_unpickle(files["test_batch"]))
    else:  # CIFAR-100
        classes = _unpickle(files["meta"])["fine_label_names"]
        train, test = [rows(_unpickle(files["train"]))], rows(_unpickle(files["test"]))
    return Arrays(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                  test[0], test[1], list(classes), source)


_PY_NAMES = {"batches.meta", "test_batch", "meta", "train", "test"} | {f"data_batch_{i}" for i in range(1, 6)}


def _decode(raw: bytes, name: str, notices: list) -> np.ndarray:
    """images.rgb_array, the conversion inference uses too; other sizes are noted for a notice."""
    img = open_image(io.BytesIO(raw), name)
    if img.size != (SIZE, SIZE):
        notices.append(name)
    return rgb_array(img, name)


def _image_folder(entries: list[tuple[str, bytes]], source: str) -> Arrays:
    """(relative path, bytes) pairs of a tree <root>/{train,test}/<class>/<file>."""
    split_items: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    for rel, raw in entries:
        parts = Path(rel).parts
        for i, part in enumerate(parts[:-2]):
            if part in split_items and len(parts) - i == 3:
                split_items[part].append((parts[i + 1], rel, raw))
                break
    if not split_items["train"] or not split_items["test"]:
        raise CifarkitError(f"{source} is not a dataset: expected <root>/train/<class>/<image> and "
                            "<root>/test/<class>/<image>, or CIFAR's python batches")
    classes = sorted({c for c, _, _ in split_items["train"]})
    index = {c: i for i, c in enumerate(classes)}
    notices: list[str] = []
    out = []
    for split in ("train", "test"):
        items = sorted(split_items[split], key=lambda t: t[1])
        unknown = {c for c, _, _ in items} - set(index)
        if unknown:
            raise CifarkitError(f"{source}: test classes {sorted(unknown)} are not in train")
        x = np.stack([_decode(raw, rel, notices) for _, rel, raw in items])
        y = np.array([index[c] for c, _, _ in items], dtype=np.int64)
        out += [x, y]
    if notices:
        print(f"notice: resized {len(notices)} images to {SIZE}x{SIZE} (first: {notices[0]})",
              file=sys.stderr)
    return Arrays(*out, classes, source)


def _read_tar(path: Path) -> Arrays:
    py: dict[str, bytes] = {}
    images: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                name = Path(m.name).name
                if name in _PY_NAMES:
                    py[name] = tar.extractfile(m).read()
                elif name.lower().endswith(SUFFIXES):
                    images.append((m.name, tar.extractfile(m).read()))
    except Exception as exc:  # TarError, EOFError, zlib.error, OSError: all mean a bad archive
        reason = str(exc).splitlines()[0].rstrip(":")  # tarfile lists each compression it tried
        raise CifarkitError(f"cannot read archive {path}: {reason} (truncated or not a .tar.gz?); "
                            "download it again") from None
    if "batches.meta" in py or {"meta", "train", "test"} <= set(py):
        return _python_batches(py, str(path))
    return _image_folder(images, str(path))


def _read_dir(path: Path) -> Arrays:
    for meta in ("batches.meta", "meta"):
        hits = sorted(path.rglob(meta))
        if hits:
            root = hits[0].parent
            return _python_batches({f.name: f.read_bytes() for f in root.iterdir()
                                    if f.name in _PY_NAMES}, str(path))
    files = [f for f in sorted(path.rglob("*")) if f.suffix.lower() in SUFFIXES]
    return _image_folder([(str(f.relative_to(path)), f.read_bytes()) for f in files], str(path))


def read_source(path: Path) -> Arrays:
    if not path.exists():
        raise CifarkitError(f"data path {path} does not exist; pass --data with a CIFAR tarball, "
                            "its extracted folder, or an ImageFolder tree (or .tar.gz of one)")
    arrays = _read_dir(path) if path.is_dir() else _read_tar(path)
    print(f"decoded {len(arrays.train_y)} train + {len(arrays.test_y)} test images from {path}",
          file=sys.stderr)
    return arrays


# ---------------------------------------------------------------------------------------------
# The decode-once cache


def cache_dir() -> Path:
    return Path(os.environ.get("CIFARKIT_CACHE", Path.home() / ".cache" / "cifarkit"))


def _cache_key(path: Path) -> str:
    st = path.stat()
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# Bump when the cached arrays' meaning changes: older caches are rebuilt. 3: images.rgb_array decodes
CACHE_VERSION = 3


def _checksum(a: Arrays) -> str:
    """sha1 over every array and the class names (~0.1 s for all of CIFAR-10)."""
    h = hashlib.sha1()
    for x in (a.train_x, a.train_y, a.test_x, a.test_y):
        h.update(np.ascontiguousarray(x).data)
    h.update("\n".join(a.classes).encode())
    return h.hexdigest()


def _save_cache(file: Path, a: Arrays) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.stem}.{os.getpid()}.tmp.npz")  # per process: ranks may race
    try:
        np.savez(tmp, train_x=a.train_x, train_y=a.train_y, test_x=a.test_x, test_y=a.test_y,
                 classes=np.array(a.classes), source=np.array(a.source),
                 version=np.array(CACHE_VERSION), checksum=np.array(_checksum(a)))
        os.replace(tmp, file)  # atomic: a killed write never leaves a half cache
    except OSError as exc:  # a cache is an optimization: a full disk must not stop training
        tmp.unlink(missing_ok=True)
        print(f"notice: could not write the data cache {file}: {exc.strerror or exc}", file=sys.stderr)


def _load_cache(file: Path) -> Arrays | None:
    """The cached arrays, or None (with a notice) when the file is corrupt, stale or unreadable."""
    try:
        with np.load(file) as z:
            if "version" not in z or int(z["version"]) != CACHE_VERSION:
                problem = "from an older cifarkit"
            else:
                a = Arrays(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                           [str(c) for c in z["classes"]], str(z["source"]))
                if _checksum(a) == str(z["checksum"]):
                    return a
                problem = "corrupt (checksum mismatch)"
    except Exception as exc:
        problem = f"unreadable ({type(exc).__name__})"
    print(f"notice: data cache {file} is {problem}; decoding the source again", file=sys.stderr)
    return None


def _torchvision(dataset: str) -> Arrays:
    from torchvision import datasets
    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[dataset]
    root = cache_dir() / "torchvision"
    try:
        train, test = cls(root, train=True, download=True), cls(root, train=False, download=True)
    except Exception as exc:
        raise CifarkitError(
            f"could not download {dataset} ({type(exc).__name__}); with no network, point at a "
            "local copy with --data PATH or CIFARKIT_DATA=PATH (python tarball, its folder, or an "
            "ImageFolder tree / .tar.gz)") from None
    return Arrays(train.data, np.array(train.targets), test.data, np.array(test.targets),
                  list(train.classes), f"torchvision:{dataset}")


def resolve_source(data: str | None, dataset: str = "cifar10") -> str | None:
    """--data, then $CIFARKIT_DATA; None means 'cache, then torchvision download'."""
    if data:
        return str(data)
    if os.environ.get("CIFARKIT_DATA"):
        return os.environ["CIFARKIT_DATA"]
    if dataset == "folder":
        raise CifarkitError("--dataset folder needs --data PATH (an ImageFolder tree or .tar.gz)")
    return None


def _cached(file: Path, decode) -> Arrays:
    """The arrays in `file` when it is sound, else decode() them and write the cache."""
    cached = _load_cache(file) if file.exists() else None
    if cached is None:
        cached = decode()
        _save_cache(file, cached)
    return cached


def load_arrays(data: str | None = None, dataset: str = "cifar10") -> Arrays:
    """Decoded arrays for a source, from the cache when the source has not changed."""
    source = resolve_source(data, dataset)
    if source is None:
        return _cached(cache_dir() / f"{dataset}-torchvision.npz", lambda: _torchvision(dataset))
    path = Path(source).expanduser()
    if not path.exists():
        read_source(path)  # raises the 'does not exist' error
    return _cached(cache_dir() / f"{path.name}-{_cache_key(path)}.npz", lambda: read_source(path))
