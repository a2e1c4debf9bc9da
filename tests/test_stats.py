"""The report's verdicts cannot overclaim: simulated null ablations shaped like the default
report (six single-factor studies, nine comparisons, three seeds per level) are called a
real effect in at most 5% of reports, and a planted effect is found as often as three
seeds allow. No Keras here: trial values are drawn, as a seed's split, data order and
initial weights would move them, and go through the same `level_effects` and `judge` the
report uses.

Measured with these settings (2,000 reports each): a planted effect of two noise
standard deviations (sd of one trial's score) is found in about 8% of reports with three
seeds and 40% with five; four standard deviations in about 23% and 96%. With three values
per level a t interval has two degrees of freedom, and nine comparisons share the 5%:
three seeds find only large effects, which the report says.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.records import TrialRecord
from pipeline.stats import REAL, TOO_FEW, compare, holm, judge, level_effects

# levels per study in the default report: padding, strides, dilation, pooling,
# regularization, augmentation
STUDY_LEVELS = (2, 2, 2, 3, 4, 2)


def simulated_study(rng, n_levels, seeds, shared_sd, own_sd, shift=0.0) -> list[TrialRecord]:
    """Level `l0` is the base; `l1` is moved by `shift`. A seed moves every level alike by
    a draw of sd `shared_sd` (its split and data order); each trial adds its own noise."""
    by_seed = rng.normal(0, shared_sd, seeds)
    trials = []
    for level in range(n_levels):
        for seed in range(seeds):
            value = 0.98 + by_seed[seed] + rng.normal(0, own_sd) + (shift if level == 1 else 0)
            trials.append(
                TrialRecord(len(trials), "COMPLETE", {"f": f"l{level}", "seed": seed}, value)
            )
    return trials


def simulated_reports(n_reports, seeds, shared_sd, own_sd, planted_sds=0.0, seed=0):
    """(share of reports with a false real effect, share that found the planted one)."""
    rng = np.random.default_rng(seed)
    shift = planted_sds * math.hypot(shared_sd, own_sd)
    false, found = 0, 0
    for _ in range(n_reports):
        tables = [
            level_effects(
                simulated_study(rng, n, seeds, shared_sd, own_sd, shift if i == 0 else 0.0),
                "f",
                "l0",
                judged=False,
            )
            for i, n in enumerate(STUDY_LEVELS)
        ]
        real = {(i, s.level) for i, t in enumerate(judge(tables)) for s in t if s.real_effect}
        planted = (0, "l1") if planted_sds else None
        false += bool(real - {planted})
        found += planted in real
    return false / n_reports, found / n_reports


def _at_most(rate: float, promise: float, n: int) -> bool:
    """`rate`, measured on `n` simulations, is consistent with at most `promise` (three
    Monte Carlo standard errors of slack)."""
    return rate <= promise + 3 * math.sqrt(promise * (1 - promise) / n)


@pytest.mark.parametrize(
    "shared_sd, own_sd",
    [(0.0, 0.002), (0.002, 0.002), (0.004, 0.001)],
    ids=["no seed effect", "half by seed", "mostly by seed"],
)
def test_null_ablations_are_called_real_in_at_most_5_percent_of_reports(shared_sd, own_sd):
    rate, _ = simulated_reports(1500, 3, shared_sd, own_sd)
    assert _at_most(rate, 0.05, 1500), rate


def test_equal_differences_at_every_seed_fall_back_to_welch():
    # 5 images fewer out of 1600 at each of three seeds, as a real report had it
    base = {0: 0.989375, 1: 0.98625, 2: 0.98125}
    level = {0: 0.98625, 1: 0.983125, 2: 0.978125}
    found = compare(level, base)
    assert found.method == "Welch t"
    assert found.ci_low < -0.003125 < found.ci_high < 0.01
    assert found.p_value > 0.05


def test_without_holm_the_same_nulls_would_overclaim():
    """The simulation can catch a method that ignores the number of comparisons."""
    rng = np.random.default_rng(1)
    n, false = 1000, 0
    for _ in range(n):
        p_values = [
            s.p_value
            for k in STUDY_LEVELS
            for s in level_effects(simulated_study(rng, k, 3, 0.002, 0.002), "f", "l0")
            if s.p_value is not None
        ]
        false += min(p_values) < 0.05
    assert false / n > 0.25


def test_a_planted_effect_is_found_and_more_often_with_more_seeds():
    _, with_three = simulated_reports(600, 3, 0.002, 0.002, planted_sds=4, seed=2)
    false, with_five = simulated_reports(600, 5, 0.002, 0.002, planted_sds=4, seed=3)
    assert with_five > 0.9
    assert 0.1 < with_three < with_five
    assert _at_most(false, 0.05, 600)


def test_one_trial_is_too_few_for_a_verdict_however_large_the_effect():
    trials = [
        TrialRecord(0, "COMPLETE", {"pooling": "max", "seed": 0}, 0.99),
        TrialRecord(1, "COMPLETE", {"pooling": "max", "seed": 1}, 0.98),
        TrialRecord(2, "COMPLETE", {"pooling": "none", "seed": 0}, 0.50),
        TrialRecord(3, "PRUNED", {"pooling": "none", "seed": 1}, None),
    ]
    stats = {s.level: s for s in level_effects(trials, "pooling", "max")}
    assert stats["none"].verdict == TOO_FEW and stats["none"].real_effect is None
    assert stats["none"].effect == pytest.approx(-0.485)
    assert stats["none"].ci_low is None


def test_a_base_with_one_trial_gives_no_verdict():
    trials = [
        TrialRecord(0, "COMPLETE", {"padding": "same", "seed": 0}, 0.99),
        TrialRecord(1, "COMPLETE", {"padding": "valid", "seed": 0}, 0.10),
        TrialRecord(2, "COMPLETE", {"padding": "valid", "seed": 1}, 0.11),
    ]
    (valid,) = [s for s in level_effects(trials, "padding", "same") if s.level == "valid"]
    assert valid.verdict == TOO_FEW


def test_seeds_pair_the_comparison():
    # the level is 0.001 better at every seed, while seeds move both by 0.01
    base = {0: 0.97, 1: 0.98, 2: 0.99}
    level = {s: v + 0.001 + 1e-5 * s for s, v in base.items()}
    paired = compare(level, base)
    unpaired = compare(dict(zip("abc", level.values(), strict=True)), base)
    assert paired.method == "paired t (3 seeds)" and unpaired.method == "Welch t"
    assert paired.p_value < 0.001 < 0.5 < unpaired.p_value
    assert paired.p_better == 1.0
    assert paired.ci_low < 0.001 < paired.ci_high


def test_the_interval_is_the_t_interval():
    # paired differences 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303
    found = compare({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    half = 4.302653 / math.sqrt(3)
    assert (found.ci_low, found.ci_high) == pytest.approx((2 - half, 2 + half), abs=1e-5)


def test_holm_adjusts_step_down_and_stays_monotone():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == []


def test_judging_studies_together_is_stricter_than_alone():
    rng = np.random.default_rng(4)
    tables = []
    for _ in range(6):
        trials = simulated_study(rng, 2, 3, 0.0, 0.002, shift=0.0)
        trials += [
            TrialRecord(100 + s, "COMPLETE", {"f": "l9", "seed": s}, 0.98 + 0.006 + 0.0008 * s)
            for s in range(3)
        ]
        tables.append(level_effects(trials, "f", "l0", judged=False))
    alone = [s for t in tables for s in judge([t])[0] if s.level == "l9"]
    together = [s for t in judge(tables) for s in t if s.level == "l9"]
    assert all(a.p_adjusted <= b.p_adjusted for a, b in zip(alone, together, strict=True))
    assert sum(s.verdict == REAL for s in together) <= sum(s.verdict == REAL for s in alone)
