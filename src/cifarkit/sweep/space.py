"""The search space: a short YAML of `TrainConfig` settings with ranges.

    lr: {low: 0.1, high: 1.2, log: true}      # a number between low and high (log: on a log scale)
    batch_size: {low: 128, high: 512, step: 128}   # an int setting draws ints (step: their spacing)
    label_smoothing: {low: 0.0, high: 0.3}
    nesterov: [true, false]                   # one of these values
    augment.pad: [0, 2, 4]                    # one key of a dict setting (augment, model_kwargs, lr_find)

Every other setting is the recipe's (the preset with the command's flags). A space is checked
whole before anything runs: a setting that does not exist, one a sweep cannot tune (where or how a
run happens, not how it learns), a range whose low is not below its high, a log range that reaches
0, an empty list, a value the setting refuses: each is one line. Each preset has a default space
(`default_space`, printed by `cifarkit sweep --show-space`): the settings that move its accuracy
most, around the preset's own values on this device.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import CifarkitError
from ..models import MODELS
from ..presets import TrainConfig, default, resolve, settings

# Settings that say where or how a run happens, not how it learns, and those a sweep sets itself
# (a trial's budget, validation split and run directory): a space cannot tune them.
NOT_TUNED = {"preset", "data", "data_name", "dataset", "subset", "classes", "calib_size", "val_size",
             "holdout_fold", "num_workers", "epochs", "eval_batch_size", "compile", "check_every_steps",
             "time_budget", "plan", "seed", "out", "accelerator", "devices", "num_nodes", "strategy",
             "ckpt_every_steps", "precision", "logger", "tta", "tta_threshold", "channels_last"}
DICT_SETTINGS = ("augment", "model_kwargs", "lr_find")
SPEC_KEYS = {"low", "high", "log", "step"}

# The default space of each preset: (setting, low, high, log). A number in place of a range is a
# factor around the preset's value on this device (a GPU's batch and rates are larger): value / f
# to value * f on a log scale.
DEFAULT_SPACES: dict[str, list[tuple]] = {
    "fast": [("lr", 3.0), ("weight_decay", 3.0), ("muon_lr", 2.0), ("label_smoothing", 0.0, 0.3, False)],
    "quick": [("lr", 3.0), ("weight_decay", 3.0), ("muon_lr", 2.0), ("label_smoothing", 0.0, 0.3, False)],
    # its lr is 'auto' (an LR range test per run): a sweep draws it instead
    "seed": [("lr", 0.02, 0.5, True), ("weight_decay", 3.0), ("momentum", 0.8, 0.95, False),
             ("label_smoothing", 0.0, 0.2, False)],
}


@dataclass(frozen=True)
class Param:
    """One setting's range: low..high (floats, or ints for an int setting), or a list of choices."""
    name: str                      # a TrainConfig field, or field.key of a dict setting
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None
    integer: bool = False

    def suggest(self, trial) -> Any:
        """The value an Optuna trial draws."""
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def spec(self) -> Any:
        """As the YAML file writes it."""
        if self.choices is not None:
            return list(self.choices)
        out = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def extremes(self) -> list:
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass(frozen=True)
class Space:
    params: tuple[Param, ...]

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def to_dict(self) -> dict:
        return {p.name: p.spec() for p in self.params}

    def to_yaml_text(self) -> str:
        lines = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=200)
        return "# cifarkit sweep's search space: TrainConfig settings with ranges (see `cifarkit sweep --help`)\n" + lines

    def key(self) -> str:
        """The space as one canonical string: a study remembers it, a worker that joins compares it."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def suggest(self, trial) -> dict:
        return {p.name: p.suggest(trial) for p in self.params}

    def apply(self, cfg: TrainConfig, values: dict) -> TrainConfig:
        """`cfg` with `values` ({setting or setting.key: value}) set, resolved as `fit` resolves a config."""
        overrides: dict = {}
        for name, value in values.items():
            field_name, _, key = name.partition(".")
            if key:
                base = overrides.get(field_name, getattr(cfg, field_name))
                overrides[field_name] = {**base, key: value}
            else:
                overrides[field_name] = value
        return resolve(dataclasses.replace(cfg, **overrides))


# -- reading a space ------------------------------------------------------------------------------


def _types() -> dict[str, Any]:
    return {f.name: typ for f, typ in settings()}


def _check_name(name: str, cfg: TrainConfig, where: str) -> Any:
    """The setting's type (for field.key: the type of the key's value); one line if it cannot be tuned."""
    types = _types()
    field_name, _, key = str(name).partition(".")
    if field_name not in types:
        near = difflib.get_close_matches(field_name, list(types), n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else "; settings are TrainConfig's fields, as `cifarkit train --help` lists them"
        raise CifarkitError(f"{where}: unknown setting '{name}'{hint}")
    if field_name in NOT_TUNED:
        raise CifarkitError(f"{where}: '{field_name}' says where or how a run happens, not how it learns: a sweep "
                            "does not tune it (give it as a flag of `cifarkit sweep` instead)")
    if field_name in DICT_SETTINGS:
        if not key:
            raise CifarkitError(f"{where}: '{field_name}' is a group of settings: give one key of it a range, "
                                f"e.g. {field_name}.{next(iter(_keys(field_name, cfg)))}")
        if key not in _keys(field_name, cfg):
            raise CifarkitError(f"{where}: unknown setting '{name}'; {field_name} has: {', '.join(sorted(_keys(field_name, cfg)))}")
        value = getattr(cfg, field_name).get(key, default(field_name).get(key))
        if value is None and field_name == "model_kwargs":  # the constructor's own default
            value = inspect.signature(MODELS[cfg.model]).parameters[key].default
        return type(value) if value is not None and value is not inspect.Parameter.empty else float
    if key:
        raise CifarkitError(f"{where}: '{field_name}' has no keys; write '{field_name}:' alone")
    return types[field_name]


def _keys(field_name: str, cfg: TrainConfig) -> set[str]:
    if field_name == "model_kwargs":
        model = MODELS.get(cfg.model)
        params = set(inspect.signature(model).parameters) - {"num_classes"} if model else set()
        return params | set(cfg.model_kwargs)
    return set(default(field_name)) | set(getattr(cfg, field_name))


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a word
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CifarkitError(f"{where}: {what} must be a number, got {value!r}")
    return value


def _param(name: str, spec: Any, typ: Any, where: str) -> Param:
    numeric = typ in (int, float) or typ in (float | str, int | None, float | None)
    integer = typ in (int, int | None)
    if isinstance(spec, list):
        if not spec:
            raise CifarkitError(f"{where}: '{name}' has an empty list of values: give at least one")
        if any(not isinstance(v, (bool, int, float, str)) or v is None for v in spec):
            raise CifarkitError(f"{where}: the values of '{name}' must be numbers, words or true/false, got {spec}")
        if numeric:
            spec = [_number(v, f"a value of '{name}'", where) for v in spec]
        if len(set(map(repr, spec))) != len(spec):
            raise CifarkitError(f"{where}: '{name}' lists a value twice: {spec}")
        return Param(name, choices=tuple(spec), integer=integer)
    if not isinstance(spec, dict):
        raise CifarkitError(f"{where}: '{name}' needs a range {{low: ..., high: ...}} or a list of values, got {spec!r}")
    unknown = set(spec) - SPEC_KEYS
    if unknown or not {"low", "high"} <= set(spec):
        raise CifarkitError(f"{where}: the range of '{name}' takes low, high and optionally log and step; "
                            f"got {', '.join(map(str, spec)) or 'nothing'}")
    if not numeric:
        raise CifarkitError(f"{where}: '{name}' is not a number: give it a list of values instead of a range")
    low, high = (_number(spec[k], f"'{name}' {k}", where) for k in ("low", "high"))
    log, step = bool(spec.get("log", False)), spec.get("step")
    if low >= high:
        raise CifarkitError(f"{where}: the range of '{name}' is empty: low {low} is not below high {high}")
    if log and low <= 0:
        raise CifarkitError(f"{where}: '{name}' on a log scale needs low > 0, got {low}")
    if step is not None:
        step = _number(step, f"'{name}' step", where)
        if log or step <= 0 or step > high - low:
            raise CifarkitError(f"{where}: the step of '{name}' must be positive, at most high - low, and "
                                "not on a log scale")
    if integer and not all(float(v).is_integer() for v in (low, high, step or 1)):
        raise CifarkitError(f"{where}: '{name}' is a whole number: give low, high and step as integers")
    return Param(name, low=low, high=high, log=log, step=step, integer=integer)


def parse_space(data: Any, cfg: TrainConfig, where: str = "the search space") -> Space:
    """A space from the YAML's mapping, checked against the recipe `cfg` it will vary."""
    if not data:
        raise CifarkitError(f"{where} is empty: give at least one setting a range, e.g. lr: {{low: 0.1, high: 1.0, log: true}}")
    if not isinstance(data, dict):
        raise CifarkitError(f"{where} must map settings to ranges (lr: {{low: 0.1, high: 1.0}}), not a {type(data).__name__}")
    params = [_param(str(name), spec, _check_name(name, cfg, where), where) for name, spec in data.items()]
    names = {p.name for p in params}
    for p in params:
        if "." in p.name and p.name.partition(".")[0] in names:
            raise CifarkitError(f"{where}: '{p.name.partition('.')[0]}' and '{p.name}' both vary the same setting")
    space = Space(tuple(params))
    _check_values(space, cfg, where)
    return space


def _check_values(space: Space, cfg: TrainConfig, where: str) -> None:
    """Every end of every range, and every listed value, makes a config that `fit` accepts."""
    from ..train.fit import validate
    for p in space.params:
        for value in p.extremes():
            try:
                validate(space.apply(cfg, {p.name: value}))
            except (CifarkitError, TypeError, ValueError) as exc:
                raise CifarkitError(f"{where}: {p.name} = {value!r} is refused: {str(exc).splitlines()[0]}") from None


def load_space(path: str | Path, cfg: TrainConfig) -> Space:
    p = Path(path)
    if not p.is_file():
        raise CifarkitError(f"search space {p} does not exist (print the preset's own with `cifarkit sweep --show-space`)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise CifarkitError(f"search space {p} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_space(data, cfg, f"search space {p}")


def _round(x: float) -> float:
    return float(f"{x:.3g}")


def default_space(cfg: TrainConfig) -> Space:
    """The preset's default space, around `cfg`'s values (the preset on this device)."""
    data = {}
    for name, *rest in DEFAULT_SPACES.get(cfg.preset, DEFAULT_SPACES["fast"]):
        if len(rest) == 1:
            value = getattr(cfg, name)
            if not isinstance(value, (int, float)) or value <= 0:
                continue  # nothing to range around (e.g. Muon turned off)
            data[name] = {"low": _round(value / rest[0]), "high": _round(value * rest[0]), "log": True}
        else:
            low, high, log = rest
            data[name] = {"low": low, "high": high, **({"log": True} if log else {})}
    return parse_space(data, cfg, f"the {cfg.preset} preset's search space")
