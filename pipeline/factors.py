"""The ablation factors: each one a field of the model config, of every conv block, or of
the training recipe, typed by that field. `apply_factors` writes sampled values into the
base config; `base_levels` says which level the base already uses."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.model import ConvBlock, ModelConfig
from pipeline.params import TrainParams


@dataclass(frozen=True)
class Factor:
    """How one ablation factor maps onto the config."""

    target: str  # "block": every conv block; "model": the model; "train": training
    kind: type
    allowed: tuple | None = None


def _factor(target: str, hint: Any) -> Factor:
    if typing.get_origin(hint) is Literal:
        return Factor(target, str, typing.get_args(hint))
    if hint is bool:
        return Factor(target, bool, (False, True))
    return Factor(target, hint)


def _factors() -> dict[str, Factor]:
    """One factor per config field that a study may vary, typed by the field itself: every
    conv block field but `filters`, the model's scalar fields, `width` (multiplies every
    block's filters), the training `seed` (an offset) and the recipe's `schedule` and
    `augment`."""
    block = typing.get_type_hints(ConvBlock)
    model = typing.get_type_hints(ModelConfig)
    factors = {name: _factor("block", hint) for name, hint in block.items() if name != "filters"}
    factors["width"] = Factor("model", float)
    factors |= {
        name: _factor("model", hint)
        for name, hint in model.items()
        if name not in ("blocks", "dense_units")
    }
    train = typing.get_type_hints(TrainParams)
    factors |= {name: _factor("train", train[name]) for name in ("seed", "schedule", "augment")}
    return factors


FACTORS: dict[str, Factor] = _factors()


def apply_factors(
    base: ModelConfig, train: TrainParams, values: dict[str, Any]
) -> tuple[ModelConfig, TrainParams]:
    """The base config with each factor's value written into its field(s)."""
    block_changes = {k: v for k, v in values.items() if FACTORS[k].target == "block"}
    blocks = tuple(dataclasses.replace(b, **block_changes) for b in base.blocks)
    if "width" in values:
        blocks = tuple(
            dataclasses.replace(b, filters=max(1, round(b.filters * values["width"])))
            for b in blocks
        )
    model_changes = {
        k: v for k, v in values.items() if FACTORS[k].target == "model" and k != "width"
    }
    config = dataclasses.replace(base, blocks=blocks, **model_changes)
    train_changes = {
        k: v for k, v in values.items() if FACTORS[k].target == "train" and k != "seed"
    }
    if "seed" in values:
        train_changes["seed"] = train.seed + int(values["seed"])
    return config, dataclasses.replace(train, **train_changes)


def base_levels(
    base: ModelConfig, factors: dict, train: TrainParams | None = None
) -> dict[str, Any]:
    """The level of each factor that the base model and recipe already use (the last conv
    block's value for block factors); an experiment file can name another with
    `base_level`."""
    levels = {}
    for name in factors:
        factor = FACTORS[name]
        if factor.target == "block" and base.blocks:
            levels[name] = getattr(base.blocks[-1], name)
        elif name == "width":
            levels[name] = 1.0
        elif factor.target == "model":
            levels[name] = getattr(base, name)
        elif train is not None and name != "seed":
            levels[name] = getattr(train, name)
    return levels
