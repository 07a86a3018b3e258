"""Calibration, label issues and robustness: synthetic data with a known answer, checked against it."""
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from cifarkit.trust import calibration as cal
from cifarkit.trust import label_issues as li
from cifarkit.trust import robustness as rob
from cifarkit.data.datamodule import out_of_fold_splits
from cifarkit.errors import CifarkitError


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _sample(probs, rng):
    """One label per row drawn from that row's distribution."""
    return (rng.random((len(probs), 1)) > probs.cumsum(1)).sum(1).clip(0, probs.shape[1] - 1)


def _logits(n=20000, k=10, scale=3.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(0, scale, (n, k)), rng


def _one_line(exc_info):
    msg = str(exc_info.value)
    assert msg and "\n" not in msg
    return msg


# -- calibration ------------------------------------------------------------------------------------

def test_ece_is_near_zero_when_labels_follow_the_predicted_probabilities():
    z, rng = _logits()
    probs = _softmax(z)
    labels = _sample(probs, rng)  # calibrated by construction: P(label = k) = p_k
    assert cal.ece(probs, labels) < 0.015


def test_ece_is_large_for_an_overconfident_predictor():
    z, rng = _logits()
    labels = _sample(_softmax(z), rng)
    overconfident = _softmax(3 * z)  # same ranking, three times the logit scale
    assert cal.ece(overconfident, labels) > 0.1
    assert cal.ece(overconfident, labels) > 5 * cal.ece(_softmax(z), labels)


def test_reliability_bins_count_every_sample_once_and_average_inside_their_edges():
    z, rng = _logits(n=3001)
    probs = _softmax(z)
    r = cal.reliability(probs, _sample(probs, rng), bins=15)
    assert r.count.sum() == 3001 and len(r.count) == 15 and len(r.edges) == 16
    used = r.count > 0
    assert np.all(r.confidence[used] > r.edges[:-1][used]) and np.all(r.confidence[used] <= r.edges[1:][used])
    assert np.all(np.isnan(r.accuracy[~used]))


def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with():
    z, rng = _logits()
    for t0 in (0.5, 2.0):
        labels = _sample(_softmax(z / t0), rng)
        assert cal.fit_temperature(z, labels) == pytest.approx(t0, rel=0.05)
    # the fitted temperature is the one of least NLL: no temperature on a fine grid does better
    t, grid = cal.fit_temperature(z, labels), np.geomspace(0.25, 8, 301)       # steps of 1.2%
    best = grid[np.argmin([cal.nll(z / g, labels) for g in grid])]
    assert t == pytest.approx(best, rel=0.015) and cal.nll(z / t, labels) <= cal.nll(z / best, labels) + 1e-6


def test_temperature_fitted_on_one_half_lowers_nll_on_the_other_and_keeps_every_prediction():
    z, rng = _logits()
    labels = _sample(_softmax(z / 2.5), rng)  # the raw logits are overconfident
    t = cal.fit_temperature(z[:10000], labels[:10000])
    held, y = z[10000:], labels[10000:]
    assert cal.nll(held / t, y) < cal.nll(held, y) - 0.05
    assert cal.nll(cal.apply_temperature(held, t), y) == pytest.approx(cal.nll(held / t, y), abs=1e-6)
    for temp in (0.1, t, 7.0):
        assert np.array_equal(cal.apply_temperature(held, temp).argmax(1), held.argmax(1))
    report = cal.calibrate(z[:10000], labels[:10000], held, y, "validation split")
    assert report.temperature == t and report.n == 10000 and report.fitted_on == "validation split"
    assert report.nll_after < report.nll_before and report.ece_after < report.ece_before


def test_calibration_takes_torch_tensors_as_well_as_numpy():
    z, rng = _logits(n=500)
    labels = _sample(_softmax(z), rng)
    assert cal.ece(torch.from_numpy(_softmax(z)), torch.from_numpy(labels)) == pytest.approx(
        cal.ece(_softmax(z), labels))
    assert cal.fit_temperature(torch.from_numpy(z).float(), torch.from_numpy(labels)) == pytest.approx(
        cal.fit_temperature(z.astype(np.float32), labels))
    assert cal.nll(_softmax(z), labels) == pytest.approx(cal.nll(z, labels), abs=1e-9)  # probs or logits


def test_fit_temperature_refuses_too_few_samples_and_nan_logits_in_one_line():
    z, rng = _logits(n=200)
    labels = rng.integers(0, 10, 200)
    with pytest.raises(CifarkitError) as e:
        cal.fit_temperature(z[:50], labels[:50])
    assert "at least 100" in _one_line(e)
    z[3, 2] = np.nan
    with pytest.raises(CifarkitError) as e:
        cal.fit_temperature(z, labels)
    assert "NaN" in _one_line(e)


# -- label issues -----------------------------------------------------------------------------------

def _noisy_set(n=4000, k=10, flip=0.05, seed=0):
    """Probabilities of a model 93% right on the true labels and about calibrated (mean confidence
    0.92, like a trained CIFAR-10 net), then `flip` of the labels changed to another class."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    z = rng.normal(0, 1.0, (n, k))                                             # (n, k)
    z[np.arange(n), true] += 3.2
    z *= 3.0
    flipped = rng.choice(n, size=int(flip * n), replace=False)
    given = true.copy()
    given[flipped] = (true[flipped] + rng.integers(1, k, len(flipped))) % k  # always another class
    return _softmax(z), given, true, flipped


def test_label_issues_recover_labels_flipped_on_purpose():
    probs, given, true, flipped = _noisy_set()
    issues = li.find_label_issues(probs, given)
    found, truth = set(issues.indices.tolist()), set(flipped.tolist())
    precision, recall = len(found & truth) / len(found), len(found & truth) / len(truth)
    # measured, seed 0: precision 0.77, recall 0.84 (218 found, 200 flipped of 4,000); seeds 0-7:
    # precision 0.70-0.78, recall 0.75-0.84. The misses and false alarms are the model's own confident
    # mistakes (7% here), which no method working from its probabilities can tell from a bad label.
    assert precision >= 0.6 and recall >= 0.6, (precision, recall)
    hits = np.isin(issues.indices, flipped)
    assert (issues.suggested[hits] == true[issues.indices[hits]]).mean() > 0.9  # suggests the real class
    assert np.all(issues.given == given[issues.indices])
    assert np.all(np.diff(issues.margin) <= 0)  # most likely first
    assert hits[:50].mean() > precision  # the top of the ranking is cleaner than the whole list


def test_label_issues_follow_the_per_class_thresholds():
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])
    labels = np.array([0, 0, 1, 1, 0])
    issues = li.find_label_issues(probs, labels)
    # t_0 = mean(0.9, 0.7, 0.3) = 0.633, t_1 = mean(0.8, 0.6) = 0.7: only sample 4 is below t_0 with p_1 >= t_1
    assert np.allclose(issues.thresholds, [1.9 / 3, 0.7])
    assert issues.indices.tolist() == [4] and issues.suggested.tolist() == [1]
    assert issues.margin[0] == pytest.approx(0.4)


def test_label_issues_csv_round_trips(tmp_path):
    import csv
    probs, given, _, _ = _noisy_set(n=1000)
    issues = li.find_label_issues(probs, given)
    classes = [f"c{i}" for i in range(10)]
    li.to_csv(issues, classes, tmp_path / "issues.csv")
    rows = list(csv.DictReader(open(tmp_path / "issues.csv", newline="")))
    assert list(rows[0]) == list(li.CSV_COLUMNS) and len(rows) == len(issues)
    assert [int(r["index"]) for r in rows] == issues.indices.tolist()
    assert [classes.index(r["given_label"]) for r in rows] == issues.given.tolist()
    assert [classes.index(r["suggested_label"]) for r in rows] == issues.suggested.tolist()
    assert np.allclose([float(r["margin"]) for r in rows], issues.margin, atol=1e-4)
    buf = io.StringIO()
    li.to_csv(issues, classes, buf)
    assert buf.getvalue() == (tmp_path / "issues.csv").read_bytes().decode()


def test_out_of_fold_splits_hold_every_index_out_once_and_refuse_one_fold():
    splits = out_of_fold_splits(103, 5, seed=1)
    held = np.concatenate([h for _, h in splits])
    assert len(splits) == 5 and sorted(held.tolist()) == list(range(103))
    for train, h in splits:
        assert not set(train) & set(h) and len(train) + len(h) == 103
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, out_of_fold_splits(103, 5, seed=1)))
    with pytest.raises(CifarkitError) as e:
        out_of_fold_splits(103, 1)
    assert "--folds must be at least 2" in _one_line(e)


# -- robustness -------------------------------------------------------------------------------------

def _images(n=64, seed=0):
    """Smooth colour fields plus a little noise: photo-like, so pixelation grows with severity as on
    CIFAR-10 (pure per-pixel noise would make any resampling equally far)."""
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.uniform(30, 225, (n, 3, 6, 6))).float()                     # (n, 3, 6, 6)
    up = torch.nn.functional.interpolate(base, size=32, mode="bicubic").permute(0, 2, 3, 1)  # (n, 32, 32, 3)
    return np.clip(up.numpy() + rng.normal(0, 4, up.shape), 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("name", rob.CORRUPTIONS)
def test_each_corruption_is_identity_at_0_grows_with_severity_and_repeats_with_its_seed(name):
    x = _images()
    same = rob.corrupt(x, name, 0)
    assert np.array_equal(same, x) and same is not x
    dist = []
    for s in range(1, 6):
        y = rob.corrupt(x, name, s, seed=3)
        assert y.dtype == np.uint8 and y.shape == x.shape
        assert np.array_equal(y, rob.corrupt(x, name, s, seed=3))
        dist.append(np.abs(y.astype(int) - x).mean())
    assert min(dist) > 0 and dist[4] > dist[0], dist
    if name == "gaussian_noise":
        assert not np.array_equal(rob.corrupt(x, name, 3, seed=3), rob.corrupt(x, name, 3, seed=4))


def test_corrupt_leaves_the_global_random_state_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    rob.corrupt(_images(4), "gaussian_noise", 5)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_corruption_or_severity_is_one_line_listing_the_choices():
    with pytest.raises(CifarkitError) as e:
        rob.corrupt(_images(2), "snow", 1)
    assert "gaussian_noise" in _one_line(e) and "pixelate" in str(e.value)
    for bad in (6, -1, 2.5, "3"):
        with pytest.raises(CifarkitError) as e:
            rob.corrupt(_images(2), "jpeg", bad)
        assert "0" in _one_line(e) and "5" in str(e.value)
    with pytest.raises(CifarkitError):
        rob.evaluate(lambda im: np.zeros(len(im)), _images(2), np.zeros(2), severities=(1, 9))


def _brightness_classifier(images):
    """Three classes by mean brightness; returns probabilities (B, 3)."""
    m = images.reshape(len(images), -1).mean(1)
    return np.eye(3)[np.digitize(m, [85, 170])]


def test_evaluate_measures_every_setting_on_one_seeded_subsample():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    images = np.clip(labels[:, None, None, None] * 85 + 42 + rng.integers(-20, 20, (300, 32, 32, 3)),
                     0, 255).astype(np.uint8)
    r = rob.evaluate(_brightness_classifier, images, labels, seed=0, n=200, batch_size=64)
    assert r.accuracy.shape == (6, 5) and r.n == 200 and r.clean_accuracy == 1.0
    assert r.at("brightness", 5) < r.at("brightness", 1) <= 1.0  # brighter images cross the class borders
    assert r.at("gaussian_blur", 3) == 1.0  # blur keeps the mean
    again = rob.evaluate(lambda im: _brightness_classifier(im).argmax(1), images, labels, seed=0, n=200)
    assert np.array_equal(again.accuracy, r.accuracy)  # class indices or probabilities alike
    rows = rob.table_rows(r)
    assert rows[0] == ["corruption", *[f"severity {s}" for s in range(1, 6)], "mean"]
    assert [row[0] for row in rows[1:-1]] == list(rob.CORRUPTIONS) and len(rows[-1]) == 7


# Flat grey images by level (a hand-computable case): blur, pixelation, contrast (toward the image's
# own grey), JPEG and zero-mean noise keep each mean within a few levels, so _brightness_classifier
# stays right; the brightness gains 1.1, 1.2, 1.3, 1.4, 1.6 push the levels marked * across 85 or 170.
GREYS = {  # level: wrong from severity (0: never)
    30: 0, 40: 0, 45: 0, 58: 5, 62: 4, 68: 3, 72: 2, 79: 1,       # class 0 (< 85); 79 x 1.1 = 86.9*
    95: 0, 100: 0, 102: 0, 118: 5, 125: 4, 135: 3, 150: 2,        # class 1; 150 x 1.2 = 180*
    180: 0, 200: 0, 210: 0, 240: 0, 250: 0,                       # class 2 (>= 170): brighter stays 2
}


def test_evaluate_matches_a_hand_computed_table_and_degrades_with_severity():
    levels = np.array(list(GREYS), dtype=np.uint8)
    images = np.broadcast_to(levels[:, None, None, None], (20, 32, 32, 3)).copy()
    labels = np.digitize(levels, [85, 170])
    r = rob.evaluate(_brightness_classifier, images, labels, batch_size=7)
    # brightness, severity s: wrong on the levels marked 1..s above: 1, 3, 5, 7, 9 of 20
    assert r.accuracy[rob.CORRUPTIONS.index("brightness")].tolist() == pytest.approx([0.95, 0.85, 0.75, 0.65, 0.55])
    others = [i for i, name in enumerate(rob.CORRUPTIONS) if name != "brightness"]
    assert np.all(r.accuracy[others] == 1.0), r.accuracy
    assert r.mean_corruption_accuracy == pytest.approx((25 * 1.0 + 5 * 0.75) / 30)  # 0.9583
    assert r.clean_accuracy == 1.0 and r.n == 20 and r.at("brightness", 4) == pytest.approx(0.65)
    assert rob.table_rows(r)[-1][-1] == "95.8%"


# -- figures ----------------------------------------------------------------------------------------

def _drawn(fig):
    assert isinstance(fig, Figure) and fig.axes
    fig.savefig(io.BytesIO(), format="png")  # renders without pyplot
    return fig


def test_every_figure_has_axes_with_data():
    z, rng = _logits(n=2000)
    labels = _sample(_softmax(z / 2), rng)
    fig = _drawn(cal.reliability_figure(_softmax(z), cal.apply_temperature(z, 2.0), labels))
    assert len(fig.axes) == 4 and all(ax.patches for ax in fig.axes)
    probs, given, _, _ = _noisy_set(n=500)
    issues = li.find_label_issues(probs, given)
    fig = _drawn(li.label_issues_figure(_images(500), issues, [str(i) for i in range(10)], n=10))
    assert sum(bool(ax.images) for ax in fig.axes) == 10
    assert fig.axes[0].get_title().startswith("given ")
    empty = li.find_label_issues(np.eye(3), np.arange(3))
    assert len(empty) == 0 and _drawn(li.label_issues_figure(_images(3), empty, ["a", "b", "c"])).axes[0].texts
    r = rob.RobustnessResult(rob.CORRUPTIONS, (1, 2, 3, 4, 5), rng.random((6, 5)), 0.9, 100, 0, 1.0)
    fig = _drawn(rob.robustness_figure(r))
    assert len(fig.axes[0].lines) == 6 + 2


def test_the_modules_leave_the_matplotlib_backend_alone():
    code = ("import cifarkit.trust.calibration, cifarkit.trust.label_issues, cifarkit.trust.robustness, sys; "
            "assert 'matplotlib.pyplot' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
