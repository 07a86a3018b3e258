"""The README and the manual: the README stays short and quotes BENCHMARKS.md, every shell command
in their code blocks still runs (or parses, where the real one is a long training or a server),
the manual builds with `mkdocs build --strict`, and the tutorial notebook runs headless."""
from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
# subcommands whose real run is a training (or many: a sweep), a report over the whole test set or a server: their
# commands are parsed by the real parser (a renamed flag or a bad value fails) and not run here;
# the trainings, the report and the app have their own slow tests
PARSE_ONLY = {"train", "lr-find", "audit", "report", "app", "sweep"}
HUB_ID = "USER/"  # the docs' placeholder of a Hugging Face repository id


def docs_module(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shell_commands(path: Path) -> list[list[str]]:
    """Each command of the page's bash blocks, as argv lists: continuation lines joined, comments
    dropped, `a && b` split in two."""
    out = []
    for lang, body in FENCE.findall(path.read_text()):
        if lang not in ("bash", "sh", "shell"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                out.append(words[:cut])
                words = words[cut + 1:]
    return out


def cifarkit_argv(words: list[str]) -> list[str] | None:
    """The arguments given to cifarkit, however it is started (cifarkit, .venv/bin/cifarkit,
    python -m cifarkit, srun cifarkit, torchrun ... -m cifarkit); None if it is not cifarkit."""
    if words[0] == "srun":
        words = words[1:]
    if Path(words[0]).name == "cifarkit":
        return words[1:]
    if words[0] in ("python", "python3", "torchrun") and "-m" in words:
        i = words.index("-m")
        if words[i + 1] == "cifarkit":
            return words[i + 2:]
    return None


def extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def check_other(words: list[str]) -> None:
    """A command that is not cifarkit's: it must be one this test knows how to check."""
    makefile = (ROOT / "Makefile").read_text()
    if words[0] == "make":
        for target in words[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"no make target {target}"
    elif words[:2] == ["pip", "install"] and words[2:3] == ["-r"]:
        assert words[3] == "requirements.txt"  # a Space folder's own (export-space writes it; test_space installs it)
    elif words[:2] == ["pip", "install"]:
        for spec in words[2:]:
            wanted = set(re.findall(r"\[([^\]]+)\]", spec)[0].split(",")) if "[" in spec else set()
            assert wanted <= extras(), f"{spec}: no such extra in pyproject.toml"
    elif words[:2] == ["python", "docs/make_pictures.py"]:
        docs_module("make_pictures").build_parser().parse_args(words[2:])
    elif words[0] == "hf":  # huggingface_hub's own command line (a dependency): its parser knows the command
        hf = Path(sys.executable).with_name("hf")
        assert subprocess.run([str(hf), *words[1:], "--help"], capture_output=True).returncode == 0, shlex.join(words)
    elif words[0] == "cd" or words == ["python", "app.py"]:
        pass  # the Space folder's steps: checked where export-space writes it (test_space runs its app.py)
    else:
        raise AssertionError(f"a command the docs test cannot check: {shlex.join(words)}; teach check_other")


@pytest.mark.parametrize("doc", PAGES, ids=lambda p: p.name)
def test_every_command_in_the_docs_parses(doc):
    """A renamed flag, a removed choice or a value of the wrong type in a documented command fails here."""
    from cifarkit.cli import build_parser
    from cifarkit.errors import CifarkitError
    for words in shell_commands(doc):
        argv = cifarkit_argv(words)
        if argv is None:
            check_other(words)
            continue
        try:
            build_parser().parse_args(argv)
        except CifarkitError as exc:
            pytest.fail(f"{doc.name}: `{shlex.join(words)}`: {exc}")


def test_readme_is_short_with_its_pictures_and_a_small_results_table():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(pictures) == 3 and all((ROOT / p).is_file() for p in pictures), pictures
    assert 1 <= len(results_rows(text)) <= 5


def results_rows(text: str) -> list[str]:
    section = text.split("## How good it is", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| run")
            and not line.startswith("| ---")]


def test_readme_results_are_quoted_from_benchmarks():
    """Every number of the README's results table is in BENCHMARKS.md as written there."""
    bench = (ROOT / "BENCHMARKS.md").read_text()
    for row in results_rows((ROOT / "README.md").read_text()):
        for number in re.findall(r"\d[\d,.]*\d%?|\d%?", row):
            assert re.search(rf"(?<![\d.,]){re.escape(number)}(?![\d])", bench), f"{number} ({row}) not in BENCHMARKS.md"


def test_the_cli_reference_lists_every_subcommand_and_flag():
    """The generated page holds every option string of every subcommand, with its help."""
    import argparse

    from cifarkit.cli import build_parser
    page = docs_module("hooks").cli_markdown()
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        assert f"\n## {name}\n" in page
        for action in p._actions:
            for option in set(action.option_strings) - {"-h", "--help"}:
                assert f"`{option}`" in page, f"{name} {option}"
    assert "`--time-budget`" in page and "`--resume`" in page


def test_the_api_reference_covers_every_module():
    import pkgutil

    import cifarkit
    hooks = docs_module("hooks")
    pages = "\n".join(hooks.api_markdown(page) for page in hooks.LAYERS)
    for m in pkgutil.walk_packages(cifarkit.__path__, "cifarkit."):
        if not m.ispkg and m.name not in ("cifarkit.__main__", "cifarkit.cli"):
            assert f"::: {m.name}\n" in pages, m.name


# -- slow: what runs for real ----------------------------------------------------------------


class Workspace:
    """Where the docs' commands run: one folder per page holding the files the docs name (cat.jpg,
    dog.png, my_cat.jpg, photos/), so that each page's outputs are new; `run(word)` maps RUN_DIR or a
    runs/... path to a copy of a small trained run (one copy per name: `compare runs/a runs/b` gets two)."""

    def __init__(self, trained: Path, root: Path, monkeypatch):
        from cifarkit.rundir import RunDir
        self.trained, self.root, self.monkeypatch = trained, root, monkeypatch
        self.examples = RunDir.open(trained).examples()
        self.runs: dict[str, str] = {}

    def enter(self, page: Path) -> None:
        from PIL import Image
        here = self.root / page.stem
        (here / "photos").mkdir(parents=True)
        for name, example in zip(("cat.jpg", "dog.png", "my_cat.jpg"), self.examples):
            Image.open(example).convert("RGB").save(here / name)
        for example in self.examples[:4]:
            shutil.copy(example, here / "photos")
        self.monkeypatch.chdir(here)

    def run(self, word: str) -> str:
        if word not in self.runs:
            self.runs[word] = str(shutil.copytree(self.trained, self.root / "runs" / f"copy{len(self.runs)}"))
        return self.runs[word]


@pytest.fixture(scope="module")
def docs_run(tmp_path_factory) -> Path:
    """A small run with its report on a toy ImageFolder (4 classes, 100 images held out, so that it
    is calibrated, and 100 test images): every documented command takes seconds on it."""
    from cifarkit.cli import main
    from cifarkit.report.report import write_report
    from conftest import make_image_folder
    data = make_image_folder(tmp_path_factory.mktemp("docs-data") / "data", n_train=75, n_test=25)
    out = tmp_path_factory.mktemp("docs-runs") / "run"
    assert main(["train", "--data", str(data), "--epochs", "2", "--batch-size", "32", "--val-size", "100",
                 "--lr", "0.05", "--tta", "0", "--out", str(out), "--no-report", "--quiet"]) == 0
    write_report(out)
    return out


@pytest.fixture
def workspace(docs_run, tmp_path, monkeypatch) -> Workspace:
    return Workspace(docs_run, tmp_path, monkeypatch)


@pytest.mark.slow
def test_documented_commands_run_on_a_small_run(workspace, capsys):
    """The documented commands that are not a training, a whole report or a server, run in document
    order on copies of a small trained run (RUN_DIR and every runs/... path stand for such copies)."""
    from cifarkit.cli import main
    ran = 0
    for page in PAGES:
        workspace.enter(page)
        for words in shell_commands(page):
            argv = cifarkit_argv(words)
            if argv is None or argv[0] in PARSE_ONLY or any(w.startswith(HUB_ID) for w in argv[1:2]):
                continue  # a model on the Hub cannot be reached from here: parsed above, loaded by test_hub
            argv = [workspace.run(w) if w == "RUN_DIR" or w.startswith("runs/") else w for w in argv]
            if argv[0] == "push":
                argv.append("--dry-run")  # everything up to the upload: the Hub cannot be reached from here
            assert main(argv) == 0, f"{page.name}: {shlex.join(words)}\n{capsys.readouterr().err[-2000:]}"
            ran += 1
            if argv[0] == "export-space":
                assert {"app.py", "requirements.txt"} <= {p.name for p in Path(argv[2]).iterdir()}
    assert ran >= 12


@pytest.mark.slow
def test_documented_python_runs_on_a_small_run(workspace):
    """Every Python block of the README and the manual, with its run paths ("runs/...", "my-model/")
    pointing at copies of a small trained run. The app's API client needs a server: test_app drives it."""
    ran = 0
    for page in PAGES:
        workspace.enter(page)
        for lang, body in FENCE.findall(page.read_text()):
            if lang != "python" or "gradio_client" in body or f'"{HUB_ID}' in body:
                continue  # the app's client needs a server (test_app), a Hub model the Hub (test_hub)
            code = re.sub(r'"(runs/[^"]*|my-model/)"', lambda m: repr(workspace.run(m.group(1))), body)
            exec(compile(code, f"{page.name}, the block at {body.splitlines()[0]!r}", "exec"), {})
            ran += 1
    assert ran >= 4


@pytest.mark.slow
def test_the_manual_builds_strictly_and_search_finds_the_flags(tmp_path):
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    index = (site / "search" / "search_index.json").read_text()
    for word in ("--time-budget", "calibrate", "--resume", "cifarkit.train.fit.fit"):
        assert word in index, word
    assert (site / "images" / "report.png").is_file() and (site / "bench" / "figures" / "budget_curve_cpu.png").is_file()


@pytest.mark.slow
def test_a_docstring_naming_a_missing_object_fails_the_strict_build(tmp_path):
    """mkdocstrings' cross-reference to a name that does not exist stops `mkdocs build --strict`."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "brokenref.py").write_text('"""See [cifarkit.no_such_thing][] for more."""\n')
    (tmp_path / "docs" / "index.md").write_text("# API\n\n::: brokenref\n")
    (tmp_path / "mkdocs.yml").write_text("site_name: t\nplugins:\n  - mkdocstrings:\n      handlers:\n"
                                         "        python:\n          paths: [src]\n")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                       cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
                       timeout=300)
    assert r.returncode != 0
    assert "cifarkit.no_such_thing" in r.stderr


@pytest.mark.slow
def test_the_tutorial_notebook_runs_with_inline_figures_and_no_warnings(tmp_path, cifar_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(DOCS / "tutorial.ipynb", as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        "commit the notebook without outputs"
    monkeypatch.setenv("CIFARKIT_DATA", str(cifar_path))  # the kernel inherits it (and the session's cache)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # curves, confusion, Grad-CAM, calibration
    text = "\n".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert not re.search(r"warn|deprecat|Tip:|Traceback", text, re.I), text[-3000:]
    assert "test accuracy" in text and "calibration: temperature" in text
