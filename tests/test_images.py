"""One image path: the dataset decoder and inference turn every odd kind of image into the same
32x32 RGB uint8 array, by stated rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cifarkit import CifarkitError
from cifarkit.images import MAX_PIXELS, rgb_array, rgb_batch
from cifarkit.data.sources import load_arrays
from cifarkit.weights import Loaded

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)


def _exif_rotated(path):
    """Left half red, right half blue, stored with EXIF orientation 6 (show rotated 90 degrees clockwise)."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20, 0] = 255
    a[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(path, exif=exif, quality=95)


def _animated(path):
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)


ODD = {  # name -> writer
    "rgba.png": lambda p: Image.fromarray(np.dstack([RGB, RNG.integers(0, 256, (40, 48), dtype=np.uint8)])).save(p),
    "la.png": lambda p: Image.fromarray(np.dstack([RGB[..., 0], RGB[..., 1]]), "LA").save(p),
    "palette-transparent.gif": lambda p: Image.fromarray(RGB).convert("P").save(p, transparency=0),
    "palette.png": lambda p: Image.fromarray(RGB).convert("P").save(p),
    "gray.png": lambda p: Image.fromarray(RGB[..., 0]).save(p),
    "bilevel.png": lambda p: Image.fromarray(RGB[..., 0] > 127).save(p),
    "sixteen.png": lambda p: Image.fromarray(RNG.integers(0, 65536, (30, 30)).astype(np.uint16)).save(p),
    "int32.tif": lambda p: Image.fromarray(RNG.integers(0, 65536, (30, 30)).astype(np.int32), "I").save(p),
    "float.tif": lambda p: Image.fromarray(RNG.random((30, 30)).astype(np.float32), "F").save(p),
    "cmyk.jpg": lambda p: Image.fromarray(RGB).convert("CMYK").save(p),
    "animated.gif": _animated,
    "exif-rotated.jpg": _exif_rotated,
    "large.jpg": lambda p: Image.fromarray(RNG.integers(0, 256, (900, 1200, 3), dtype=np.uint8)).save(p),
    "plain.png": lambda p: Image.fromarray(RGB[:32, :32]).save(p),
}


@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """An ImageFolder tree whose every training image is an odd kind (one class each, so the
    decoded array's row order is known), and their paths."""
    root = tmp_path_factory.mktemp("odd")
    paths = {}
    for i, (name, write) in enumerate(sorted(ODD.items())):
        for split in ("train", "test"):
            d = root / split / f"c{i:02d}"
            d.mkdir(parents=True)
            write(d / name)
        paths[name] = root / "train" / f"c{i:02d}" / name
    return root, paths


def test_each_odd_kind_decodes_identically_for_training_and_inference(odd_tree):
    root, paths = odd_tree
    arrays = load_arrays(str(root))                    # the training decoder
    loaded = Loaded(torch.nn.Identity(), arrays.classes, [0.5] * 3, [0.25] * 3, {})
    for row, name in enumerate(sorted(ODD)):
        served = rgb_array(paths[name])               # predict, gradcam, the app
        assert served.shape == (32, 32, 3) and served.dtype == np.uint8, name
        assert np.array_equal(arrays.train_x[row], served), name
        assert np.array_equal(rgb_array(Image.open(paths[name]), name), served), name  # a PIL image too
        assert torch.equal(loaded.preprocess([paths[name]]), loaded.normalize(arrays.train_x[row:row + 1])), name


def test_the_rules_alpha_on_white_16_bit_scaled_exif_applied_first_frame(tmp_path):
    clear = np.zeros((32, 32, 4), np.uint8)            # fully transparent black
    Image.fromarray(clear).save(tmp_path / "clear.png")
    assert (rgb_array(tmp_path / "clear.png") == 255).all()          # composited on white
    levels = np.full((32, 32), 65535, np.uint16)
    levels[16:] = 32896                                               # 128 x 257
    Image.fromarray(levels).save(tmp_path / "16.png")
    out = rgb_array(tmp_path / "16.png")
    assert (out[:16] == 255).all() and (out[16:] == 128).all()       # scaled, not clipped
    _exif_rotated(tmp_path / "rot.jpg")
    out = rgb_array(tmp_path / "rot.jpg").astype(int)
    assert out[:12, :, 0].mean() > 200 and out[20:, :, 2].mean() > 200  # red on top after the rotation
    _animated(tmp_path / "anim.gif")
    out = rgb_array(tmp_path / "anim.gif").astype(int)
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50      # the first frame


def test_over_the_pixel_limit_or_broken_is_one_line_naming_only_the_file(tmp_path):
    huge = tmp_path / "huge.png"
    Image.new("L", (8000, MAX_PIXELS // 8000 + 1)).save(huge, compress_level=1)
    with pytest.raises(CifarkitError, match="huge.png is 8000x5001: over the 40,000,000-pixel limit") as info:
        rgb_array(huge)
    assert str(tmp_path) not in str(info.value)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(CifarkitError, match="cannot read image broken.jpg") as info:
        rgb_array(broken)
    assert str(tmp_path) not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CifarkitError, match="cannot read image upload.png"):
        rgb_array(broken, name="upload.png")           # the app names the uploaded file by its own name


def test_a_file_of_unknown_format_is_named_by_its_own_name_never_its_folder(tmp_path):
    # Pillow's own message names the full path ("cannot identify image file '/tmp/gradio/...'"):
    # an app would show the server's temporary folders to whoever uploaded it
    text = tmp_path / "deep" / "folder" / "notes.png"
    text.parent.mkdir(parents=True)
    text.write_text("not an image")
    for name, expect in ((None, "notes.png"), ("cat.png", "cat.png")):
        with pytest.raises(CifarkitError) as info:
            rgb_array(text, name=name)
        assert str(info.value) == f"cannot read image {expect}: not a known image format"
    with pytest.raises(CifarkitError) as info:
        rgb_array(open(text, "rb"), name="cat.png")                # a file object: Pillow names its path too
    assert str(tmp_path) not in str(info.value) and "deep" not in str(info.value)


def test_a_batch_is_a_checked_array_or_a_list_converted(tmp_path):
    x = np.zeros((2, 32, 32, 3), np.uint8)
    assert rgb_batch(x) is x
    with pytest.raises(CifarkitError, match=r"expected uint8 images \(B, 32, 32, 3\)"):
        rgb_batch(x.astype(np.float32))
    Image.fromarray(RGB).save(tmp_path / "a.png")
    assert rgb_batch([tmp_path / "a.png", Image.open(tmp_path / "a.png")]).shape == (2, 32, 32, 3)
