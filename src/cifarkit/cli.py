"""The front door: one subcommand per library function. Errors a user can cause print one line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

STARTED = time.time()  # before the heavy imports below: a command's --time-budget counts from here

from .console import command_line, log
from .errors import CifarkitError, RunInterrupted

def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_flag(p: argparse.ArgumentParser, name: str, typ, meta: dict, help: str) -> None:
    """--name for a setting of type `typ`, its choices and parser from its declaration (`meta`);
    not given, it is None (the setting's value comes from elsewhere)."""
    kwargs = dict(help=help, dest=name, default=None)
    if meta.get("choices"):
        kwargs["choices"] = meta["choices"]
    if meta.get("parse"):
        kwargs["type"] = meta["parse"]
    elif typ is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typ in (int, float) or typ in (int | None, float | None):
        kwargs["type"] = int if typ in (int, int | None) else float
    p.add_argument(_flag(name), **kwargs)


def add_config_flags(p: argparse.ArgumentParser, cls=None, skip: tuple[str, ...] = ()) -> None:
    """One flag per TrainConfig setting (its help, type and choices), plus --preset and --config;
    `skip`: settings whose flag the command declares with its own meaning."""
    from .presets import TrainConfig, list_presets, settings
    p.add_argument("--preset", help=f"{' | '.join(list_presets())}: the recipe whose values are the defaults "
                                    "(default fast)")
    p.add_argument("--config", help="replay a saved run config (config.yaml); flags override it")
    for f, typ in settings(cls or TrainConfig):
        if f.metadata.get("flag", True) and f.name not in skip:
            _add_flag(p, f.name, typ, f.metadata, f.metadata["help"])


def add_setting_flags(p: argparse.ArgumentParser, names: tuple[str, ...], default_text: str) -> None:
    """A subcommand's flags for the named TrainConfig settings ('lr_find.num_training': one key of
    a dict setting, --num-training), declared there; default_text says what it does without one."""
    from .presets import default, settings
    fields = {f.name: (f, typ) for f, typ in settings()}
    for name in names:
        field, _, key = name.partition(".")
        f, typ = fields[field]
        if key:
            _add_flag(p, key, type(default(field)[key]), {}, f"{f.metadata['keys'][key]} ({default_text})")
        else:
            _add_flag(p, field, typ, f.metadata, f"{f.metadata['help']} ({default_text})")


def _overrides(args, cls) -> dict:
    """The settings given on the command line: {field: value} (a subkey flag sets one key of a dict)."""
    from .presets import settings
    out = {}
    for f, _ in settings(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            out[f.name] = {f.metadata["subkey"]: value} if f.metadata.get("subkey") else value
    return out


def config_from_args(args, cls=None):
    """The run's config from the command line: the preset (or a replayed config.yaml) with the flags
    given over it, settled by presets.resolve, as `fit` would settle it from Python."""
    from .presets import TrainConfig, preset_config, resolve
    cls = cls or TrainConfig
    overrides = _overrides(args, cls)
    if args.config:
        base = cls.from_yaml(args.config)
        overrides = {"preset": args.preset, **overrides}
    elif cls is TrainConfig:
        base = preset_config(args.preset or "fast", device=_device_kind(overrides.get("accelerator", "auto")))
    else:  # a settings class extending TrainConfig: its own defaults
        base = cls()
    cfg = resolve(base, overrides)
    if args.config and args.out is None:
        cfg = dataclasses.replace(cfg, out=None)  # a replay writes a new run, never over the original
    return cfg


def _device_kind(accelerator: str) -> str:
    """'cuda' when the run will train on a CUDA GPU: the presets' GPU settings apply (presets.ON_CUDA)."""
    import torch
    return "cuda" if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu"


# -- commands -----------------------------------------------------------------------------------


def resume_config(args):
    """RUN_DIR's own config; only the machine it runs on may change."""
    from .presets import settings
    from .rundir import RunDir
    run = RunDir.open(args.resume, need=("config",))
    machine = {f.name for f, _ in settings() if f.metadata.get("machine")}
    given = [_flag(name) for name in _overrides(args, type(run.read_config())) if name not in machine]
    given += [f"--{name}" for name in ("preset", "config") if getattr(args, name)]
    if given:
        allowed = ", ".join(_flag(m) for m in sorted(machine))
        raise CifarkitError(f"--resume continues {run.path} as it was configured; drop {', '.join(given)} "
                            f"(only {allowed} may change)")
    cfg = run.read_config()
    return dataclasses.replace(cfg, **_overrides(args, type(cfg)), out=str(run.path))


def _report(run_dir: Path, args) -> Path | None:
    """The report after training (its path), or a one-line notice of why it was not written."""
    if args.no_report:
        return None
    from .report.report import write_report
    from .rundir import RunDir
    try:
        return write_report(run_dir) / RunDir.REPORT_PAGE
    except CifarkitError as exc:
        log.warning(f"report not written: {exc}; rerun with `cifarkit report {run_dir}`")
        return None


def _track_report(run, report_dir: Path) -> None:
    """The report's figures to the run's MLflow or W&B run (--logger mlflow/wandb); a tracker that
    fails here costs a notice, never the trained run."""
    from .train.trackers import log_report
    try:
        for name in log_report(run, report_dir):
            log.info(f"report figures logged to {name}")
    except Exception as exc:  # the tracker's own errors: a store or service we do not own
        log.warning(f"report figures not logged to the tracker: {str(exc).splitlines()[0] if str(exc) else exc}")


def cmd_train(args):
    from .rundir import RunDir
    from .train.fit import fit, is_follower
    try:
        run = (fit(resume_config(args), resume=True, started=args.started) if args.resume
               else fit(config_from_args(args), started=args.started))
    except RunInterrupted as exc:
        if not is_follower() and RunDir(exc.run_dir).metrics_file.is_file():
            _report(Path(exc.run_dir), args)  # what there is: curves so far
        raise
    if is_follower():
        return  # rank 0 reports
    results = run.read_results()
    report = _report(run.path, args)
    if report:
        _track_report(run, report.parent)
    lines = [f"test accuracy: {results.test_acc:.4f} ({results.seconds:.0f} s)", f"run directory: {run.path}"]
    if report:
        lines.append(f"report: {report}")
    lines += [f"next: cifarkit app {run.path}    (the app: classify, Grad-CAM, mistakes)",
              f"      cifarkit export {run.path} --format onnx --out model.onnx    (or --format hub, safetensors)"]
    print("\n".join(lines))


def cmd_sweep(args):
    from .sweep.space import default_space, load_space
    cfg = config_from_args(args)
    space = load_space(args.space, cfg) if args.space else default_space(cfg)
    if args.show_space:
        print(space.to_yaml_text(), end="")
        return
    if not args.sweep_budget:
        raise CifarkitError("sweep: give --time-budget, the whole sweep's time (e.g. 1h), or --show-space")
    from .sweep.run import run_sweep
    try:
        r = run_sweep(cfg, args.sweep_budget, args.sweep_out or f"sweeps/{cfg.preset}", space, args.storage,
                      args.study, args.trial_budget, started=args.started)
    except RunInterrupted as exc:
        log.warning(f"sweep stopped in {exc.run_dir}: the study keeps its finished trials; run the same command "
                    "again to go on")
        raise KeyboardInterrupt from None
    lines = [f"best: trial {r.best.number}, val accuracy {r.best.value:.4f} ("
             + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.best.params.items()) + ")"]
    if r.final_results:
        lines.append(f"final: test accuracy {r.final_results['test_acc']:.4f}, run directory {r.final_run}")
    if r.report:
        lines.append(f"report: {r.report}")
    lines.append(f"replay: cifarkit train --config {r.sweep.best_config}")
    print("\n".join(lines))


def cmd_report(args):
    from .report.report import write_report
    from .rundir import RunDir
    out = write_report(args.run_dir, n=args.n, method=args.method, out=args.out,
                       corruption_images=args.corruption_images)
    print(f"report: {out / RunDir.REPORT_PAGE}")


def cmd_audit(args):
    from .train.audit import audit, check_folds
    check_folds(args.folds)
    result = audit(args.run_dir, args.folds, args.out)
    print(f"{len(result.issues)} likely label errors among {len(result.indices):,} training images: {result.csv}")


def cmd_compare(args):
    from .report.compare import compare, write_comparison
    if args.n < 1:
        raise CifarkitError(f"--n must be at least 1, got {args.n}")
    c = compare(args.run_dirs)
    page = write_comparison(c, args.out, args.n)
    for sentence in c.verdicts():
        print(sentence)
    print(f"comparison: {page}")


def cmd_calibrate(args):
    from .trust.calibration import calibrate_run, describe
    print(f"calibration: {describe(calibrate_run(args.run_dir, ood_method=args.ood_method, keep=args.keep))}")


def cmd_gradcam(args):
    from .report.report import overlays_for_files
    overlays_for_files(args.run_dir, args.images, args.layer, args.method, args.alpha, args.out)


def cmd_test(args):
    from .train.fit import evaluate
    res = evaluate(args.run_dir, args.data, args.tta, args.tta_threshold)
    print(f"test accuracy: {res['test_acc']:.4f}  test loss: {res['test_loss']:.4f}")


def cmd_lr_find(args):
    from datetime import datetime

    from .train.lr_finder import check_settings, find_lr, save_lr_find
    from .rundir import RunDir
    from .train.fit import build_datamodule, build_module, trainer_kwargs
    cfg = config_from_args(args)
    cfg = dataclasses.replace(cfg, out=cfg.out or f"runs/lr-find-{datetime.now():%Y%m%d-%H%M%S}",
                              lr_find={**cfg.lr_find, **({"num_training": args.num_training} if args.num_training else {})})
    check_settings(**cfg.lr_find, muon_lr=cfg.muon_lr)  # before any data is decoded
    out = RunDir.create(cfg)
    dm = build_datamodule(cfg)
    result = find_lr(build_module(cfg, dm), dm, trainer_kwargs(cfg), **cfg.lr_find)
    save_lr_find(out.path, result)
    print(result.summary())
    print(f"suggested lr: {result.suggestion:.4g} ({result.reason})")
    print(f"curve: {out.lr_find_png}")


def cmd_summary(args):
    from .models import list_models
    from .report.summary import summary_table
    if args.list:
        print("\n".join(list_models()))
        return
    print(summary_table(args.model, args.num_classes))


def cmd_predict(args):
    from .serve.export import load_any
    from .serve.predict import answer, collect_images, predict_files, write_csv
    model = load_any(args.model)
    paths, failed = collect_images(args.images)
    results, errors = predict_files(model, paths, args.top_k, args.batch_size, args.coverage)
    failed += errors
    if args.csv:
        write_csv(results, args.csv)
    if args.json:
        print(json.dumps({"predictions": results, "errors": failed}, indent=2))
    else:
        for r in results[:50] if args.csv else results:
            print(f"{r['image']}: {answer(r, len(model.classes))}")
        if args.csv:
            print(f"{len(results)} predictions written to {args.csv}")
        for msg in failed:
            log.warning(f"skipped: {msg}")
    if not results:
        raise CifarkitError(f"no image could be classified ({len(failed)} unreadable)")


def cmd_export(args):
    from .console import progress
    from .serve.export import export
    with progress(f"exporting {args.format}", None):
        out = export(args.run_dir, args.format, args.out)
    print(f"exported {args.format}: {out}")


def cmd_app(args):
    from .serve.app import launch
    size = {"max_file_size": args.max_file_size} if args.max_file_size else {}  # else app.MAX_FILE_SIZE
    launch(args.run_dir, host=args.host, port=args.port, **size)


def cmd_export_space(args):
    from .console import progress
    from .serve.space import export_space
    with progress("writing the Space", None):
        out = export_space(args.run_dir, args.out_dir)
    print(f"Space written to {out}; try it with: cd {out} && pip install -r requirements.txt && python app.py")


def cmd_push(args):
    from .console import progress
    from .serve.hub import describe, push
    with progress("staging the push" if args.dry_run else "pushing to the Hugging Face Hub", None):
        staged = push(args.run_dir, args.repo, args.space, args.private, args.dry_run, args.bundle, args.license)
    if args.dry_run:
        print(describe(staged))
        return
    print("\n".join(["pushed:", *(f"  {r}" for r in staged.reached),
                     f"load it with: cifarkit predict {args.repo} photo.jpg    (or cifarkit.load(\"{args.repo}\"))"]))


class Parser(argparse.ArgumentParser):
    """A wrong flag or value is one line, like every other error a user can cause."""

    def error(self, message):
        command = self.prog.partition(" ")[2]  # 'train' in `cifarkit train`; main() prints the program's name
        raise CifarkitError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from .presets import OOD_DEFAULT as DEFAULT, OOD_KEEP as KEEP, OOD_METHODS as METHODS
    from .version import __version__
    parser = Parser(prog="cifarkit", description="Train, explain and demo CIFAR-10 classifiers.")
    parser.add_argument("--version", action="version", version=f"cifarkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    console = argparse.ArgumentParser(add_help=False)
    console.add_argument("--verbose", action="store_true", help="also show other libraries' warnings and notes")
    console.add_argument("--quiet", action="store_true", help="print only the final result (and errors)")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[console])  # every command takes both

    p = command("train", help="train a model; prints the run directory and test accuracy")
    add_config_flags(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    p.add_argument("--no-report", action="store_true", help="skip the report at the end")
    p.set_defaults(func=cmd_train)

    p = command("sweep", help="the best recipe in a time budget: budgeted trials drawn by Optuna, weak ones stopped "
                              "early on validation accuracy, then the best setting trained on all the training "
                              "images and tested once; a report and the best setting as config.yaml")
    add_config_flags(p, skip=("time_budget", "out"))
    p.set_defaults(out=None, time_budget=None)  # the recipe's own: a trial's are the sweep's to set
    p.add_argument("--time-budget", dest="sweep_budget", metavar="TIME",
                   help="the whole sweep's time, from the start of the command: the trials, the final training "
                        "and its test (90m, 1h, 2h30m)")
    p.add_argument("--space", metavar="FILE.yaml", help="the search space: TrainConfig settings with ranges "
                                                        "(default: the preset's; see --show-space)")
    p.add_argument("--show-space", action="store_true", help="print the search space (the preset's, or --space's) "
                                                             "as YAML and exit")
    p.add_argument("--out", dest="sweep_out", metavar="DIR",
                   help="the sweep's folder (default sweeps/<preset>); the same command run again goes on with its study")
    p.add_argument("--storage", metavar="WHERE",
                   help="the shared study: a journal file path (several processes on one machine) or a database URL "
                        "such as postgresql://user@host/db (several machines); default DIR/study.journal")
    p.add_argument("--study", metavar="NAME", help="the study's name, the same on every worker (default sweep; "
                                                   "needed with --storage)")
    p.add_argument("--trial-budget", metavar="TIME", help="each trial's time (default: the recipe's own length here, at most a "
                                          "fifth of the budget; a study keeps the one it was created with)")
    p.set_defaults(func=cmd_sweep)

    p = command("report", help="figures, Grad-CAM and an HTML page for a run (RUN_DIR/report)")
    p.add_argument("run_dir")
    p.add_argument("--n", type=int, default=20, help="misclassified images to show")
    p.add_argument("--method", default="gradcam", help="gradcam | gradcam++ | eigencam | layercam | scorecam")
    p.add_argument("--out", help="report directory (default RUN_DIR/report)")
    p.add_argument("--corruption-images", type=int,
                   help="test images per corruption setting of the robustness table (default 1,000 on a CPU, "
                        "all on a GPU; 0 leaves robustness out)")
    p.set_defaults(func=cmd_report)

    p = command("audit", help="likely label errors in the training set, from K out-of-fold trainings "
                             "of the run's recipe (K times the run's time: a GPU job)")
    p.add_argument("run_dir")
    p.add_argument("--folds", type=int, required=True, help="K >= 2 trainings, each without one fold")
    p.add_argument("--out", help="output directory (default RUN_DIR/audit)")
    p.set_defaults(func=cmd_audit)

    p = command("compare", help="runs side by side: settings, results, curves, per-class accuracy, "
                             "which differences are beyond chance (McNemar, bootstrap intervals, spread "
                             "over seeds), the test images one gets right and the other wrong")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="output directory for index.html and its figures")
    p.add_argument("--n", type=int, default=16, help="images per 'one right, the other wrong' grid")
    p.set_defaults(func=cmd_compare)

    p = command("calibrate", help="fit on a run's held-out images (never the test set) what makes its answers "
                             "trustworthy, and store it in its weights: the temperature that makes its percentages "
                             "honest, the out-of-distribution score that says 'none of these', prediction sets")
    p.add_argument("run_dir")
    p.add_argument("--ood-method", choices=METHODS,
                   help=f"out-of-distribution score (default: the run's, else {DEFAULT})")
    p.add_argument("--keep", type=float, help=f"share of held-out images of the training distribution the "
                                              f"'none of these' threshold keeps (default {KEEP})")
    p.set_defaults(func=cmd_calibrate)

    p = command("gradcam", help="Grad-CAM overlays for your own images")
    p.add_argument("run_dir")
    p.add_argument("images", nargs="+")
    p.add_argument("--layer", help="one of the model's Grad-CAM layers (default: the deepest)")
    p.add_argument("--method", default="gradcam", help="gradcam | gradcam++ | eigencam | layercam | scorecam")
    p.add_argument("--alpha", type=float, default=0.5, help="heatmap weight in the blend, 0..1")
    p.add_argument("--out", help="output directory (default RUN_DIR/gradcam)")
    p.set_defaults(func=cmd_gradcam)

    p = command("test", help="test accuracy of a finished run")
    p.add_argument("run_dir")
    p.add_argument("--data", help="another copy of the data source")
    add_setting_flags(p, ("tta", "tta_threshold"), "default: the run's")
    p.set_defaults(func=cmd_test)

    p = command("lr-find", help="LR range test: prints the suggestion, saves the curve")
    add_config_flags(p)
    add_setting_flags(p, ("lr_find.num_training",), "default from the preset")
    p.set_defaults(func=cmd_lr_find)

    p = command("summary", help="layer table of a model with parameter and size totals")
    p.add_argument("--model", default="resnet18_gn")
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--list", action="store_true", help="list the registered models")
    p.set_defaults(func=cmd_summary)

    p = command("predict", help="top classes of image files and folders, in batches")
    p.add_argument("model", help="run directory, .safetensors, Hub folder, .onnx, or a Hub model repository "
                                 "USER/NAME[@REVISION] (downloaded once into the Hub cache)")
    p.add_argument("images", nargs="+", help="image files and/or folders")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--csv", help="write all predictions to this CSV file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--coverage", type=float, help="also give each image's prediction set: the classes that hold "
                                                  "the true one this often (e.g. 0.9)")
    p.set_defaults(func=cmd_predict)

    p = command("export", help="safetensors, ONNX or a Hub-ready folder")
    p.add_argument("run_dir", help="run directory or .safetensors file")
    p.add_argument("--format", required=True, help="safetensors | onnx | hub")
    p.add_argument("--out", required=True, help="output file or folder")
    p.set_defaults(func=cmd_export)

    p = command("app", help="serve the Gradio app for a trained run")
    p.add_argument("run_dir", help="run directory, or a model repository USER/NAME[@REVISION] that "
                                   "`cifarkit push` wrote (downloaded once into the Hub cache)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-file-size",
                   help="uploads over this are refused before they are decoded (default 20mb; e.g. 500kb, 1gb)")
    p.set_defaults(func=cmd_app)

    p = command("export-space", help="write a self-contained Hugging Face Space folder")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_export_space)

    p = command("push", help="upload a run to a model repository on the Hugging Face Hub (and a Space "
                             "with --space); the token is huggingface_hub's: HF_TOKEN or `hf auth login`")
    p.add_argument("run_dir")
    p.add_argument("--repo", required=True, metavar="USER/NAME", help="the model repository (created if needed)")
    p.add_argument("--space", metavar="USER/NAME", help="also push the app as a Gradio Space of this name")
    p.add_argument("--private", action="store_true", help="create the repositories private")
    p.add_argument("--bundle", action="store_true",
                   help="the Space carries the run's files instead of downloading them from the model repository")
    p.add_argument("--license", default="mit", help="the license in the model card (a Hub license id; default mit)")
    p.add_argument("--dry-run", action="store_true",
                   help="stage the folders in a temporary directory, list them and the card's metadata, upload nothing")
    p.set_defaults(func=cmd_push)
    return parser


def _rank() -> str:
    """' (rank N)' in the processes of a multi-process run other than rank 0 (as train.is_follower)."""
    ranks = [os.environ.get(v) or "0" for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")]
    nonzero = [r for r in ranks if r != "0"]
    return f" (rank {nonzero[0]})" if nonzero else ""


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        args = build_parser().parse_args(argv)
        # a command's clock starts with its process; main([...]) called from Python starts it now
        args.started = STARTED if argv is None else time.time()
    except CifarkitError as exc:
        print(f"cifarkit: error: {exc}", file=sys.stderr)
        return 2
    with command_line(verbose=args.verbose, quiet=args.quiet):
        return _run(args)


def _run(args) -> int:
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
