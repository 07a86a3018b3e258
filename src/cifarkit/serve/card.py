"""The model card of a published run, made with huggingface_hub's ModelCard and ModelCardData: its
front matter holds `model-index` results (the Hub renders them as an evaluation widget and its
metadata loader reads them back), the license, tags and library; its text says how the run was
trained and how to load it. Numbers come from the run's public results, which name the data and
hold no path of this machine.
"""
from __future__ import annotations

import re

from ..errors import CifarkitError
from ..trust import stats
from ..version import __version__
from ..weights import Loaded

# the Hub's dataset ids of the datasets cifarkit trains on (a copy of one is still that dataset)
HUB_DATASETS = {"CIFAR-100": "uoft-cs/cifar100", "CIFAR-10": "uoft-cs/cifar10"}
TAGS = ["image-classification", "cifarkit", "pytorch", "pytorch-lightning", "safetensors"]
CARD_FIGURES = ("curves", "confusion", "calibration", "robustness")  # shown in the card when pushed


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise CifarkitError("the model card needs huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def dataset_id(data: str) -> str:
    """The Hub dataset a run's data is, by its public name ('CIFAR-10, JPEG-q75 copy' is CIFAR-10)."""
    for name, hub_id in HUB_DATASETS.items():
        if data.startswith(name):
            return hub_id
    return re.sub(r"[^a-z0-9]+", "-", data.lower()).strip("-") or "unknown"


def eval_results(res: dict) -> list:
    """model-index entries: test accuracy, ECE after the temperature, mean corruption accuracy."""
    hub, data = _hub(), str(res.get("data") or "unknown data")
    common = dict(task_type="image-classification", task_name="Image Classification",
                  dataset_type=dataset_id(data), dataset_name=data, dataset_split="test")
    metrics = [("accuracy", "Test accuracy", res.get("test_acc")),
               ("ece", "Expected calibration error after temperature scaling (15 bins)", res.get("ece_after")),
               ("accuracy", "Mean corruption accuracy (6 corruptions x 5 severities)",
                res.get("mean_corruption_accuracy"))]
    return [hub.EvalResult(**common, metric_type=kind, metric_name=name, metric_value=round(float(value), 4))
            for kind, name, value in metrics if value is not None]


def _name(m: Loaded, repo: str | None) -> str:
    return repo.split("/")[-1] if repo else f"cifarkit-{m.meta['model']}"


def card_data(m: Loaded, res: dict, repo: str | None, license: str):
    hub = _hub()
    name = _name(m, repo)
    data = str(res.get("data") or "")
    results = eval_results(res) if res else []
    return hub.ModelCardData(
        model_name=name, library_name="cifarkit", license=license, pipeline_tag="image-classification",
        tags=TAGS + [m.meta["model"]], datasets=[dataset_id(data)] if data else None,
        metrics=sorted({r.metric_type for r in results}) or None, eval_results=results or None)


def _number(value, fmt: str) -> str:
    return format(float(value), fmt) if value is not None else "not recorded"


def _results_lines(m: Loaded, res: dict) -> list[str]:
    data = str(res.get("data", "unknown data"))
    if "JPEG-q75" in data:
        data += " (about 3 points below the original CIFAR-10 for the same recipe)"
    acc = res.get("test_acc", m.meta.get("test_acc"))
    return [f"- Test accuracy: **{_number(acc, '.2%')}** ({res.get('test_images', '?')} test images, "
            f"test-time views level {res.get('tta', '?')})",
            f"- Data: {data}",
            f"- Probabilities: {_calibration_line(m, res)}",
            f"- Mean corruption accuracy: {_number(res.get('mean_corruption_accuracy'), '.2%')}"
            + (f" (on {res['corruption_images']} test images per setting)" if res.get("corruption_images") else ""),
            f"- Classes: {', '.join(m.classes)}",
            f"- Input: 32x32 RGB, normalized with mean {m.mean} and std {m.std}"]


def _calibration_line(m: Loaded, res: dict) -> str:
    if "temperature" not in m.meta:
        return "softmax of the logits, not calibrated (run `cifarkit calibrate` on the run, then push again)"
    ece = f"; test ECE {_number(res.get('ece_before'), '.4f')} before, {_number(res.get('ece_after'), '.4f')} after" \
        if res.get("ece_after") is not None else ""
    return (f"temperature-scaled (T = {m.temperature:.3f}, fitted on the {m.meta.get('calibration_fitted_on', '?')}"
            f"{ece}); `probabilities()` applies it")


def _per_class_lines(res: dict) -> list[str]:
    """Precision, recall, F1 (with their bootstrap intervals) and ECE per class, and the top confusions."""
    if not res.get("per_class"):
        return ["Per-class precision and recall: not measured (run `cifarkit report` on the run, then push again).",
                ""]
    pc = res["per_class"]
    lines = ["## Per class", "",
             f"On the test set, single view; {pc['level']:.0%} percentile bootstrap intervals over the test images "
             f"({pc['resamples']:,} resamples, seed {pc['seed']}); a share of fewer than {pc['min_images']} images "
             "gets no interval. ECE: the calibration error within the class (15 bins), after the temperature "
             "where the run has one.", "",
             "| class | test images | precision | recall | F1 | ECE |", "| --- | ---: | --- | --- | --- | ---: |"]
    lines += [f"| {s.name} | {s.images:,} | {s.precision.text()} | {s.recall.text()} | {s.f1.text()} | "
              f"{_number(s.ece, '.2%')} |" for s in stats.from_summary(pc)]
    if res.get("confusions"):
        lines += ["", "Most frequent confusions (true class taken for another): " + ", ".join(
            f"{c['true']} as {c['predicted']} ({c['images']:,})" for c in res["confusions"]) + "."]
    return lines + [""]


def _training_lines(res: dict) -> list[str]:
    plan = res.get("plan")
    lines = ["## Training", "",
             f"Preset `{res.get('preset', '?')}`, {res.get('epochs', '?')} epochs ({res.get('steps', '?')} steps), "
             f"peak lr {res.get('lr', '?')}, seed {res.get('seed', '?')}, precision {res.get('precision', '?')}, "
             f"{res.get('train_images', '?')} training images, {_number(res.get('seconds'), '.0f')} s.", "",
             "The resolved settings are in `config.yaml`; the same training again (give your copy of the data):",
             "", "```bash", "cifarkit train --config config.yaml --data PATH/TO/DATA", "```", ""]
    if plan:
        lines += [f"Planned by a time budget of {_number(res.get('time_budget'), '.0f')} s: "
                  f"{plan.get('schedule', {}).get('epochs', '?')} epochs, "
                  f"{len(plan.get('replanned') or [])} re-plan(s) during training.", ""]
    return lines


def _use_lines(repo: str | None) -> list[str]:
    repo = repo or "path/to/this/folder"
    return ["## Use", "", "```bash", "pip install cifarkit", f"cifarkit predict {repo} photo.jpg",
            f"cifarkit app {repo}          # the Gradio app: classify, Grad-CAM, mistakes", "```", "",
            "```python", "import cifarkit", "from PIL import Image", "",
            f"model = cifarkit.load(\"{repo}\")   # downloaded once into the Hub cache; eval mode, CPU",
            "probs = model.probabilities([Image.open(\"cat.jpg\")])   # calibrated, (1, classes)",
            "```", "", "Pin a version with `revision=` (or `USER/NAME@REVISION` on the command line); with "
            "`HF_HUB_OFFLINE=1` it loads from the cache without the network.", ""]


def model_card(m: Loaded, res: dict, repo: str | None = None, license: str = "mit", figures: tuple[str, ...] = ()):
    """A huggingface_hub ModelCard for `repo` (None: a local folder); `figures`: relative paths of
    the images it shows."""
    hub = _hub()
    data = card_data(m, res, repo, license)
    body = ["", f"# {_name(m, repo)}: {m.meta['model']} trained with cifarkit", "",
            *_results_lines(m, res), "", *_per_class_lines(res), *_use_lines(repo), *_training_lines(res)]
    if figures:
        body += ["## Figures", "", *[f"![{f.rsplit('/', 1)[-1][:-4]}]({f})" for f in figures], ""]
    body += [f"Made with cifarkit {__version__}.", ""]
    return hub.ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body))
