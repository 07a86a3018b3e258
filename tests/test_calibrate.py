"""Calibrated probabilities on every path: T in the weights' metadata, fitted on held-out images only."""
import json
import shutil

import numpy as np
import pytest
import torch
import yaml

from cifarkit.trust.calibration import calibrate_run
from cifarkit.cli import main
from cifarkit.errors import CifarkitError
from cifarkit.models import build_model
from cifarkit.weights import load, save_weights, update_metadata


def _weights(path):
    torch.manual_seed(0)
    save_weights(build_model("custom_resnet", 10), path, "custom_resnet", [f"c{i}" for i in range(10)],
                 [0.5] * 3, [0.25] * 3)
    return path


def _images(n=8):
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_weights_without_a_temperature_load_with_t_1(tmp_path):
    m = load(_weights(tmp_path / "old.safetensors"))
    assert "temperature" not in m.meta and m.temperature == 1.0
    assert torch.allclose(m.probabilities(_images()), torch.softmax(m.logits(_images()), 1))


def test_probabilities_are_the_logits_divided_by_the_stored_temperature(tmp_path):
    path = _weights(tmp_path / "w.safetensors")
    raw = load(path)
    update_metadata(path, temperature=2.5, calibration_fitted_on="validation split (500 images)")
    cal = load(path)
    assert cal.temperature == 2.5 and cal.meta["calibration_fitted_on"] == "validation split (500 images)"
    x = _images()
    assert torch.equal(cal.logits(x), raw.logits(x))                   # same tensors after the rewrite
    log_raw, log_cal = raw.probabilities(x).log(), cal.probabilities(x).log()
    centred = lambda lp: lp - lp.mean(1, keepdim=True)  # noqa: E731  log-probabilities up to a per-row shift
    assert (log_raw.std(1) > 0.05).all()                                # a spread to scale, not a uniform guess
    assert torch.allclose(centred(log_cal) * 2.5, centred(log_raw), atol=1e-4)
    assert torch.equal(cal.probabilities(x).argmax(1), raw.probabilities(x).argmax(1))
    assert not list(tmp_path.glob("*.tmp"))                              # replaced in one rename


# -- runs ------------------------------------------------------------------------------------------

def test_training_ends_calibrated_on_its_validation_split_and_calibrate_repeats_it(tiny_run, capsys):
    res = json.loads((tiny_run / "results.json").read_text())
    model = load(tiny_run)
    assert res["calibration_fitted_on"] == "validation split (500 images)"
    assert model.temperature == res["temperature"] != 1.0 and model.meta["calibration_fitted_on"] == \
        res["calibration_fitted_on"]
    assert all(isinstance(res[k], float) for k in ("ece_before", "ece_after", "nll_before", "nll_after"))
    assert res["nll_after"] <= res["nll_before"] + 0.01   # fitted on other images, so not strictly lower
    assert main(["calibrate", str(tiny_run)]) == 0        # fits on raw logits: the same T, not T squared
    assert "temperature" in capsys.readouterr().out
    assert load(tiny_run).temperature == pytest.approx(res["temperature"], rel=1e-6)
    per_class = json.loads((tiny_run / "results.json").read_text())["per_class"]["classes"]
    assert len(per_class) == 10 and all(c["images"] == 1000 and c["recall"]["low"] is not None
                                        for c in per_class.values())


def test_a_run_without_validation_split_is_calibrated_on_training_images_and_says_so(toy_run, tmp_path):
    run = tmp_path / "no-val"
    shutil.copytree(toy_run, run, ignore=shutil.ignore_patterns("report", "checkpoints"))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "val_size": 0}))
    report = calibrate_run(run)
    assert "training" in report.fitted_on and "180" in report.fitted_on
    assert load(run).meta["calibration_fitted_on"] == report.fitted_on
    assert json.loads((run / "results.json").read_text())["temperature"] == report.temperature


def test_too_few_held_out_images_is_one_line_and_the_run_still_finishes(toy_run):
    res = json.loads((toy_run / "results.json").read_text())      # fit printed a notice and went on
    assert res["test_acc"] is not None and res.get("temperature") is None
    assert load(toy_run).temperature == 1.0
    with pytest.raises(CifarkitError) as e:
        calibrate_run(toy_run)
    assert "\n" not in str(e.value) and "at least 100" in str(e.value) and "got 20" in str(e.value)
