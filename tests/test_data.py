import io
import os
import pickle
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from cifarkit import CifarkitError
from cifarkit.cli import main
from cifarkit.data.datamodule import CIFARDataModule, balanced_subset, epoch_order, split_train_val
from cifarkit.data.sources import cache_dir, load_arrays
from conftest import CLASSES, make_image_folder


@pytest.mark.slow  # decodes the real copy's 60,000 JPEGs
def test_real_jpeg_copy_loads_with_the_right_counts_and_class_order(cifar_path):
    a = load_arrays(str(cifar_path))
    assert a.train_x.shape == (50_000, 32, 32, 3) and a.train_x.dtype == np.uint8
    assert a.test_x.shape == (10_000, 32, 32, 3)
    assert a.classes == CLASSES
    assert np.bincount(a.train_y).tolist() == [5000] * 10
    assert np.bincount(a.test_y).tolist() == [1000] * 10
    # the copy's README: per-channel train mean (0.4913, 0.4821, 0.4465)
    assert np.allclose(a.train_x.reshape(-1, 3).mean(0) / 255, [0.4913, 0.4821, 0.4465], atol=2e-3)


@pytest.mark.slow  # the real copy
def test_second_load_comes_from_the_cache_in_seconds(cifar_path):
    load_arrays(str(cifar_path))
    t = time.time()
    a = load_arrays(str(cifar_path))
    assert time.time() - t < 5 and len(a.train_y) == 50_000


def _python_tarball(path, n=20):
    rng = np.random.default_rng(0)
    def batch(k):
        return pickle.dumps({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                             "labels": list(rng.integers(0, 10, n))})
    files = {f"data_batch_{i}": batch(i) for i in range(1, 6)}
    files["test_batch"] = batch(0)
    files["batches.meta"] = pickle.dumps({"label_names": CLASSES})
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def test_official_python_tarball_and_its_extracted_folder_load_alike(tmp_path):
    tgz = _python_tarball(tmp_path / "cifar-10-python.tar.gz")
    a = load_arrays(str(tgz))
    assert a.train_x.shape == (100, 32, 32, 3) and a.test_x.shape == (20, 32, 32, 3)
    with tarfile.open(tgz) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    b = load_arrays(str(tmp_path / "x"))
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)
    assert b.classes == CLASSES


def test_image_folder_of_another_size_is_resized_with_a_notice(tmp_path, notices):
    root = make_image_folder(tmp_path / "big", n_train=3, n_test=2, size=48)
    a = load_arrays(str(root))
    assert a.train_x.shape == (12, 32, 32, 3)
    assert "resized" in notices()


def test_image_folder_tarball_loads(image_folder_tgz):
    a = load_arrays(str(image_folder_tgz))
    assert a.classes == CLASSES[:4] and len(a.train_y) == 48 and len(a.test_y) == 16


def test_truncated_archive_is_a_clear_error(truncated_archive):
    with pytest.raises(CifarkitError, match=r"cannot read archive .*cut\.tar\.gz.*truncated.*download it again"):
        load_arrays(str(truncated_archive))


def test_missing_path_and_non_dataset_folder_are_clear_errors(tmp_path):
    with pytest.raises(CifarkitError, match="does not exist"):
        load_arrays(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CifarkitError, match="not a dataset"):
        load_arrays(str(tmp_path / "empty"))


def test_changed_source_is_decoded_again(tmp_path):
    root = make_image_folder(tmp_path / "toy", n_train=2, n_test=1)
    assert len(load_arrays(str(root)).train_y) == 8
    tgz = tmp_path / "toy.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname="toy")
    a = load_arrays(str(tgz))
    os.utime(tgz, (time.time() + 10, time.time() + 10))  # same path, new mtime: a new cache key
    root2 = make_image_folder(tmp_path / "toy2", n_train=3, n_test=1)
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root2, arcname="toy")
    assert len(load_arrays(str(tgz)).train_y) == 12 != len(a.train_y)


def test_validation_split_is_seeded_and_disjoint():
    labels = np.arange(1000) % 10
    tr, va = split_train_val(labels, 100, seed=3)
    tr2, va2 = split_train_val(labels, 100, seed=3)
    assert np.array_equal(va, va2) and len(va) == 100 and len(tr) == 900
    assert not set(tr) & set(va)
    assert not np.array_equal(va, split_train_val(labels, 100, seed=4)[1])
    assert len(split_train_val(labels, 0, seed=0)[1]) == 0


def test_subset_is_class_balanced_and_too_large_is_an_error():
    labels = np.arange(1000) % 10
    idx = balanced_subset(np.arange(1000), labels, 50, 10)
    assert np.bincount(labels[idx]).tolist() == [5] * 10
    assert idx.tolist() == sorted(idx.tolist())
    with pytest.raises(CifarkitError, match="--subset"):
        balanced_subset(np.arange(1000), labels, 2000, 10)


def test_datamodule_yields_step_numbers_and_draws_uint8_batches_from_the_device_copy(image_folder):
    dm = CIFARDataModule(str(image_folder), batch_size=8, val_size=8, augment={"pad": 2}).prepare()
    steps = list(dm.train_dataloader())
    assert steps == [0, 1, 2, 3, 4]                     # 40 training images, batches of 8: no images
    x, y, idx = dm._device_batch(1, epoch=0)
    assert x.dtype == torch.uint8 and x.shape == (8, 32, 32, 3) and len(y) == 8
    order = epoch_order(40, 0, 0)                        # the epoch's shuffle, a function of (seed, epoch)
    assert torch.equal(idx, order[8:16])
    assert torch.equal(x, torch.from_numpy(dm.arrays.train_x[dm.train_idx])[order[8:16]])
    assert dm.device_set(torch.device("cpu"))[0].data_ptr() == dm.device_set(torch.device("cpu"))[0].data_ptr()
    out = dm.augment(x, idx)
    assert out.shape == (8, 3, 32, 32)
    assert len(dm.val_idx) == 8 and len(dm.train_idx) == 40
    dm.drop_last, dm.batch_size = True, 16
    assert list(dm.train_dataloader()) == [0, 1]         # 40 // 16: the smaller last batch dropped


def _cache_file(source: Path) -> Path:
    return next(p for p in cache_dir().glob(f"{source.name}-*.npz"))


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, notices):
    src = make_image_folder(tmp_path / "corrupt", n_train=3, n_test=1)
    fresh = load_arrays(str(src))
    file = _cache_file(src)
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)  # zeros over part of the image data
    file.write_bytes(bytes(raw))
    again = load_arrays(str(src))
    assert "data cache" in notices()
    assert np.array_equal(again.train_x, fresh.train_x) and again.classes == fresh.classes
    assert np.array_equal(load_arrays(str(src)).train_x, fresh.train_x)  # the rebuilt cache is good


def test_stale_cache_is_detected_by_checksum_and_rebuilt(tmp_path, notices):
    src = make_image_folder(tmp_path / "stale", n_train=3, n_test=1)
    fresh = load_arrays(str(src))
    file = _cache_file(src)
    with np.load(file) as z:
        parts = dict(z)
    parts["train_x"] = parts["train_x"][::-1].copy()  # a well-formed file whose arrays changed
    np.savez(file, **parts)
    assert np.array_equal(load_arrays(str(src)).train_x, fresh.train_x)
    assert "checksum mismatch" in notices()
    del parts["version"]  # a cache from before checksums
    np.savez(file, **parts)
    assert np.array_equal(load_arrays(str(src)).train_x, fresh.train_x)
    assert "older cifarkit" in notices()


def test_wrong_archive_is_a_clear_one_line_error(tmp_path, capsys):
    png = tmp_path / "cat.tar.gz"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    code = main(["train", "--data", str(png), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot read archive" in err[0] and "not a .tar.gz" in err[0]
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------
# Hostile sources: folders and archives scraped from the web


def _bomb_png(path: Path, width: int = 50_000, height: int = 50_000) -> Path:
    """A PNG of a few bytes whose header claims width x height pixels (a decompression bomb)."""
    import struct
    import zlib
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "png")
    raw = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(raw[24:29])
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    path.write_bytes(bytes(raw))
    return path


def _hostile_tree(root: Path) -> dict[str, int]:
    """A small learnable tree plus every kind of hostile item; returns the images expected to load."""
    make_image_folder(root, n_train=3, n_test=1, classes=CLASSES[:2])
    cat = root / "train" / CLASSES[0]
    Image.fromarray(np.full((30, 30), 60000, np.uint16)).save(cat / "sixteen.png")          # kept
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).convert("CMYK").save(cat / "cmyk.jpg")  # kept
    _bomb_png(cat / "bomb.png")
    (cat / "notes.txt").write_text("not an image")
    (cat / "fake.png").write_text("not a png either")
    (cat / "cut.jpg").write_bytes((root / "test" / CLASSES[0] / "0000.png").read_bytes()[:40])
    os.mkfifo(cat / "fifo.png")                                    # reading it would block forever
    (cat / "gone.png").symlink_to(root / "no-such-file.png")        # a broken link
    (cat / "loop").symlink_to(root / "train")                       # a link back up the tree
    outside = make_image_folder(root.parent / "elsewhere", n_train=2, n_test=0, classes=["bird"])
    (root / "train" / "bird").symlink_to(outside / "train" / "bird")  # a linked class folder: followed
    (root / "test" / "bird").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / "bird" / "b.png")
    return {"train": 2 * 3 + 2 + 2, "test": 2 + 1}


def test_hostile_image_folder_trains_with_bad_files_skipped_and_listed_once(tmp_path, notices):
    root = tmp_path / "scraped"
    expect = _hostile_tree(root)
    got = {}
    reader = threading.Thread(target=lambda: got.update(a=load_arrays(str(root))), daemon=True)
    reader.start()
    reader.join(120)
    assert not reader.is_alive(), "the reader hung (on the fifo or the link loop)"
    a = got["a"]
    assert (len(a.train_y), len(a.test_y)) == (expect["train"], expect["test"])
    assert a.classes == sorted([CLASSES[0], CLASSES[1], "bird"])
    err = notices()
    lines = [line for line in err.splitlines() if "skipped" in line]
    assert len(lines) == 1, err
    # seven skipped, by name: the first five named with the reason, then a count
    shown = ["bomb.png (over the 40,000,000-pixel limit)", "cut.jpg (", "fake.png (not a known image format)",
             "fifo.png (not a regular file)", "gone.png (broken symbolic link)"]
    assert lines[0].startswith("notice: skipped 7 files: train/") and lines[0].endswith("and 2 more")
    assert all(f"train/{CLASSES[0]}/{s}" in lines[0] for s in shown), lines[0]
    assert str(tmp_path) not in lines[0]                           # names relative to the tree
    load_arrays(str(root))                                           # from the cache: no second notice
    assert "skipped" not in notices()


def test_a_train_class_left_empty_stops_with_one_line_saying_what_to_fix(tmp_path):
    root = make_image_folder(tmp_path / "t", n_train=2, n_test=1, classes=CLASSES[:2])
    (root / "train" / "unicorn").mkdir()
    with pytest.raises(CifarkitError, match="class folder train/unicorn has no readable image; add images to it or remove it"):
        load_arrays(str(root))
    (root / "train" / "unicorn" / "readme.txt").write_text("only text here")
    _bomb_png(root / "train" / "unicorn" / "huge.png")
    with pytest.raises(CifarkitError, match="train/unicorn has no readable image"):
        load_arrays(str(root))


def test_a_test_class_missing_from_train_or_no_test_image_stops_with_one_line(tmp_path):
    root = make_image_folder(tmp_path / "t", n_train=2, n_test=1, classes=CLASSES[:2])
    (root / "test" / "unicorn").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "test" / "unicorn" / "u.png")
    with pytest.raises(CifarkitError, match=r"test classes \['unicorn'\] are not in train; add train images"):
        load_arrays(str(root))
    root2 = make_image_folder(tmp_path / "t2", n_train=2, n_test=0, classes=CLASSES[:2])
    (root2 / "test" / CLASSES[0] / "x.txt").write_text("no image")
    with pytest.raises(CifarkitError, match="no readable test image"):
        load_arrays(str(root2))


def _member(tar, name, data=b"", **kw):
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_archive_members_with_unsafe_names_or_links_are_skipped_and_nothing_is_written(tmp_path, notices, monkeypatch):
    import cifarkit.data.sources
    monkeypatch.setattr(cifarkit.data.sources, "MAX_MEMBER_MB", 1)
    root = make_image_folder(tmp_path / "toy", n_train=2, n_test=1, classes=CLASSES[:2])
    png = (root / "train" / CLASSES[0] / "0000.png").read_bytes()
    tgz = tmp_path / "box" / "hostile.tar.gz"
    tgz.parent.mkdir()
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname="toy")
        _member(tar, f"toy/train/{CLASSES[0]}/../../../../evil.png", png)
        _member(tar, f"/tmp/abs/train/{CLASSES[0]}/abs.png", png)
        _member(tar, f"toy/train/{CLASSES[0]}/link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        _member(tar, f"toy/train/{CLASSES[0]}/hard.png", type=tarfile.LNKTYPE, linkname="/etc/shadow")
        _member(tar, f"toy/train/{CLASSES[0]}/dev.png", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        _member(tar, f"toy/train/{CLASSES[0]}/huge.png", bytes(2 * 2**20))   # over the (patched) 1 MB
    before = {p for p in tmp_path.rglob("*")}
    a = load_arrays(str(tgz))
    assert len(a.train_y) == 4 and len(a.test_y) == 2                 # only the tree's own images
    err = notices()
    assert "skipped 6 files" in err and "'..' in its path" in err and "absolute path" in err and "a link" in err
    assert "huge.png (over 1 MB)" in err
    assert {p for p in tmp_path.rglob("*")} == before                  # nothing extracted anywhere
    assert not Path("/tmp/abs").exists() and not (tmp_path / "evil.png").exists()


def test_archive_that_expands_past_the_cap_stops_with_one_line_naming_the_cap(tmp_path, monkeypatch):
    tgz = tmp_path / "bomb.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        _member(tar, "bomb/train/cat/zeros.png", bytes(64 * 2**20))    # 64 MiB of zeros
    assert tgz.stat().st_size < 2**20                                  # from a file under 1 MiB
    monkeypatch.setenv("CIFARKIT_MAX_ARCHIVE_GB", "0.01")
    with pytest.raises(CifarkitError, match=r"expands to more than 0.01 GiB.*CIFARKIT_MAX_ARCHIVE_GB=N") as info:
        load_arrays(str(tgz))
    assert "\n" not in str(info.value)
    monkeypatch.setenv("CIFARKIT_MAX_ARCHIVE_GB", "lots")
    with pytest.raises(CifarkitError, match="not a number of GiB"):
        load_arrays(str(tgz))
    monkeypatch.delenv("CIFARKIT_MAX_ARCHIVE_GB")
    from cifarkit.data.sources import max_archive_bytes
    assert max_archive_bytes() == 4 * 2**30


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_python_batch_that_would_run_code_is_refused_not_run(tmp_path):
    tgz = _python_tarball(tmp_path / "cifar-10-python.tar.gz")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(tgz) as src, tarfile.open(evil, "w:gz") as dst:
        for m in src:
            raw = src.extractfile(m).read()
            if m.name.endswith("data_batch_1"):
                raw = pickle.dumps({"data": _RunsCode(marker), "labels": []})
            _member(dst, m.name, raw)
    with pytest.raises(CifarkitError, match=r"data_batch_1 in .* is not a CIFAR python batch \(it would call .*system\)"):
        load_arrays(str(evil))
    assert not marker.exists()


def test_a_refused_source_leaves_the_existing_good_cache_in_place(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "toy", n_train=2, n_test=1, classes=CLASSES[:2])
    tgz = tmp_path / "kept.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname="toy")
    good = load_arrays(str(tgz))
    cached = {p: p.read_bytes() for p in cache_dir().iterdir()}
    assert len([p for p in cached if p.name.startswith("kept.tar.gz-")]) == 1
    with tarfile.open(tgz, "w:gz") as tar:                             # the same path, now hostile
        _member(tar, "toy/train/cat/zeros.png", bytes(32 * 2**20))
    os.utime(tgz, (time.time() + 10, time.time() + 10))
    monkeypatch.setenv("CIFARKIT_MAX_ARCHIVE_GB", "0.01")
    with pytest.raises(CifarkitError, match="CIFARKIT_MAX_ARCHIVE_GB"):
        load_arrays(str(tgz))
    assert {p: p.read_bytes() for p in cache_dir().iterdir()} == cached  # nothing lost, nothing half-written
    assert len(good.train_y) == 4
