"""Dataset sources and the decode-once uint8 cache.

A source (python tarball or folder, ImageFolder tree or .tar.gz of one, or torchvision's download)
is decoded once into uint8 arrays (N, 32, 32, 3) + labels, cached, checksummed, and rebuilt when the
source or the cache format changes.

Sources may come from anywhere (folders scraped from the web), so the readers trust nothing:
- a file that is not an image, cannot be decoded, or is over the pixel limit (images.MAX_PIXELS, as
  for uploads) is skipped; the skipped files are counted and the first few named, once, on stderr;
- what makes the dataset meaningless stops with one line: a train class folder with no readable
  image, a test class that is not in train, nothing readable at all;
- folders are walked following symbolic links to folders once per real folder (a link that loops
  back is skipped and listed); only regular files are read (no fifos or devices);
- archives are never extracted: members are read in memory, one after another; absolute or '..'
  names, links, devices and members over MAX_MEMBER_MB are skipped and listed; reading stops with
  one line once the archive expands past MAX_ARCHIVE_GB (CIFARKIT_MAX_ARCHIVE_GB raises it);
- CIFAR's python batches are pickles: only dicts, lists and numpy arrays are rebuilt from them, so a
  batch that would run code is refused, not run.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import zlib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..console import log, progress
from ..errors import CifarkitError
from ..images import SIZE, SUFFIXES, UnreadableImage, open_image, rgb_array
from ..rundir import atomic_path

_bar: ContextVar = ContextVar("decoding_bar", default=None)  # read_source's progress bar

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")
MAX_ARCHIVE_GB = 4.0   # GiB an archive may expand to (CIFAR-10 as JPEGs: ~0.1; as python batches: 0.2)
MAX_MEMBER_MB = 256    # an archive member bigger than this is skipped unread (40 MP, 16-bit RGB: 240 MB)
SHOWN = 5              # skipped files named in the notice
SPLITS = ("train", "test")
_PY_NAMES = {"batches.meta", "test_batch", "meta", "train", "test"} | {f"data_batch_{i}" for i in range(1, 6)}
# what CIFAR's python batches hold: numpy arrays (and scalars) inside plain dicts and lists
_PICKLE_GLOBALS = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                   for n in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype")}


@dataclass
class Arrays:
    """A decoded dataset: uint8 images (N, 32, 32, 3) and int64 labels, train and test."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    source: str


def max_archive_bytes() -> int:
    raw = os.environ.get("CIFARKIT_MAX_ARCHIVE_GB")
    try:
        gib = float(raw) if raw else MAX_ARCHIVE_GB
    except ValueError:
        raise CifarkitError(f"CIFARKIT_MAX_ARCHIVE_GB={raw!r} is not a number of GiB; set it to e.g. 8") from None
    return int(gib * 2**30)


def _too_large(source, cap: int) -> CifarkitError:
    return CifarkitError(f"{source} expands to more than {cap / 2**30:g} GiB, the cap on what an archive may "
                         "expand to; if you trust it, raise the cap with CIFARKIT_MAX_ARCHIVE_GB=N")


class Skipped:
    """Files a reader left out and why; `notice()` prints a count and the first few, once."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, name: str, why: str) -> None:
        self.items.append((name, why))

    def notice(self) -> None:
        if self.items:
            self.items.sort()
            first = ", ".join(f"{n} ({why})" for n, why in self.items[:SHOWN])
            more = f", and {len(self.items) - SHOWN} more" if len(self.items) > SHOWN else ""
            log.warning(f"notice: skipped {len(self.items)} files: {first}{more}")
            self.items.clear()


# ---------------------------------------------------------------------------------------------
# CIFAR's python batches


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it would call {module}.{name}")


def _unpickle(raw: bytes, name: str, source: str) -> dict:
    try:
        d = _BatchUnpickler(io.BytesIO(raw), encoding="latin1").load()
        if not isinstance(d, dict):
            raise pickle.UnpicklingError("it holds no dict")
        return d
    except Exception as exc:  # UnpicklingError, EOFError, ValueError...: not a batch we can trust
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CifarkitError(f"{name} in {source} is not a CIFAR python batch ({reason}); it was not "
                            "loaded: get the dataset from its official source") from None


def _python_batches(files: dict[str, bytes], source: str) -> Arrays:
    """CIFAR-10 / CIFAR-100 'python version' batches, by file name -> raw bytes."""
    def rows(name):
        d = _unpickle(files[name], name, source)
        try:
            x = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, SIZE, SIZE).transpose(0, 2, 3, 1)
            y = np.asarray(d.get("labels", d.get("fine_labels")), dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise CifarkitError(f"{name} in {source} is not a CIFAR python batch ({type(exc).__name__}); "
                                "get the dataset from its official source") from None
        return x, y

    try:
        if "batches.meta" in files:  # CIFAR-10
            classes = _unpickle(files["batches.meta"], "batches.meta", source)["label_names"]
            train = [rows(f"data_batch_{i}") for i in range(1, 6)]
            test = rows("test_batch")
        else:  # CIFAR-100
            classes = _unpickle(files["meta"], "meta", source)["fine_label_names"]
            train, test = [rows("train")], rows("test")
    except KeyError as exc:
        raise CifarkitError(f"{source} lacks {exc.args[0]} of CIFAR's python batches; download it again") from None
    return Arrays(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]),
                  test[0], test[1], [str(c) for c in classes], source)


# ---------------------------------------------------------------------------------------------
# ImageFolder trees: <root>/{train,test}/<class>/<file>, from a folder or an archive


def _place(rel: str, depth: int) -> tuple[str, str] | None:
    """(split, class) of a path `depth` levels below a split folder (2: a file, 1: a class folder)."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    for i, part in enumerate(parts[:-depth]):
        if part in SPLITS and len(parts) - i == depth + 1:
            return part, parts[i + 1]
    return None


class _Tree:
    """An ImageFolder tree decoded as its files arrive, with what was skipped and why."""

    def __init__(self, source: str, skipped: Skipped):
        self.source, self.skipped = source, skipped
        self.bar = _bar.get()  # the "decoding" progress bar of read_source, if any
        self.items: dict[str, list[tuple[str, str, np.ndarray]]] = {s: [] for s in SPLITS}
        self.folders: dict[str, set[str]] = {s: set() for s in SPLITS}
        self.resized: list[str] = []

    def folder(self, rel: str) -> None:
        placed = _place(rel, 1)
        if placed:
            self.folders[placed[0]].add(placed[1])

    def add(self, rel: str, read) -> None:
        """A file of the tree; `read()` gives its path or bytes, called only for an image."""
        placed = _place(rel, 2)
        if placed is None:
            return                                  # outside the layout (a README at the root)
        split, cls = placed
        self.folders[split].add(cls)
        if not rel.lower().endswith(SUFFIXES):
            return self.skipped.add(rel, "not an image")
        try:
            img = open_image(read(), rel)
            if img.size != (SIZE, SIZE):
                self.resized.append(rel)
            self.items[split].append((rel, cls, rgb_array(img, rel)))
        except UnreadableImage as exc:
            self.skipped.add(rel, exc.reason)
        if self.bar is not None:
            self.bar.advance(1)

    def arrays(self) -> Arrays:
        self.skipped.notice()
        src = self.source
        if not self.folders["train"] or not self.folders["test"]:
            raise CifarkitError(f"{src} is not a dataset: expected <root>/train/<class>/<image> and "
                                "<root>/test/<class>/<image>, or CIFAR's python batches")
        classes = sorted(self.folders["train"])
        have = {c for _, c, _ in self.items["train"]}
        empty = [c for c in classes if c not in have]
        if empty:
            raise CifarkitError(f"{src}: class folder train/{empty[0]} has no readable image"
                                + (f" (nor do {len(empty) - 1} more)" if len(empty) > 1 else "")
                                + "; add images to it or remove it")
        unknown = sorted({c for _, c, _ in self.items["test"]} - set(classes))
        if unknown:
            raise CifarkitError(f"{src}: test classes {unknown} are not in train; add train images for "
                                "them or remove those test folders")
        if not self.items["test"]:
            raise CifarkitError(f"{src}: no readable test image; add images under test/<class>/")
        if self.resized:
            log.warning(f"notice: resized {len(self.resized)} images to {SIZE}x{SIZE} (first: {self.resized[0]})")
        index = {c: i for i, c in enumerate(classes)}
        out = []
        for split in SPLITS:
            items = sorted(self.items[split], key=lambda t: t[0])
            out += [np.stack([a for _, _, a in items]), np.array([index[c] for _, c, _ in items], dtype=np.int64)]
        return Arrays(*out, classes, src)


# ---------------------------------------------------------------------------------------------
# Readers: each returns Arrays from one kind of source


def _unsafe(name: str) -> str | None:
    """Why an archive member's name may not be used, or None."""
    if name.startswith("/") or "\\" in name or name[1:2] == ":":
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' in its path"
    return None


def _read_tar(path: Path) -> Arrays:
    """Members are read in memory as a stream (nothing is written to disk), checked one by one."""
    cap, skipped = max_archive_bytes(), Skipped()
    tree, py = _Tree(str(path), skipped), {}
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                if tar.offset > cap:                # offset: bytes expanded so far, this member included
                    raise _too_large(f"archive {path}", cap)
                why = _unsafe(m.name) or (None if m.isfile() or m.isdir() else
                                          "a link" if m.issym() or m.islnk() else "not a regular file")
                if not why and m.size > MAX_MEMBER_MB * 2**20:
                    why = f"over {MAX_MEMBER_MB} MB"    # never read whole into memory
                if why:
                    skipped.add(m.name, why)
                elif m.isdir():
                    tree.folder(m.name)
                elif m.name.rsplit("/", 1)[-1] in _PY_NAMES:
                    py[m.name.rsplit("/", 1)[-1]] = tar.extractfile(m).read()
                else:
                    tree.add(m.name, lambda m=m: tar.extractfile(m).read())
    except CifarkitError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # all mean a bad archive
        reason = str(exc).splitlines()[0].rstrip(":")  # tarfile lists each compression it tried
        raise CifarkitError(f"cannot read archive {path}: {reason} (truncated or not a .tar.gz?); "
                            "download it again") from None
    except Exception as exc:  # lzma/bz2 errors and the like
        raise CifarkitError(f"cannot read archive {path}: {type(exc).__name__} (truncated or not a "
                            ".tar.gz?); download it again") from None
    if "batches.meta" in py or {"meta", "train", "test"} <= set(py):
        skipped.notice()
        return _python_batches(py, str(path))
    return tree.arrays()


def _walk(root: Path, skipped: Skipped):
    """(relative path, path, is_folder) of what lies under root. Links to folders are followed once
    per real folder, so a link that loops back (or a second link to a folder) is skipped and listed;
    broken links, fifos, sockets and devices are skipped and listed."""
    seen: set[tuple[int, int]] = set()
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        st = folder.stat()
        if (st.st_dev, st.st_ino) in seen:
            skipped.add(rel, "symbolic link to a folder already read (a loop?)")
            continue
        seen.add((st.st_dev, st.st_ino))
        if rel:
            yield rel, folder, True
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            skipped.add(rel or ".", f"cannot list it: {exc.strerror}")
            continue
        for e in entries:
            r = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_dir():
                    stack.append((Path(e.path), r))
                    continue
                if e.is_file():
                    yield r, Path(e.path), False
                    continue
            except OSError:
                pass
            skipped.add(r, "broken symbolic link" if e.is_symlink() and not os.path.exists(e.path)
                        else "not a regular file")


def _read_dir(path: Path) -> Arrays:
    skipped = Skipped()
    entries = list(_walk(path, skipped))
    for meta in ("batches.meta", "meta"):
        hits = [p for _, p, is_dir in entries if not is_dir and p.name == meta]
        if hits:
            files = [f for f in hits[0].parent.iterdir() if f.name in _PY_NAMES and f.is_file()]
            cap = max_archive_bytes()
            if sum(f.stat().st_size for f in files) > cap:
                raise _too_large(f"the python batches in {path}", cap)
            skipped.notice()
            return _python_batches({f.name: f.read_bytes() for f in files}, str(path))
    tree = _Tree(str(path), skipped)
    for rel, p, is_dir in entries:
        if is_dir:
            tree.folder(rel)
        else:
            tree.add(rel, lambda p=p: p)
    return tree.arrays()


def read_source(path: Path) -> Arrays:
    if not path.exists():
        raise CifarkitError(f"data path {path} does not exist; pass --data with a CIFAR tarball, "
                            "its extracted folder, or an ImageFolder tree (or .tar.gz of one)")
    with progress(f"decoding {path.name} (once: then cached)", None) as bar:
        token = _bar.set(bar)
        try:
            arrays = _read_dir(path) if path.is_dir() else _read_tar(path)
        finally:
            _bar.reset(token)
    log.info(f"decoded {len(arrays.train_y):,} train + {len(arrays.test_y):,} test images from {path}")
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
    try:
        with atomic_path(file, ".npz") as tmp:  # a killed write never leaves a half cache
            np.savez(tmp, train_x=a.train_x, train_y=a.train_y, test_x=a.test_x, test_y=a.test_y,
                     classes=np.array(a.classes), source=np.array(a.source),
                     version=np.array(CACHE_VERSION), checksum=np.array(_checksum(a)))
    except OSError as exc:  # a cache is an optimization: a full disk must not stop training
        log.warning(f"notice: could not write the data cache {file}: {exc.strerror or exc}")


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
    log.warning(f"notice: data cache {file} is {problem}; decoding the source again")
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


def load_arrays(data: str | None = None, dataset: str = "cifar10", classes: list[str] | None = None) -> Arrays:
    """Decoded arrays for a source, from the cache when the source has not changed; with `classes`,
    only the images of those classes, labelled 0..len(classes)-1 in that order."""
    source = resolve_source(data, dataset)
    if source is None:
        arrays = _cached(cache_dir() / f"{dataset}-torchvision.npz", lambda: _torchvision(dataset))
    else:
        path = Path(source).expanduser()
        if not path.exists():
            read_source(path)  # raises the 'does not exist' error
        arrays = _cached(cache_dir() / f"{path.name}-{_cache_key(path)}.npz", lambda: read_source(path))
    return select_classes(arrays, classes) if classes else arrays


def select_classes(a: Arrays, names: list[str]) -> Arrays:
    """The images of the named classes only, relabelled in the order named."""
    unknown = [n for n in names if n not in a.classes]
    if unknown or len(set(names)) < 2 or len(set(names)) != len(names):
        why = f"unknown classes {unknown}" if unknown else "name at least two different classes"
        raise CifarkitError(f"--classes: {why}; the data has: {', '.join(a.classes)}")
    old = np.array([a.classes.index(n) for n in names])
    relabel = np.full(len(a.classes), -1)
    relabel[old] = np.arange(len(names))
    train, test = np.isin(a.train_y, old), np.isin(a.test_y, old)
    return Arrays(a.train_x[train], relabel[a.train_y[train]], a.test_x[test], relabel[a.test_y[test]],
                  list(names), a.source)
