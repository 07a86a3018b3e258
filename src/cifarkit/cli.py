"""The front door: one subcommand per library function. Errors a user can cause print one line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import CifarkitError, RunInterrupted

MACHINE_FIELDS = ("accelerator", "devices", "num_nodes", "strategy", "num_workers")  # --resume may change

TRAIN_OPTIONS = {  # flag -> (TrainConfig field, type, help)
    "--model": ("model", str, "architecture (see `cifarkit summary --list`)"),
    "--epochs": ("epochs", float, "epochs, may be fractional"),
    "--batch-size": ("batch_size", int, "training batch size"),
    "--lr": ("lr", str, "peak learning rate, or 'auto' for the LR range test"),
    "--muon-lr": ("muon_lr", float, "Muon step for conv filters, a fraction of their norm (0: plain SGD)"),
    "--data": ("data", str, "CIFAR python tarball/folder, ImageFolder tree or .tar.gz of one"),
    "--dataset": ("dataset", str, "cifar10 | cifar100 | folder"),
    "--subset": ("subset", int, "train on the first N training images, class-balanced"),
    "--val-size": ("val_size", int, "images held out of training for validation (0 allowed)"),
    "--seed": ("seed", int, "random seed"),
    "--out": ("out", str, "run directory (default runs/<preset>-<time>)"),
    "--accelerator": ("accelerator", str, "auto | cpu | gpu ..."),
    "--devices": ("devices", str, "auto, a count, or a list like 0,1 (per node)"),
    "--num-nodes": ("num_nodes", int, "machines in a multi-node DDP run"),
    "--strategy": ("strategy", str, "auto | ddp | ... (Lightning's strategy names)"),
    "--ckpt-every-steps": ("ckpt_every_steps", int, "also checkpoint every N steps (default: every epoch)"),
    "--precision": ("precision", str, "auto | 32-true | bf16-mixed | 16-mixed"),
    "--logger": ("logger", str, "csv | tensorboard (metrics.csv is always written)"),
    "--num-workers": ("num_workers", int, "DataLoader workers (per-sample augmentation only)"),
}


def _add_train_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="seed | fast | quick (default fast)")
    p.add_argument("--config", help="replay a saved run config (config.yaml); flags override it")
    p.add_argument("--augment", choices=["batched", "albumentations"], help="augmentation pipeline")
    for flag, (_, typ, help_) in TRAIN_OPTIONS.items():
        p.add_argument(flag, type=typ, help=help_)


def _devices(value):
    if value is None or value == "auto":
        return value
    return int(value) if value.isdigit() else [int(v) for v in value.split(",") if v]


def config_from_args(args):
    from .presets import TrainConfig, preset_config
    overrides = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _, _) in TRAIN_OPTIONS.items()}
    overrides["devices"] = _devices(overrides["devices"])
    if overrides["lr"] not in (None, "auto"):
        try:
            overrides["lr"] = float(overrides["lr"])
        except ValueError:
            raise CifarkitError(f"--lr must be a number or 'auto', got '{overrides['lr']}'") from None
    if args.config:
        cfg = TrainConfig.from_yaml(args.config)
        if args.preset:
            cfg.preset = args.preset
        for k, v in overrides.items():
            if v is not None:
                setattr(cfg, k, v)
    else:
        cfg = preset_config(args.preset or "fast", **overrides)
    if args.augment:
        cfg.augment = {**cfg.augment, "pipeline": args.augment}
        if args.augment == "albumentations" and cfg.augment.pop("low_res", 0):
            cfg.augment.pop("low_res_epochs", None)
            print("notice: the albumentations pipeline trains at full size throughout (no low-res epochs)",
                  file=sys.stderr)
    low_epochs = cfg.augment.get("low_res_epochs", 0)
    if cfg.augment.get("low_res") and low_epochs > cfg.epochs / 2:  # e.g. the fast preset with --epochs 4
        cfg.augment = {**cfg.augment, "low_res_epochs": int(cfg.epochs // 2)}
        print(f"notice: {cfg.augment['low_res_epochs']} of the {cfg.epochs:g} epochs at {cfg.augment['low_res']} px "
              f"(at most half the run trains on low-res images)", file=sys.stderr)
    if args.config and args.out is None:
        cfg.out = None  # a replay writes a new run, never over the original
    return cfg


# -- commands -----------------------------------------------------------------------------------


def resume_config(args):
    """RUN_DIR's own config; only the machine it runs on may change."""
    from .presets import TrainConfig
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise CifarkitError(f"{run_dir} is not a run directory (no config.yaml); give the RUN_DIR "
                            "a `cifarkit train` printed")
    given = [flag for flag, (field, _, _) in TRAIN_OPTIONS.items()
             if getattr(args, flag[2:].replace("-", "_")) is not None and field not in MACHINE_FIELDS]
    given += [f"--{name}" for name in ("preset", "config", "augment") if getattr(args, name)]
    if given:
        raise CifarkitError(f"--resume continues {run_dir} as it was configured; drop {', '.join(given)} "
                            "(only --accelerator, --devices, --num-nodes, --strategy, --num-workers may change)")
    cfg = TrainConfig.from_yaml(run_dir / "config.yaml")
    for field in MACHINE_FIELDS:
        value = getattr(args, field)
        if value is not None:
            setattr(cfg, field, _devices(value) if field == "devices" else value)
    cfg.out = str(run_dir)
    return cfg


def _report(run_dir: Path, args) -> None:
    if args.no_report:
        return
    from .report import write_report
    try:
        print(f"report: {write_report(run_dir) / 'index.html'}")
    except CifarkitError as exc:
        print(f"report not written: {exc}; rerun with `cifarkit report {run_dir}`", file=sys.stderr)


def cmd_train(args):
    from .train import fit, is_follower
    try:
        run_dir = fit(resume_config(args), resume=True) if args.resume else fit(config_from_args(args))
    except RunInterrupted as exc:
        if not is_follower() and (Path(exc.run_dir) / "metrics.csv").is_file():
            _report(Path(exc.run_dir), args)  # what there is: curves so far
        raise
    if is_follower():
        return  # rank 0 reports
    results = json.loads((run_dir / "results.json").read_text())
    _report(run_dir, args)
    print(f"run directory: {run_dir}")
    print(f"test accuracy: {results['test_acc']:.4f} ({results['seconds']:.0f} s)")


def cmd_report(args):
    from .report import write_report
    out = write_report(args.run_dir, n=args.n, method=args.method, out=args.out)
    print(f"report: {out / 'index.html'}")


def cmd_gradcam(args):
    from .report import overlays_for_files
    overlays_for_files(args.run_dir, args.images, args.layer, args.method, args.alpha, args.out)


def cmd_test(args):
    from .train import evaluate
    res = evaluate(args.run_dir, args.data, args.tta, args.tta_threshold)
    print(f"test accuracy: {res['test_acc']:.4f}  test loss: {res['test_loss']:.4f}")


def cmd_lr_find(args):
    from datetime import datetime

    from .lr_finder import find_lr, save_lr_find
    from .train import build_datamodule, build_module, make_run_dir, trainer_kwargs
    cfg = config_from_args(args)
    cfg.out = cfg.out or f"runs/lr-find-{datetime.now():%Y%m%d-%H%M%S}"
    if args.num_training:
        cfg.lr_find = {**cfg.lr_find, "num_training": args.num_training}
    out = make_run_dir(cfg)
    dm = build_datamodule(cfg)
    lr, curve, fig = find_lr(build_module(cfg, dm, 1e-3), dm, trainer_kwargs(cfg), **cfg.lr_find)
    save_lr_find(out, curve, fig)
    print(f"suggested lr: {lr:.4g}")
    print(f"curve: {out / 'lr_find.png'}")


def cmd_summary(args):
    from .models import list_models
    from .summary import summary_table
    if args.list:
        print("\n".join(list_models()))
        return
    print(summary_table(args.model, args.num_classes))


def cmd_predict(args):
    from .export import load_any
    from .predict import collect_images, predict_files, write_csv
    model = load_any(args.model)
    paths, failed = collect_images(args.images)
    results, errors = predict_files(model, paths, args.top_k, args.batch_size, progress=not args.json)
    failed += errors
    if args.csv:
        write_csv(results, args.csv)
    if args.json:
        print(json.dumps({"predictions": results, "errors": failed}, indent=2))
    else:
        for r in results[:50] if args.csv else results:
            print(f"{r['image']}: " + ", ".join(f"{t['class']} {t['prob']:.1%}" for t in r["top"]))
        if args.csv:
            print(f"{len(results)} predictions written to {args.csv}")
        for msg in failed:
            print(f"skipped: {msg}", file=sys.stderr)
    if not results:
        raise CifarkitError(f"no image could be classified ({len(failed)} unreadable)")


def cmd_export(args):
    from .export import export
    out = export(args.run_dir, args.format, args.out)
    print(f"exported {args.format}: {out}")


def cmd_app(args):
    from .app import launch
    launch(args.run_dir, host=args.host, port=args.port)


def cmd_export_space(args):
    from .space import export_space
    out = export_space(args.run_dir, args.out_dir)
    print(f"Space written to {out}; try it with: cd {out} && pip install -r requirements.txt && python app.py")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="cifarkit", description="Train, explain and demo CIFAR-10 classifiers.")
    parser.add_argument("--version", action="version", version=f"cifarkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model; prints the run directory and test accuracy")
    _add_train_options(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="figures, Grad-CAM and an HTML page for a run (RUN_DIR/report)")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=20, help="misclassified images to show")
    p.add_argument("--method", default="gradcam", help="gradcam | gradcam++ | eigencam | layercam | scorecam")
    p.add_argument("--out", help="report directory (default RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("gradcam", help="Grad-CAM overlays for your own images")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--layer", help="one of the model's Grad-CAM layers (default: the deepest)")
    p.add_argument("--method", default="gradcam", help="gradcam | gradcam++ | eigencam | layercam | scorecam")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap weight in the blend, 0..1")
    p.add_argument("--out", help="output directory (default RUN_DIR/gradcam)")
    p.set_defaults(func=cmd_gradcam)

    p = sub.add_parser("test", help="test accuracy of a finished run")
    p.add_argument("run_dir")
    p.add_argument("--data", help="another copy of the data source")
    p.add_argument("--tta", type=int, choices=[0, 1, 2], help="test-time views (default: the run's)")
    p.add_argument("--tta-threshold", type=float,
                   help="extra views only for images whose plain top probability is below this; "
                        "1 = every image (default: the run's)")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("lr-find", help="LR range test: prints the suggestion, saves the curve")
    _add_train_options(p)
    p.add_argument("--num-training", type=int, help="steps of the sweep (default from the preset)")
    p.set_defaults(func=cmd_lr_find)

    p = sub.add_parser("summary", help="layer table of a model with parameter and size totals")
    p.add_argument("--model", default="resnet18_gn")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--list", action="store_true", help="list the registered models")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("predict", help="top classes of image files and folders, in batches")
    p.add_argument("model", help="run directory, .safetensors, Hub folder or .onnx")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--csv", help="write all predictions to this CSV file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="safetensors, ONNX or a Hub-ready folder")
    p.add_argument("run_dir", help="run directory or .safetensors file")
    p.add_argument("--format", required=True, help="safetensors | onnx | hub")
    p.add_argument("--out", required=True, help="output file or folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("app", help="serve the Gradio app for a trained run")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.set_defaults(func=cmd_app)

    p = sub.add_parser("export-space", help="write a self-contained Hugging Face Space folder")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export_space)
    return parser


def _rank() -> str:
    """' (rank N)' in the processes of a multi-process run other than rank 0 (as train.is_follower)."""
    ranks = [os.environ.get(v) or "0" for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")]
    nonzero = [r for r in ranks if r != "0"]
    return f" (rank {nonzero[0]})" if nonzero else ""


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except CifarkitError as exc:
        print(f"cifarkit: error{_rank()}: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:
        if not _rank():
            print(f"cifarkit: interrupted: {exc.how}; what was saved is in {exc.run_dir}", file=sys.stderr)
            print(f"resume with: cifarkit train --resume {exc.run_dir}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("cifarkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
