import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarkit import CifarkitError
from cifarkit.cli import main
from cifarkit.report.report import write_report

FIGURES = ["curves.png", "lr.png", "confusion.png", "misclassified.png", "gradcam.png", "gradcam_correct.png",
           "calibration.png", "label_issues.png", "robustness.png"]


def _not_blank(path: Path):
    with Image.open(path) as im:
        a = np.asarray(im.convert("L"), dtype=np.float32)
    assert a.shape[0] > 100 and a.shape[1] > 100 and a.std() > 10, path.name


@pytest.fixture(scope="module")
def report(reported_run):
    return reported_run / "report"


def test_every_figure_exists_opens_and_is_not_blank(report):
    for name in FIGURES:
        _not_blank(report / name)


def test_index_references_only_files_that_exist_and_holds_the_numbers(report, tiny_run):
    page = (report / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert set(FIGURES) <= set(refs)
    assert all((report / r).is_file() for r in refs)
    assert "test_acc" in page and "Per-class" in page and "<script" not in page
    summary = (report / "summary.md").read_text()
    assert "test_acc" in summary and "automobile" in summary
    assert "label_issues.csv" in refs                                  # the CSV is linked from the page
    for text in (page, summary):
        assert "ECE after" in text and "NLL before" in text and "severity 5" in text and "gaussian_blur" in text


def test_report_records_mean_corruption_accuracy_and_flags_label_issues(report, tiny_run):
    import csv
    res = json.loads((tiny_run / "results.json").read_text())
    import torch
    assert res["corruption_images"] == (10_000 if torch.cuda.is_available() else 1000)  # a subsample on a CPU
    assert 0 <= res["mean_corruption_accuracy"] <= 1
    assert "| all corruptions |" in (report / "summary.md").read_text()
    assert f"{res['mean_corruption_accuracy']:.1%} |" in (report / "summary.md").read_text()
    rows = list(csv.DictReader(open(report / "label_issues.csv", newline="")))
    assert rows and all(r["given_label"] != r["suggested_label"] for r in rows)
    flagged = [int(r["index"]) for r in rows if r["flagged"] == "1"]  # test-set indices, likeliest first
    assert 0 < len(flagged) <= 20 and [r["flagged"] for r in rows[:len(flagged)]] == ["1"] * len(flagged)
    with np.load(tiny_run / "gallery.npz") as g:                      # the app's filter reads these flags
        shown, flags, rank = g["index"], g["label_issue"], g["label_issue_rank"]
    assert set(shown[flags].tolist()) == set(flagged)                 # every flagged image is in the gallery
    assert all(flagged[r] == i for i, r in zip(shown[flags], rank[flags]))  # with its place in the ranking
    page = (report / "index.html").read_text()
    assert "real label errors, measured on CIFAR-10&#x27;s human-verified list" in page


def test_a_run_too_small_to_calibrate_gets_one_line_and_every_other_part(toy_run, tmp_path):
    run = tmp_path / "toy"
    shutil.copytree(toy_run, run, ignore=shutil.ignore_patterns("report", "checkpoints"))
    out = write_report(run, n=4)
    page = (out / "index.html").read_text()
    assert "calibration: fitting a temperature needs at least 100 held-out samples, got 20" in page
    for name in ("calibration.png", "confusion.png", "label_issues.png", "robustness.png", "curves.png"):
        _not_blank(out / name)
    assert "ECE before" in page and "ECE after" not in page             # a diagram without the 'after' column
    assert str(tmp_path) not in page


def test_mean_corruption_accuracy_falls_with_severity_on_a_trained_run(toy_run, tmp_path):
    from cifarkit.trust import robustness
    from cifarkit.trust.analysis import load_test_split
    from cifarkit.weights import load
    model = load(toy_run)
    images, labels = load_test_split(toy_run)
    r = robustness.evaluate(model.probabilities, images, labels, severities=(0, 1, 2, 3, 4, 5))
    assert r.clean_accuracy == 1.0 and r.at("jpeg", 0) == 1.0       # learned; severity 0 changes nothing
    by_severity = r.accuracy.mean(0)                                  # mean over the six corruptions
    assert np.all(np.diff(by_severity) <= 0) and by_severity[-1] < by_severity[0] - 0.05, by_severity


def test_run_without_weights_still_gets_its_curves(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("model.safetensors", "report", "checkpoints"))
    out = write_report(run)
    assert (out / "curves.png").is_file() and not (out / "confusion.png").exists()
    page = (out / "index.html").read_text()
    assert "has no model.safetensors" in page and str(tmp_path) not in page


def test_run_without_metrics_still_gets_predictions(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("metrics.csv", "report", "checkpoints"))
    out = write_report(run, n=3, corruption_images=100)
    assert (out / "confusion.png").is_file() and not (out / "curves.png").exists()
    assert "metrics.csv" in (out / "index.html").read_text()


@pytest.mark.slow
def test_more_mistakes_asked_than_made_is_noted(image_folder, tmp_path):
    run = tmp_path / "toy-run"
    assert main(["train", "--data", str(image_folder), "--model", "custom_resnet", "--epochs", "1",
                 "--batch-size", "16", "--val-size", "0", "--lr", "0.05", "--out", str(run), "--no-report"]) == 0
    out = write_report(run, n=40)                       # 16 test images: at most 16 mistakes, however trained
    page = (out / "index.html").read_text()
    assert "made only" in page and (out / "confusion.png").is_file()


def test_report_rejects_bad_arguments(tiny_run, tmp_path):
    with pytest.raises(CifarkitError, match="scorecam"):
        write_report(tiny_run, method="nope", out=tmp_path / "x")
    with pytest.raises(CifarkitError, match="between 1 and 100"):
        write_report(tiny_run, n=0, out=tmp_path / "x")
    with pytest.raises(CifarkitError, match="not a directory"):
        write_report(tmp_path / "missing")


def test_gradcam_command_writes_overlays_and_skips_bad_images(tiny_run, tmp_path, capsys):
    good = tmp_path / "plane.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 4), dtype=np.uint8), "RGBA").save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(good.read_bytes()[:60])
    out = tmp_path / "cams"
    assert main(["gradcam", str(tiny_run), str(good), str(bad), "--layer", "block2", "--method", "gradcam++",
                 "--alpha", "0.4", "--out", str(out)]) == 0
    files = list(out.glob("*.png"))
    assert [f.name for f in files] == ["plane-block2-gradcam++.png"]
    assert Image.open(files[0]).size == (128, 128)
    assert "broken.png" in capsys.readouterr().err
    assert main(["gradcam", str(tiny_run), str(good), "--layer", "layer9"]) == 2
    assert "block1, block2, block3" in capsys.readouterr().err
