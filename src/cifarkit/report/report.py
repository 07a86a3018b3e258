"""A run's report: figures, an HTML page and a Markdown summary in RUN_DIR/report/.

Each part is written on its own: a run without metrics still gets its confusion matrix, a run
without weights still gets its curves, a run too small to calibrate still gets its robustness
table, and the page says what is missing and why. Beyond what the model got wrong and where it
looked: how sure each class's precision and recall are (bootstrap intervals), how honest its
percentages are (calibration), which test labels are likely wrong (label issues) and how it holds
up on blurred, noisy or otherwise corrupted images (robustness).
"""
from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np

from ..trust import analysis, calibration, explain, label_issues, robustness, stats
from . import plots
from ..train.budget import format_seconds
from ..console import log, progress
from ..errors import CifarkitError
from ..rundir import RunDir

CAM_COLUMNS = 10  # images per Grad-CAM grid: enough to see a pattern, small enough to read
MAX_SHOWN = 100   # misclassified images in one grid


class Report:
    def __init__(self, run: RunDir, out: Path):
        self.run, self.out = run, out
        self.figures: list[tuple[str, str, str]] = []  # (file, title, caption)
        self.notes: list[str] = []
        self.tables: dict[str, list[tuple[str, str]]] = {}
        self.grids: dict[str, list[list[str]]] = {}   # multi-column tables: header row, then rows
        self.links: list[tuple[str, str]] = []        # (file, what it is): data files beside the page
        self.p: analysis.Predictions | None = None    # test predictions, once made
        self.issues: label_issues.LabelIssues | None = None  # likely label errors among them
        self.issue_models = 1                         # models whose views ranked them (the run's, the audit's)
        self.temperature: float | None = None         # the run's T and where it was fitted, once known
        self.fitted_on = ""

    def add(self, fig, figure: str, title: str, caption: str) -> None:
        """Save one of RunDir.FIGURES and list it on the page."""
        name = RunDir.figure_name(figure)
        fig.savefig(self.out / name, dpi=110, bbox_inches="tight")
        self.figures.append((name, title, caption))

    def attempt(self, what: str, fn) -> None:
        try:
            fn()
        except CifarkitError as exc:
            self.notes.append(f"{what}: {self._without_paths(str(exc))}")
        except FileNotFoundError as exc:
            self.notes.append(f"{what}: missing {Path(exc.filename).name if exc.filename else exc}")

    def _without_paths(self, text: str) -> str:
        """A page may be shared: the run and its data by name, never by a path of this machine."""
        source, *_ = self.run.data_source()
        if source:
            text = text.replace(str(source), self.run.data_name())
        return text.replace(str(self.run.path.resolve()), self.run.name).replace(str(self.run.path), self.run.name)


def _curves(r: Report) -> None:
    m = r.run.read_metrics()
    r.add(plots.curves(m), "curves", "Loss and accuracy",
          "Training and validation loss and accuracy per epoch; the dashed line is the final test result.")
    if m["lr"][0]:
        r.add(plots.lr_schedule(*m["lr"]), "lr", "Learning rate",
              "The one-cycle schedule, one point per optimizer step.")


def _lr_find(r: Report) -> None:
    from ..train.lr_finder import load_lr_find, plot_lr_find
    if r.run.lr_find_json.is_file():
        curve = load_lr_find(r.run.lr_find_json)
        r.add(plot_lr_find(curve), "lr_find", "LR range test",
              f"Loss while the learning rate grows exponentially (raw per step, faint; smoothed, solid); "
              f"the suggestion {curve['suggestion']:.3g} was the schedule's peak: {curve['reason']}.")


def _predictions(r: Report, n: int, method: str) -> None:
    from ..weights import load
    model = load(r.run.path)
    images, labels = analysis.load_test_split(r.run.path)
    p = r.p = analysis.predict_arrays(model, images, labels)
    issues, r.issue_models = label_issues.rank_test_set(r.run.path, model, images, labels, p.probs)
    r.issues = issues
    analysis.save_gallery(r.run.path, p, label_issues=issues.flagged_indices)  # what the app shows, without the dataset
    conf = analysis.confusion(p)
    r.tables["Results"].append(("single-view test accuracy (this report)", f"{p.accuracy:.4f}"))
    r.add(plots.confusion_matrix(conf, p.classes), "confusion", "Confusion matrix",
          "Rows are true classes, normalized to sum to 1; the bars are per-class accuracy.")
    wrong = analysis.mistakes(p, n)
    if len(wrong) < n:
        r.notes.append(f"misclassified: asked for {n}, the model made only {len(wrong)} mistakes")
    doubtful = np.isin(wrong, issues.flagged_indices)
    titles = [f"{p.classes[p.labels[i]]} / {p.classes[p.preds[i]]} ({p.confidence[i]:.0%})" + ("\nlabel?" if d else "")
              for i, d in zip(wrong, doubtful)]
    if len(wrong):
        r.add(plots.image_grid(explain.upscale(images[wrong]), titles, colors=["C1" if d else "C3" for d in doubtful]),
              "misclassified", "Misclassified test images",
              f"The {len(wrong)} most confident mistakes, titled actual / predicted (confidence); "
              f"{int(doubtful.sum())} of them, titled in orange with 'label?', are likely label errors "
              "(see below): the given label, not the model, is probably wrong. 32x32 images upscaled 4x, bicubic.")
    for name, idx, what in (("gradcam", wrong[:CAM_COLUMNS], "misclassified"),
                            ("gradcam_correct", analysis.correct(p, CAM_COLUMNS), "correctly classified")):
        if len(idx) == 0:
            continue
        x = model.normalize(images[idx])
        rows = {layer: explain.overlay(images[idx], explain.heatmaps(model.net, x, p.preds[idx], layer, method))
                for layer in explain.cam_layers(model.net)}
        cap = [f"{p.classes[p.labels[i]]} / {p.classes[p.preds[i]]}" for i in idx]
        r.add(plots.cam_grid(explain.upscale(images[idx]), rows, cap), name, f"Grad-CAM, {what} images",
              f"{method} for the predicted class, one row per layer (shallow to deep), jet colours blended "
              "50/50; titles are actual / predicted.")


def _per_class(r: Report) -> None:
    """Precision, recall and F1 per class with bootstrap intervals, the ECE within each class (of
    the calibrated probabilities where the run has a temperature), and the top confusions; the same
    numbers go into results.json, where the model card reads them."""
    if r.p is None:
        return
    p = r.p
    counts = np.bincount(p.labels, minlength=len(p.classes))
    probs = "after temperature scaling" if r.temperature is not None else "no temperature fitted"
    r.grids[f"Per-class precision, recall and F1 (test set, single view; {stats.LEVEL:.0%} bootstrap intervals)"] = [
        ["class", "test images", "precision", "recall (per-class accuracy)", "F1", f"ECE in class ({probs})"],
        *[[s.name, f"{s.images:,}", s.precision.text(), s.recall.text(), s.f1.text(),
           "n/a" if s.ece is None else f"{s.ece:.2%}"] for s in stats.per_class(p.labels, p.preds, p.classes, p.probs)]]
    r.tables["Top confusions (test set)"] = [
        (f"{t} taken for {q}", f"{n:,} images ({n / counts[p.classes.index(t)]:.1%} of the {t} images)")
        for t, q, n in stats.top_confusions(p.labels, p.preds, p.classes)] or [("none", "no mistakes")]
    results = r.run.read_results()
    if results is not None:
        stats.record(results, p.labels, p.probs, p.classes)
        r.run.write_results(results)


def _temperature(r: Report) -> None:
    """The run's temperature; an older run, trained before calibration, is calibrated here."""
    from ..weights import load
    if not r.run.weights_file.is_file():
        return  # the predictions part says so
    meta, by = load(r.run.path).meta, ""
    if "temperature" not in meta:
        calibration.calibrate_run(r.run.path)
        meta, by = load(r.run.path).meta, ", by this report (the run predates calibration)"
    r.temperature, r.fitted_on = float(meta["temperature"]), meta.get("calibration_fitted_on", "?") + by


def _calibration(r: Report) -> None:
    if r.p is None:
        return
    z, y, t = r.p.logits, r.p.labels, r.temperature                            # raw logits (N, K)
    before = calibration.softmax(z)
    after = None if t is None else calibration.apply_temperature(z, t)
    rows = [("ECE before (15 bins)", f"{calibration.ece(before, y):.2%}"),
            ("NLL before", f"{calibration.nll(z, y):.4f}")]
    if after is not None:
        rows = [("temperature T", f"{t:.4f}"), ("fitted on", r.fitted_on), rows[0],
                ("ECE after", f"{calibration.ece(after, y):.2%}"), rows[1],
                ("NLL after", f"{calibration.nll(z / t, y):.4f}")]
    r.tables["Calibration (test set)"] = rows
    _trust_answers(r)
    how = ("Temperature scaling divides the logits by T, fitted on held-out images (never the test set); the app, "
           "predict and the exports show the calibrated percentages." if after is not None else
           "No temperature was fitted (see above), so the percentages shown are the raw ones.")
    r.add(calibration.reliability_figure(before, after, y), "calibration", "Calibration",
          "Reliability diagrams: test images binned by the model's confidence (15 bins); a bar reaching the "
          f"diagonal means that confidence is honest. Below, the share of images per bin. {how}")


def _trust_answers(r: Report) -> None:
    """The "none of these" score and the prediction sets fitted beside T: which, on what, and the
    sets' coverage on the test set against the coverage asked for."""
    res = r.run.read_results()
    if res is None or not res.coverage:
        return
    rows = [("fitted on", r.fitted_on or "?")]
    if res.ood:
        rows.append(("out-of-distribution score", f"{res.ood['method']}, its threshold keeping "
                                                  f"{res.ood['keep']:.0%} of the held-out images"))
    rows += [(f"{float(c):.0%} prediction sets", f"cover {cov:.2%} of the test set, {size:.2f} classes on average")
             for c, (cov, size) in sorted(res.coverage.items())]
    r.tables["None of these, and prediction sets"] = rows


def _label_issues(r: Report) -> None:
    if r.p is None:
        return
    issues, p = r.issues, r.p
    label_issues.to_csv(issues, p.classes, r.out / RunDir.LABEL_ISSUES_CSV)
    r.links.append((RunDir.LABEL_ISSUES_CSV, f"{len(issues):,} test images whose given label the model finds less "
                                             f"likely than another, most likely first; the first {issues.flagged} "
                                             "flagged (index, given and suggested label, probabilities)"))
    models = f"{r.issue_models} models (the run's and its audit's)" if r.issue_models > 1 else "the run's model"
    res = r.run.read_results()
    measured = label_issues.measured_line(res.preset if res else None)
    r.tables["Likely label errors (test set)"] = [
        ("flagged", f"{issues.flagged} of {len(p.labels):,} test images"),
        ("how many are real", measured),
        ("ranked by", f"the given label's calibrated probability from {models}, lowest first"),
        ("listed in the CSV", f"{len(issues):,}: those the model would give another class")]
    r.add(label_issues.label_issues_figure(p.images, issues, p.classes), "label_issues", "Likely label errors",
          f"The {issues.flagged} test images whose given label the model finds least plausible (its calibrated "
          "probability, lowest first, among the images it would give another class), titled given / suggested "
          f"(probability); {measured}. Check them by eye before trusting the accuracy: most of "
          f"the others are the model's own confident mistakes (single-view test accuracy {p.accuracy:.1%}), which "
          "look the same to it.")


def measure_robustness(run: RunDir, n: int | None = None, images=None, labels=None) -> robustness.RobustnessResult:
    """The robustness table of a run's final weights: accuracy under every corruption and severity on
    n test images (a seeded subsample; None: robustness.CPU_SUBSAMPLE on a CPU, all on a GPU), bf16
    where the hardware runs it natively. images, labels: the test split, when already loaded."""
    import torch

    from ..weights import load
    model = load(run.path)
    on_gpu = torch.cuda.is_available()
    model.net.to("cuda" if on_gpu else "cpu")
    if n is None:
        n = None if on_gpu else robustness.CPU_SUBSAMPLE  # the whole table in about a minute on 2 CPU cores
    if images is None:
        images, labels = analysis.load_test_split(run.path)
    return robustness.evaluate(lambda b: model.probabilities(b, autocast=True), images, labels, n=n)


def record_robustness(run: RunDir, res: robustness.RobustnessResult) -> None:
    """Its mean corruption accuracy, and the images it was measured on, in the run's results.json."""
    results = run.read_results()
    if results is not None:
        results.mean_corruption_accuracy, results.corruption_images = res.mean_corruption_accuracy, res.n
        run.write_results(results)


def _robustness(r: Report, n: int | None) -> None:
    if not r.run.weights_file.is_file():
        return  # the predictions part says so
    images, labels = analysis.load_test_split(r.run.path) if r.p is None else (r.p.images, r.p.labels)
    res = measure_robustness(r.run, n, images, labels)
    r.grids["Accuracy under corruptions"] = robustness.table_rows(res)
    r.tables["Results"].append(("mean corruption accuracy", f"{res.mean_corruption_accuracy:.4f}"))
    sample = " (a seeded subsample, the same for every point)" if res.n < len(labels) else ""
    r.add(robustness.robustness_figure(res), "robustness", "Robustness",
          "Test accuracy under six common corruptions at severities 1-5 (CIFAR-10-C's parameters, made on the fly), "
          f"on {res.n:,} test images{sample}; bf16 where the hardware runs it natively, {res.seconds:.0f} s.")
    record_robustness(r.run, res)


def _write_pages(r: Report) -> None:
    rows = "".join(f"<h2>{html.escape(t)}</h2><table>" +
                   "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in tab) +
                   "</table>" for t, tab in r.tables.items())
    rows += "".join(f"<h2>{html.escape(t)}</h2><table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in g[0]) +
                    "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                                      for row in g[1:]) + "</table>" for t, g in r.grids.items())
    rows += "".join(f'<p><a href="{f}">{html.escape(f)}</a>: {html.escape(what)}</p>' for f, what in r.links)
    figs = "".join(f'<figure><h2>{html.escape(t)}</h2><img src="{f}" alt="{html.escape(t)}">'
                   f"<figcaption>{html.escape(c)}</figcaption></figure>" for f, t, c in r.figures)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in r.notes)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>cifarkit report: "
            f"{html.escape(r.run.name)}</title><style>body{{font-family:system-ui,sans-serif;max-width:1100px;"
            "margin:2em auto;padding:0 1em;color:#222}table{border-collapse:collapse}td{border:1px solid #ccc;"
            "padding:3px 10px}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}"
            f"</style></head><body><h1>Run {html.escape(r.run.name)}</h1>{rows}"
            + (f"<h2>Not in this report</h2><ul>{notes}</ul>" if notes else "") + figs + "</body></html>")
    (r.out / RunDir.REPORT_PAGE).write_text(page)
    md = [f"# Run {r.run.name}", ""]
    for t, tab in r.tables.items():
        md += [f"## {t}", "", "| | |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in tab], ""]
    for t, g in r.grids.items():
        md += [f"## {t}", "", *["| " + " | ".join(row) + " |" for row in g[:1]],
               "| " + " | ".join("---" for _ in g[0]) + " |", *["| " + " | ".join(row) + " |" for row in g[1:]], ""]
    md += [f"- [{f}]({f}): {what}" for f, what in r.links]
    md += [f"![{t}]({f})" for f, t, _ in r.figures]
    md += ["", *[f"- not in this report: {n}" for n in r.notes]]
    (r.out / RunDir.REPORT_SUMMARY).write_text("\n".join(md) + "\n")


def _settings(run: RunDir) -> list[tuple[str, str]]:
    """The results table: the data by name, never by a path of this machine."""
    res = run.read_results()
    if res is None:
        return []
    shown = {**res.to_dict(), "data": run.data_name()}
    rows = []
    for k in ("test_acc", "test_loss", "preset", "model", "epochs", "steps", "lr", "seconds", "data",
              "train_images", "seed", "tta", "precision", "cifarkit_version"):
        v = shown.get(k)
        if v is not None:
            rows.append((k, f"{v:.4f}" if isinstance(v, float) and k.startswith("test") else str(v)))
    if res.plan:  # --time-budget: what it planned from the measured speed
        p = res.plan
        speed = ", ".join(f"{v:,.0f} images/s at {k} px" for k, v in sorted(p["images_per_second"].items()))
        n = len(p.get("replanned") or [])
        replanned = f"; re-planned {n} time{'s' * (n > 1)}, last: {p['replanned'][-1][3]}" if n else ""
        rows.append(("time budget", f"{format_seconds(p['budget'])}: {p['epochs']:.2f} epochs, {p['total_steps']:,} "
                                    f"steps planned from {speed}; predicted {p['predicted_seconds']:.0f} s{replanned}"))
    return rows


def write_report(run_dir: str | Path, n: int = 20, method: str = "gradcam", out: str | Path | None = None,
                 corruption_images: int | None = None) -> Path:
    """Write RUN_DIR/report/ (or `out`); returns its path. Raises only if nothing can be written.

    corruption_images: test images per robustness setting; None: robustness.CPU_SUBSAMPLE on a CPU,
    all of them on a GPU; 0: no robustness part."""
    run = RunDir.open(run_dir)
    if not 1 <= n <= MAX_SHOWN:
        raise CifarkitError(f"--n must be between 1 and {MAX_SHOWN}, got {n}")
    if corruption_images is not None and corruption_images < 0:
        raise CifarkitError(f"--corruption-images must be >= 0 (0 leaves robustness out), got {corruption_images}")
    explain._cam_class(method)  # an unknown method fails before any work
    r = Report(run, Path(out) if out else run.report_dir)
    try:
        r.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CifarkitError(f"cannot write the report to {r.out}: {exc.strerror or exc}") from None
    start = time.time()
    r.tables["Results"] = _settings(run)
    parts = [("curves", lambda: _curves(r)), ("LR range test", lambda: _lr_find(r)),
             ("calibration", lambda: _temperature(r)),
             ("predictions, mistakes and Grad-CAM", lambda: _predictions(r, n, method)),
             ("per-class statistics", lambda: _per_class(r)),
             ("calibration", lambda: _calibration(r)), ("likely label errors", lambda: _label_issues(r))]
    if corruption_images != 0:
        parts.append(("robustness", lambda: _robustness(r, corruption_images)))
    with progress("report", len(parts)) as bar:
        for what, part in parts:
            bar.advance(0, f"report: {what}")
            r.attempt(what, part)
            bar.advance(1)
    r.tables["Results"].append(("report seconds", f"{time.time() - start:.1f}"))
    _write_pages(r)
    return r.out


def overlays_for_files(run_dir: str | Path, images: list[str], layer: str | None = None,
                       method: str = "gradcam", alpha: float = 0.5, out: str | Path | None = None) -> list[Path]:
    """`cifarkit gradcam`: an overlay PNG per readable image file; returns the written paths."""
    from PIL import Image

    from ..images import rgb_array
    from ..weights import load
    model = load(run_dir)
    layer = explain.resolve_layer(model.net, layer)
    explain._cam_class(method)
    out_dir = Path(out) if out else RunDir(run_dir).gradcam_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with progress("Grad-CAM", len(images)) as bar:
        for path in images:
            bar.advance(1)
            try:
                arr = rgb_array(path)[None]  # (1, 32, 32, 3)
            except CifarkitError as exc:
                log.warning(f"skipped: {exc}")
                continue
            probs, cam = explain.explain_top_class(model, arr, layer, method)
            pred = int(probs[0].argmax())
            dest = out_dir / f"{Path(path).stem}-{layer}-{method}.png"
            Image.fromarray(explain.overlay(arr, cam, alpha)[0]).save(dest)
            written.append(dest)
            print(f"{path}: predicted {model.classes[pred]} -> {dest}")
    if not written:
        raise CifarkitError(f"none of the {len(images)} images could be read")
    return written
