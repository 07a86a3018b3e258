"""--logger mlflow and --logger wandb: a short real training each, read back with the tracker's own
tools, with nothing sent anywhere (MLflow: a local store; W&B: offline mode, no key, no telemetry)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from cifarkit import CifarkitError
from cifarkit.cli import _track_report, main
from cifarkit.presets import preset_config
from cifarkit.rundir import RunDir
from cifarkit.train.fit import validate
from conftest import make_image_folder

NO_NETWORK = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "WANDB_MODE": "offline",
              "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true",
              "WANDB_ERROR_REPORTING": "false", "WANDB_ANONYMOUS": "never"}


@pytest.fixture
def tracked(tmp_path, monkeypatch):
    """Train on a toy folder for one short epoch with --logger as given, then hand two report figures
    to the tracker as `cifarkit train` does once its report is written (the report itself is left
    out: it would double the test's time and is tested on its own)."""
    for k, v in NO_NETWORK.items():
        monkeypatch.setenv(k, v)
    for k in ("MLFLOW_TRACKING_URI", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(tmp_path / "data", n_train=16, n_test=4)

    def train(logger: str):
        out = tmp_path / logger
        assert main(["train", "--data", str(data), "--epochs", "1", "--batch-size", "16", "--val-size", "8",
                     "--lr", "0.05", "--tta", "0", "--out", str(out), "--logger", logger, "--no-report"]) == 0
        run = RunDir(out)
        run.report_dir.mkdir()
        for name in ("curves", "confusion"):
            Image.new("RGB", (64, 48), (200, 40, 40)).save(run.figure(name))
        _track_report(run, run.report_dir)
        return out
    return train


@pytest.mark.slow
def test_mlflow_run_in_the_local_store_is_read_back_by_mlflows_own_client(tracked, tmp_path):
    from mlflow.tracking import MlflowClient
    run = tracked("mlflow")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")   # the default: ./mlruns
    (exp,) = [e for e in client.search_experiments() if e.name == "cifarkit"]
    (found,) = client.search_runs([exp.experiment_id])
    ids = json.loads((run / "trackers.json").read_text())
    assert found.info.run_id == ids["mlflow"]["run_id"] and found.info.run_name == "mlflow"
    params, metrics = found.data.params, found.data.metrics
    assert params["preset"] == "fast" and float(params["epochs"]) == 1 and params["batch_size"] == "16"
    results = json.loads((run / "results.json").read_text())
    assert metrics["final/test_acc"] == pytest.approx(results["test_acc"])
    assert metrics["final/test_loss"] == pytest.approx(results["test_loss"])
    assert {"train_loss", "val_acc", "lr"} <= set(metrics)
    assert len(client.get_metric_history(found.info.run_id, "lr")) >= 1
    figures = {a.path for a in client.list_artifacts(found.info.run_id, "report")}
    assert {"report/curves.png", "report/confusion.png"} <= figures


@pytest.mark.slow
def test_wandb_offline_writes_its_run_folder_with_the_config_metrics_and_figures(tracked):
    run = tracked("wandb")
    ids = json.loads((run / "trackers.json").read_text())["wandb"]
    assert ids["offline"] is True
    folders = sorted((run / "wandb").glob(f"offline-run-*-{ids['run_id']}"))
    assert folders, list((run / "wandb").iterdir())
    (log,) = folders[0].glob("*.wandb")                    # the record `wandb sync` uploads
    assert all(key in log.read_bytes() for key in (b"batch_size", b"val_acc", b"final/test_acc"))
    images = [p.name for f in folders for p in (f / "files").rglob("*.png")]
    assert any(name.startswith("curves") for name in images), images


def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch):
    import builtins
    real = builtins.__import__

    def without_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    with pytest.raises(CifarkitError, match=r"--logger mlflow needs the extra: pip install 'cifarkit\[mlflow\]'"):
        validate(preset_config("quick", logger="mlflow"))
