"""Which changes to a recipe pay, at one time budget: variants over the same seeds, paired.

Usage:
  python bench/ablate.py --variant base: --variant ls09:label_smoothing=0.09 \
      --variant silu:model_kwargs.act=silu --seeds 0 1 2 3 4 --time-budget 5m --out runs/ablate-5m
  python bench/ablate.py --variants bench/ablations/levers.yaml --seeds 0 1 2 3 4 --time-budget 5m \
      --out runs/levers-5m [--only base silu] [--set proxy_keep=0.5,batch_size=512] [--preset fast]
  python bench/ablate.py --table runs/levers-5m     # the table again, from what is there, nothing run

A variant is NAME:SETTING=VALUE[,SETTING=VALUE...] (values read as YAML: 0.09, silu, true, [64, 192,
192]; a dotted setting sets one key of a dict setting, e.g. model_kwargs.act=silu or
augment.low_res_epochs=2), or a YAML file of them (NAME: {SETTING: VALUE, ...}). The first variant
is the base every other is compared with; `--set` applies to all of them. Every variant's config is
resolved and checked (settings, values, the model's and the augmentation's own arguments) before
anything runs: a setting that does not exist, or a bad value, is one line and exit code 2.

For each seed, in turn, every variant trains once (their order rotated from one seed to the next,
so that none always runs first), each as its own `cifarkit train --config FILE --no-report`
process with the same `--time-budget` (when given; without it each trains its own epochs), the
decode cache warmed first. After each run the mean accuracy under the robustness table's
corruptions is measured on its 1,000-image seeded subsample (the report's number on a CPU; off with
--no-corruption). Per variant against the base, over the seeds both finished: the mean paired
difference in test accuracy with its 95% t-interval, a sign test (scipy's binomtest, ties left
out), the corruption accuracy and its paired difference, and training speed (steps per second of
training, results.json's steps / train_seconds; torch.compile's seconds apart). A variant is
marked "take" only when its interval lies above zero. Writes OUT/ablate.json (every run, the
variants, the summary) and OUT/ablate.md (the table, for BENCHMARKS.md). A re-run skips the runs
that finished (a run cut short is trained again from the start) and refuses a variant whose
settings changed under the same name. Run it alone on the machine.

The levers of issue #34 (airbench94's accuracy in 0.6x its time on 2 CPU cores), on an idle
machine, 5 seeds at a 5-minute budget (about 35 runs of 5 minutes and a minute of corruptions
each, some 3.5 hours):
  python bench/ablate.py --variants bench/ablations/levers.yaml --seeds 0 1 2 3 4 --time-budget 5m \
      --out runs/levers-5m
and the torch.compile lever on its own (it needs a working C++ compiler; `--drop-last` keeps one
batch shape, so that the last batch of an epoch is not compiled again):
  python bench/ablate.py --variant base:drop_last=true --variant compile:drop_last=true,compile=true \
      --seeds 0 1 2 3 4 --time-budget 5m --out runs/compile-5m
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from cifarkit.errors import CifarkitError
from cifarkit.presets import TrainConfig, preset_config, resolve, settings

FORBIDDEN = {"seed": "--seeds", "time_budget": "--time-budget", "out": "--out", "preset": "--preset", "plan": ""}


# -- variants ---------------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    """SETTING=VALUE pieces of a variant, split at the commas outside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += 1 if ch in "[{(" else -1 if ch in "]})" else 0
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p.strip() for p in parts + [cur] if p.strip()]


def parse_overrides(text: str, what: str) -> dict:
    """'a=1,b.c=x' -> {'a': 1, 'b': {'c': 'x'}} (values read as YAML)."""
    out: dict = {}
    for piece in _split(text):
        key, eq, value = piece.partition("=")
        if not eq or not key.strip():
            raise CifarkitError(f"{what}: '{piece}' is not SETTING=VALUE")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            raise CifarkitError(f"{what}: the value of {key.strip()} ('{value}') does not read as YAML") from None
        _put(out, key.strip(), parsed)
    return out


def _put(d: dict, dotted: str, value) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        d.setdefault(head, {})
        if not isinstance(d[head], dict):
            raise CifarkitError(f"'{dotted}' sets a key of '{head}', which is given a value too")
        _put(d[head], rest, value)
    else:
        d[head] = value


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:SETTING=VALUE,...' -> (name, overrides)."""
    name, colon, rest = text.partition(":")
    if not colon or not name.strip():
        raise CifarkitError(f"--variant '{text}' must look like NAME:SETTING=VALUE[,SETTING=VALUE] (base: changes nothing)")
    return name.strip(), parse_overrides(rest, f"variant '{name.strip()}'")


def load_variants(path: str) -> dict[str, dict]:
    """A YAML file of NAME: {SETTING: VALUE} (dotted settings allowed)."""
    p = Path(path)
    if not p.is_file():
        raise CifarkitError(f"--variants {p}: no such file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CifarkitError(f"--variants {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) or v is None for v in raw.values()):
        raise CifarkitError(f"--variants {p} must map each variant's name to its settings")
    out = {}
    for name, given in raw.items():
        out[str(name)] = {}
        for key, value in (given or {}).items():
            _put(out[str(name)], str(key), value)
    return out


def _type_ok(value, typ) -> bool:
    """Whether a value given for a setting has its declared type (an int where a float is declared)."""
    if typ is typing.Any:
        return True
    options = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    for t in options:
        t = typing.get_origin(t) or t
        if t is type(None) and value is None:
            return True
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t not in (float, int, type(None)) and isinstance(value, t):
            return True
    return False


def variant_config(name: str, overrides: dict, common: dict, preset: str, device: str, seed: int,
                   time_budget: str | None) -> TrainConfig:
    """The resolved, checked config of one variant's run (CifarkitError in one line if it cannot be)."""
    from cifarkit.data.augment import Augment
    from cifarkit.models import build_model
    from cifarkit.train.fit import validate
    fields = dict((f.name, typ) for f, typ in settings())
    base = preset_config(preset, device=device, seed=seed, time_budget=time_budget)
    values = {}
    for key, value in {**common, **overrides}.items():
        if key not in fields:
            raise CifarkitError(f"variant '{name}': unknown setting '{key}' (the settings are TrainConfig's: "
                                "see `cifarkit train --help`, underscores for dashes)")
        if key in FORBIDDEN:
            raise CifarkitError(f"variant '{name}': {key} is the sitting's, the same for every variant"
                                + (f" (give {FORBIDDEN[key]})" if FORBIDDEN[key] else ""))
        if isinstance(value, dict) and isinstance(getattr(base, key), dict):
            value = {**getattr(base, key), **values.get(key, {}), **value}  # one key of a dict setting
        if not _type_ok(value, fields[key]):
            raise CifarkitError(f"variant '{name}': {key}={value!r} is not a {getattr(fields[key], '__name__', fields[key])}")
        values[key] = value
    try:
        cfg = resolve(dataclasses.replace(base, **values))
        validate(cfg)
        build_model(cfg.model, 10, **cfg.model_kwargs)
        Augment([0.5] * 3, [0.25] * 3, **cfg.augment)
    except CifarkitError as exc:
        raise CifarkitError(f"variant '{name}': {exc}") from None
    except TypeError as exc:  # a key the model or the augmentation does not take
        raise CifarkitError(f"variant '{name}': {str(exc).splitlines()[0]}") from None
    return cfg


# -- statistics -------------------------------------------------------------------------------------


@dataclass
class Paired:
    """A variant against the base over the seeds both finished (differences in accuracy, 0-1)."""
    n: int                        # seed pairs
    mean: float | None            # mean paired difference, variant - base
    low: float | None             # its 95% t-interval (None with fewer than 2 pairs)
    high: float | None
    wins: int                     # pairs the variant won, lost (ties are left out of the sign test)
    losses: int
    p: float | None               # two-sided sign test (binomtest), None without a non-tied pair

    @property
    def verdict(self) -> str:
        if self.low is None:
            return f"{self.n} pair{'s' * (self.n != 1)}: no interval"
        if self.low > 0:
            return "take"
        return "worse" if self.high < 0 else "not shown"


def paired(base: dict, other: dict, level: float = 0.95) -> Paired:
    """The paired comparison of two {seed: value} over their common seeds."""
    from scipy import stats
    seeds = sorted(set(base) & set(other))
    d = [other[s] - base[s] for s in seeds]
    n = len(d)
    wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
    p = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else None
    if n == 0:
        return Paired(0, None, None, None, 0, 0, None)
    mean = sum(d) / n
    if n < 2:
        return Paired(n, mean, None, None, wins, losses, p)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half, wins, losses, p)


def _pts(x: float | None, sign: bool = False) -> str:
    return "" if x is None else f"{100 * x:{'+' if sign else ''}.2f}"


def summarize(rows: list[dict], names: list[str]) -> list[dict]:
    """One entry per variant: means, and the paired comparisons with the first (the base)."""
    by = {n: {r["seed"]: r for r in rows if r["variant"] == n} for n in names}
    base = by[names[0]]
    out = []
    def mean(runs: list[dict], key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    for name in names:
        runs = list(by[name].values())
        entry = dict(variant=name, runs=len(runs), **{k: mean(runs, k) for k in (
            "test_acc", "corruption_acc", "steps", "steps_per_second", "compile_seconds")})
        if name != names[0]:
            acc = paired({s: r["test_acc"] for s, r in base.items()}, {s: r["test_acc"] for s, r in by[name].items()})
            cor = paired({s: r["corruption_acc"] for s, r in base.items() if r.get("corruption_acc") is not None},
                         {s: r["corruption_acc"] for s, r in by[name].items() if r.get("corruption_acc") is not None})
            entry.update(paired=dataclasses.asdict(acc), verdict=acc.verdict, corruption_paired=dataclasses.asdict(cor))
        out.append(entry)
    return out


def table(summary: list[dict], variants: dict[str, dict]) -> str:
    lines = ["| variant | settings | runs | test accuracy | vs base, points (95% CI) | sign test | "
             "corruption accuracy | vs base, points | steps/s | compile s | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in summary:
        changes = ", ".join(f"{k}={json.dumps(v)}" for k, v in variants[e["variant"]].items()) or "(base)"
        vs = sign = cvs = ""
        if "paired" in e:
            p, c = e["paired"], e["corruption_paired"]
            vs = _pts(p["mean"], True) + (f" ({_pts(p['low'], True)} to {_pts(p['high'], True)})" if p["low"] is not None else "")
            sign = f"{p['wins']}-{p['losses']}" + (f", p={p['p']:.3f}" if p["p"] is not None else "")
            cvs = _pts(c["mean"], True)
        speed = "" if e["steps_per_second"] is None else f"{e['steps_per_second']:.2f}"
        comp = "" if e["compile_seconds"] is None else f"{e['compile_seconds']:.0f}"
        acc = "" if e["test_acc"] is None else f"{100 * e['test_acc']:.2f}%"
        cor = "" if e["corruption_acc"] is None else f"{100 * e['corruption_acc']:.2f}%"
        lines.append(f"| {e['variant']} | {changes} | {e['runs']} | {acc} | {vs} | {sign} | {cor} | {cvs} | {speed} | "
                     f"{comp} | {e.get('verdict', 'base')} |")
    return "\n".join(lines) + "\n"


# -- running ----------------------------------------------------------------------------------------


def run_one(cfg: TrainConfig, run_dir: Path, config_file: Path, corruption: bool) -> dict:
    """Train one variant's run in its own process (unless it finished before) and read its numbers."""
    from cifarkit.rundir import RunDir
    run = RunDir(run_dir)
    wall = None
    if run.read_results() is None:
        if run_dir.exists():  # cut short before: from the start
            shutil.rmtree(run_dir)
        config_file.parent.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(config_file)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cifarkit", "train", "--config", str(config_file), "--out", str(run_dir),
                        "--no-report", "--quiet"], check=True)
        wall = round(time.perf_counter() - t, 1)
    res = run.read_results()
    if corruption and res.mean_corruption_accuracy is None:
        from cifarkit.report.report import measure_robustness, record_robustness
        from cifarkit.trust.robustness import CPU_SUBSAMPLE
        record_robustness(run, measure_robustness(run, n=CPU_SUBSAMPLE))
        res = run.read_results()
    train = res.train_seconds
    return dict(seed=cfg.seed, test_acc=res.test_acc, corruption_acc=res.mean_corruption_accuracy,
                corruption_images=res.corruption_images, steps=res.steps, epochs=res.epochs, train_seconds=train,
                steps_per_second=round(res.steps / train, 3) if train else None, compiled=res.compiled,
                compile_seconds=res.compile_seconds, seconds=res.seconds, wall_seconds=wall)


def _order(names: list[str], i: int) -> list[str]:
    """The variants for the i-th seed, rotated by i."""
    k = i % len(names)
    return names[k:] + names[:k]


def _variants(args) -> dict[str, dict]:
    variants: dict[str, dict] = {}
    if args.variants:
        variants.update(load_variants(args.variants))
    for text in args.variant or []:
        name, overrides = parse_variant(text)
        if name in variants:
            raise CifarkitError(f"variant '{name}' is given twice")
        variants[name] = overrides
    if args.only:
        missing = [n for n in args.only if n not in variants]
        if missing:
            raise CifarkitError(f"--only names no variant {missing}; the variants are: {', '.join(variants)}")
        variants = {n: v for n, v in variants.items() if n in args.only or n == next(iter(variants))}
    if len(variants) < 2:
        raise CifarkitError("give a base and at least one variant (--variant base: --variant NAME:SETTING=VALUE)")
    return variants


def _write(out: Path, record: dict, names: list[str]) -> None:
    """OUT/ablate.json (every run, every variant) and OUT/ablate.md (the table of `names`, base first)."""
    record["summary"] = summarize(record["runs"], names)
    (out / "ablate.json").write_text(json.dumps(record, indent=2))
    (out / "ablate.md").write_text(table(record["summary"], record["variants"]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", help="NAME:SETTING=VALUE[,SETTING=VALUE...] (the first is the base)")
    p.add_argument("--variants", help="a YAML file of NAME: {SETTING: VALUE} (before any --variant)")
    p.add_argument("--only", nargs="+", help="of those, only these (and the first, the base)")
    p.add_argument("--set", default="", help="SETTING=VALUE,... for every variant")
    p.add_argument("--preset", default="fast")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--time-budget", help="the same for every run (90s, 5m); without it, each its own epochs")
    p.add_argument("--out", default="runs/ablate")
    p.add_argument("--no-corruption", action="store_true", help="leave the corruption accuracy out")
    p.add_argument("--table", metavar="OUT", help="write the table of OUT's runs again, nothing run")
    args = p.parse_args(argv)
    try:
        if args.table:
            out = Path(args.table)
            record = json.loads((out / "ablate.json").read_text())
            _write(out, record, [e["variant"] for e in record["summary"]])
            print((out / "ablate.md").read_text(), end="")
            return 0
        return _sitting(args)
    except CifarkitError as exc:
        print(f"ablate: error: {exc}", file=sys.stderr)
        return 2


def _sitting(args) -> int:
    import torch
    from cifarkit.data.sources import load_arrays
    from cifarkit.train.budget import parse_budget
    if args.time_budget:
        parse_budget(args.time_budget)
    variants, common = _variants(args), parse_overrides(args.set, "--set")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    configs = {(name, seed): variant_config(name, overrides, common, args.preset, device, seed, args.time_budget)
               for seed in args.seeds for name, overrides in variants.items()}  # every one checked before any run
    out = Path(args.out)
    saved = json.loads((out / "ablate.json").read_text()) if (out / "ablate.json").is_file() else {}
    settings_now = {name: {**common, **overrides} for name, overrides in variants.items()}
    for key, now in (("preset", args.preset), ("time_budget", args.time_budget)):
        if saved and saved.get(key) != now:
            raise CifarkitError(f"{out} holds runs with {key} {saved.get(key)}, not {now}; give another --out")
    for name, now in settings_now.items():
        before = saved.get("variants", {}).get(name)
        if before is not None and before != now:
            raise CifarkitError(f"variant '{name}' ran in {out} with other settings ({before}); give it a new "
                                "name or another --out")
    out.mkdir(parents=True, exist_ok=True)
    record = dict(preset=args.preset, time_budget=args.time_budget, device=device,
                  variants={**saved.get("variants", {}), **settings_now},
                  runs=[r for r in saved.get("runs", []) if (r["variant"], r["seed"]) not in configs])
    first = configs[next(iter(configs))]
    load_arrays(first.data, first.dataset, first.classes)  # the decode cache warm: no run pays for it
    names = list(variants)
    for i, seed in enumerate(args.seeds):
        for name in _order(names, i):
            try:
                row = dict(variant=name, **run_one(configs[name, seed], out / name / f"seed{seed}",
                                                   out / "configs" / f"{name}-seed{seed}.yaml", not args.no_corruption))
            except subprocess.CalledProcessError as exc:  # its own error is printed above
                print(f"ablate: {name}, seed {seed}: cifarkit train exited with {exc.returncode}; the runs that "
                      f"finished are in {out}, and running this again goes on from there", file=sys.stderr)
                return 1
            record["runs"].append(row)
            print(json.dumps(row), flush=True)
            _write(out, record, names)
    print((out / "ablate.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
