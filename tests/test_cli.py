import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from cifarkit.cli import main


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert err and err[-1].startswith("cifarkit: error:") and "Traceback" not in "\n".join(err)
    return err[-1]


def test_unknown_model_and_preset_list_the_choices(capsys):
    assert "fast" in _error(capsys, ["train", "--model", "vgg", "--epochs", "1"])
    assert "quick" in _error(capsys, ["train", "--preset", "huge"])


def test_missing_data_path_says_what_to_pass(capsys, tmp_path):
    assert "--data" in _error(capsys, ["train", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r")])


def test_truncated_archive_is_one_line(capsys, tmp_path, truncated_archive):
    assert "truncated" in _error(capsys, ["train", "--data", str(truncated_archive), "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_unwritable_output_directory(capsys, tmp_path, image_folder):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    assert "--out" in _error(capsys, ["train", "--data", str(image_folder), "--out", str(blocker / "run")])


def test_subset_larger_than_the_data(capsys, tmp_path, image_folder):
    msg = _error(capsys, ["train", "--data", str(image_folder), "--subset", "10000", "--val-size", "4",
                          "--out", str(tmp_path / "r")])
    assert "--subset" in msg


def test_bad_lr_and_bad_config(capsys, tmp_path):
    assert "--lr" in _error(capsys, ["train", "--lr", "fast"])
    bad = tmp_path / "c.yaml"
    bad.write_text("epochs: 1\nwarp_speed: 9\n")
    assert "warp_speed" in _error(capsys, ["train", "--config", str(bad)])


def test_summary_prints_the_seed_table_totals(capsys):
    assert main(["summary", "--model", "resnet18_gn"]) == 0
    out = capsys.readouterr().out
    assert "Total params: 11,173,962" in out and "Params size (MB): 42.63" in out
    assert "[-1, 128, 32, 32]" in out  # stage 2 stays at 32x32, as in the seed


@pytest.mark.slow
def test_train_on_a_toy_folder_writes_a_complete_run_and_replays_its_config(capsys, tmp_path, image_folder):
    out = tmp_path / "run"
    args = ["train", "--data", str(image_folder), "--model", "custom_resnet", "--epochs", "1",
            "--batch-size", "16", "--val-size", "8", "--lr", "0.05", "--out", str(out), "--seed", "1",
            "--muon-lr", "0.02"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"run directory: {out}" in printed and "test accuracy:" in printed
    for name in ("config.yaml", "metrics.csv", "model.safetensors", "results.json",
                 "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert {"test_acc", "test_loss", "epochs", "seconds", "preset", "model", "data", "seed",
            "cifarkit_version"} <= set(res)
    assert res["model"] == "custom_resnet" and res["seed"] == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["muon_lr"] == 0.02
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "test_acc"} <= set(header)
    replay = tmp_path / "replay"
    assert main(["train", "--config", str(out / "config.yaml"), "--out", str(replay)]) == 0
    again = json.loads((replay / "results.json").read_text())
    assert again["model"] == "custom_resnet" and again["data"] == res["data"]


def test_test_and_predict_on_a_trained_run(capsys, tiny_run, tmp_path):
    assert main(["test", str(tiny_run), "--tta", "0"]) == 0
    assert "test accuracy:" in capsys.readouterr().out
    assert main(["test", str(tiny_run), "--tta-threshold", "0"]) == 2
    assert "--tta-threshold must be in (0, 1]" in capsys.readouterr().err
    img = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(img)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["predict", str(tiny_run), str(img), str(bad), "--top-k", "4", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    top = result["predictions"][0]["top"]
    assert len(top) == 4 and sum(t["prob"] for t in top) <= 1.0001
    assert [t["prob"] for t in top] == sorted((t["prob"] for t in top), reverse=True)
    assert "bad.jpg" in result["errors"][0]


def test_module_entry_point_runs_and_errors_cleanly():
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "cifarkit", "summary", "--model", "nope"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "resnet18_gn" in r.stderr


def test_albumentations_with_the_fast_preset_trains_at_full_size_and_says_so(notices):
    from cifarkit.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "fast", "--augment", "albumentations"]))
    assert cfg.augment["pipeline"] == "albumentations" and "low_res" not in cfg.augment
    assert "no low-res epochs" in notices()
    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "fast"]))
    assert cfg.augment["low_res"] == 24 and cfg.augment["low_res_epochs"] == 4


def test_a_short_fast_run_keeps_half_its_epochs_at_full_size(notices):
    from cifarkit.cli import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["train", "--preset", "fast", "--epochs", "3"]))
    assert cfg.augment["low_res_epochs"] == 1 and "1 of the 3 epochs at 24 px" in notices()


@pytest.mark.parametrize("flags, says", [
    (["--muon-lr", "-1"], "--muon-lr must be >= 0"),
    (["--lr", "auto"], "the LR range test sweeps one rate, but Muon"),
    (["--preset", "seed", "--muon-lr", "0.05", "--lr", "0.1"], "Muon keeps a fixed momentum"),
])
def test_muon_settings_that_cannot_work_are_refused_in_one_line(capsys, flags, says):
    assert main(["train", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("key, value, says", [
    ("tta_threshold", 0.0, "tta_threshold must be in (0, 1]"),
    ("tta_threshold", 1.5, "tta_threshold must be in (0, 1]"),
    ("tta", 5, "unknown tta '5'; choose one of: 0, 1, 2"),
])
def test_test_time_view_settings_out_of_range_are_refused_in_one_line(tmp_path, capsys, key, value, says):
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"preset: fast\n{key}: {value}\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1
