"""Declarative ablation studies: `experiments/<name>.yaml`, validated, and turned into trials.

An experiment file holds only what differs from the base model in `params.yaml`: the
factors and their levels (a list) or ranges (`{low, high, log}`), the sampler, pruner,
budget and objective. Each factor is one field of the model config. This is the only
module that calls `trial.suggest_*`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import yamlfile
from pipeline.errors import UserError
from pipeline.factors import FACTORS, apply_factors, base_levels
from pipeline.model import ModelConfig
from pipeline.params import TrainParams

# The training settings of the first release, hashed into every study name.
FIRST_TRAIN_FIELDS = ("epochs", "batch_size", "patience", "seed", "deterministic")
# The metrics `train()` returns that a study may optimise.
OBJECTIVES = ("val_accuracy", "val_loss")


SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("none", "median", "hyperband", "successive_halving")
KEYS = (
    "description",
    "factors",
    "repeats",
    "sampler",
    "pruner",
    "n_trials",
    "objective",
    "direction",
    "base_level",
    "learning_rates",
    "max_macs_ratio",
)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class Experiment:
    name: str
    factors: dict[str, tuple | Range]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    n_trials: int
    repeats: int = 1
    objective: str = "val_accuracy"
    direction: str = "maximize"
    description: str = ""
    base_level: dict[str, Any] = dataclasses.field(default_factory=dict)
    # each level also at each of these learning rates; the report compares levels at
    # their best rates
    learning_rates: tuple[float, ...] = ()
    # a model needing more than this many times the base model's multiply-accumulates an
    # image is rejected before training: a bound on a sampled study's costliest trials
    max_macs_ratio: float | None = None

    @property
    def is_grid(self) -> bool:
        return self.sampler["name"] == "grid"

    def grid(self) -> list[dict[str, Any]]:
        """Every level of every factor times each seed, seed-major (all levels of seed 0
        first), so a partial budget still covers every level."""
        names = list(self.factors)
        combos = itertools.product(*(self.factors[n] for n in names))
        points = [dict(zip(names, c, strict=True)) for c in combos]
        if self.learning_rates:
            points = [{**p, "learning_rate": r} for p in points for r in self.learning_rates]
        return [{**p, "seed": s} for s in range(self.repeats) for p in points]

    def to_dict(self) -> dict[str, Any]:
        extra = {"learning_rates": list(self.learning_rates)} if self.learning_rates else {}
        if self.max_macs_ratio is not None:
            extra["max_macs_ratio"] = self.max_macs_ratio
        return extra | {
            "factors": {
                k: (dataclasses.asdict(v) if isinstance(v, Range) else list(v))
                for k, v in self.factors.items()
            },
            "sampler": self.sampler,
            "pruner": self.pruner,
            "repeats": self.repeats,
            "objective": self.objective,
            "direction": self.direction,
        }


def _named(value: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    """`tpe` or `{name: tpe, seed: 0}` -> a dict with `name`."""
    spec = {"name": value} if isinstance(value, str) else value
    if not isinstance(spec, dict) or spec.get("name") not in allowed:
        raise UserError(f"{where}: {value!r} is not allowed; use one of {', '.join(allowed)}")
    return dict(spec)


def _levels(name: str, raw: Any, where: str) -> tuple | Range:
    factor = FACTORS[name]
    if isinstance(raw, dict):
        unknown = set(raw) - {"low", "high", "log"}
        if unknown or "low" not in raw or "high" not in raw or factor.kind is str:
            raise UserError(
                f"{where}: a range needs low and high (and optional log: true), "
                f"for a numeric factor; got {raw!r}"
            )
        kinds = (int,) if factor.kind is int else (int, float)
        if any(isinstance(raw[k], bool) or not isinstance(raw[k], kinds) for k in ("low", "high")):
            raise UserError(
                f"{where}: low and high must be "
                f"{'integers' if factor.kind is int else 'numbers'}; got {raw!r}"
            )
        if not raw["low"] < raw["high"]:
            raise UserError(f"{where}: low must be below high; got {raw!r}")
        if raw.get("log") and raw["low"] <= 0:
            raise UserError(f"{where}: a log range needs low > 0; got {raw!r}")
        return Range(factor.kind(raw["low"]), factor.kind(raw["high"]), bool(raw.get("log")))
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: expected a list of levels or a {{low, high}} range")
    levels = []
    for level in raw:
        if factor.allowed is not None and level not in factor.allowed:
            raise UserError(
                f"{where}: level {level!r} is not allowed; use one of "
                f"{', '.join(map(str, factor.allowed))}"
            )
        if factor.kind is bool and not isinstance(level, bool):
            raise UserError(f"{where}: level {level!r} must be true or false")
        if factor.kind in (int, float) and (
            isinstance(level, bool | str) or not isinstance(level, int | float)
        ):
            raise UserError(f"{where}: level {level!r} must be a number")
        if factor.kind is int and level != int(level):
            raise UserError(f"{where}: level {level!r} must be an integer")
        levels.append(factor.kind(level))
    if len(set(levels)) != len(levels):
        raise UserError(f"{where}: levels must be distinct; got {raw!r}")
    return tuple(levels)


def parse_experiment(
    name: str,
    data: Any,
    where: str,
    n_trials_override: int | None = None,
    base: ModelConfig | None = None,
    train: TrainParams | None = None,
) -> Experiment:
    """Validate one experiment mapping; errors name `where` (the file) and the key."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with at least `factors:`")
    unknown = sorted(set(data) - set(KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(KEYS)}")
    factors_raw = data.get("factors")
    if not isinstance(factors_raw, dict) or not factors_raw:
        raise UserError(f"{where}: factors: expected a mapping of factor -> levels")
    factors = {}
    for factor, raw in factors_raw.items():
        if factor not in FACTORS:
            raise UserError(
                f"{where}: factors.{factor}: unknown factor; use one of {', '.join(FACTORS)}"
            )
        factors[factor] = _levels(factor, raw, f"{where}: factors.{factor}")
    sampler = _named(data.get("sampler", "grid"), SAMPLERS, f"{where}: sampler")
    pruner = _named(data.get("pruner", "none"), PRUNERS, f"{where}: pruner")
    objective = data.get("objective", "val_accuracy")
    if objective not in OBJECTIVES:
        raise UserError(
            f"{where}: objective: {objective!r} is not a metric the training "
            f"produces; use one of {', '.join(OBJECTIVES)}"
        )
    direction = data.get("direction", "maximize" if objective == "val_accuracy" else "minimize")
    if direction not in ("maximize", "minimize"):
        raise UserError(f"{where}: direction: use maximize or minimize, not {direction!r}")
    repeats = data.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError(f"{where}: repeats: expected an integer >= 1, got {repeats!r}")
    if sampler["name"] == "grid":
        if any(isinstance(v, Range) for v in factors.values()):
            raise UserError(f"{where}: sampler grid needs lists of levels, not ranges")
        if "seed" in factors:
            raise UserError(f"{where}: factors.seed: use `repeats` for seeds in a grid study")
        rates = _learning_rates(data.get("learning_rates"), factors, where)
        grid_size = repeats * len(list(itertools.product(*factors.values()))) * (len(rates) or 1)
        n_trials = data.get("n_trials", grid_size)
    else:
        if data.get("learning_rates") is not None:
            raise UserError(f"{where}: learning_rates: only for sampler grid")
        n_trials, rates = data.get("n_trials"), ()
    if n_trials_override is not None:
        n_trials = n_trials_override
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise UserError(f"{where}: n_trials: expected an integer >= 1, got {n_trials!r}")
    if sampler["name"] == "grid":
        n_trials = min(n_trials, grid_size)
    base_level = data.get("base_level") or {}
    if not isinstance(base_level, dict):
        raise UserError(f"{where}: base_level: expected a mapping factor -> level")
    for factor, level in base_level.items():
        levels = factors.get(factor)
        if levels is None or (not isinstance(levels, Range) and level not in levels):
            raise UserError(
                f"{where}: base_level.{factor}: {level!r} must be one of the "
                f"levels of factors.{factor}"
            )
    _check_levels(factors, base or ModelConfig(), train or TrainParams(), where)
    max_macs_ratio = data.get("max_macs_ratio")
    if max_macs_ratio is not None and (
        isinstance(max_macs_ratio, bool)
        or not isinstance(max_macs_ratio, int | float)
        or max_macs_ratio <= 0
    ):
        raise UserError(
            f"{where}: max_macs_ratio: expected a number > 0 (times the base model's "
            f"multiply-accumulates an image), got {max_macs_ratio!r}"
        )
    if base is not None and not base_level:
        base_level = base_levels(base, factors, train)
    return Experiment(
        name,
        factors,
        sampler,
        pruner,
        n_trials,
        repeats,
        objective,
        direction,
        str(data.get("description", "")),
        base_level,
        rates,
        None if max_macs_ratio is None else float(max_macs_ratio),
    )


def _check_levels(factors: dict, base: ModelConfig, train: TrainParams, where: str) -> None:
    """Each level (a range's ends) set alone on the base config: a value no config can
    take (`dropout_rate: 1.5`) is refused when the file is read, not trial by trial."""
    for factor, levels in factors.items():
        values = (levels.low, levels.high) if isinstance(levels, Range) else levels
        for value in values:
            try:
                apply_factors(base, train, {factor: value})
            except ValueError as exc:
                raise UserError(f"{where}: factors.{factor}: level {value!r}: {exc}") from None


def _learning_rates(raw: Any, factors: dict, where: str) -> tuple[float, ...]:
    if raw is None:
        return ()
    if "learning_rate" in factors or len(factors) != 1:
        raise UserError(f"{where}: learning_rates: for a study of one factor other than it")
    if not isinstance(raw, list) or len(set(raw)) != len(raw) or len(raw) < 2:
        raise UserError(f"{where}: learning_rates: expected two or more distinct rates")
    if any(isinstance(r, bool) or not isinstance(r, int | float) or r <= 0 for r in raw):
        raise UserError(f"{where}: learning_rates: rates must be numbers > 0; got {raw!r}")
    return tuple(float(r) for r in raw)


def load_experiment(
    folder: str | Path,
    name: str,
    n_trials_override: int | None = None,
    base: ModelConfig | None = None,
    train: TrainParams | None = None,
) -> Experiment:
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in Path(folder).glob("*.yaml"))
        raise UserError(f"{path}: no such experiment; known: {', '.join(known) or 'none'}")
    try:
        data = yamlfile.load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    return parse_experiment(name, data, str(path), n_trials_override, base, train)


def suggest(trial, experiment: Experiment) -> dict[str, Any]:
    """Sample one value per factor (plus `seed` in grid studies). Names are stable."""
    values: dict[str, Any] = {}
    for name, levels in experiment.factors.items():
        if isinstance(levels, Range):
            if FACTORS[name].kind is int:
                values[name] = trial.suggest_int(
                    name, int(levels.low), int(levels.high), log=levels.log
                )
            else:
                values[name] = trial.suggest_float(name, levels.low, levels.high, log=levels.log)
        else:
            values[name] = trial.suggest_categorical(name, list(levels))
    if experiment.learning_rates:
        values["learning_rate"] = trial.suggest_categorical(
            "learning_rate", list(experiment.learning_rates)
        )
    if experiment.is_grid:
        values["seed"] = trial.suggest_categorical("seed", list(range(experiment.repeats)))
    return values


def study_name(
    experiment: Experiment, base: ModelConfig, train: TrainParams, data_hash: str
) -> str:
    """Stable across machines and runs; changes when anything that defines the study does.

    The budget (`n_trials`) is left out on purpose: raising it continues the same study.
    Training settings added after the first release count only when they differ from
    their defaults, so that adding a setting never restarts anyone's studies.
    """
    settings = dataclasses.asdict(train)
    defaults = dataclasses.asdict(TrainParams())
    hashed = {k: v for k, v in settings.items() if k in FIRST_TRAIN_FIELDS or v != defaults[k]}
    payload = json.dumps(
        {
            "experiment": experiment.to_dict(),
            "model": base.to_dict(),
            "train": hashed,
            "data": data_hash,
        },
        sort_keys=True,
        default=str,
    )
    return f"{experiment.name}-{hashlib.sha256(payload.encode()).hexdigest()[:10]}"
