"""cifarkit's LR range test against the seed project's library (torch-lr-finder 0.2.2), on one net,
one sequence of batches and one exponential sweep; and Lightning's own finder's first points.

Usage:
  pip install 'cifarkit[bench]'            # torch-lr-finder==0.2.2, a bench-only dependency
  python bench/lr_finder_compare.py [--batch-size 512] [--steps 200] [--out runs/bench/lr_finder]

Both sides: the seed's ResNet-18-GN (cifarkit.models.build_model, channels_last) from the same
initial weights; the same `--steps` training batches of the real data (cifarkit's data module and
the seed preset's augmentation, drawn once and fed to both in the same order), fp32; SGD momentum
0.9, weight decay 5e-4; the rate swept exponentially from --min-lr to --max-lr over --steps steps.
cifarkit: `find_lr` on `--preset seed`'s LitClassifier (its defaults; it stops on divergence).
torch-lr-finder: `LRFinder.range_test` with its defaults (smooth_f 0.05, diverge_th 5, "exp") and
its suggestion, `plot(suggest_lr=True)`: the steepest gradient after skipping 10 points at the
start and 5 at the end. Lightning (`Tuner.lr_find`, --lightning-steps of them) runs only to show
where its smoothed curve starts against the raw first loss (its issue #14167).

Writes OUT/compare.png (both curves, both suggestions) and OUT/compare.json; prints the numbers.
"""
import argparse
import json
import math
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from cifarkit.train.lr_finder import LRFindRefused, find_lr, save_lr_find
from cifarkit.train.module import LitClassifier
from cifarkit.presets import preset_config
from cifarkit.train.fit import build_datamodule, build_module

p = argparse.ArgumentParser()
p.add_argument("--batch-size", type=int, default=512, help="the seed preset's 512; smaller on a CPU")
p.add_argument("--steps", type=int, default=200, help="sweep steps (the seed preset's lr_find num_training)")
p.add_argument("--min-lr", type=float, default=1e-5)
p.add_argument("--max-lr", type=float, default=10.0)
p.add_argument("--lightning-steps", type=int, default=20, help="Lightning's finder, for its first points (0: skip)")
p.add_argument("--data", default=None, help="CIFAR-10 (default: $CIFARKIT_DATA, cache, download)")
p.add_argument("--model", default="resnet18_gn", help="the seed's net; another only for a smoke run")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="runs/bench/lr_finder")
p.add_argument("--replot", action="store_true", help="only redraw OUT/compare.png from OUT/compare.json")
args = p.parse_args()
warnings.filterwarnings("ignore")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)


def draw(summary: dict) -> Figure:
    """Both smoothed curves (cifarkit's raw losses faint), both suggestions and both minima."""
    ours, theirs = summary["cifarkit"], summary["torch_lr_finder"]
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    values = []
    c = ours.get("curve")
    if c:
        ax.plot(c["lr"], c["raw_loss"], color="C0", alpha=0.25, lw=0.8, label="cifarkit: raw loss per step")
        ax.plot(c["lr"], c["smooth_loss"], color="C0", lw=1.8,
                label=f"cifarkit: debiased EMA, beta {c['beta']:.2f}" + (" (refused)" if ours["refused"] else ""))
        values += c["smooth_loss"]
    tc = theirs["curve"]
    ax.plot(tc["lr"], tc["loss"], color="C1", lw=1.4, label="torch-lr-finder: EMA started at the first loss, 0.95")
    values += tc["loss"]
    if ours.get("suggestion"):
        ax.plot([ours["suggestion"]], [ours["suggestion_loss"]], "o", color="C0", ms=8,
                label=f"cifarkit suggestion {ours['suggestion']:.3g}")
        ax.plot([ours["min_loss_lr"]], [ours["min_loss"]], "^", color="C0",
                label=f"cifarkit minimum at {ours['min_loss_lr']:.3g}")
    j = tc["lr"].index(theirs["suggestion"])
    ax.plot([theirs["suggestion"]], [tc["loss"][j]], "s", color="C1", ms=8,
            label=f"torch-lr-finder suggestion {theirs['suggestion']:.3g}")
    ax.plot([theirs["min_loss_lr"]], [theirs["min_loss"]], "^", color="C1",
            label=f"torch-lr-finder minimum at {theirs['min_loss_lr']:.3g}")
    finite_values = [v for v in values if v is not None and math.isfinite(v)]
    lo, hi = min(finite_values), max(finite_values)
    ax.set_ylim(lo - 0.1 * (hi - lo) - 0.05, hi + 0.1 * (hi - lo) + 0.05)
    ax.set_xscale("log")
    refused = "; cifarkit refused: too noisy" if ours["refused"] else ""
    ax.set(xlabel="learning rate (log)", ylabel="training loss",
           title=f"{summary['model']}, batch {summary['batch_size']}, {summary['steps']} steps{refused}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def finite(v):
    """Strict JSON: a diverged loss (inf, nan) becomes null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [finite(x) for x in v]
    return v


if args.replot:
    draw(json.loads((out / "compare.json").read_text())).savefig(out / "compare.png", dpi=120)
    print(f"wrote {out / 'compare.png'}")
    raise SystemExit(0)
accelerator = "gpu" if torch.cuda.is_available() else "cpu"
device = torch.device("cuda" if accelerator == "gpu" else "cpu")

L.seed_everything(args.seed, verbose=False)
cfg = preset_config("seed", data=args.data, batch_size=args.batch_size, seed=args.seed, model=args.model)
dm = build_datamodule(cfg)


def draw_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n training batches in the data module's shuffled order, through the seed preset's augmentation."""
    a, g = dm.arrays, torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(dm.train_idx), generator=g)
    batches = []
    for k in range(n):
        idx = order[(torch.arange(args.batch_size) + k * args.batch_size) % len(order)]
        x = torch.from_numpy(a.train_x[dm.train_idx[idx.numpy()]])
        y = torch.from_numpy(a.train_y[dm.train_idx[idx.numpy()]]).long()
        xb = dm.augment(x, idx, epoch=0).contiguous(memory_format=torch.channels_last)  # (B, 3, 32, 32)
        batches.append((xb, y))
    return batches


class Batches(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, shuffle=False)


class RecordingClassifier(LitClassifier):
    """Lightning's finder replaces the trainer's callbacks; a module hook still sees the raw loss."""
    raw: list

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.raw.append(float(outputs["loss"]))


batches = draw_batches(args.steps)
module = build_module(cfg, dm, lr=1e-3)
initial = {k: v.clone() for k, v in module.net.state_dict().items()}
kw = dict(accelerator=accelerator, devices=1, precision="32-true", enable_progress_bar=False,
          default_root_dir=str(out))

# -- cifarkit -----------------------------------------------------------------------------------
t = time.perf_counter()
try:
    ours = find_lr(module, Batches(batches), kw, min_lr=args.min_lr, max_lr=args.max_lr, num_training=args.steps)
    refused, our_curve = None, ours.curve
except LRFindRefused as exc:  # a refusal is a result too: record it and its curve, run the other side
    ours, refused, our_curve = None, str(exc), exc.curve
ours_s = time.perf_counter() - t
if ours:
    save_lr_find(out, ours)
    print(f"cifarkit: {ours.summary()} ({ours_s:.0f} s)")
    print(f"  rule: {ours.reason}")
else:
    print(f"cifarkit refused ({ours_s:.0f} s): {refused}")

# -- torch-lr-finder ------------------------------------------------------------------------------
from torch_lr_finder import LRFinder  # noqa: E402  (a bench-only dependency)

net = build_module(cfg, dm, lr=1e-3).net.to(device)
net.load_state_dict(initial)
opt = torch.optim.SGD(net.parameters(), lr=args.min_lr, momentum=0.9, weight_decay=5e-4)
finder = LRFinder(net, opt, torch.nn.CrossEntropyLoss(), device=device)
t = time.perf_counter()
finder.range_test(DataLoader(batches, batch_size=None, shuffle=False), end_lr=args.max_lr,
                  num_iter=args.steps, step_mode="exp")
theirs_s = time.perf_counter() - t
fig_tlf = Figure()
_, theirs_sug = finder.plot(suggest_lr=True, ax=fig_tlf.subplots())  # prints its own two lines
tlf_lr, tlf_loss = finder.history["lr"], finder.history["loss"]
tlf_min = int(np.argmin(tlf_loss))
print(f"torch-lr-finder: {len(tlf_lr)} steps, smoothed minimum {tlf_loss[tlf_min]:.3g} at lr {tlf_lr[tlf_min]:.3g}; "
      f"suggestion {theirs_sug:.3g} ({theirs_s:.0f} s)")

# -- Lightning's finder: its first points only ----------------------------------------------------
lightning = None
if args.lightning_steps:
    from lightning.pytorch.tuner import Tuner
    rec = RecordingClassifier(build_module(cfg, dm, lr=1e-3).net, len(dm.classes), lr=1e-3, momentum=0.9,
                              weight_decay=5e-4, cycle_momentum=False)
    rec.net.load_state_dict(initial)
    rec.raw = []
    trainer = L.Trainer(**kw, logger=False, enable_checkpointing=False)  # OneCycle needs finite steps
    res = Tuner(trainer).lr_find(rec, datamodule=Batches(batches[:args.lightning_steps]), min_lr=args.min_lr,
                                 max_lr=args.max_lr, num_training=args.lightning_steps, update_attr=False)
    sm, raw = res.results["loss"], rec.raw
    lightning = dict(version=L.__version__, steps=args.lightning_steps, raw=raw[:5], smoothed=sm[:5],
                     ratio_first=sm[0] / raw[0], expected_ratio=0.02 / (1 - 0.98 ** 2))
    print(f"Lightning {L.__version__} Tuner.lr_find: first raw loss {raw[0]:.4f}, its first smoothed point "
          f"{sm[0]:.4f} (x{sm[0] / raw[0]:.3f}; 0.02 / (1 - 0.98^2) = {0.02 / (1 - 0.98 ** 2):.3f}); "
          f"raw {[round(v, 3) for v in raw[:5]]} -> smoothed {[round(v, 3) for v in sm[:5]]}")

# -- the comparison ------------------------------------------------------------------------------
c = our_curve
summary = dict(
    machine=dict(accelerator=accelerator, threads=torch.get_num_threads(),
                 gpu=torch.cuda.get_device_name() if accelerator == "gpu" else None),
    model=args.model, batch_size=args.batch_size, steps=args.steps, min_lr=args.min_lr, max_lr=args.max_lr,
    cifarkit=dict(refused=refused, seconds=round(ours_s, 1), steps_run=len(c["lr"]), diverged_at=c["diverged_at"],
                  beta=c["beta"], **({} if not ours else dict(
                      suggestion=ours.suggestion, reason=ours.reason, suggestion_loss=c["suggestion_loss"],
                      min_loss=c["min_loss"], min_loss_lr=c["min_loss_lr"], start_loss=c["start_loss"])),
                  curve=dict(lr=c["lr"], raw_loss=c["raw_loss"], smooth_loss=c["smooth_loss"], beta=c["beta"])),
    torch_lr_finder=dict(suggestion=theirs_sug, min_loss=tlf_loss[tlf_min], min_loss_lr=tlf_lr[tlf_min],
                         steps_run=len(tlf_lr), start_loss=tlf_loss[0], seconds=round(theirs_s, 1),
                         curve=dict(lr=tlf_lr, loss=tlf_loss)),
    lightning_first_points=lightning,
)
(out / "compare.json").write_text(json.dumps(finite(summary), indent=1))
draw(summary).savefig(out / "compare.png", dpi=120)
if ours:
    print(f"suggestions: cifarkit {ours.suggestion:.3g}, torch-lr-finder {theirs_sug:.3g} "
          f"(ratio {ours.suggestion / theirs_sug:.2f}); minima at lr {c['min_loss_lr']:.3g} and {tlf_lr[tlf_min]:.3g}")
print(f"wrote {out / 'compare.png'}, {out / 'compare.json'}" + (f", {out / 'lr_find.png'}" if ours else ""))
