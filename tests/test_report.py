"""The report's statistics: planted effects are found, copies of the base are not."""

from __future__ import annotations

import itertools
import json
import types

import numpy as np
import optuna
import pytest

from pipeline.experiments import parse_experiment
from pipeline.outputs import flat_summary, to_html
from pipeline.params import Paths
from pipeline.records import REJECTED, TrialRecord
from pipeline.report import build_report
from pipeline.stats import at_best_rates, judge, level_effects, pareto_front
from pipeline.tables import FactorStudy, regularization_answer, summary_table

SETTINGS = types.SimpleNamespace(confidence=0.95, min_effect=0.001)
HISTORY = {
    "loss": [1.0, 0.5],
    "accuracy": [0.6, 0.9],
    "val_loss": [0.9, 0.6],
    "val_accuracy": [0.7, 0.9],
}


def planted_trials(rng: np.random.Generator, repeats: int = 3) -> list[TrialRecord]:
    """A padding-like study: `same` is the base; `copy` is the base trained again with the
    same seeds (identical up to float noise); `blank` blanks the input (chance level)."""
    trials, number = [], 0
    base = 0.97 + rng.normal(0, 0.006, repeats)
    levels = {
        "same": base,
        "copy": base + rng.normal(0, 1e-5, repeats),
        "blank": 0.10 + rng.normal(0, 0.01, repeats),
    }
    for level, values in levels.items():
        for seed, value in enumerate(values):
            trials.append(
                TrialRecord(
                    number,
                    "COMPLETE",
                    {"padding": level, "seed": seed},
                    float(value),
                    {"n_params": 1000, "macs": 5000, "history": HISTORY},
                )
            )
            number += 1
    return trials


@pytest.mark.parametrize("seed", range(8))
def test_a_harmful_level_is_a_real_effect_and_a_copy_of_the_base_is_noise(seed):
    stats = {
        s.level: s
        for s in level_effects(
            planted_trials(np.random.default_rng(seed)), "padding", "same", min_effect=0.001
        )
    }
    assert stats["same"].effect is None  # the base level is the reference
    assert stats["blank"].real_effect is True
    assert stats["blank"].effect < -0.8
    assert stats["blank"].ci_high < 0
    assert stats["copy"].real_effect is False
    assert abs(stats["copy"].effect) < 1e-3


def test_an_effect_inside_the_seed_noise_is_not_real():
    # every level from the same wide distribution: differences are noise
    rng = np.random.default_rng(1)
    trials = [
        TrialRecord(i, "COMPLETE", {"pooling": level}, float(0.9 + rng.normal(0, 0.05)))
        for i, level in enumerate(["max", "avg"] * 3)
    ]
    stats = {s.level: s for s in level_effects(trials, "pooling", "max")}
    assert stats["avg"].real_effect is False


def test_the_summary_shows_the_adjusted_p_beside_an_interval_of_one_comparison():
    """Three seeds a level, one level 0.013 worse with a per-seed spread of 0.003: its
    interval alone leaves out zero (p about 0.02), but over nine comparisons Holm's
    adjusted p is above 0.05, so the row says "within noise" and shows why."""
    rng = np.random.default_rng(0)
    studies = []
    for k in range(9):
        records = []
        for seed in range(3):
            base = 0.98 + rng.normal(0, 0.005)
            shift = -0.013 if k == 0 else 0.0
            noise = (-0.003, 0.003, 0.0)[seed] if k == 0 else rng.normal(0, 0.005)
            for level, value in (("a", base), ("b", base + shift + noise)):
                records.append(
                    TrialRecord(len(records), "COMPLETE", {"f": level, "seed": seed}, value)
                )
        stats = level_effects(records, "f", "a", judged=False)
        studies.append(FactorStudy(f"study{k}", None, "f", "a", records, {}, stats))
    for study, stats in zip(studies, judge([s.stats for s in studies]), strict=True):
        study.stats = stats
    shifted = next(s for s in studies[0].stats if s.level == "b")
    assert shifted.ci_high < 0 and shifted.p_value < 0.05 <= shifted.p_adjusted

    lines = summary_table(studies, 0.95)

    assert lines[0].split(" | ")[3:7] == [
        "95% interval, alone",
        "P(beats base)",
        "p (Holm)",
        "verdict",
    ]
    row = [cell.strip() for cell in lines[2].split("|")]
    assert row[2] == "b vs a" and row[6] == f"{shifted.p_adjusted:.3f}" and row[7] == "within noise"


def test_pruned_and_failed_trials_are_counted_not_averaged():
    trials = [
        TrialRecord(0, "COMPLETE", {"strides": 1}, 0.9),
        TrialRecord(1, "COMPLETE", {"strides": 1}, 0.92),
        TrialRecord(2, "PRUNED", {"strides": 2}, None),
        TrialRecord(3, "FAIL", {"strides": 2}, None),
    ]
    stats = {s.level: s for s in level_effects(trials, "strides", 1)}
    assert (stats["2"].n, stats["2"].n_pruned, stats["2"].n_failed) == (0, 1, 1)
    assert stats["2"].mean is None and stats["2"].effect is None
    assert stats["1"].mean == pytest.approx(0.91)


def test_pareto_front_keeps_only_undominated_points():
    points = [(100, 0.90), (200, 0.85), (300, 0.95), (50, 0.80), (400, 0.95), (300, 0.93)]
    assert pareto_front(points) == [(50, 0.80), (100, 0.90), (300, 0.95)]


def test_regularization_answer_says_when_both_together_is_worse():
    trials = []
    for i, (level, mean) in enumerate(
        [("none", 0.95), ("dropout", 0.96), ("batchnorm", 0.97), ("both", 0.80)] * 3
    ):
        params = {"regularization": level, "seed": i // 4}
        trials.append(TrialRecord(i, "COMPLETE", params, mean + 0.001 * (i % 3) + 0.002 * (i // 4)))
    answer = regularization_answer(level_effects(trials, "regularization", "none"), trials, 3)
    assert "worse than the better of the two alone (batchnorm: 0.9" in answer
    assert "over 3 trials" in answer and "paired t (3 seeds)" in answer
    assert "warning holds" in answer


def test_regularization_answer_follows_the_reports_confidence():
    """`both` trails dropout by 0.005, 0.001 and 0.007 over 3 seeds: paired t = -2.45,
    p = 0.27 after Bonferroni over 2, so the answer follows the error rate asked for."""
    trials = []
    for seed, noise in enumerate([0.0, 0.004, -0.002]):
        for level, mean in [("none", 0.95), ("dropout", 0.96), ("batchnorm", 0.95)]:
            trials.append(
                TrialRecord(len(trials), "COMPLETE", {"regularization": level, "seed": seed}, mean)
            )
        trials.append(
            TrialRecord(
                len(trials), "COMPLETE", {"regularization": "both", "seed": seed}, 0.955 + noise
            )
        )
    stats = level_effects(trials, "regularization", "none")
    strict = regularization_answer(stats, trials, 1, confidence=0.99)
    loose = regularization_answer(stats, trials, 1, confidence=0.6)
    assert "no different from" in strict and "99% interval" in strict
    assert "worse than" in loose and "60% interval" in loose


def test_regularization_answer_needs_two_trials_of_each():
    trials = [
        TrialRecord(i, "COMPLETE", {"regularization": level, "seed": 0}, 0.9)
        for i, level in enumerate(["none", "dropout", "batchnorm", "both"])
    ]
    answer = regularization_answer(level_effects(trials, "regularization", "none"), trials)
    assert answer.startswith("Too few complete trials")


def _stored_study(storage: str, name: str, trials: list[TrialRecord], factor: str) -> None:
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    levels = sorted({str(t.params[factor]) for t in trials})
    for t in trials:
        distributions = {
            factor: optuna.distributions.CategoricalDistribution(levels),
            "seed": optuna.distributions.IntDistribution(0, 10),
        }
        study.add_trial(
            optuna.trial.create_trial(
                params={factor: str(t.params[factor]), "seed": t.params.get("seed", 0)},
                distributions=distributions,
                value=t.value,
                user_attrs={"n_params": t.n_params, "macs": t.macs, "history": t.history},
            )
        )


def test_report_from_a_real_optuna_storage_writes_tables_plots_and_json(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    trials = planted_trials(np.random.default_rng(0))
    _stored_study(storage, "padding-abc", trials, "padding")
    experiment = parse_experiment(
        "padding",
        {"factors": {"padding": ["same", "valid"]}, "base_level": {"padding": "same"}},
        "padding.yaml",
    )
    plots = tmp_path / "plots"
    markdown, results = build_report(
        {"padding": (experiment, {"study": "padding-abc", "best_value": 0.98})},
        storage,
        Paths(reports=str(tmp_path)),
        SETTINGS,
    )
    assert "| blank | 3 | 0 | 0 |" in markdown
    assert "| padding | blank vs same |" in markdown.split("## padding")[0]  # the summary
    assert "**real effect**" in markdown and "within noise" in markdown
    assert "Holm-adjusted p-value over all 2 comparisons" in markdown
    assert (plots / "padding_levels.png").stat().st_size > 1000
    assert (plots / "padding_curves.png").stat().st_size > 1000
    assert "](plots/padding_levels.png)" in markdown
    levels = json.loads(json.dumps(results))["padding"]["levels"]
    assert levels["blank"]["real_effect"] is True
    assert levels["copy"]["real_effect"] is False

    html = to_html(markdown, tmp_path)
    assert html.count('<img src="data:image/png;base64,') == 2  # both plots, embedded
    assert "<table>" in html and "plots/padding_levels.png" not in html
    flat = flat_summary(results)
    assert flat["padding.blank.real"] == 1 and flat["padding.copy.real"] == 0
    assert flat["padding.best"] == 0.98
    assert all(isinstance(v, int | float) for v in flat.values())


def test_joint_report_ranks_the_parameter_that_drives_the_score(tmp_path):
    # val_accuracy follows learning_rate and ignores padding; two trials were pruned, one
    # by the pruner and one rejected before training over the cost cap
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(study_name="joint-abc", storage=storage, direction="maximize")
    distributions = {
        "padding": optuna.distributions.CategoricalDistribution(["same", "valid"]),
        "learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
    }
    rng = np.random.default_rng(0)
    for i in range(24):
        lr = float(10 ** rng.uniform(-4, -2))
        params = {"padding": ["same", "valid"][i % 2], "learning_rate": lr}
        pruned = i in (3, 7)
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=distributions,
                state=optuna.trial.TrialState.PRUNED
                if pruned
                else optuna.trial.TrialState.COMPLETE,
                value=None if pruned else 0.5 + 10 * lr,
                intermediate_values={0: 0.3} if i == 3 else None,
                user_attrs={"n_params": 1000 * (i + 1), "history": HISTORY}
                | (
                    {"prune_reason": f"{REJECTED}: 40.0 M ..., over max_macs_ratio 2"}
                    if i == 7
                    else {}
                ),
            )
        )
    experiment = parse_experiment(
        "joint",
        {
            "factors": {
                "padding": ["same", "valid"],
                "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
            },
            "sampler": {"name": "tpe"},
            "n_trials": 24,
        },
        "joint.yaml",
    )
    markdown, results = build_report(
        {"joint": (experiment, {"study": "joint-abc", "best_value": 0.6})},
        storage,
        Paths(reports=str(tmp_path)),
        SETTINGS,
    )
    weights = results["joint"]["importances"]
    assert weights["learning_rate"] > 0.8 > weights["padding"]
    assert (
        "22 complete, 2 pruned, 0 failed. Of the pruned, 1 was rejected before training "
        "(1 over the study's max_macs_ratio" in markdown
    )
    assert "over the 22 complete trials" in markdown
    front = results["joint"]["pareto"]
    assert [p["n_params"] for p in front] == sorted(p["n_params"] for p in front)
    assert all(b["val_accuracy"] > a["val_accuracy"] for a, b in itertools.pairwise(front))
    assert (tmp_path / "plots" / "joint_pareto.png").stat().st_size > 1000


def test_levels_are_compared_at_their_own_best_learning_rate():
    # batchnorm is poor at the low rate and good at the high one; none the other way round
    means = {
        ("none", 1e-3): 0.97,
        ("none", 4e-3): 0.95,
        ("batchnorm", 1e-3): 0.90,
        ("batchnorm", 4e-3): 0.98,
    }
    trials = [
        TrialRecord(
            i,
            "COMPLETE",
            {"regularization": level, "learning_rate": rate, "seed": seed},
            mean + 0.001 * seed,
        )
        for i, ((level, rate), mean) in enumerate(
            (key, mean) for key, mean in means.items() for _ in range(3)
        )
        for seed in [i % 3]
    ]
    kept, rates = at_best_rates(trials, "regularization")
    assert rates == {"none": 1e-3, "batchnorm": 4e-3}
    stats = {s.level: s for s in level_effects(kept, "regularization", "none")}
    assert stats["batchnorm"].effect == pytest.approx(0.01)
