"""Shared fixtures: the real JPEG copy of CIFAR-10 when it is beside the repo, small fake datasets,
and one tiny trained run for the commands that need weights."""
from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

ROOT = Path(__file__).resolve().parents[1]
SHARED_COPY = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def real_data() -> Path:
    """The real CIFAR-10 copy: $CIFARKIT_DATA, else ../shared/data/cifar10-jpeg.tar.gz."""
    path = Path(os.environ.get("CIFARKIT_DATA") or SHARED_COPY)
    if not path.exists():
        pytest.fail(f"real CIFAR-10 copy not found at {path}; set CIFARKIT_DATA")
    return path


# Tests that use these fixtures read the real copy (cifar_path: decoding its 60,000 JPEGs takes
# minutes, and the copy may be absent), train a model, or start a server or a browser: they are slow
# (`make test-fast` leaves them out; `make test` and CI run them, and a missing copy fails them).
SLOW_FIXTURES = {"cifar_path", "tiny_training", "tiny_run", "tiny_report", "reported_run", "toy_run", "served", "page", "reference"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _no_fit_outside_slow_tests(request, monkeypatch):
    """A Lightning fit in a test not marked slow fails that test: `make test-fast` trains nothing."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    from lightning.pytorch import Trainer

    def refuse(self, *args, **kwargs):
        pytest.fail(f"{request.node.nodeid} runs a Lightning fit: mark it @pytest.mark.slow")
    monkeypatch.setattr(Trainer, "fit", refuse)
    yield


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """One decode cache per test session, so tests never read a user's cache."""
    os.environ["CIFARKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def cifar_path() -> Path:
    return real_data()


def make_image_folder(root: Path, n_train: int = 12, n_test: int = 4, size: int = 32, classes=CLASSES[:4],
                      seed: int = 0) -> Path:
    """A small ImageFolder tree whose classes differ in mean colour (learnable)."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.full((size, size, 3), 40 + 50 * c, dtype=np.int16)
                img = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "toy")


@pytest.fixture
def image_folder_tgz(tmp_path) -> Path:
    root = make_image_folder(tmp_path / "toy")
    out = tmp_path / "toy.tar.gz"
    with tarfile.open(out, "w:gz") as tar:
        tar.add(root, arcname="toy")
    return out


@pytest.fixture(scope="session")
def truncated_archive(tmp_path_factory) -> Path:
    """The first half of an ImageFolder .tar.gz of 480 noisy PNGs (about 1 MB): a download cut short."""
    root = make_image_folder(tmp_path_factory.mktemp("whole") / "toy", n_train=100, n_test=20)
    whole = root.parent / "toy.tar.gz"
    with tarfile.open(whole, "w:gz") as tar:
        tar.add(root, arcname="toy")
    raw = whole.read_bytes()
    assert len(raw) > 500_000
    cut = tmp_path_factory.mktemp("cut") / "cut.tar.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    return cut


def cifarkit(*args, cwd=None) -> tuple[int, str, str]:
    """`python -m cifarkit ARGS` in its own process, with Python's warnings on as a user's shell may
    have them: (exit code, stdout, stderr)."""
    env = dict(os.environ, PYTHONWARNINGS="default")
    r = subprocess.run([sys.executable, "-m", "cifarkit", *args], capture_output=True, text=True, env=env,
                       cwd=cwd, timeout=900)
    return r.returncode, r.stdout, r.stderr


# The net of the session's tiny_run and of the DDP run: the fast net with an eighth to a quarter of its
# channels in each conv group, the same layers, stem and head (38,968 parameters instead of 1,972,792).
# What the tests of the commands read (files, layers, classes, calibration, the app's answers, DDP's
# ranks) does not depend on the width, and every pass over the 10,000 test images (training's test, the
# report, compare, `cifarkit test`) costs a sixth of the full net's. In 10 steps of 100 images it
# reaches about 19% test accuracy, as the full net does in 4 steps of 250: weak, calibrated, with
# confident mistakes.
TINY_WIDTHS = [16, 32, 32]


def narrow_config(path: Path, preset: str, **overrides) -> Path:
    """A config file of `preset` (with `overrides`) whose fast net has TINY_WIDTHS, for --config."""
    from cifarkit.presets import PRESETS, preset_config
    kwargs = {**PRESETS[preset]["model_kwargs"], "widths": TINY_WIDTHS}
    preset_config(preset, model_kwargs=kwargs, **overrides).to_yaml(path)
    return path


@pytest.fixture(scope="session")
def tiny_training(tmp_path_factory, cifar_path) -> tuple[Path, str, str]:
    """`cifarkit train` (the quick preset, its fast net narrowed to TINY_WIDTHS by a config file) for a
    few steps on 1,000 real images, in its own process, as a person runs it:
    (run directory, stdout, stderr). One training for the commands that need weights (tiny_run) and
    for the tests of what the console shows (test_console)."""
    runs = tmp_path_factory.mktemp("runs")
    out = runs / "tiny"
    code, stdout, stderr = cifarkit("train", "--config", str(narrow_config(runs / "narrow.yaml", "quick")),
                                    "--data", str(cifar_path), "--subset", "1000", "--val-size", "500", "--epochs", "1",
                                    "--batch-size", "100", "--tta", "0", "--eval-batch-size", "2000", "--no-report",
                                    "--out", str(out))
    assert code == 0, stderr[-3000:]
    return out, stdout, stderr


@pytest.fixture(scope="session")
def tiny_run(tiny_training):
    """A run directory trained for a few steps on 1,000 real images (weights, config, metrics)."""
    from cifarkit.rundir import RunDir
    return RunDir.open(tiny_training[0])


@pytest.fixture(scope="session")
def tiny_report(tiny_run) -> tuple[Path, str, str]:
    """`cifarkit report` of tiny_run in its own process, with the defaults: (run directory, stdout,
    stderr). One report for the app's tests and for the test of what the console shows."""
    code, stdout, stderr = cifarkit("report", str(tiny_run.path))
    assert code == 0, stderr[-3000:]
    return tiny_run.path, stdout, stderr


@pytest.fixture(scope="session")
def reported_run(tiny_run, tiny_report) -> Path:
    """tiny_run with its report, gallery.npz and examples/ written (what the app needs)."""
    return tiny_run


# Training images of the toy run whose labels are flipped on purpose: (class, file) -> wrong class.
FLIPPED = {(0, "0000.png"): 3, (0, "0001.png"): 3, (3, "0000.png"): 0, (1, "0000.png"): 3}


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory) -> Path:
    """A quick run (fast net, 4 epochs, about a minute) on a toy ImageFolder that it learns to 100%:
    4 grey-level classes, 180 training images of which 4 carry a wrong label on purpose (FLIPPED),
    20 held out (too few to fit a temperature), 100 test images. At full width: the out-of-fold audit
    of its training images (test_audit) finds the flipped labels with fold models of this capacity."""
    from cifarkit.cli import main
    root = make_image_folder(tmp_path_factory.mktemp("toy") / "data", n_train=45, n_test=25)
    for (c, name), wrong in FLIPPED.items():
        (root / "train" / CLASSES[c] / name).rename(root / "train" / CLASSES[wrong] / f"flipped-{c}-{name}")
    out = tmp_path_factory.mktemp("runs") / "toy"
    assert main(["train", "--data", str(root), "--epochs", "4", "--batch-size", "16", "--val-size", "20",
                 "--lr", "0.05", "--tta", "0", "--out", str(out), "--no-report"]) == 0
    return out


def bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: a dataclass in it looks its module up there
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_images(folder: Path) -> dict[str, Path]:
    """One file per kind of awkward upload, keyed by what it is."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    files = {}
    def save(name, img, **kw):
        files[name] = folder / name
        img.save(files[name], **kw)
    save("rgb.jpg", Image.fromarray(rgb))
    save("gray.png", Image.fromarray(rgb[..., 0]))
    save("rgba.png", Image.fromarray(np.dstack([rgb, rgb[..., :1]])))
    save("palette.gif", Image.fromarray(rgb).convert("P"))
    save("sixteen.png", Image.fromarray((rng.integers(0, 65535, (30, 30))).astype(np.uint16)))
    save("one.png", Image.fromarray(rgb[:1, :1]))
    (folder / "text.png").write_text("this is not an image")
    files["text.png"] = folder / "text.png"
    for name in ("rgb.jpg", "rgba.png"):
        cut = folder / f"truncated-{name}"
        cut.write_bytes(files[name].read_bytes()[: len(files[name].read_bytes()) // 2])
        files[cut.name] = cut
    return files


@pytest.fixture
def notices(caplog):
    """cifarkit's own log lines since the last call, one per line: a library call logs its notices
    to the "cifarkit" logger (the command line prints them on stderr)."""
    caplog.set_level(logging.INFO, logger="cifarkit")

    def read() -> str:
        lines = [r.getMessage() for r in caplog.records if r.name.startswith("cifarkit")]
        caplog.clear()
        return "\n".join(lines)
    return read
