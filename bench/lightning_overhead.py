"""Per-step overhead of training through Lightning versus a plain PyTorch loop doing the same work.

Usage: python bench/lightning_overhead.py [--steps 40] [--batch-size 256] [--rounds 2]
Both sides train the fast net on the same real images (CIFAR-10 copy from $CIFARKIT_DATA), with the
same batched augmentation at full resolution, the fast preset's optimizer (Muon for conv filters,
SGD for the rest) + OneCycle, bf16 autocast (when the CPU has it) and channels_last.
Lightning runs our real LitClassifier and DataModule (metrics and per-step lr logging included,
no progress bar, no checkpoints). The two alternate in rounds so machine noise hits both.
Run alone on the machine.
"""
import argparse
import dataclasses
import time

import lightning as L
import torch
import torch.nn.functional as F

from _common import StepTimer
from cifarkit.presets import preset_config
from cifarkit.train.fit import build_datamodule, build_module, resolve_precision

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--batch-size", type=int, default=256)
p.add_argument("--rounds", type=int, default=2)
args = p.parse_args()

cfg = preset_config("fast", batch_size=args.batch_size, subset=args.batch_size * args.steps, val_size=0,
                    lookahead=False)  # the plain loop has no weight averaging either
cfg = dataclasses.replace(cfg, augment={k: v for k, v in cfg.augment.items() if not k.startswith("low_res")})  # full size
dm = build_datamodule(cfg)
precision = resolve_precision("auto", "cpu")
bf16 = precision == "bf16-mixed"


def lightning_run():
    module = build_module(cfg, dm)
    timer = StepTimer(5)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, max_steps=args.steps, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1, callbacks=[timer])
    trainer.fit(module, datamodule=dm)
    return timer.per_step


def plain_run():
    module = build_module(cfg, dm)
    net, hp = module.net, module.cfg
    groups = module._param_groups()
    opt = module._optimizer(groups)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=args.steps,
                                                pct_start=hp.pct_start, anneal_strategy="linear",
                                                div_factor=hp.div_factor, final_div_factor=hp.final_div_factor,
                                                cycle_momentum=False)
    net.train()
    for step, (x, y, idx) in enumerate(dm.train_dataloader()):
        if step == 5:
            t = time.perf_counter()
        x = dm.augment(x, idx, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x), y, label_smoothing=hp.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step + 1 == args.steps:
            break
    return (time.perf_counter() - t) / (args.steps - 5)


results = {"plain": [], "lightning": []}
for r in range(args.rounds):
    results["plain"].append(plain_run())
    results["lightning"].append(lightning_run())
plain, light = min(results["plain"]), min(results["lightning"])
print(f"seconds/step (best of {args.rounds}): plain {plain:.3f}, lightning {light:.3f}; "
      f"overhead {100 * (light / plain - 1):+.1f}% (batch {args.batch_size}, {precision}, "
      f"{torch.get_num_threads()} threads)")
