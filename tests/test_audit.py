"""`cifarkit audit`: likely label errors in the training set from out-of-fold trainings."""
import csv
import json

import numpy as np
import yaml

from cifarkit.train.audit import audit
from cifarkit.cli import main
from cifarkit.data.sources import load_arrays
from conftest import FLIPPED


def test_one_fold_is_refused_in_one_line_before_any_training(tiny_run, tmp_path, capsys):
    for folds in ("1", "0"):
        assert main(["audit", str(tiny_run), "--folds", folds, "--out", str(tmp_path / "a")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--folds must be at least 2" in err[0]
    assert not (tmp_path / "a").exists()


def test_out_of_fold_audit_finds_the_training_labels_flipped_on_purpose(toy_run, tmp_path, capsys, notices):
    out = tmp_path / "audit"
    result = audit(toy_run, 2, out)
    err = notices()
    assert "2 trainings" in err and "GPU job" in err
    # every training image the run used is predicted once, by the fold model that did not train on it
    assert len(result.indices) == 160 and len(result.folds) == 2
    assert np.allclose(result.probs.sum(1), 1, atol=1e-4)
    held = []
    for k, fold in enumerate(result.folds):
        cfg = yaml.safe_load((fold / "config.yaml").read_text())
        assert cfg["holdout_fold"] == [k, 2] and cfg["epochs"] == 4
        held.append(160 - json.loads((fold / "results.json").read_text())["train_images"])
    assert sum(held) == 160
    # the flipped images are the ones whose grey level is not their label's (make_image_folder: 40 + 50 c)
    a = load_arrays(str(yaml.safe_load((toy_run / "config.yaml").read_text())["data"]), "folder")
    level = a.train_x[result.indices].reshape(len(result.indices), -1).mean(1)
    flipped = set(result.indices[np.abs(level - (40 + 50 * result.labels)) > 25].tolist())
    assert 1 <= len(flipped) <= len(FLIPPED)                     # some may sit in the 20 held-out images
    found = set(result.issues.indices.tolist())
    # measured: 3 of the 4 flipped images that were trained on found, no false alarm; the fourth was the
    # weaker fold model's (83% test accuracy) 60% automobile, below that class's own threshold of 65%
    assert len(found & flipped) >= len(flipped) - 1 and len(found - flipped) <= 1, (flipped, found)
    grey_class = dict(zip(result.indices.tolist(), np.rint((level - 40) / 50).astype(int).tolist()))
    for i, suggested in zip(result.issues.indices.tolist(), result.issues.suggested.tolist()):
        assert i not in flipped or suggested == grey_class[i]           # suggests the class the image shows
    rows = list(csv.DictReader(open(out / "label_issues_train.csv", newline="")))
    assert {int(r["index"]) for r in rows} == found
    assert (out / "label_issues_train.png").is_file()
    assert main(["audit", str(toy_run), "--folds", "2", "--out", str(out)]) == 0   # finished folds are reused
    assert capsys.readouterr().err.count("already trained") == 2
