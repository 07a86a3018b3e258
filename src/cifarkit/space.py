"""Export a self-contained Hugging Face Space: app.py, requirements.txt, README.md (Spaces header),
the run's weights, gallery and examples, and the few cifarkit modules the app imports."""
from __future__ import annotations

import shutil
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import __version__, analysis
from .errors import CifarkitError
from .weights import WEIGHTS_NAME, load

APP_MODULES = ("__init__", "errors", "models", "weights", "augment", "analysis", "explain", "app")
REQUIREMENTS = ("torch", "torchvision", "numpy", "pillow", "safetensors", "matplotlib", "grad-cam", "gradio")
RUN_FILES = (WEIGHTS_NAME, "results.json", analysis.GALLERY_NAME, "report/curves.png", "report/confusion.png")

APP_PY = '''"""Hugging Face Space entry point: serves the bundled run with the cifarkit app."""
from pathlib import Path

from cifarkit.app import build_app

demo = build_app(Path(__file__).parent / "run")

if __name__ == "__main__":
    # Spaces sets GRADIO_SERVER_NAME=0.0.0.0; locally this binds 127.0.0.1.
    demo.launch(allowed_paths=demo.cifarkit_allowed, show_error=True)
'''


def _pinned(name: str) -> str:
    try:
        return f"{name}=={version(name).split('+')[0]}"  # drop a local tag such as +cu130
    except PackageNotFoundError:
        return name


def _readme(model: str, acc: str) -> str:
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

A `{model}` trained with cifarkit {__version__}; test accuracy {acc}. Upload any image to see the
top classes and where the model looked, browse its mistakes, and a Grad-CAM gallery.

Run locally: `pip install -r requirements.txt && python app.py`.
"""


def export_space(run_dir: str | Path, out: str | Path) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    model = load(run_dir)                       # fails early on a run without usable weights
    if not (run_dir / analysis.GALLERY_NAME).is_file():
        raise CifarkitError(f"{run_dir} has no {analysis.GALLERY_NAME}; run `cifarkit report {run_dir}` first")
    if out.exists() and any(out.iterdir()):
        raise CifarkitError(f"{out} exists and is not empty; choose a new folder")
    try:
        (out / "run").mkdir(parents=True, exist_ok=True)
        for rel in RUN_FILES:
            if (run_dir / rel).is_file():
                (out / "run" / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(run_dir / rel, out / "run" / rel)
        shutil.copytree(run_dir / analysis.EXAMPLES_DIR, out / "run" / analysis.EXAMPLES_DIR)
        pkg = out / "cifarkit"
        pkg.mkdir()
        for name in APP_MODULES:
            shutil.copy(Path(__file__).with_name(f"{name}.py"), pkg / f"{name}.py")
        (out / "app.py").write_text(APP_PY)
        (out / "requirements.txt").write_text("\n".join(_pinned(r) for r in REQUIREMENTS) + "\n")
        acc = model.meta.get("test_acc")
        (out / "README.md").write_text(_readme(model.meta["model"], f"{float(acc):.2%}" if acc else "not recorded"))
    except OSError as exc:
        raise CifarkitError(f"cannot write the Space to {out}: {exc.strerror or exc}") from None
    return out
