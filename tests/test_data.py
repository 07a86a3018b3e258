import io
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from cifarkit import CifarkitError
from cifarkit.cli import main
from cifarkit.data import CIFARDataModule, balanced_subset, epoch_order, split_train_val
from cifarkit.sources import cache_dir, load_arrays
from conftest import CLASSES, make_image_folder


def test_real_jpeg_copy_loads_with_the_right_counts_and_class_order(cifar_path):
    a = load_arrays(str(cifar_path))
    assert a.train_x.shape == (50_000, 32, 32, 3) and a.train_x.dtype == np.uint8
    assert a.test_x.shape == (10_000, 32, 32, 3)
    assert a.classes == CLASSES
    assert np.bincount(a.train_y).tolist() == [5000] * 10
    assert np.bincount(a.test_y).tolist() == [1000] * 10
    # the copy's README: per-channel train mean (0.4913, 0.4821, 0.4465)
    assert np.allclose(a.train_x.reshape(-1, 3).mean(0) / 255, [0.4913, 0.4821, 0.4465], atol=2e-3)


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


def test_image_folder_of_another_size_is_resized_with_a_notice(tmp_path, capsys):
    root = make_image_folder(tmp_path / "big", n_train=3, n_test=2, size=48)
    a = load_arrays(str(root))
    assert a.train_x.shape == (12, 32, 32, 3)
    assert "resized" in capsys.readouterr().err


def test_image_folder_tarball_loads(image_folder_tgz):
    a = load_arrays(str(image_folder_tgz))
    assert a.classes == CLASSES[:4] and len(a.train_y) == 48 and len(a.test_y) == 16


def test_truncated_archive_is_a_clear_error(tmp_path, cifar_path):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(cifar_path.read_bytes()[: 2_000_000])
    with pytest.raises(CifarkitError, match="truncated"):
        load_arrays(str(cut))


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


def test_corrupt_cache_is_detected_and_rebuilt(tmp_path, capsys):
    src = make_image_folder(tmp_path / "corrupt", n_train=3, n_test=1)
    fresh = load_arrays(str(src))
    file = _cache_file(src)
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)  # zeros over part of the image data
    file.write_bytes(bytes(raw))
    again = load_arrays(str(src))
    assert "data cache" in capsys.readouterr().err
    assert np.array_equal(again.train_x, fresh.train_x) and again.classes == fresh.classes
    assert np.array_equal(load_arrays(str(src)).train_x, fresh.train_x)  # the rebuilt cache is good


def test_stale_cache_is_detected_by_checksum_and_rebuilt(tmp_path, capsys):
    src = make_image_folder(tmp_path / "stale", n_train=3, n_test=1)
    fresh = load_arrays(str(src))
    file = _cache_file(src)
    with np.load(file) as z:
        parts = dict(z)
    parts["train_x"] = parts["train_x"][::-1].copy()  # a well-formed file whose arrays changed
    np.savez(file, **parts)
    assert np.array_equal(load_arrays(str(src)).train_x, fresh.train_x)
    assert "checksum mismatch" in capsys.readouterr().err
    del parts["version"]  # a cache from before checksums
    np.savez(file, **parts)
    assert np.array_equal(load_arrays(str(src)).train_x, fresh.train_x)
    assert "older cifarkit" in capsys.readouterr().err


def test_wrong_archive_is_a_clear_one_line_error(tmp_path, capsys):
    png = tmp_path / "cat.tar.gz"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    code = main(["train", "--data", str(png), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "cannot read archive" in err[0] and "not a .tar.gz" in err[0]
    assert not (tmp_path / "r").exists()
