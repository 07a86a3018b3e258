"""A console a person can read: cifarkit's own start and end blocks, nobody else shouting."""
from __future__ import annotations

import logging

import pytest
from PIL import Image

from conftest import cifarkit

NOISE = ("Tip", "deprecated", "Warning", "will be deleted", "Traceback", "GPU available", "💡")


def assert_quiet(out: str) -> None:
    for word in NOISE:
        assert word not in out, f"{word!r} reached the console:\n{out[-3000:]}"


@pytest.mark.slow
def test_train_says_what_it_will_do_and_what_it_did_and_nothing_else(tiny_training):
    """The session's tiny training, run as a person runs it (conftest.tiny_training)."""
    run, out, err = tiny_training
    assert_quiet(out + err)
    start = [line for line in err.splitlines() if not line.startswith("decoded ")]  # a first decode says so
    assert start[0] == f"training {run} (preset quick, seed 0)"
    for label in ("data      CIFAR-10, JPEG-q75 copy: 1,000 training images, 500 held out", "model     fast: ",
                  "machine   cpu x1", "schedule  1 epoch of 10 steps of 100 images"):
        assert any(label in line for line in start), label
    assert out.splitlines()[0].startswith("test accuracy: ") and f"run directory: {run}" in out
    assert "report:" not in out and f"cifarkit app {run}" in out          # --no-report: no report line


@pytest.mark.slow
def test_quiet_prints_only_the_end_block(tmp_path, image_folder):
    """--quiet on a first run over a new source (its decode included): the end block, nothing else."""
    run = tmp_path / "run"
    code, out, err = cifarkit("train", "--preset", "quick", "--data", str(image_folder), "--batch-size", "16",
                              "--val-size", "0", "--epochs", "1", "--tta", "0", "--no-report", "--quiet",
                              "--out", str(run))
    assert code == 0 and err == "", err[-3000:]
    assert out.splitlines()[0].startswith("test accuracy: ") and "training " not in out


@pytest.mark.slow
def test_report_predict_with_a_huge_image_and_export_are_quiet(tiny_report, tmp_path):
    """The session's report of the tiny run (conftest.tiny_report), then predict and export on it."""
    run, out, err = tiny_report
    assert out.strip() == f"report: {run / 'report' / 'index.html'}", err[-3000:]
    assert_quiet(out + err)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(photos / "red.png")
    Image.new("L", (10_000, 10_000)).save(photos / "huge.png", compress_level=1)
    code, out, err = cifarkit("predict", str(run), str(photos))
    assert code == 0 and "red.png" in out and "huge.png is 10000x10000: over the" in err
    assert_quiet(out + err)
    code, out, err = cifarkit("export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert code == 0 and "exported onnx" in out, err[-3000:]
    assert_quiet(out + err)


def test_a_command_puts_every_logger_and_filter_back(capsys):
    import warnings

    from cifarkit.cli import main
    from cifarkit.console import THIRD_PARTY, bars_on
    before = ({n: logging.getLogger(n).level for n in (*THIRD_PARTY, "cifarkit")}, list(warnings.filters),
              list(logging.getLogger("cifarkit").handlers))
    assert main(["summary", "--list"]) == 0 and main(["summary", "--model", "nope"]) == 2
    after = ({n: logging.getLogger(n).level for n in (*THIRD_PARTY, "cifarkit")}, list(warnings.filters),
             list(logging.getLogger("cifarkit").handlers))
    assert after == before and not bars_on()
    assert "unknown model 'nope'" in capsys.readouterr().err
