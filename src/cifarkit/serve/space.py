"""Export a self-contained Hugging Face Space: app.py, requirements.txt, README.md (Spaces header),
the run's weights, gallery and examples, and the few cifarkit modules the app imports."""
from __future__ import annotations

import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..version import __version__
from .app import MAX_FILE_SIZE
from ..errors import CifarkitError
from ..rundir import RunDir
from ..weights import load

# the modules the app imports, and theirs
APP_MODULES = ("__init__", "version", "errors", "console", "images", "models", "presets", "rundir", "weights",
               "trust/__init__", "trust/analysis", "trust/explain", "trust/ood", "trust/conformal",
               "serve/__init__", "serve/predict", "serve/app")
PACKAGE = Path(__file__).resolve().parents[1]  # src/cifarkit: the Space keeps its layout
REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "safetensors", "matplotlib", "grad-cam", "pyyaml",
                "gradio")

APP_PY = '''"""Hugging Face Space entry point: serves the bundled run with the cifarkit app."""
from pathlib import Path

from cifarkit.serve.app import build_app, serve_options

# Uploads over this size are refused while they arrive, before anything is decoded ("500kb", "1gb").
MAX_FILE_SIZE = "{max_file_size}"

demo = build_app(Path(__file__).parent / "run")

if __name__ == "__main__":
    # Spaces sets GRADIO_SERVER_NAME=0.0.0.0; locally this binds 127.0.0.1. Only the copies Gradio
    # made of the examples and figures are served, never run/ (weights) itself.
    demo.launch(**serve_options(demo, max_file_size=MAX_FILE_SIZE))
'''


def _pinned(name: str) -> str:
    try:
        return f"{name}=={version(name).split('+')[0]}"  # drop a local tag such as +cu130
    except PackageNotFoundError:
        return name


def _readme(model: str, acc: str, data: str) -> str:
    return f"""---
title: cifarkit {model}
emoji: 🖼️
colorFrom: blue
colorTo: indigo
sdk: gradio
sdk_version: {version("gradio")}
python_version: "{sys.version_info.major}.{sys.version_info.minor}"
app_file: app.py
pinned: false
---

# CIFAR-10 classifier with Grad-CAM

A `{model}` trained with cifarkit {__version__}; test accuracy {acc} ({data}). Upload any image to see the
top classes and where the model looked, browse its mistakes, and a Grad-CAM gallery.

Run locally: `pip install -r requirements.txt && python app.py`.
"""


def export_space(run_dir: str | Path, out: str | Path) -> Path:
    run, out = RunDir.open(run_dir, need=("weights", "gallery")), Path(out)
    model = load(run.path)                      # fails early on a run without usable weights
    if out.exists() and any(out.iterdir()):
        raise CifarkitError(f"{out} exists and is not empty; choose a new folder")
    try:
        (out / "run").mkdir(parents=True, exist_ok=True)
        run.publish(out / "run")                # the run's published files; results without paths
        pkg = out / "cifarkit"
        pkg.mkdir()
        for name in APP_MODULES:
            (pkg / name).parent.mkdir(exist_ok=True)
            shutil.copy(PACKAGE / f"{name}.py", pkg / f"{name}.py")
        (out / "app.py").write_text(APP_PY.format(max_file_size=MAX_FILE_SIZE))
        (out / "requirements.txt").write_text("\n".join(_pinned(r) for r in REQUIREMENTS) + "\n")
        acc = model.meta.get("test_acc")
        (out / "README.md").write_text(_readme(model.meta["model"], f"{float(acc):.2%}" if acc else "not recorded",
                                               run.data_name()))
    except OSError as exc:
        raise CifarkitError(f"cannot write the Space to {out}: {exc.strerror or exc}") from None
    return out
