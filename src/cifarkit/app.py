"""The Gradio app for a trained run: classify with Grad-CAM, browse mistakes, a Grad-CAM gallery,
and the run's own numbers. It needs only the run directory (weights, gallery.npz, examples/).

`build_app(run_dir)` returns the Blocks; `launch()` serves it (127.0.0.1 unless told otherwise,
never a public share link). Every event has an api_name, so the app is also an API.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from . import analysis, explain
from .errors import CifarkitError
from .images import rgb_array
from .rundir import Results, RunDir
from .weights import Loaded, load

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

VIEW_SIZE = 256   # the 32x32 input and its overlay are shown 8x larger (bicubic)
KINDS = ("mistakes", "correct", "random")
SHOW = ("all mistakes", "likely label errors")  # the Mistakes tab's filter (label issues: the report's)


class RunApp:
    """The app's state and handlers; handlers raise CifarkitError for anything a user did wrong."""

    def __init__(self, run_dir: str | Path):
        self.run = RunDir.open(run_dir, need=("weights", "gallery"))
        self.model: Loaded = load(self.run.path)
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
            name = image.get("orig_name") or Path(image["path"]).name
            image = image["path"]
        return rgb_array(image, name)[None]

    def _top_k(self, probs: torch.Tensor, k) -> dict[str, float]:
        k = int(max(1, min(int(k or 1), len(self.classes))))
        top = probs.topk(k)
        return {self.classes[i]: float(p) for p, i in zip(top.values, top.indices)}

    def predict(self, image, k=3) -> dict[str, float]:
        arr = self._image(image)
        with self.lock:
            probs = self.model.probabilities(arr)[0]
        return self._top_k(probs, k)

    def classify(self, image, k=3, alpha=0.5, layer=None, method="gradcam"):
        """Top-k classes, the Grad-CAM overlay of the top class, and the 32x32 input upscaled."""
        arr = self._image(image)
        layer = explain.resolve_layer(self.model.net, layer or None)
        with self.lock:
            probs, cam = explain.explain_top_class(self.model, arr, layer, method or "gradcam")
        return (self._top_k(probs[0], k), explain.overlay(arr, cam, float(alpha), VIEW_SIZE)[0],
                explain.upscale(arr, VIEW_SIZE)[0])

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
        """The most confident mistakes; show='likely label errors' keeps those whose given label the
        report found implausible (confident learning over the whole test set, flagged in the gallery)."""
        n = int(max(1, min(int(n), 100)))
        g = self.gallery
        if show not in SHOW:
            raise CifarkitError(f"unknown selection '{show}'; choose one of: {', '.join(SHOW)}")
        idx = analysis.mistakes(g, None, self._class_index(true_class), self._class_index(predicted_class))
        if show == SHOW[1]:
            if g.label_issue is None:
                raise CifarkitError("this run's gallery has no label-error flags: it predates them; "
                                    "write the report again with `cifarkit report` on the run")
            idx = idx[g.label_issue[idx]]
        return [(explain.upscale(g.images[[i]], 128)[0], self._caption(i)) for i in idx[:n]]

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
        return (f"**Test accuracy: {acc}** on {known(r.test_images)} test images ({self.data_name})  \n"
                f"model `{r.model or self.model.meta.get('model')}`, preset `{known(r.preset)}`, "
                f"{known(r.epochs)} epochs, {known(r.seconds)} s, seed {known(r.seed)}")


def _ui(fn):
    """Turn a user's mistake into a message in the UI (gr.Error), never a stack trace."""
    import gradio as gr

    def wrapped(*args):
        try:
            return fn(*args)
        except CifarkitError as exc:
            raise gr.Error(str(exc)) from None
    wrapped.__name__ = fn.__name__
    return wrapped


def build_app(run_dir: str | Path):
    import gradio as gr
    app = RunApp(run_dir)
    choices = ["any", *app.classes]
    fig = {n: app.run.report_dir / f"{n}.png" for n in ("curves", "confusion")}
    with gr.Blocks(title="cifarkit") as demo:
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
                    go = gr.Button("Classify", variant="primary", elem_id="classify")
                    if app.examples:
                        gr.Examples(app.examples, inputs=image, label="Test images")
                with gr.Column():
                    label = gr.Label(label="Prediction", elem_id="prediction")
                    cam = gr.Image(label="Grad-CAM", format="png", elem_id="overlay")
                    view = gr.Image(label="What the model sees (32x32, shown 8x)", format="png")
            go.click(_ui(app.classify), [image, k, alpha, layer, method], [label, cam, view],
                     api_name="classify", preprocess=False)
            image.upload(_ui(app.predict), [image, k], label, api_name="predict", preprocess=False)
        with gr.Tab("Mistakes"):
            with gr.Row():
                n = gr.Slider(1, 100, value=20, step=1, label="How many")
                true_c = gr.Dropdown(choices, value="any", label="True class")
                pred_c = gr.Dropdown(choices, value="any", label="Predicted class")
                only = gr.Radio(list(SHOW), value=SHOW[0], label="Show", elem_id="mistakes-filter")
            show = gr.Button("Show mistakes", elem_id="show-mistakes")
            gallery = gr.Gallery(label="Misclassified test images", columns=4, format="png", elem_id="mistakes")
            show.click(_ui(app.mistakes), [n, true_c, pred_c, only], gallery, api_name="mistakes")
        with gr.Tab("Grad-CAM gallery"):
            with gr.Row():
                gn = gr.Slider(1, 50, value=10, step=1, label="How many")
                galpha = gr.Slider(0, 1, value=0.5, step=0.05, label="Heatmap transparency")
                glayer = gr.Dropdown(app.layers, value=app.layers[-1], label="Layer")
                which = gr.Radio(list(KINDS), value="mistakes", label="Images")
            gshow = gr.Button("Show Grad-CAM", elem_id="show-gradcam")
            ggallery = gr.Gallery(label="Grad-CAM overlays", columns=4, format="png", elem_id="gradcam-gallery")
            gshow.click(_ui(app.gradcam_gallery), [gn, galpha, glayer, which], ggallery, api_name="gradcam_gallery")
        with gr.Tab("Run"):
            gr.Markdown(app.run_summary(), elem_id="run-summary")
            for name, path in fig.items():
                if path.is_file():
                    gr.Image(str(path), label=name.capitalize(), format="png", interactive=False)
            summary_btn = gr.Button("Refresh", visible=False)
            summary_btn.click(app.run_summary, None, gr.Markdown(visible=False), api_name="run_summary")
    demo.queue(default_concurrency_limit=2, max_size=256)
    demo.cifarkit_allowed = [str(app.run.path.resolve())]
    return demo


def launch(run_dir: str | Path, host: str = "127.0.0.1", port: int | None = None, **kwargs):
    """Serve the app; binds loopback by default and never creates a public share link."""
    import gradio as gr
    demo = build_app(run_dir)
    demo.launch(server_name=host, server_port=port, share=False, show_error=True,
                allowed_paths=demo.cifarkit_allowed, theme=gr.themes.Soft(), **kwargs)
    return demo
