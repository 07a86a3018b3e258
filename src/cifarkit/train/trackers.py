"""Runs tracked where teams already look: MLflow and Weights & Biases, through Lightning's own loggers.

`--logger mlflow` logs to MLFLOW_TRACKING_URI, or to a local store in ./mlruns (an SQLite database
and an artifacts folder: MLflow 3 keeps plain-file stores in maintenance mode). `--logger wandb`
logs offline, into RUN/wandb, unless WANDB_API_KEY is set or WANDB_MODE says otherwise (`wandb sync`
uploads an offline run later). Either gets, like metrics.csv: the resolved TrainConfig as parameters
(Lightning logs the module's hyperparameters), per-epoch metrics and the per-step lr; then the final
results and, once the report is written, its figures as artifacts. Where to find the tracker's run
again is kept in RUN/trackers.json; it names no token.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import CifarkitError
from ..presets import TrainConfig
from ..rundir import Results, RunDir, atomic_write

TRACKERS = {"mlflow": "mlflow", "wandb": "wandb"}  # --logger value -> the module (and extra) it needs
EXPERIMENT = "cifarkit"                             # MLflow experiment and W&B project by default
FINAL = ("test_acc", "test_loss", "seconds", "temperature", "ece_before", "ece_after", "nll_before",
         "nll_after", "mean_corruption_accuracy")


def check_tracker(logger: str) -> None:
    """--logger mlflow/wandb without its package: one line naming the extra, before any data is read."""
    if logger not in TRACKERS:
        return
    try:
        __import__(TRACKERS[logger])
    except ImportError:
        raise CifarkitError(f"--logger {logger} needs the extra: pip install 'cifarkit[{logger}]'") from None


def _mlflow_store() -> tuple[str, str | None]:
    """(tracking URI, artifact location): MLFLOW_TRACKING_URI as it is, else a store in ./mlruns."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    root = Path("mlruns").resolve()
    root.mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def _wandb_offline() -> bool:
    return os.environ.get("WANDB_MODE", "") not in ("online", "run") and not os.environ.get("WANDB_API_KEY")


def tracker_loggers(cfg: TrainConfig, run: RunDir) -> list:
    """The Lightning logger of --logger mlflow or wandb (none for csv or tensorboard)."""
    check_tracker(cfg.logger)
    if cfg.logger == "mlflow":
        from lightning.pytorch.loggers import MLFlowLogger
        uri, artifacts = _mlflow_store()
        return [MLFlowLogger(experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT),
                             run_name=run.name, tracking_uri=uri, artifact_location=artifacts)]
    if cfg.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger
        return [WandbLogger(project=os.environ.get("WANDB_PROJECT", EXPERIMENT), name=run.name,
                            save_dir=os.environ.get("WANDB_DIR") or str(run.path), offline=_wandb_offline())]
    return []


def record(run: RunDir, loggers: list) -> None:
    """RUN/trackers.json: where the tracker's run is, so the report's figures can join it later."""
    found = {}
    for lg in loggers:
        if type(lg).__name__ == "MLFlowLogger":
            found["mlflow"] = {"run_id": lg.run_id, "tracking_uri": _mlflow_store()[0]}
        elif type(lg).__name__ == "WandbLogger":
            found["wandb"] = {"run_id": lg.experiment.id, "project": lg.experiment.project, "dir": str(lg.save_dir),
                              "offline": _wandb_offline()}
    if found:
        atomic_write(run.trackers_file, json.dumps(found, indent=2))


def log_results(loggers: list, results: Results, step: int) -> None:
    """The run's final numbers (test, calibration), as metrics of the tracker's run; a W&B run is
    finished here, so that the report's figures can resume it."""
    values = {f"final/{k}": float(v) for k, v in results.to_dict().items() if k in FINAL and v is not None}
    for lg in loggers:
        if type(lg).__name__ in ("MLFlowLogger", "WandbLogger"):
            lg.log_metrics(values, step=step)
        if type(lg).__name__ == "WandbLogger":
            lg.experiment.finish()


def log_report(run: RunDir, report_dir: Path) -> list[str]:
    """The report's figures (and the robustness number it adds) as artifacts of the tracked run; the
    trackers that took them. Nothing for a run that was not tracked."""
    if not run.trackers_file.is_file():
        return []
    found = json.loads(run.trackers_file.read_text())
    figures = sorted(Path(report_dir).glob("*.png"))
    res = run.read_results()
    extra = {"final/mean_corruption_accuracy": res.mean_corruption_accuracy} \
        if res and res.mean_corruption_accuracy is not None else {}
    if "mlflow" in found:
        from mlflow.tracking import MlflowClient
        client, run_id = MlflowClient(found["mlflow"]["tracking_uri"]), found["mlflow"]["run_id"]
        for fig in figures:
            client.log_artifact(run_id, str(fig), "report")
        for k, v in extra.items():
            client.log_metric(run_id, k, float(v))
    if "wandb" in found:
        import wandb
        w = found["wandb"]
        with wandb.init(id=w["run_id"], project=w["project"], dir=w["dir"], resume="allow",
                        mode="offline" if w["offline"] else "online") as tracked:
            tracked.log({**extra, **{f"report/{f.stem}": wandb.Image(str(f)) for f in figures}})
    return sorted(found)
