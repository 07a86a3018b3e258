"""Calibration, label issues and robustness: synthetic data with a known answer, checked against it."""
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from cifarkit import calibration as cal
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
    assert cal.fit_temperature(z, labels) == cal.fit_temperature(z, labels)  # deterministic


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
