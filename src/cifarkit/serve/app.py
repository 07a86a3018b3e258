"""The Gradio app for a trained run: classify with Grad-CAM, browse mistakes, a Grad-CAM gallery,
and the run's own numbers. It needs only the run directory (weights, gallery.npz, examples/).

`build_app(run_dir)` returns the Blocks; `launch()` serves it (127.0.0.1 unless told otherwise,
never a public share link). Every event has an api_name, so the app is also an API.

Anyone who can reach it may send it anything, so (`serve_options`, used by `launch` and the Space):
- no folder of the machine is served: Gradio serves the copies it made of the examples and figures
  when the app was built, and its own uploads and answers; the run directory and the training data
  are blocked outright (weights, checkpoints, config);
- uploads over `max_file_size` are refused while they arrive, before anything is decoded;
- each answer's images are PNG files of their own (see `_PngFiles`), and uploads and answers are
  deleted `cache_seconds` after they were made, with the folders they leave (see `_CacheCleaner`),
  so an app that runs for weeks keeps a bounded cache;
- messages in the page name only the uploaded file's own name; an unexpected failure is one generic
  line in the page and a traceback on the server.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..trust import analysis, explain
from ..errors import CifarkitError
from ..images import rgb_array
from ..rundir import Results, RunDir
from ..weights import locate
from .predict import NO_STATS, Model, answer, load_model

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

VIEW_SIZE = 256   # the 32x32 input and its overlay are shown 8x larger (bicubic)
KINDS = ("mistakes", "correct", "random")
SHOW = ("all mistakes", "likely label errors")  # the Mistakes tab's filter (label issues: the report's)
COVERAGE_CHOICES = ("off", "80%", "90%", "95%")  # the Classify tab's prediction sets
MAX_FILE_SIZE = "20mb"   # uploads over this are refused (`cifarkit app --max-file-size`)
CACHE_SECONDS = 600      # uploads and answers are deleted from Gradio's cache after 10 minutes
_UNITS = {"b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30}   # as Gradio counts them


def file_size(size: str | int) -> int:
    """'20mb', '500kb', '1gb' or a number of bytes -> bytes; anything else is one line."""
    m = re.fullmatch(r"\s*(\d+)\s*(b|kb|mb|gb)?\s*", str(size).lower())
    if not m or int(m.group(1)) == 0:
        raise CifarkitError(f"max file size {size!r} is not a size; give e.g. 20mb, 500kb or 1gb "
                            "(--max-file-size, or MAX_FILE_SIZE in a Space's app.py)")
    return int(m.group(1)) * _UNITS[m.group(2) or "b"]


def _own_name(name: str) -> str:
    """A client-supplied file name without any folder part (a browser sends 'cat.png'; an API
    client may send 'C:\\Users\\me\\cat.png' or '/home/me/cat.png')."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] or "image"


class RunApp:
    """The app's state and handlers; handlers raise CifarkitError for anything a user did wrong."""

    def __init__(self, run_dir: str | Path):
        # a Hub repository id: its whole folder (gallery, examples, figures) from the Hub cache
        self.run = RunDir.open(locate(run_dir, files=None), need=("weights", "gallery"))
        self.model: Model = load_model(self.run.path)
        self.model.net.eval()
        self.classes = self.model.classes
        self.layers = explain.cam_layers(self.model.net)
        self.gallery = analysis.load_gallery(self.run.path)
        self.results = self.run.read_results()
        self.data_name = self.run.data_name()
        self.examples = [str(p) for p in self.run.examples()]
        self.lock = threading.Lock()  # CAM hooks live on the shared net: one computation at a time

    # -- Classify ------------------------------------------------------------------------------

    def _image(self, image) -> np.ndarray:
        """An upload (Gradio file payload, path or PIL image) -> uint8 (1, 32, 32, 3). Messages name
        the uploaded file by its own name, never the server's temporary path."""
        if image is None or image == "" or (isinstance(image, dict) and not image.get("path")):
            raise CifarkitError("no image: upload, paste or pick an example first")
        name = None
        if isinstance(image, dict):
            name = _own_name(image.get("orig_name") or image["path"])
            image = image["path"]
        if isinstance(image, (str, Path)) and not Path(image).is_file():  # e.g. deleted with the cache
            raise CifarkitError(f"image {name or _own_name(str(image))} is no longer on the server; upload it again")
        return rgb_array(image, name)[None]

    def _top_k(self, probs: torch.Tensor, k) -> dict[str, float]:
        k = int(max(1, min(int(k or 1), len(self.classes))))
        top = probs.topk(k)
        return {self.classes[i]: float(p) for p, i in zip(top.values, top.indices)}

    def _answer(self, arr: np.ndarray, k, coverage) -> tuple[dict[str, float] | str, str, int]:
        """(the Label's value: the top-k classes, or "not one of the K classes (looks least unlike:
        X)"; a line with the prediction set at `coverage` (e.g. "90%"; "" or "off": none); the top class)."""
        coverage = None if coverage in (None, "", "off") else float(str(coverage).rstrip("%")) / 100
        a = self.model.assess(arr, coverage)
        best = int(a.probabilities[0].argmax())
        top = self._top_k(a.probabilities[0], k)
        unknown = a.unknown is not None and bool(a.unknown[0])
        label = answer({"top": [{"class": c, "prob": p} for c, p in top.items()], "unknown": unknown},
                       len(self.classes)) if unknown else top
        if a.sets is None:
            return label, "" if coverage is None else NO_STATS, best
        members = [c for c, inside in zip(self.classes, a.sets[0].tolist()) if inside]
        return label, f"prediction set at {coverage:.0%}: {', '.join(members) or 'empty (no class is likely enough)'}", best

    def predict(self, image, k=3, coverage="off") -> dict[str, float] | str:
        arr = self._image(image)
        with self.lock:
            return self._answer(arr, k, coverage)[0]

    def classify(self, image, k=3, alpha=0.5, layer=None, method="gradcam", coverage="off"):
        """The answer (top-k classes, or "none of these"), the Grad-CAM overlay of the top class, the
        32x32 input upscaled, and the prediction set's line."""
        arr = self._image(image)
        layer = explain.resolve_layer(self.model.net, layer or None)
        with self.lock:
            label, set_line, best = self._answer(arr, k, coverage)
            cam = explain.heatmaps(self.model.net, self.model.normalize(arr), [best], layer, method or "gradcam")
        return (label, explain.overlay(arr, cam, float(alpha), VIEW_SIZE)[0],
                explain.upscale(arr, VIEW_SIZE)[0], set_line)

    # -- Mistakes and the Grad-CAM gallery -------------------------------------------------------

    def _class_index(self, name) -> int | None:
        if name in (None, "", "any"):
            return None
        if name not in self.classes:
            raise CifarkitError(f"unknown class '{name}'; choose one of: {', '.join(self.classes)}")
        return self.classes.index(name)

    def _caption(self, i: int) -> str:
        g = self.gallery
        doubt = ", likely label error" if g.label_issue is not None and g.label_issue[i] else ""
        return f"actual {g.classes[g.labels[i]]} / predicted {g.classes[g.preds[i]]} ({g.confidence[i]:.0%}){doubt}"

    def mistakes(self, n=20, true_class="any", predicted_class="any", show=SHOW[0]) -> list[tuple[np.ndarray, str]]:
        """The most confident mistakes; show='likely label errors': the images the report flagged as
        likely mislabelled (label_issues.py, over the whole test set), in the report's order."""
        n = int(max(1, min(int(n), 100)))
        g = self.gallery
        if show not in SHOW:
            raise CifarkitError(f"unknown selection '{show}'; choose one of: {', '.join(SHOW)}")
        true, pred = self._class_index(true_class), self._class_index(predicted_class)
        idx = self._flagged(true, pred) if show == SHOW[1] else analysis.mistakes(g, None, true, pred)
        return [(explain.upscale(g.images[[i]], 128)[0], self._caption(i)) for i in idx[:n]]

    def _flagged(self, true: int | None, pred: int | None) -> np.ndarray:
        """Gallery positions of the flagged images of these classes, likeliest label error first, each once."""
        g = self.gallery
        if g.label_issue is None:
            raise CifarkitError("this run's gallery has no label-error flags: it predates them; "
                                "write the report again with `cifarkit report` on the run")
        keep = g.label_issue.copy()
        if true is not None:
            keep &= g.labels == true
        if pred is not None:
            keep &= g.preds == pred
        idx = np.flatnonzero(keep)
        if g.label_issue_rank is None:  # a gallery from before the ranking was stored: most confident first
            return idx[np.argsort(-g.confidence[idx], kind="stable")]
        _, first = np.unique(g.label_issue_rank[idx], return_index=True)      # sorted by rank, each once
        return idx[first]

    def gradcam_gallery(self, n=10, alpha=0.5, layer=None, which="mistakes", method="gradcam"):
        n = int(max(1, min(int(n), 50)))
        if which not in KINDS:
            raise CifarkitError(f"unknown selection '{which}'; choose one of: {', '.join(KINDS)}")
        g = self.gallery
        kind = {"mistakes": "mistake"}.get(which, which)
        idx = np.flatnonzero(g.kind == kind)[:n]
        layer = explain.resolve_layer(self.model.net, layer or None)
        x = self.model.normalize(g.images[idx])
        with self.lock:
            maps = explain.heatmaps(self.model.net, x, g.preds[idx], layer, method or "gradcam")
        overlays = explain.overlay(g.images[idx], maps, float(alpha), 128)
        return [(o, self._caption(i)) for o, i in zip(overlays, idx)]

    def run_summary(self) -> str:
        """The run's numbers, with the data by name (never a path of the machine that trained it)."""
        r = self.results or Results()
        acc = f"{r.test_acc:.2%}" if r.test_acc is not None else "not recorded"
        def known(v):
            return "?" if v is None else v
        epochs = "?" if r.epochs is None else f"{r.epochs:.2f}".rstrip("0").rstrip(".")
        fitted = "" if self.model.detector is not None else f"  \n{NO_STATS}"
        return (f"**Test accuracy: {acc}** on {known(r.test_images)} test images ({self.data_name})  \n"
                f"model `{r.model or self.model.meta.get('model')}`, preset `{known(r.preset)}`, "
                f"{epochs} epoch{'' if epochs == '1' else 's'}, {known(r.seconds)} s, seed {known(r.seed)}{fitted}")


def _ui(fn):
    """A user's mistake becomes its one-line message in the page (gr.Error); anything else becomes
    one generic line there (it might name a path of the server) and a traceback on the server."""
    import gradio as gr

    def wrapped(*args):
        try:
            return fn(*args)
        except CifarkitError as exc:
            raise gr.Error(str(exc)) from None
        except Exception:
            traceback.print_exc(file=sys.stderr)
            raise gr.Error("the server could not answer this request; try again or with another image") from None
    wrapped.__name__ = fn.__name__
    return wrapped


class _PngFiles:
    """Answer images as PNG files with names of their own in Gradio's cache folder.

    Given arrays, Gradio names each file by its content's hash and writes it in place: identical
    answers sent at the same moment (the examples row) rewrite one shared file while other clients
    download it, and those downloads come back cut short. A file of its own per answer is never
    rewritten. Gradio serves it as its own (it lies in its cache); _CacheCleaner deletes it."""

    def __init__(self, cache: str | Path):
        self.folder = Path(cache) / "cifarkit"

    def __call__(self, image: np.ndarray, kind: str) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{kind}-{uuid.uuid4().hex[:16]}.png"
        Image.fromarray(image).save(path, format="png")
        return str(path)


def _release_memory() -> None:
    """Hand freed heap memory back to the system. glibc keeps what a thread freed in that thread's
    arena; with Gradio's pool of worker threads a busy app's resident memory climbed ~30 MB a minute
    while no Python object grew (measured: bench/app_soak.py), and malloc_trim gives it back.
    Nothing to do where there is no glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _CacheCleaner:
    """Deletes this app's uploads and answers from Gradio's cache `age` seconds after they were
    made, checking every `every` seconds, and the folders they leave; everything at shutdown. Each
    pass also hands freed memory back to the system (`_release_memory`).

    Gradio's own delete_cache does the first part, but (6.31) it walks each set of files while
    request threads add to it: the first "Set changed size during iteration" ends its task for good
    and nothing is deleted after that (minutes into steady traffic). It also leaves the folder each
    upload sat in (named by the content's hash): one empty folder per new image, forever. This does
    the same walk over snapshots, and removes a folder of Gradio's cache when its last file goes
    (never our own answers' folder, `keep`)."""

    def __init__(self, demo, every: int, age: int, keep: Path):
        self.demo, self.every, self.age, self.keep = demo, every, age, keep.resolve()
        self.folders: set[Path] = set()

    def _kept(self) -> set[str]:
        """The examples and figures (Gradio marks them keep_in_cache): never deleted."""
        return {f for block in list(self.demo.blocks.values()) for f in getattr(block, "keep_in_cache", ())}

    def clean(self, age: float | None = None) -> None:
        age = self.age if age is None else age
        kept, now = self._kept(), time.time()
        cache = Path(self.demo.GRADIO_CACHE).resolve()
        for files in list(self.demo.temp_file_sets):
            for f in list(files):               # a snapshot: request threads add to the set meanwhile
                if f in kept:
                    continue
                folder = Path(f).parent
                try:
                    if now - os.lstat(f).st_ctime > age:   # ctime, as Gradio: a reused file is touched
                        os.remove(f)
                        files.discard(f)
                        self._remove_if_empty(folder, cache)
                    else:
                        self.folders.add(folder)
                except FileNotFoundError:
                    files.discard(f)
                    self._remove_if_empty(folder, cache)
        for folder in list(self.folders):           # folders whose files went another way
            try:
                if now - folder.stat().st_mtime > age:
                    self._remove_if_empty(folder, cache)
            except FileNotFoundError:
                self.folders.discard(folder)
        _release_memory()

    def _remove_if_empty(self, folder: Path, cache: Path) -> None:
        """rmdir a folder directly in Gradio's cache (not our answers' folder) if it is empty."""
        try:
            real = folder.resolve()
            if real != self.keep and real.parent == cache:
                folder.rmdir()                      # refuses a folder that is not empty
            self.folders.discard(folder)
        except FileNotFoundError:
            self.folders.discard(folder)
        except OSError:
            pass                                    # not empty

    @contextlib.asynccontextmanager
    async def lifespan(self, _app):
        async def loop():
            while True:
                await asyncio.sleep(self.every)
                try:
                    await asyncio.to_thread(self.clean)
                except Exception:                   # one bad pass must not end the cleaning
                    traceback.print_exc(file=sys.stderr)
        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(Exception):
                self.clean(age=-1)                  # at shutdown: everything but the kept files


def _blocked(app: RunApp) -> list[str]:
    """Folders no file route may serve from: the run directory and the training data."""
    source, *_ = app.run.data_source()
    return [str(app.run.path.resolve())] + ([str(Path(source).resolve())] if source and os.path.isabs(source) else [])


def build_app(run_dir: str | Path, cache_seconds: int = CACHE_SECONDS):
    import gradio as gr
    app = RunApp(run_dir)
    choices = ["any", *app.classes]
    fig = {n: app.run.figure(n) for n in app.run.APP_FIGURES}
    with gr.Blocks(title="cifarkit") as demo:      # not delete_cache=: see _CacheCleaner
        png = _PngFiles(demo.GRADIO_CACHE)
        # uploads and answers older than cache_seconds go, checked every minute (or 5x per lifetime)
        demo.cifarkit_cleaner = _CacheCleaner(demo, max(1, min(60, cache_seconds // 5)), cache_seconds, png.folder)

        def classify(*args):
            label, overlay, view, set_line = app.classify(*args)
            return label, png(overlay, "gradcam"), png(view, "input"), set_line

        def mistakes(*args):
            return [(png(im, "mistake"), caption) for im, caption in app.mistakes(*args)]

        def gradcam_gallery(*args):
            return [(png(im, "gradcam"), caption) for im, caption in app.gradcam_gallery(*args)]

        gr.Markdown(f"# cifarkit: {app.model.meta.get('model', '')} on {len(app.classes)} classes\n{app.run_summary()}")
        with gr.Tab("Classify"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image (any size)",
                                     elem_id="input-image")
                    k = gr.Slider(1, len(app.classes), value=min(3, len(app.classes)), step=1, label="Top classes")
                    alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="Heatmap transparency")
                    layer = gr.Dropdown(app.layers, value=app.layers[-1], label="Grad-CAM layer")
                    method = gr.Dropdown(list(explain.METHODS), value="gradcam", label="CAM method")
                    coverage = gr.Radio(list(COVERAGE_CHOICES), value="off", label="Prediction set (coverage)",
                                        elem_id="coverage")
                    go = gr.Button("Classify", variant="primary", elem_id="classify")
                    if app.examples:
                        gr.Examples(app.examples, inputs=image, label="Test images")
                with gr.Column():
                    label = gr.Label(label="Prediction", elem_id="prediction")
                    set_line = gr.Markdown(elem_id="prediction-set")
                    cam = gr.Image(label="Grad-CAM", format="png", elem_id="overlay")
                    view = gr.Image(label="What the model sees (32x32, shown 8x)", format="png")
            go.click(_ui(classify), [image, k, alpha, layer, method, coverage], [label, cam, view, set_line],
                     api_name="classify", preprocess=False)
            image.upload(_ui(app.predict), [image, k, coverage], label, api_name="predict", preprocess=False)
        with gr.Tab("Mistakes"):
            with gr.Row():
                n = gr.Slider(1, 100, value=20, step=1, label="How many")
                true_c = gr.Dropdown(choices, value="any", label="True class")
                pred_c = gr.Dropdown(choices, value="any", label="Predicted class")
                only = gr.Radio(list(SHOW), value=SHOW[0], label="Show", elem_id="mistakes-filter")
            show = gr.Button("Show mistakes", elem_id="show-mistakes")
            gallery = gr.Gallery(label="Misclassified test images", columns=4, format="png", elem_id="mistakes")
            show.click(_ui(mistakes), [n, true_c, pred_c, only], gallery, api_name="mistakes")
        with gr.Tab("Grad-CAM gallery"):
            with gr.Row():
                gn = gr.Slider(1, 50, value=10, step=1, label="How many")
                galpha = gr.Slider(0, 1, value=0.5, step=0.05, label="Heatmap transparency")
                glayer = gr.Dropdown(app.layers, value=app.layers[-1], label="Layer")
                which = gr.Radio(list(KINDS), value="mistakes", label="Images")
            gshow = gr.Button("Show Grad-CAM", elem_id="show-gradcam")
            ggallery = gr.Gallery(label="Grad-CAM overlays", columns=4, format="png", elem_id="gradcam-gallery")
            gshow.click(_ui(gradcam_gallery), [gn, galpha, glayer, which], ggallery, api_name="gradcam_gallery")
        with gr.Tab("Run"):
            gr.Markdown(app.run_summary(), elem_id="run-summary")
            for name, path in fig.items():
                if path.is_file():
                    gr.Image(str(path), label=name.capitalize(), format="png", interactive=False)
            summary_btn = gr.Button("Refresh", visible=False)
            summary_btn.click(app.run_summary, None, gr.Markdown(visible=False), api_name="run_summary")
    demo.queue(default_concurrency_limit=2, max_size=256)
    demo.cifarkit_blocked = _blocked(app)
    return demo


def serve_options(demo, max_file_size: str | int = MAX_FILE_SIZE) -> dict:
    """What demo.launch needs to serve only what it should (the module docstring): `launch` and
    the Space's app.py both use it."""
    return dict(allowed_paths=[], blocked_paths=demo.cifarkit_blocked, max_file_size=file_size(max_file_size),
                show_error=False, app_kwargs={"lifespan": demo.cifarkit_cleaner.lifespan})


def launch(run_dir: str | Path, host: str = "127.0.0.1", port: int | None = None,
           max_file_size: str | int = MAX_FILE_SIZE, cache_seconds: int = CACHE_SECONDS, **kwargs):
    """Serve the app; binds loopback by default and never creates a public share link."""
    import gradio as gr
    file_size(max_file_size)  # a wrong size is one line before the model loads
    demo = build_app(run_dir, cache_seconds)
    demo.launch(server_name=host, server_port=port, share=False, theme=gr.themes.Soft(),
                **serve_options(demo, max_file_size), **kwargs)
    return demo
