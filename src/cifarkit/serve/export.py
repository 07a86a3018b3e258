"""Share a trained model: safetensors with metadata, a single-file ONNX graph, a Hub-ready folder.

The ONNX graph takes float32 RGB in [0, 1], shape (batch, 3, 32, 32), and normalizes inside, so a
non-Python runtime needs no statistics; they are also in the graph's metadata. It divides its logits
by the run's temperature, so softmax of its output is the calibrated probabilities `load()` gives.
A model with an out-of-distribution score has a second output, the score (higher: less like the
training images; above the metadata's `ood_threshold`: none of the classes).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..version import __version__
from ..errors import CifarkitError
from ..images import rgb_batch
from ..rundir import WEIGHTS_NAME, RunDir
from ..trust import conformal
from ..trust.ood import OODDetector
from ..trust.ood import score as ood_score
from ..weights import Loaded, load, save_weights

FORMATS = ("safetensors", "onnx", "hub")


class Normalized(nn.Module):
    """net((x - mean) / std) / T for x in [0, 1], and the out-of-distribution score when the model has
    one: the graph users of other runtimes call."""

    def __init__(self, net: nn.Module, mean, std, temperature: float = 1.0, detector: OODDetector | None = None):
        super().__init__()
        self.net, self.detector = net, detector
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))
        for name, value in (detector.tensors.items() if detector else ()):
            self.register_buffer("ood_" + name, value.float())

    def forward(self, x):  # (B, 3, 32, 32) in [0, 1]
        f = self.net.features((x - self.mean) / self.std)                       # (B, D)
        z = self.net.head(f)                                                    # (B, K) raw logits
        if self.detector is None:
            return z / self.temperature                                         # calibrated logits
        stats = {k: getattr(self, "ood_" + k) for k in self.detector.tensors}
        return z / self.temperature, ood_score(self.detector.method, z, f, stats)  # and (B,) scores


CARRIED = ("test_acc", "temperature", "calibration_fitted_on", "ood_method", "ood_threshold",
           "ood_keep")  # metadata an export keeps (and the stored stats: out-of-distribution, conformal)


def _meta(m: Loaded) -> dict:
    keep = ("model", "classes", "mean", "std", "input_size", "model_kwargs", *CARRIED)
    return {**{k: m.meta[k] for k in keep if k in m.meta}, "cifarkit_version": __version__}


def export_safetensors(m: Loaded, out: Path) -> Path:
    out = out if out.suffix == ".safetensors" else out / WEIGHTS_NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(m.net, out, m.meta["model"], m.classes, m.mean, m.std, json.loads(m.meta.get("model_kwargs", "{}")),
                 extra={k: v for k, v in m.meta.items() if k in CARRIED}, stats=m.stats)
    return out


def export_onnx(m: Loaded, out: Path) -> Path:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError:
        raise CifarkitError("ONNX export needs the extra: pip install 'cifarkit[export]'") from None
    out = out if out.suffix == ".onnx" else out / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    detector = OODDetector.from_weights(m.stats, m.meta)
    graph = Normalized(m.net.eval().to(memory_format=torch.contiguous_format), m.mean, m.std, m.temperature,
                       detector).eval()
    example = torch.rand(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, external_data=False, verbose=False,
                                    input_names=["image"], output_names=["logits"] + (["ood_score"] if detector else []),
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    program.save(str(out))
    proto = onnx.load(str(out))
    meta = {**_meta(m), "input": "float32 RGB in [0, 1], shape (batch, 3, 32, 32); normalized inside",
            "temperature": repr(m.temperature),
            "output": f"calibrated logits (batch, classes): the net's logits divided by temperature "
                      f"{m.temperature:.4g}; softmax for calibrated probabilities"}
    if detector is not None:
        meta.update(ood_method=detector.method, ood_threshold=repr(detector.threshold), ood_keep=repr(detector.keep),
                    ood_output="ood_score (batch,): higher is less like the training images; above "
                               "ood_threshold, none of the classes")
    if conformal.SCORES in m.stats:
        meta["conformal_scores"] = json.dumps([round(v, 6) for v in m.stats[conformal.SCORES].tolist()])
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=str(v))
    onnx.save(proto, str(out))
    return out


def export_hub(m: Loaded, out: Path, run: RunDir | None, repo: str | None = None, license: str = "mit") -> Path:
    """The folder a model repository holds, laid out like a published run (so `load`, `predict` and
    `app` read it as they read a run): the weights with their metadata, config.json (what rebuilds the
    net), config.yaml (the run's settings without paths), results.json, the gallery, the examples and
    the report's figures, and README.md, the model card. Nothing in it names a path of this machine."""
    from .card import CARD_FIGURES, model_card
    out.mkdir(parents=True, exist_ok=True)
    if run:
        run.publish(out)                                   # gallery, examples, app figures, results.json
        _publish_figures(run, out)
        if run.config_file.is_file():
            _public_config(run).to_yaml(out / run.config_file.name)
    export_safetensors(m, out / WEIGHTS_NAME)
    config = {"model": m.meta["model"], "model_kwargs": json.loads(m.meta.get("model_kwargs", "{}")),
              "classes": m.classes, "mean": m.mean, "std": m.std, "input_size": 32,
              "cifarkit_version": __version__}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    public = (run.public_results() if run else None) or {}  # the card's numbers
    figures = tuple(RunDir(out).figure(f).relative_to(out).as_posix() for f in CARD_FIGURES
                    if RunDir(out).figure(f).is_file())
    model_card(m, public, repo, license, figures).save(out / "README.md")
    return out


def _publish_figures(run: RunDir, out: Path) -> None:
    """Every figure the run's report drew, under the same names (report/<figure>.png)."""
    for name in RunDir.FIGURES:
        if run.figure(name).is_file():
            dest = RunDir(out).figure(name)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(run.figure(name), dest)


def _public_config(run: RunDir):
    """The run's settings as a replay needs them, without the paths of this machine (data, out)."""
    cfg = run.read_config()
    return dataclasses.replace(cfg, data=None, out=None, data_name=cfg.data_name or run.data_name())


def export(source: str | Path, fmt: str, out: str | Path) -> Path:
    if fmt not in FORMATS:
        raise CifarkitError(f"unknown format '{fmt}'; choose one of: {', '.join(FORMATS)}")
    src = Path(source)
    m = load(src)
    run = RunDir.open(src) if src.is_dir() else None
    try:
        if fmt == "safetensors":
            return export_safetensors(m, Path(out))
        if fmt == "onnx":
            return export_onnx(m, Path(out))
        return export_hub(m, Path(out), run)
    except OSError as exc:
        raise CifarkitError(f"cannot write {out}: {exc.strerror or exc}") from None


class OnnxModel:
    """An exported .onnx file behind the same interface as a loaded PyTorch model (for predict)."""

    def __init__(self, path: str | Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise CifarkitError("ONNX prediction needs the extra: pip install 'cifarkit[export]'") from None
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise CifarkitError(f"cannot load ONNX model {path}: {str(exc).splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "classes" not in meta:
            raise CifarkitError(f"{path} has no cifarkit metadata (classes)")
        self.classes, self.meta = json.loads(meta["classes"]), dict(meta)
        scores = meta.get("conformal_scores")
        self.conformal_scores = torch.tensor(json.loads(scores)) if scores else None

    @property
    def detector(self) -> OODDetector | None:  # its threshold; the score is the graph's second output
        return OODDetector.from_weights({}, self.meta)

    def _run(self, images) -> list[np.ndarray]:
        x = (rgb_batch(images).astype(np.float32) / 255).transpose(0, 3, 1, 2)  # (B, 3, 32, 32) in [0, 1]
        return self.session.run(None, {"image": np.ascontiguousarray(x)})

    def probabilities(self, images) -> torch.Tensor:
        return torch.softmax(torch.from_numpy(self._run(images)[0]), dim=1)

    def assess(self, images, coverage: float | None = None):
        """As predict.Model.assess, from the graph's outputs."""
        from .predict import Assessment
        out = self._run(images)
        probs = torch.softmax(torch.from_numpy(out[0]), dim=1)
        det, scores = self.detector, self.conformal_scores
        if coverage is not None:
            conformal.check_coverage(coverage, None if scores is None else len(scores))
        ood = torch.from_numpy(out[1]) if det is not None and len(out) > 1 else None
        sets = conformal.prediction_sets(probs, scores, coverage) if coverage is not None and scores is not None else None
        return Assessment(probs, ood, det.verdict(ood) if ood is not None else None, sets)


def load_any(path: str | Path):
    """A PyTorch model (run dir, .safetensors, Hub folder) or an ONNX model (.onnx) for prediction."""
    from .predict import load_model
    return OnnxModel(path) if str(path).endswith(".onnx") else load_model(path)
