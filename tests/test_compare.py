"""`cifarkit compare`: runs side by side, which differences are beyond chance, refused in one line
when they cannot be compared."""
import html
import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import CLASSES, make_image_folder
from cifarkit.cli import main
from cifarkit.models import build_model
from cifarkit.presets import TrainConfig
from cifarkit.report.compare import Comparison, compare, write_comparison
from cifarkit.rundir import RunDir
from cifarkit.weights import load, save_weights


def _not_blank(path):
    with Image.open(path) as im:
        assert np.asarray(im.convert("L"), dtype=np.float32).std() > 10, path.name


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()     # a first decode of the data prints a notice
    assert err[-1].startswith("cifarkit: error:") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_a_run_compared_with_itself_shows_no_differences(tiny_run, tmp_path):
    c = compare([tiny_run, tiny_run])
    assert c.names == ["tiny (1)", "tiny (2)"] and c.settings == []
    assert len(c.right_wrong(0, 1)) == 0 and len(c.right_wrong(1, 0)) == 0
    assert all(len(set(values)) == 1 for _, values in c.results)
    assert np.array_equal(c.per_class[0], c.per_class[1]) and c.probs.shape == (2, 10_000, 10)
    assert main(["compare", str(tiny_run), str(tiny_run), "--out", str(tmp_path / "cmp")]) == 0
    page = tmp_path / "cmp" / "index.html"
    text = page.read_text()
    assert "none: the runs were configured alike" in text and str(tiny_run.path.parent) not in text
    refs = re.findall(r'src="([^"]+)"', text)
    assert len(refs) == 4 and all((page.parent / r).is_file() for r in refs)
    _not_blank(page.parent / "curves.png")


def _other_run(tiny_run, tmp_path):
    """A copy of tiny_run with another seed and epoch count, a perturbed classifier and no metrics."""
    other = tmp_path / "other"
    shutil.copytree(tiny_run, other, ignore=shutil.ignore_patterns("report", "checkpoints", "metrics.csv"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    (other / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": 1, "epochs": 2.0}))
    m = load(other)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(torch.randn_like(p) * (p.abs().mean() + 1e-3) * 0.5)
    save_weights(m.net, other / "model.safetensors", m.meta["model"], m.classes, m.mean, m.std,
                 json.loads(m.meta["model_kwargs"]), extra={"temperature": m.temperature})
    return other


def test_two_runs_show_their_differing_settings_and_the_images_one_gets_right(tiny_run, tmp_path):
    other = _other_run(tiny_run, tmp_path)
    c = compare([tiny_run, other])
    assert set(dict(c.settings)) == {"seed", "epochs"} and dict(c.settings)["seed"] == ["0", "1"]
    for a, b in ((0, 1), (1, 0)):
        idx = c.right_wrong(a, b)
        assert len(idx) > 0
        assert np.all(c.preds[a, idx] == c.labels[idx]) and np.all(c.preds[b, idx] != c.labels[idx])
    assert c.metrics[1] is None
    out = write_comparison(c, tmp_path / "cmp", n=8).parent
    text = (out / "index.html").read_text()
    assert "<td>seed</td><td>0</td><td>1</td>" in text and str(tmp_path) not in text
    for name in ("curves.png", "per_class.png", "right_0_wrong_1.png", "right_1_wrong_0.png"):
        _not_blank(out / name)


def test_one_run_and_runs_on_different_test_sets_are_refused_in_one_line(tiny_run, image_folder, tmp_path, capsys):
    assert "at least two run directories" in _error(capsys, ["compare", str(tiny_run), "--out", str(tmp_path / "x")])
    foreign = tmp_path / "foreign"
    shutil.copytree(tiny_run, foreign, ignore=shutil.ignore_patterns("report", "checkpoints", "results.json"))
    cfg = yaml.safe_load((foreign / "config.yaml").read_text())
    (foreign / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": str(image_folder), "dataset": "folder"}))
    msg = _error(capsys, ["compare", str(tiny_run), str(foreign), "--out", str(tmp_path / "x")])
    assert "different class lists (10 classes: airplane" in msg and "tiny" in msg and "foreign" in msg
    assert not (tmp_path / "x").exists()                               # refused before any work


# -- runs without a training: config and untrained weights on a small ImageFolder tree ---------------

def _untrained_run(path, data, seed=0, classes=CLASSES[:4], **settings):
    """A run directory as compare reads it (config.yaml, model.safetensors), without a training."""
    path.mkdir(parents=True)
    run = RunDir(path)
    run.write_config(TrainConfig(data=str(data), dataset="folder", seed=seed, out=str(path), **settings))
    torch.manual_seed(seed)
    save_weights(build_model("fast", len(classes)), run.weights_file, "fast", classes, [0.5] * 3, [0.25] * 3)
    return path


def test_runs_on_other_test_images_labels_or_classes_are_one_line_before_any_work(tmp_path, capsys):
    base = make_image_folder(tmp_path / "data" / "base")
    more = make_image_folder(tmp_path / "data" / "more", n_test=5)      # 20 test images against 16
    moved = make_image_folder(tmp_path / "data" / "moved")              # 16, one moved to another class
    (moved / "test" / CLASSES[1] / "0000.png").rename(moved / "test" / CLASSES[0] / "moved.png")
    other = make_image_folder(tmp_path / "data" / "other", classes=CLASSES[4:8])  # 16, other classes
    a = _untrained_run(tmp_path / "a", base)
    out = tmp_path / "cmp"
    for name, data, classes, expected in (
            ("more", more, CLASSES[:4], "different test sets (16 vs 20 test images)"),
            ("moved", moved, CLASSES[:4], "different test sets (the same 16 test images in number, different labels"),
            ("other", other, CLASSES[4:8], "different class lists (4 classes: airplane, automobile, bird, cat vs "
                                           "4 classes: deer, dog, frog, horse)")):
        run = _untrained_run(tmp_path / name, data, classes=classes)
        msg = _error(capsys, ["compare", str(a), str(run), "--out", str(out)])
        assert expected in msg and f"runs a (base) and {name} ({name})" in msg, msg
        assert str(tmp_path) not in msg and not out.exists()


def _comparison(right: np.ndarray, seeds=(0, 1), recipes=("r", "r"), k: int = 4) -> Comparison:
    """A Comparison of runs whose right (True) or wrong answers per test image are given, (R, N)."""
    r, n = right.shape
    labels = np.arange(n) % k
    preds = np.where(right, labels, (labels + 1) % k)                  # (R, N)
    probs = np.eye(k)[preds] * 0.9 + 0.1 / k                            # (R, N, K), argmax = preds
    per_class = np.stack([np.bincount(labels, weights=ok, minlength=k) for ok in right]) / np.bincount(labels)
    return Comparison([f"run{i}" for i in range(r)], [], [], [None] * r, CLASSES[:k],
                      np.zeros((n, 32, 32, 3), np.uint8), labels, probs, per_class, list(recipes), list(seeds))


def test_the_page_says_in_words_which_differences_are_beyond_chance(tmp_path):
    n = 4000
    right = np.ones((3, n), bool)
    right[0, :400] = False                                              # run0: 90.0%
    right[1, :300] = False                                              # run1: 92.5%, right where run0 is on 100
    right[2, :396], right[2, 396:400], right[2, 400:404] = False, True, False   # run2: 4 each way
    c = _comparison(right, seeds=(0, 1, 2), recipes=("r", "r", "other"))
    first, second = c.verdicts()
    assert first.startswith("run1 is 2.5 points above run0 (95% CI ") and first.endswith(
        "McNemar p < 0.001): beyond chance")
    assert second == "run0 and run2 are level (95% CI -0.1 to 0.1, McNemar p = 1): within chance"
    overall, per_class = c.difference(0, 1)
    assert (overall.test.only_a, overall.test.only_b) == (0, 100) and len(per_class) == 4
    assert all(d.diff.value == pytest.approx(0.025) and d.beyond_chance for d in per_class)
    (names, seeds, mean, sd), = c.seed_spread()
    assert names == ["run0", "run1"] and seeds == [0, 1]
    assert mean == pytest.approx(0.9125) and sd == pytest.approx(np.std([0.9, 0.925], ddof=1))
    text = write_comparison(c, tmp_path / "cmp", n=4).read_text()
    assert html.escape(first) in text and html.escape(second) in text
    assert "Per class: run1 against run0" in text and "Spread over seeds" in text and "1.77 points" in text


def test_runs_of_another_recipe_or_the_same_seed_make_no_spread_over_seeds(tmp_path):
    right = np.ones((3, 400), bool)
    assert _comparison(right, seeds=(0, 0, 0), recipes=("r", "r", "r")).seed_spread() == []
    assert _comparison(right, seeds=(0, 1, 2), recipes=("r", "s", "t")).seed_spread() == []
    c = _comparison(right, seeds=(0, 0, 1), recipes=("r", "r", "r"))   # a run given twice counts once
    assert [s[1] for s in c.seed_spread()] == [[0, 1]]
    assert "Spread over seeds" not in write_comparison(_comparison(right[:2], recipes=("r", "s")), tmp_path).read_text()


def test_untrained_runs_of_one_recipe_compare_without_a_training_and_print_their_verdict(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", n_test=6)
    a, b = _untrained_run(tmp_path / "a", data, seed=0), _untrained_run(tmp_path / "b", data, seed=1, num_workers=2)
    c = compare([a, b])
    assert c.recipes[0] == c.recipes[1] and c.seeds == [0, 1] and len(c.seed_spread()) == 1
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == c.verdicts()[0] and out[-2].endswith("chance") and "McNemar" in out[-2]
    assert out[-1].startswith("comparison: ")
