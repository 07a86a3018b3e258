import torch
import torch.nn.functional as F

from cifarkit.data.augment import Augment

MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.25, 0.25]


def _batch(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 32, 32, 3), dtype=torch.uint8, generator=g)


def test_output_is_normalized_float_nchw_channels_last_and_labels_stay_aligned():
    aug = Augment(MEAN, STD, flip="random", pad=4, pad_mode="mean", cutout=(8, 16), cutout_holes=(1, 2))
    x = _batch()
    out = aug(x, torch.arange(16))
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    # no translation, no flip, no cutout: image i stays image i, normalized per channel
    plain = Augment(MEAN, STD, flip="none")(x, torch.arange(16))
    expected = (x.float() / 255 - torch.tensor(MEAN)) / torch.tensor(STD)       # (B, H, W, 3)
    assert torch.allclose(plain, expected.permute(0, 3, 1, 2), atol=1e-6)


def test_flip_of_a_flip_is_the_identity():
    aug = Augment(MEAN, STD, flip="random")
    x = _batch()
    all_ = torch.ones(16, dtype=torch.bool)
    once = aug.crop_flip(x, all_)
    assert torch.equal(once, x.flip(2))
    assert torch.equal(aug.crop_flip(once, all_), x)


def test_reflect_translation_matches_padding_then_cropping():
    torch.manual_seed(1)
    aug = Augment(MEAN, STD, pad=2, pad_mode="reflect")
    x = _batch(8)
    out = aug.crop_flip(x, torch.zeros(8, dtype=torch.bool))
    padded = F.pad(x.permute(0, 3, 1, 2).float(), (2, 2, 2, 2), mode="reflect").permute(0, 2, 3, 1)
    for i in range(8):  # every output is one of the 25 crops of the reflect-padded image
        crops = [padded[i, dy:dy + 32, dx:dx + 32] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i].float(), c) for c in crops)


def test_mean_padding_fills_the_border_with_the_mean_colour():
    torch.manual_seed(0)
    aug = Augment(MEAN, STD, pad=4, pad_mode="mean")
    x = torch.zeros(64, 32, 32, 3, dtype=torch.uint8)  # black: any non-black pixel is fill
    out = aug.crop_flip(x, torch.zeros(64, dtype=torch.bool))
    filled = (out != 0).any(-1)
    assert filled.any()
    assert torch.equal(out[filled][0], aug.fill)


def test_cutout_holes_have_the_requested_size():
    torch.manual_seed(0)
    aug = Augment(MEAN, STD, flip="none", cutout=8, cutout_holes=1, cutout_p=1.0)
    x = torch.zeros(32, 32, 32, 3, dtype=torch.uint8)
    out = aug.cut(x)
    holes = (out != 0).any(-1)                     # (B, H, W)
    assert (holes.sum((1, 2)) == 64).all()        # one 8x8 hole per image, fully inside
    rows, cols = holes.any(2).sum(1), holes.any(1).sum(1)
    assert (rows == 8).all() and (cols == 8).all()


def test_cutout_probability_zero_changes_nothing_and_size_range_is_respected():
    torch.manual_seed(0)
    x = torch.zeros(64, 32, 32, 3, dtype=torch.uint8)
    assert torch.equal(Augment(MEAN, STD, cutout=8, cutout_p=0.0).cut(x), x)
    out = Augment(MEAN, STD, cutout=(8, 16), cutout_holes=(1, 1)).cut(x)
    area = (out != 0).any(-1).sum((1, 2))
    assert (area >= 64).all() and (area <= 256).all()


def test_alternating_flip_flips_each_image_every_other_epoch():
    aug = Augment(MEAN, STD, flip="alternate")
    idx = torch.arange(1000)
    e0, e1, e2 = (aug.flips_for(idx, e) for e in range(3))
    assert torch.equal(e0, ~e1) and torch.equal(e0, e2)
    assert 0.4 < e0.float().mean() < 0.6


def test_albumentations_pipeline_is_the_seeds_and_keeps_uint8():
    import numpy as np
    aug = Augment(MEAN, STD, flip="none", pad=4, pad_mode="mean", cutout=(8, 16), cutout_holes=(1, 2),
                  cutout_p=0.8, pipeline="albumentations")
    pipe = aug.per_sample()
    names = [type(t).__name__ for t in pipe.transforms]
    assert names == ["PadIfNeeded", "RandomCrop", "CoarseDropout"]
    out = pipe(image=np.zeros((32, 32, 3), np.uint8))["image"]
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def test_batched_seed_augmentation_has_the_albumentations_pipelines_statistics():
    """The seed preset's batched augmentation paints as much of an image, where it does, as the
    seed's per-sample Albumentations pipeline (pad 4 + crop, 1-2 cutout holes of 8-16 px, p 0.8)."""
    import numpy as np
    cfg = dict(flip="none", pad=4, pad_mode="mean", cutout=(8, 16), cutout_holes=(1, 2), cutout_p=0.8)
    n = 3000
    white = torch.full((n, 32, 32, 3), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    batched = Augment(MEAN, STD, **cfg)
    painted_b = (batched.cut(batched.crop_flip(white, torch.zeros(n, dtype=torch.bool))) != 255).any(-1)
    pipe = Augment(MEAN, STD, pipeline="albumentations", **cfg).per_sample()
    pipe.set_random_seed(0)  # Albumentations 2 draws from its own generator, seeded from the OS unless set
    painted_a = torch.from_numpy(np.stack([pipe(image=img)["image"] for img in white[:n].numpy()]) != 255).any(-1)
    frac_b, frac_a = painted_b.float().mean((1, 2)), painted_a.float().mean((1, 2))   # (n,) per image
    assert 0.1 < frac_a.mean() < 0.5                                   # something is painted, not all
    assert abs(frac_b.mean() - frac_a.mean()) < 0.015
    for q in (0.1, 0.5, 0.9):
        assert abs(frac_b.quantile(q) - frac_a.quantile(q)) < 0.03, q
    untouched_b, untouched_a = (frac_b == 0).float().mean(), (frac_a == 0).float().mean()
    assert abs(untouched_b - untouched_a) < 0.03                       # no shift and no hole: as often
    # where: the same share of paint in each image row and column
    for dim in (1, 2):
        assert (painted_b.float().mean((0, dim)) - painted_a.float().mean((0, dim))).abs().max() < 0.03


def test_low_res_epochs_show_the_whole_image_smaller_then_full_size():
    aug = Augment(MEAN, STD, flip="none", pad=0, low_res=16, low_res_epochs=1)
    x = torch.zeros(4, 32, 32, 3, dtype=torch.uint8)
    x[:, :, 16:] = 255                                   # right half white
    out = aug(x, torch.arange(4), epoch=0)
    assert out.shape == (4, 3, 16, 16)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out[..., :8] < 0).all() and (out[..., 8:] > 0).all()  # still half and half: nothing cut off
    assert aug(x, torch.arange(4), epoch=1).shape == (4, 3, 32, 32)
