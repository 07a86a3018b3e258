"""`cifarkit compare`: runs side by side, refused in one line when they cannot be compared."""
import json
import re
import shutil

import numpy as np
import torch
import yaml
from PIL import Image

from cifarkit.cli import main
from cifarkit.report.compare import compare, write_comparison
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
    assert "different test sets" in msg and "tiny" in msg and "foreign" in msg
    assert not (tmp_path / "x").exists()                               # refused before any work
