"""The run-directory contract: what opens, what is refused in one line, what a published copy holds."""
from __future__ import annotations

import json

import pytest
import torch

from cifarkit import CifarkitError
from cifarkit.cli import main
from cifarkit.models import build_model
from cifarkit.presets import preset_config
from cifarkit.rundir import Results, RunDir, atomic_path, atomic_write, data_name
from cifarkit.weights import save_weights

CLASSES = ["a", "b", "c", "d"]


def half_run(root, data="/home/someone/data/cifar10-jpeg.tar.gz"):
    """A run as a kill before the end leaves it: config and a metrics file, no weights or results."""
    root.mkdir(parents=True)
    preset_config("quick", data=data, out=str(root)).to_yaml(root / "config.yaml")
    (root / "metrics.csv").write_text("epoch,step,train_loss\n0,3,2.1\n")
    return RunDir(root)


def finished_run(root, **results):
    run = half_run(root)
    save_weights(build_model("fast", 4), run.weights_file, "fast", CLASSES, [0.5] * 3, [0.25] * 3)
    run.write_results(Results(test_acc=0.5, data="/home/someone/data/cifar10-jpeg.tar.gz", **results))
    return run


def test_a_folder_of_another_tool_is_refused_in_one_line_and_left_alone(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CifarkitError, match="not a cifarkit run directory"):
        RunDir.open(other)
    for argv in (["report", str(other)], ["app", str(other)], ["test", str(other)],
                 ["export-space", str(other), str(tmp_path / "space")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "not a cifarkit run directory" in err[0], argv
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    with pytest.raises(CifarkitError, match="is not a directory"):
        RunDir.open(tmp_path / "missing")


def test_a_half_written_run_says_it_did_not_finish_and_how_to_resume(tmp_path, capsys):
    run = half_run(tmp_path / "run")
    before = sorted(p.name for p in run.path.iterdir())
    for argv in (["app", str(run.path)], ["export", str(run.path), "--format", "hub", "--out", str(tmp_path / "h")],
                 ["test", str(run.path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "has no model.safetensors; the run did not finish" in err and f"--resume {run.path}" in err, argv
    assert sorted(p.name for p in run.path.iterdir()) == before  # nothing written, nothing lost


def test_training_into_a_directory_that_holds_a_run_is_refused_and_overwrites_nothing(tmp_path, capsys):
    run = finished_run(tmp_path / "run")
    weights = run.weights_file.read_bytes()
    assert main(["train", "--out", str(run.path), "--epochs", "1"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert run.weights_file.read_bytes() == weights and run.read_results().test_acc == 0.5


def test_results_round_trip_keep_unknown_keys_and_read_older_files(tmp_path):
    run = RunDir(tmp_path)
    run.results_file.write_text(json.dumps({"test_acc": 0.9, "data": "/x/cifar-10-python.tar.gz",
                                            "from_the_future": [1, 2]}))
    res = run.read_results()
    assert res.test_acc == 0.9 and res.data_name is None and res.extra == {"from_the_future": [1, 2]}
    run.write_results(res)
    assert json.loads(run.results_file.read_text())["from_the_future"] == [1, 2]
    run.results_file.write_text("{cut sho")
    with pytest.raises(CifarkitError, match="not valid JSON results"):
        run.read_results()


@pytest.mark.parametrize("source, name", [
    ("/home/u/data/cifar10-jpeg.tar.gz", "CIFAR-10, JPEG-q75 copy"),
    ("/home/u/cifar-10-python.tar.gz", "CIFAR-10"),
    ("torchvision:cifar100", "CIFAR-100 (torchvision download)"),
    ("/srv/scraped/my-pets.tar.gz", "my-pets"),
    ("/srv/scraped/my-pets", "my-pets"),
])
def test_data_is_named_without_its_path(source, name):
    assert data_name(source) == name


def test_a_published_copy_names_the_data_and_holds_no_path(tmp_path):
    run = finished_run(tmp_path / "run", data_name=None)
    (run.examples_dir).mkdir()
    torch.save({}, run.path / "not-published.pt")
    (run.examples_dir / "00-a.png").write_bytes(b"png")
    dest = tmp_path / "space" / "run"
    run.publish(dest)
    published = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert published == ["examples/00-a.png", "model.safetensors", "results.json"]
    public = json.loads((dest / "results.json").read_text())
    assert public["data"] == "CIFAR-10, JPEG-q75 copy" and "/home/someone" not in json.dumps(public)
    assert run.read_results().data.startswith("/home/someone")  # the run itself keeps it for replay


def test_a_write_that_fails_midway_leaves_the_old_file_whole_and_no_temporary_file(tmp_path):
    target = tmp_path / "results.json"
    atomic_write(target, "old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the n")
            raise OSError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_every_name_of_a_run_directory_is_the_run_directorys(tmp_path):
    run = RunDir(tmp_path)
    assert run.best_ckpt == tmp_path / "checkpoints" / "best.ckpt"
    assert (run.tensorboard_dir, run.audit_dir, run.gradcam_dir) == (
        tmp_path / "tensorboard", tmp_path / "audit", tmp_path / "gradcam")
    assert run.figure("curves") == tmp_path / "report" / "curves.png"
    with pytest.raises(ValueError, match="unknown report figure"):
        run.figure("curve")
