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

APP_PY = '''"""Hugging Face Space entry point: serves {what} with the cifarkit app."""
from pathlib import Path

from cifarkit.serve.app import build_app, serve_options
from cifarkit.weights import locate

# Uploads over this size are refused while they arrive, before anything is decoded ("500kb", "1gb").
MAX_FILE_SIZE = "{max_file_size}"
{source}
demo = build_app(RUN)

if __name__ == "__main__":
    # Spaces sets GRADIO_SERVER_NAME=0.0.0.0; locally this binds 127.0.0.1. Only the copies Gradio
    # made of the examples and figures are served, never the run's folder (weights) itself.
    demo.launch(**serve_options(demo, max_file_size=MAX_FILE_SIZE))
'''
BUNDLED = 'RUN = Path(__file__).parent / "run"  # the run, bundled with the Space'
FROM_HUB = '''MODEL_REPO = "{repo}"
# the model repository's folder (weights, gallery, examples), downloaded once into the Hub cache
RUN = locate(MODEL_REPO, files=None)'''


def app_py(model_repo: str | None, bundle: bool) -> str:
    if bundle:
        return APP_PY.format(what="the bundled run", max_file_size=MAX_FILE_SIZE, source=BUNDLED)
    return APP_PY.format(what=f"the model repository {model_repo}", max_file_size=MAX_FILE_SIZE,
                         source=FROM_HUB.format(repo=model_repo))


def _pinned(name: str) -> str:
    try:
        return f"{name}=={version(name).split('+')[0]}"  # drop a local tag such as +cu130
    except PackageNotFoundError:
        return name


def _readme(model: str, acc: str, data: str, model_repo: str | None = None) -> str:
    models = f"models:\n  - {model_repo}\n" if model_repo else ""  # the Hub links the Space and the model
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
{models}---

# CIFAR-10 classifier with Grad-CAM

A `{model}` trained with cifarkit {__version__}; test accuracy {acc} ({data}). Upload any image to see the
top classes and where the model looked, browse its mistakes, and a Grad-CAM gallery.

Run locally: `pip install -r requirements.txt && python app.py`.
"""


def export_space(run_dir: str | Path, out: str | Path, model_repo: str | None = None, bundle: bool = True) -> Path:
    """The Space folder. model_repo: the model repository the Space names in its front matter and,
    unless `bundle`, downloads the run from (weights, gallery, examples) instead of carrying a copy."""
    run, out = RunDir.open(run_dir, need=("weights", "gallery")), Path(out)
    model = load(run.path)                      # fails early on a run without usable weights
    if not bundle and not model_repo:
        raise CifarkitError("a Space without the bundled run needs the model repository it loads from")
    if out.exists() and any(out.iterdir()):
        raise CifarkitError(f"{out} exists and is not empty; choose a new folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if bundle:
            (out / "run").mkdir()
            run.publish(out / "run")            # the run's published files; results without paths
        _copy_package(out / "cifarkit")
        (out / "app.py").write_text(app_py(model_repo, bundle))
        needs = REQUIREMENTS + (() if bundle else ("huggingface_hub",))
        (out / "requirements.txt").write_text("\n".join(_pinned(r) for r in needs) + "\n")
        acc = model.meta.get("test_acc")
        (out / "README.md").write_text(_readme(model.meta["model"], f"{float(acc):.2%}" if acc else "not recorded",
                                               run.data_name(), model_repo))
    except OSError as exc:
        raise CifarkitError(f"cannot write the Space to {out}: {exc.strerror or exc}") from None
    return out


def _copy_package(pkg: Path) -> None:
    """The few cifarkit modules the app imports, in the package's layout."""
    pkg.mkdir()
    for name in APP_MODULES:
        (pkg / name).parent.mkdir(exist_ok=True)
        shutil.copy(PACKAGE / f"{name}.py", pkg / f"{name}.py")
