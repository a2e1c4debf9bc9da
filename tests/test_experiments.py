"""`experiments/*.yaml`: every shipped file validates, malformed ones are refused naming the
file and the key, factors land in the config, and study names identify a study."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config, read_params
from pipeline.errors import UserError
from pipeline.experiments import Range, load_experiment, parse_experiment, study_name
from pipeline.factors import FACTORS, apply_factors
from pipeline.model import ConvBlock, ModelConfig
from pipeline.params import TrainParams

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO_ROOT / "experiments"
SHIPPED = sorted(EXPERIMENTS.glob("*.yaml"))


@pytest.fixture(scope="module")
def base() -> ModelConfig:
    """The base model of the repository's `params.yaml` (two conv blocks)."""
    raw = read_params(REPO_ROOT / "params.yaml")
    return ModelConfig.from_dict(raw["model"])


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


# -- the shipped experiment files -----------------------------------------------------------


def test_there_are_experiment_files():
    assert SHIPPED, f"no experiment files in {EXPERIMENTS}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_experiment_loads_and_validates(path, base):
    experiment = load_experiment(EXPERIMENTS, path.stem, base=base)

    assert experiment.name == path.stem
    assert experiment.n_trials >= 1
    assert set(experiment.factors) <= set(FACTORS)
    assert set(experiment.base_level) <= set(experiment.factors)
    # STYLE.md: each file is headed by the command that runs it.
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# Run:") and f"sweep@{path.stem}" in first_line


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_experiment_budget(path, base):
    """Grid studies expand to levels x repeats; the others state their budget."""
    experiment = load_experiment(EXPERIMENTS, path.stem, base=base)
    if not experiment.is_grid:
        assert yaml.safe_load(path.read_text())["n_trials"] == experiment.n_trials
        return

    n_levels = math.prod(len(levels) for levels in experiment.factors.values())
    points = experiment.grid()
    assert len(points) == n_levels * experiment.repeats == experiment.n_trials
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
    # seed-major: the first block of points covers every level once with seed 0
    assert {p["seed"] for p in points[:n_levels]} == {0}
    for point in points:
        apply_factors(base, TrainParams(), point)  # every grid point is a valid config


def test_the_experiment_list_drives_dvc_and_names_every_shipped_file():
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["sweep"]["foreach"] == "${experiments}"
    listed = load_config(REPO_ROOT / "params.yaml").experiments
    assert sorted(listed) == [p.stem for p in SHIPPED]


def test_sweep_n_trials_overrides_the_budget_but_never_beyond_the_grid(base):
    padding = load_experiment(EXPERIMENTS, "padding", base=base)
    assert load_experiment(EXPERIMENTS, "padding", 2, base).n_trials == 2
    assert load_experiment(EXPERIMENTS, "padding", 1000, base).n_trials == len(padding.grid())
    assert load_experiment(EXPERIMENTS, "joint", 3, base).n_trials == 3


def test_base_level_is_what_the_base_model_already_uses(base):
    padding = load_experiment(EXPERIMENTS, "padding", base=base)
    assert padding.base_level == {"padding": base.blocks[-1].padding}


# -- malformed files ---------------------------------------------------------------------------

MALFORMED = {
    "not-yaml": ("factors: [same, valid\nrepeats: 1\n", "not valid YAML"),
    "not-a-mapping": ("- padding\n- strides\n", "expected a mapping"),
    "unknown-key": ("factors: {padding: [same]}\nrepeat: 2\n", r"unknown key\(s\) \['repeat'\]"),
    "no-factors": ("description: nothing to vary\n", "factors"),
    "unknown-factor": ("factors: {paddding: [same]}\n", "factors.paddding: unknown factor"),
    "unknown-level": ("factors: {padding: [full]}\n", "factors.padding: level 'full'"),
    "string-range": (
        "factors: {padding: {low: 1, high: 2}}\nsampler: tpe\nn_trials: 2\n",
        "factors.padding: a range",
    ),
    "empty-levels": ("factors: {strides: []}\n", "factors.strides: expected a list"),
    "text-level": ("factors: {strides: [1, two]}\n", "factors.strides: level 'two'"),
    "fraction-level": ("factors: {strides: [1, 1.5]}\n", "factors.strides: level 1.5"),
    "repeated-level": ("factors: {strides: [1, 1]}\n", "factors.strides: levels must be distinct"),
    "inverted-range": (
        "factors: {learning_rate: {low: 0.1, high: 0.01}}\nsampler: tpe\nn_trials: 2\n",
        "factors.learning_rate: low must be below high",
    ),
    "text-range": (
        "factors: {learning_rate: {low: a, high: b}}\nsampler: tpe\nn_trials: 2\n",
        "factors.learning_rate",
    ),
    "log-range-from-zero": (
        "factors: {learning_rate: {low: 0, high: 0.01, log: true}}\nsampler: tpe\nn_trials: 2\n",
        "factors.learning_rate",
    ),
    "fraction-int-range": (
        "factors: {kernel_size: {low: 1.5, high: 5}}\nsampler: random\nn_trials: 2\n",
        "factors.kernel_size",
    ),
    "range-in-grid": (
        "factors: {learning_rate: {low: 0.001, high: 0.01}}\n",
        "sampler grid needs lists",
    ),
    "seed-in-grid": ("factors: {seed: [0, 1]}\n", "factors.seed: use `repeats`"),
    "unknown-objective": (
        "factors: {padding: [same]}\nobjective: f1\n",
        "objective: 'f1' is not a metric the training produces",
    ),
    "bad-direction": ("factors: {padding: [same]}\ndirection: up\n", "direction"),
    "bad-sampler": ("factors: {padding: [same]}\nsampler: cmaes\n", "sampler: 'cmaes'"),
    "bad-sampler-mapping": ("factors: {padding: [same]}\nsampler: {seed: 3}\n", "sampler"),
    "bad-pruner": ("factors: {padding: [same]}\npruner: {name: percentile}\n", "pruner"),
    "zero-repeats": ("factors: {padding: [same]}\nrepeats: 0\n", "repeats: expected an integer"),
    "text-repeats": ("factors: {padding: [same]}\nrepeats: three\n", "repeats"),
    "zero-n-trials": ("factors: {padding: [same]}\nn_trials: 0\n", "n_trials"),
    "impossible-level": (
        "factors: {dropout_rate: [0.25, 1.5]}\n",
        "factors.dropout_rate: level 1.5",
    ),
    "tpe-without-budget": (
        "factors: {padding: [same, valid]}\nsampler: tpe\n",
        "n_trials",
    ),
    "base-level-not-a-level": (
        "factors: {padding: [same, valid]}\nbase_level: {padding: full}\n",
        "base_level.padding: 'full' must be one of the levels",
    ),
    "base-level-not-a-factor": (
        "factors: {padding: [same]}\nbase_level: {strides: 1}\n",
        "base_level.strides",
    ),
}


@pytest.mark.parametrize(("text", "message"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_experiment_is_refused_naming_the_file_and_key(tmp_path, text, message):
    path = _write(tmp_path, "broken", text)

    with pytest.raises(UserError, match=message) as raised:
        load_experiment(tmp_path, "broken")
    assert str(raised.value).startswith(f"{path}:")
    assert "\n" not in str(raised.value)


def test_missing_experiment_lists_the_known_ones(tmp_path):
    _write(tmp_path, "padding", "factors: {padding: [same]}\n")
    _write(tmp_path, "strides", "factors: {strides: [1]}\n")

    with pytest.raises(UserError, match="no such experiment; known: padding, strides"):
        load_experiment(tmp_path, "dilation")


def test_grid_experiment_defaults(tmp_path):
    _write(tmp_path, "tiny", "factors: {padding: [valid, same], strides: [1, 2]}\nrepeats: 2\n")

    experiment = load_experiment(tmp_path, "tiny")

    assert experiment.is_grid
    assert experiment.n_trials == 8
    assert experiment.sampler == {"name": "grid"}
    assert experiment.pruner == {"name": "none"}
    assert (experiment.objective, experiment.direction) == ("val_accuracy", "maximize")
    assert experiment.grid()[:4] == [
        {"padding": "valid", "strides": 1, "seed": 0},
        {"padding": "valid", "strides": 2, "seed": 0},
        {"padding": "same", "strides": 1, "seed": 0},
        {"padding": "same", "strides": 2, "seed": 0},
    ]


def test_val_loss_objective_is_minimized(tmp_path):
    _write(tmp_path, "loss", "factors: {padding: [same]}\nobjective: val_loss\n")
    assert load_experiment(tmp_path, "loss").direction == "minimize"


def test_numeric_range_keeps_the_factor_type(tmp_path):
    _write(
        tmp_path,
        "ranges",
        "factors:\n  kernel_size: {low: 1, high: 5}\n"
        "  learning_rate: {low: 0.0001, high: 0.01, log: true}\nsampler: tpe\nn_trials: 4\n",
    )

    factors = load_experiment(tmp_path, "ranges").factors

    assert factors["kernel_size"] == Range(1, 5, False)
    assert isinstance(factors["kernel_size"].low, int)
    assert factors["learning_rate"] == Range(0.0001, 0.01, True)


# -- apply_factors ---------------------------------------------------------------------------

# A non-default level for every block factor; a new factor must be added here.
BLOCK_LEVELS = {
    "padding": "valid",
    "strides": 2,
    "dilation_rate": 2,
    "kernel_size": 5,
    "pooling": "avg",
    "pool_size": 3,
    "regularization": "both",
    "dropout_rate": 0.5,
    "activation": "gelu",
}


def test_every_block_factor_has_a_test_level():
    assert set(BLOCK_LEVELS) == {n for n, f in FACTORS.items() if f.target == "block"}


@pytest.mark.parametrize(("factor", "level"), BLOCK_LEVELS.items(), ids=BLOCK_LEVELS.keys())
def test_apply_factors_writes_a_block_factor_into_every_block(base, factor, level):
    assert any(getattr(b, factor) != level for b in base.blocks)

    config, train = apply_factors(base, TrainParams(), {factor: level})

    assert [getattr(b, factor) for b in config.blocks] == [level] * len(base.blocks)
    # nothing else changes, and the base config is left alone
    others = [
        dataclasses.replace(b, **{factor: getattr(o, factor)})
        for b, o in zip(config.blocks, base.blocks, strict=True)
    ]
    assert tuple(others) == base.blocks
    assert train == TrainParams()


def test_apply_factors_model_and_train_factors(base):
    config, train = apply_factors(
        base,
        TrainParams(seed=10),
        {"width": 0.5, "learning_rate": 0.01, "dense_dropout": 0.1, "seed": 2},
    )

    assert [b.filters for b in config.blocks] == [b.filters // 2 for b in base.blocks]
    assert config.learning_rate == 0.01
    assert config.dense_dropout == 0.1
    assert train.seed == 12  # repeats offset the configured seed


def test_apply_factors_width_keeps_at_least_one_filter(base):
    config, _ = apply_factors(base, TrainParams(), {"width": 0.001})
    assert [b.filters for b in config.blocks] == [1] * len(base.blocks)


def test_apply_factors_refuses_combinations_keras_cannot_build(base):
    with pytest.raises(ValueError, match="strides > 1 together with dilation_rate > 1"):
        apply_factors(base, TrainParams(), {"strides": 2, "dilation_rate": 2})


def test_apply_factors_to_the_fully_connected_baseline():
    config, _ = apply_factors(
        ModelConfig(blocks=()), TrainParams(), {"padding": "valid", "learning_rate": 0.01}
    )
    assert config.blocks == ()
    assert config.learning_rate == 0.01


# -- study names ------------------------------------------------------------------------------

PADDING = {"factors": {"padding": ["valid", "same"]}, "repeats": 2}


def _name(
    base, experiment=PADDING, train=None, data_hash="0123abcd", n_trials=None, name="padding"
) -> str:
    train = train or TrainParams()
    spec = parse_experiment(name, experiment, f"{name}.yaml", n_trials, base)
    return study_name(spec, base, train, data_hash)


def test_study_name_is_stable_and_readable(base):
    first = _name(base)
    assert first == _name(base)
    assert re.fullmatch(r"padding-[0-9a-f]{10}", first)


def test_study_names_do_not_change_between_versions(tmp_path):
    """A workspace made by an earlier version resumes its studies only if the same config
    still hashes to the same name: this one was recorded on 2026-11-29 (commit 3013653).
    If it fails, the hash changed, and every user's sweeps would start over."""
    _write(tmp_path, "padding", "factors: {padding: [valid, same]}\nrepeats: 3\n")
    base = ModelConfig(
        blocks=(ConvBlock(filters=8, pooling="none"), ConvBlock(filters=16)),
        dense_units=(32,),
        dense_dropout=0.1,
        learning_rate=0.001,
    )
    spec = load_experiment(tmp_path, "padding", base=base)
    train = TrainParams(epochs=3, batch_size=32, patience=1, seed=0)
    assert study_name(spec, base, train, "0123456789abcdef") == "padding-092c2a9824"


@pytest.mark.parametrize(
    "change",
    [
        "levels",
        "repeats",
        "sampler",
        "objective",
        "name",
        "base model",
        "train epochs",
        "train seed",
        "data hash",
    ],
)
def test_study_name_changes_with_what_defines_the_study(base, change):
    blocks = [dataclasses.replace(b, filters=b.filters * 2) for b in base.blocks]
    changed = {
        "levels": lambda: _name(base, {**PADDING, "factors": {"padding": ["valid"]}}),
        "repeats": lambda: _name(base, {**PADDING, "repeats": 3}),
        "sampler": lambda: _name(base, {**PADDING, "sampler": "random", "n_trials": 4}),
        "objective": lambda: _name(base, {**PADDING, "objective": "val_loss"}),
        "name": lambda: _name(base, name="padding2"),
        "base model": lambda: _name(dataclasses.replace(base, blocks=tuple(blocks))),
        "train epochs": lambda: _name(base, train=TrainParams(epochs=2)),
        "train seed": lambda: _name(base, train=TrainParams(seed=1)),
        "data hash": lambda: _name(base, data_hash="0123abce"),
    }[change]()
    assert changed != _name(base)


def test_study_name_ignores_the_budget(base):
    assert _name(base, n_trials=1) == _name(base, n_trials=3) == _name(base)
    assert _name(base, {**PADDING, "n_trials": 2}) == _name(base)


def test_bad_sampler_arguments_are_refused_before_any_trial(base):
    from pipeline.errors import UserError
    from pipeline.experiments import parse_experiment
    from pipeline.studies import _sampler

    experiment = parse_experiment(
        "x",
        {"factors": {"padding": ["same"]}, "n_trials": 2, "sampler": {"name": "tpe", "n_start": 3}},
        "x.yaml",
        None,
        base,
    )
    with pytest.raises(UserError, match="experiments/x.yaml: sampler: .*n_start"):
        _sampler(experiment)


def test_learning_rates_give_every_level_each_rate_and_leave_other_names_alone(base):
    spec = {"factors": {"regularization": ["none", "batchnorm"]}, "repeats": 2}
    plain = parse_experiment("r", spec, "r.yaml", None, base)
    tuned = parse_experiment("r", {**spec, "learning_rates": [1e-3, 4e-3]}, "r.yaml", None, base)

    assert tuned.n_trials == len(tuned.grid()) == 2 * 2 * 2
    assert {(p["regularization"], p["learning_rate"]) for p in tuned.grid()} == {
        (level, rate) for level in ("none", "batchnorm") for rate in (1e-3, 4e-3)
    }
    assert "learning_rates" not in plain.to_dict()
    assert study_name(plain, base, TrainParams(), "h") != study_name(
        tuned, base, TrainParams(), "h"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"learning_rates": [1e-3]}, "two or more distinct rates"),
        ({"learning_rates": [1e-3, -1]}, "numbers > 0"),
        (
            {"learning_rates": [1e-3, 2e-3], "sampler": "tpe", "n_trials": 4},
            "only for sampler grid",
        ),
    ],
)
def test_bad_learning_rates_are_refused_when_the_file_is_read(base, extra, message):
    spec = {"factors": {"padding": ["valid", "same"]}, **extra}
    with pytest.raises(UserError, match=message):
        parse_experiment("x", spec, "x.yaml", None, base)


def test_a_cost_cap_defines_the_study_and_bad_caps_are_refused(base):
    spec = {"factors": {"width": [1.0, 2.0]}}
    plain = parse_experiment("w", spec, "w.yaml", None, base)
    capped = parse_experiment("w", {**spec, "max_macs_ratio": 2}, "w.yaml", None, base)

    assert (plain.max_macs_ratio, capped.max_macs_ratio) == (None, 2.0)
    assert "max_macs_ratio" not in plain.to_dict()
    assert study_name(plain, base, TrainParams(), "h") != study_name(
        capped, base, TrainParams(), "h"
    )
    for bad in (0, -1, "2x", True):
        with pytest.raises(UserError, match=r"w.yaml: max_macs_ratio: expected a number > 0"):
            parse_experiment("w", {**spec, "max_macs_ratio": bad}, "w.yaml", None, base)


def test_numbers_in_exponent_form_are_numbers_in_every_yaml_file(tmp_path):
    from pipeline.config import read_params

    (tmp_path / "params.yaml").write_text("model:\n  learning_rate: 2e-3\n")
    assert read_params(tmp_path / "params.yaml")["model"]["learning_rate"] == 0.002
    (tmp_path / "rates.yaml").write_text(
        "factors:\n  learning_rate: {low: 1e-4, high: 1E-2, log: true}\nsampler: tpe\nn_trials: 4\n"
    )
    experiment = load_experiment(tmp_path, "rates")
    rate = experiment.factors["learning_rate"]
    assert (rate.low, rate.high) == (0.0001, 0.01)
