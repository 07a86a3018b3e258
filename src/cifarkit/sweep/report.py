"""A sweep's report, SWEEP/report/: a page that needs nothing but its folder.

Optuna's matplotlib plots of the study (the optimization history, each trial's validation accuracy
by epoch with the points where trials were pruned, the parameters' importances, parallel
coordinates), the table of trials with their budgets and pruning points (also as trials.csv), the
final training's test accuracy, and the best setting as config.yaml, which `cifarkit train
--config` replays. A plot the study cannot give yet (importances need two finished trials) is a line
on the page saying why.
"""
from __future__ import annotations

import csv
import html
import io
import warnings
from pathlib import Path

from ..console import log
from ..presets import TrainConfig
from ..rundir import SweepDir, atomic_write
from ..train.budget import format_seconds
from . import study as studies

PLOTS = {  # SweepDir.FIGURES -> (Optuna's matplotlib function, title)
    "history": ("plot_optimization_history", "Optimization history"),
    "intermediate": ("plot_intermediate_values", "Validation accuracy by epoch (a line that stops early was pruned)"),
    "importances": ("plot_param_importances", "Parameter importances"),
    "parallel": ("plot_parallel_coordinate", "Parallel coordinates"),
}
LEGEND_MOST = 12  # trials named in a plot's legend; beyond, the table names them
COLUMNS = ["trial", "state", "val accuracy", "epochs", "planned epochs", "pruned after epoch", "budget",
           "seconds", "worker"]


def _missing(study, name: str) -> str | None:
    """Why the study cannot give this plot yet, or None."""
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    if name == "intermediate":
        return None if any(t.intermediate_values for t in trials) else "no trial reported an epoch yet"
    if name == "importances" and len(finished) < 2:
        return "it needs two finished trials"
    return None if finished else "no trial finished yet"


def _figure(study, name: str, out: Path) -> str | None:
    """Save one of Optuna's plots; None, or why it could not be drawn."""
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots
    if why := _missing(study, name):
        return why
    function, _ = PLOTS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        try:
            ax = getattr(plots, function)(study)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    first = ax.flat[0] if hasattr(ax, "flat") else ax
    if name == "intermediate":  # Optuna's steps are our epochs; a legend of every trial says nothing
        first.set(xlabel="epoch", ylabel="validation accuracy")
        if first.get_legend() is not None and len(study.trials) > LEGEND_MOST:
            first.get_legend().remove()
    elif name == "history":
        first.set_ylabel("validation accuracy")
    fig = first.figure
    fig.set_size_inches(9, 5)
    fig.savefig(out, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return None


def trial_rows(study) -> tuple[list[str], list[list[str]]]:
    """The table of trials: header, rows (one per trial, in order)."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({p for t in trials for p in t.params})
    rows = []
    for t in trials:
        a = t.user_attrs
        value = t.value if t.value is not None else (t.intermediate_values[t.last_step] if t.last_step else None)
        rows.append([str(t.number), t.state.name.lower() + (f": {a['failed']}" if "failed" in a else ""),
                     "" if value is None else f"{value:.4f}", str(a.get("epochs", "")),
                     f"{a['planned_epochs']:.2f}" if "planned_epochs" in a else "", str(a.get("pruned_at", "")),
                     format_seconds(a["budget_seconds"]) if "budget_seconds" in a else "",
                     str(a.get("seconds", "")), str(a.get("worker", ""))]
                    + [_value(t.params.get(p)) for p in params])
    return COLUMNS + params, rows


def _value(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_sweep_report(study, storage, sweep: SweepDir, best: TrainConfig | None) -> Path:
    """SWEEP/report/index.html with its figures, trials.csv and (given the best setting) config.yaml."""
    out = sweep.report_dir
    out.mkdir(parents=True, exist_ok=True)
    figures, notes = [], []
    for name, (_, title) in PLOTS.items():
        why = _figure(study, name, sweep.figure(name))
        if why:
            notes.append(f"{title}: not drawn ({why})")
        else:
            figures.append((sweep.figure(name).name, title))
    header, rows = trial_rows(study)
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    atomic_write(out / SweepDir.TRIALS_CSV, buf.getvalue())
    parts = [f"<h1>Sweep: study {html.escape(study.study_name)}</h1>", f"<p>{html.escape(_summary(study))}</p>"]
    if best is not None:
        atomic_write(sweep.best_config, best.to_yaml_text())
        try:
            b = study.best_trial
            parts.append(f"<h2>Best setting: trial {b.number}, validation accuracy {b.value:.2%}</h2>"
                         + _table(["setting", "value"], [[k, _value(v)] for k, v in b.params.items()])
                         + f"<p><a href='{SweepDir.BEST_CONFIG}'>{SweepDir.BEST_CONFIG}</a>: the recipe with these "
                         f"values, on all the training images, with a budget of {html.escape(str(best.time_budget))}. "
                         f"Replay it: <code>cifarkit train --config {html.escape(str(sweep.best_config))}</code></p>")
        except ValueError:
            pass
    finals = studies.finals(storage, study.study_name)
    if finals:
        parts.append("<h2>Final training (tested once)</h2>" + _table(
            ["trial", "test accuracy", "seconds", "where"],
            [[str(n), f"{r['test_acc']:.4f}" if "test_acc" in r else "not finished", str(r.get("seconds", "")),
              f"{r.get('host', '')}:{r.get('dir', '')}"] for n, r in sorted(finals.items())]))
    parts += [f'<h2>{html.escape(t)}</h2><img src="{f}" alt="{html.escape(t)}">' for f, t in figures]
    parts += [f"<p class='note'>{html.escape(n)}</p>" for n in notes]
    parts.append(f"<h2>Trials</h2><p><a href='{SweepDir.TRIALS_CSV}'>{SweepDir.TRIALS_CSV}</a></p>"
                 + _table(header, rows))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>cifarkit sweep</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 10px}img{max-width:100%}"
            ".note{color:#666}</style></head><body>" + "".join(parts) + "</body></html>")
    atomic_write(out / SweepDir.REPORT_PAGE, page)
    log.info(f"sweep report: {out / SweepDir.REPORT_PAGE}")
    return out / SweepDir.REPORT_PAGE


def _summary(study) -> str:
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    budgets = {t.user_attrs.get("budget_seconds") for t in trials} - {None}
    budget = f", each with a budget of {format_seconds(budgets.pop())}" if len(budgets) == 1 else ""
    return (f"{len(trials)} trials{budget}: {states.count('COMPLETE')} finished, {states.count('PRUNED')} pruned, "
            f"{states.count('FAIL')} failed" + (f", {states.count('RUNNING')} running" if "RUNNING" in states else "")
            + ". Trials are judged on a validation split of the training images; only the final training is tested.")
