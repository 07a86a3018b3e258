"""What a person sees on the console: cifarkit's own lines through `logging` (the "cifarkit" logger,
so notebooks and other programs can route them), progress bars on stderr that are shown only on a
terminal, and third parties kept quiet.

Importing cifarkit changes no global state: only the command line calls `command_line()`, which
sets all of this up for the length of one command and puts everything back afterwards.
"""
from __future__ import annotations

import logging
import sys
import warnings
from contextlib import contextmanager

log = logging.getLogger("cifarkit")

# Loggers of libraries that talk at INFO level (Lightning's device summary and its "Tip" among them)
THIRD_PARTY = ("lightning", "lightning.pytorch", "lightning.fabric", "torch", "httpx", "gradio", "optuna")

_bars = False  # progress bars on: set by command_line() when stderr is a terminal and not --quiet


def bars_on() -> bool:
    return _bars


@contextmanager
def command_line(verbose: bool = False, quiet: bool = False):
    """For one command: cifarkit's log lines to stderr (errors only with quiet), third parties'
    warnings and INFO lines silenced (verbose shows them), bars where stderr is a terminal."""
    global _bars
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = {name: logging.getLogger(name).level for name in THIRD_PARTY}
    saved_bars, saved_level, saved_propagate = _bars, log.level, log.propagate
    with warnings.catch_warnings():
        if not verbose:
            warnings.simplefilter("ignore")
            import lightning  # noqa: F401  (first: its import sets its loggers to INFO)
            for name in THIRD_PARTY:
                logging.getLogger(name).setLevel(logging.WARNING)
        log.addHandler(handler)
        log.setLevel(logging.ERROR if quiet else logging.DEBUG if verbose else logging.INFO)
        log.propagate = False
        _bars = not quiet and sys.stderr.isatty()
        try:
            yield
        finally:
            log.removeHandler(handler)
            log.setLevel(saved_level)
            log.propagate = saved_propagate
            _bars = saved_bars
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)


class _NoBar:
    def advance(self, n: float = 1, description: str | None = None) -> None:
        pass


@contextmanager
def progress(description: str, total: float | None):
    """A bar on stderr (rich, the look of Lightning's training bar) for a step that can take more
    than a few seconds; nothing at all when bars are off. Yields an object with advance(n, description)."""
    if not _bars:
        yield _NoBar()
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        class Bar:
            def advance(self, n: float = 1, description: str | None = None) -> None:
                bar.update(task, advance=n, **({"description": description} if description else {}))
        yield Bar()


def lightning_bar():
    """Lightning's rich progress bar, on stderr; None when bars are off."""
    if not _bars:
        return None
    from lightning.pytorch.callbacks import RichProgressBar
    return RichProgressBar(leave=False, console_kwargs={"stderr": True})
