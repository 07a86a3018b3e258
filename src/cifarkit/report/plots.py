"""Pure matplotlib: each function takes data and returns a Figure (the caller saves or shows it)."""
from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

# Figures are built without pyplot: importing or calling this module never touches matplotlib's
# backend or pyplot's figure registry (a notebook shows a returned Figure inline; savefig works).


def _figure(nrows: int = 1, ncols: int = 1, figsize=(7, 3.8), **kw):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def curves(m: dict) -> Figure:
    """The seed's 2x2: train/validation loss and accuracy per epoch, the test result marked."""
    fig, axes = _figure(2, 2, figsize=(11, 7.5))
    panels = [("train_loss", "Training loss"), ("val_loss", "Validation loss"),
              ("train_acc", "Training accuracy"), ("val_acc", "Validation accuracy")]
    x = m["epochs"]
    for ax, (key, title) in zip(axes.flat, panels):
        y = m["epoch"].get(key)
        if y is not None and not np.all(np.isnan(y)):
            ax.plot(x, y, marker="o", ms=3)
        else:
            why = "no validation split (--val-size 0)" if key.startswith("val") else "not logged"
            ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, color="gray")
        test_key = "test_" + key.split("_")[1]
        if key.startswith("val") and test_key in m["test"]:
            ax.axhline(m["test"][test_key], color="C3", ls="--", label=f"test {m['test'][test_key]:.4f}")
            ax.legend(loc="best")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def lr_schedule(steps: list[int], lrs: list[float]) -> Figure:
    fig, ax = _figure(figsize=(7, 3.8))
    ax.plot(steps, lrs)
    ax.set(title="Learning rate per step", xlabel="optimizer step", ylabel="learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_matrix(conf: np.ndarray, classes: list[str]) -> Figure:
    """Row-normalized confusion matrix with class names, and per-class accuracy beside it."""
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    k = len(classes)
    fig, (ax, bx) = _figure(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [3, 1.2]})
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix (rows sum to 1)")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046)
    acc = np.diag(norm)
    bx.barh(range(k), acc, color="C0")
    bx.set_yticks(range(k), classes)
    bx.invert_yaxis()
    bx.set_xlim(0, 1)
    bx.set_title("Per-class accuracy")
    for i, a in enumerate(acc):  # label inside a long bar, beside a short one
        inside = a > 0.25
        bx.text(a - 0.01 if inside else a + 0.01, i, f"{a:.1%}", va="center", ha="right" if inside else "left",
                fontsize=8, color="white" if inside else "black")
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, titles: list[str], ncols: int = 5, colors: list[str] | None = None,
               suptitle: str | None = None) -> Figure:
    """uint8 images (N, H, W, 3) in a grid, each with a title."""
    n = max(len(images), 1)
    nrows = -(-n // ncols)
    fig, axes = _figure(nrows, ncols, figsize=(2.3 * ncols, 2.5 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i])
            ax.set_title(titles[i], fontsize=8, color=(colors or ["black"] * n)[i])
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def cam_grid(inputs: np.ndarray, rows: dict[str, np.ndarray], titles: list[str], suptitle: str = "") -> Figure:
    """A row of inputs, then one row of overlays per layer (the seed's Grad-CAM grid)."""
    n = len(inputs)
    nrows = 1 + len(rows)
    fig, axes = _figure(nrows, n, figsize=(1.7 * n, 1.9 * nrows), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(inputs[j])
        axes[0, j].set_title(titles[j], fontsize=6)
        for i, (layer, overlays) in enumerate(rows.items(), start=1):
            axes[i, j].imshow(overlays[j])
    for i, label in enumerate(["input", *rows]):
        axes[i, 0].set_ylabel(label, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig
