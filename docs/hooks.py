"""MkDocs hooks: the pages that are generated, never typed.

- `cli.md`: every subcommand of `cifarkit.cli.build_parser()`, every flag with its default and help.
- `api/*.md`: one page per layer of the package (the root's contracts, then each subpackage), one
  mkdocstrings section per module found by walking the package, so a new module is documented
  without editing anything here.
- `benchmarks.md`: BENCHMARKS.md as it is, its pictures copied beside it.
"""
from __future__ import annotations

import argparse
import pkgutil
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _this_checkout() -> None:
    """Import cifarkit from this checkout's src/, as mkdocstrings reads it, even where another copy
    is installed or was imported first (a venv shared between checkouts)."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))
    loaded = sys.modules.get("cifarkit")
    if loaded is not None and not Path(loaded.__file__).resolve().is_relative_to(SRC):
        for name in [n for n in sys.modules if n == "cifarkit" or n.startswith("cifarkit.")]:
            del sys.modules[name]

LAYERS = {  # page -> (title, subpackage or None for the root's modules)
    "index": ("the contracts at the package root", None),
    "data": ("data", "data"),
    "train": ("training", "train"),
    "trust": ("trust", "trust"),
    "report": ("reports", "report"),
    "sweep": ("sweeps", "sweep"),
    "serve": ("serving", "serve"),
}


# -- the command line --------------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text for one Markdown table cell: pipes escaped, one line."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required or action.default in (None, argparse.SUPPRESS):
        return "required" if action.required else ""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return "off" if action.default is False else "on"
    return f"`{action.default}`"


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`" + (" ..." if action.nargs in ("+", "*") else "")
    return " / ".join(f"`{s}`" for s in action.option_strings)


def _help(action: argparse.Action) -> str:
    text = action.help or ""
    if action.choices and not isinstance(action.choices, dict):
        text += (" " if text else "") + "(one of: " + ", ".join(str(c) for c in action.choices) + ")"
    return _cell(text)


def _arguments_table(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | what it does |", "| --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        rows.append(f"| {_name(action)} | {_default(action)} | {_help(action)} |")
    return rows


def cli_markdown() -> str:
    """The command-line reference, from the parser the `cifarkit` command runs."""
    _this_checkout()
    from cifarkit.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub._choices_actions}
    lines = ["---", "search:", "  boost: 2", "---", "", "# Command line", "",
             "Generated from `cifarkit.cli.build_parser()` when the manual is built: every subcommand, "
             "every flag, its default and its help, as `cifarkit COMMAND --help` prints them. "
             "A flag of a training setting with no default shown takes its value from the preset "
             "(`--preset`, the fast recipe when none is given) or the replayed `--config`. Every command "
             "also takes `-h` / `--help`.", "",
             "```text", parser.format_usage().strip(), "```", "",
             *_arguments_table(parser), "",
             "| command | what it does |", "| --- | --- |",
             *(f"| [`{name}`](#{name}) | {_cell(helps[name])} |" for name in sub.choices), ""]
    for name, p in sub.choices.items():
        text = _cell(helps[name])
        lines += [f"## {name}", "", text[:1].upper() + text[1:] + ".", "",
                  "```text", p.format_usage().strip(), "```", "", *_arguments_table(p), ""]
    return "\n".join(lines)


# -- the Python API ----------------------------------------------------------------------------


def _modules(subpackage: str | None) -> list[str]:
    """The modules of the root (the package itself first) or of one subpackage, found in src/."""
    if subpackage is None:
        found = [m.name for m in pkgutil.iter_modules([str(SRC / "cifarkit")]) if not m.ispkg]
        return ["cifarkit"] + [f"cifarkit.{n}" for n in found if n not in ("__main__", "cli")]
    return [f"cifarkit.{subpackage}.{m.name}" for m in pkgutil.iter_modules([str(SRC / "cifarkit" / subpackage)])]


def api_markdown(page: str) -> str:
    title, subpackage = LAYERS[page]
    lines = ["---", "search:", "  boost: 0.5", "---", "",  # the guides first, then the signatures
             f"# Python API: {title}", ""]
    if subpackage is None:
        lines += ["Generated from the docstrings. Data flows one way: source -> `data` -> `train` -> "
                  "the run directory (`cifarkit.rundir.RunDir`) -> `report`, `trust`, `serve`. "
                  "The command line is in the [command-line reference](../cli.md).", ""]
    else:
        lines += [f"::: cifarkit.{subpackage}", "    options:", "      members: false",
                  "      show_root_heading: false", ""]
    for module in _modules(subpackage):
        lines += [f"::: {module}", ""]
    return "\n".join(lines)


# -- BENCHMARKS.md -----------------------------------------------------------------------------

PICTURE = re.compile(r"\]\((bench/figures/[^)]+\.png)\)")


def benchmarks_markdown() -> tuple[str, list[str]]:
    """BENCHMARKS.md, and the pictures it shows (copied to the same paths beside the page)."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    return text, PICTURE.findall(text)


# -- hooks -------------------------------------------------------------------------------------


def on_files(files, config):
    files.append(File.generated(config, "cli.md", content=cli_markdown()))
    for page in LAYERS:
        files.append(File.generated(config, f"api/{page}.md", content=api_markdown(page)))
    text, pictures = benchmarks_markdown()
    files.append(File.generated(config, "benchmarks.md", content=text))
    for picture in pictures:
        files.append(File.generated(config, picture, abs_src_path=str(ROOT / picture)))
    return files
