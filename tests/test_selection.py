"""Choosing what to submit: candidates ranked by their mean over seeds, and the interval
of a held-out accuracy. Pure functions, no Keras."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.experiments import parse_experiment
from pipeline.model import ConvBlock, ModelConfig
from pipeline.params import TrainParams
from pipeline.records import TrialRecord
from pipeline.selection import rank_candidates, wilson

BASE = ModelConfig(blocks=(ConvBlock(filters=8, padding="same", strides=1),))
PADDING = parse_experiment("padding", {"factors": {"padding": ["valid", "same"]}}, "p.yaml")
STRIDES = parse_experiment("strides", {"factors": {"strides": [1, 2]}}, "s.yaml")


def _trial(number: int, value: float, **params) -> TrialRecord:
    return TrialRecord(number, "COMPLETE", params, value, {"best_epoch": 10 + number})


def test_the_same_configuration_in_two_studies_is_one_candidate_with_all_its_seeds():
    studies = {
        "padding": (
            PADDING,
            [_trial(0, 0.97, padding="same", seed=0), _trial(1, 0.95, padding="valid", seed=0)],
        ),
        "strides": (
            STRIDES,
            [_trial(0, 0.98, strides=1, seed=1), _trial(1, 0.90, strides=2, seed=1)],
        ),
    }
    ranked = rank_candidates(studies, BASE, TrainParams())
    base = [c for c in ranked if c.config == BASE]
    assert len(base) == 1
    assert sorted(base[0].values) == [0.97, 0.98]
    assert sorted(base[0].trials) == ["padding#0", "strides#0"]
    assert len(ranked) == 3  # base, valid padding, stride 2
    assert base[0].label == "base"


def test_a_reused_trial_does_not_count_its_seed_twice():
    copy = TrialRecord(5, "COMPLETE", {"strides": 1, "seed": 0}, 0.97, {"reused_from": "p#0"})
    studies = {
        "padding": (PADDING, [_trial(0, 0.97, padding="same", seed=0)]),
        "strides": (STRIDES, [copy]),
    }
    (base,) = rank_candidates(studies, BASE, TrainParams())
    assert base.values == (0.97,)


def test_a_lucky_single_seed_ranks_behind_a_configuration_seen_with_several():
    studies = {
        "padding": (
            PADDING,
            [
                _trial(0, 0.97, padding="same", seed=0),
                _trial(1, 0.96, padding="same", seed=1),
                _trial(2, 0.995, padding="valid", seed=0),
            ],
        ),
    }
    ranked = rank_candidates(studies, BASE, TrainParams())
    assert [c.label for c in ranked] == ["base", "padding=valid"]
    assert ranked[0].mean == pytest.approx(0.965)
    assert ranked[0].epochs == 10  # median of the kept epochs 10 and 11, rounded half to even


def test_failed_and_pruned_trials_are_not_candidates():
    studies = {
        "padding": (
            PADDING,
            [
                TrialRecord(0, "PRUNED", {"padding": "same", "seed": 0}, None),
                TrialRecord(1, "FAIL", {"padding": "valid", "seed": 0}, None),
            ],
        )
    }
    assert rank_candidates(studies, BASE, TrainParams()) == []


def test_wilson_interval_matches_the_formula_and_stays_inside_0_1():
    low, high = wilson(8, 10)
    assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
    assert wilson(100, 100)[1] == 1.0
    assert wilson(0, 50)[0] == 0.0


@pytest.mark.parametrize("p", [0.95, 0.99])
def test_the_held_out_interval_covers_the_true_accuracy_about_95_percent_of_the_time(p):
    # 800 held-out images, as MNIST-10k gives with holdout_fraction 0.1
    rng = np.random.default_rng(0)
    hits = rng.binomial(800, p, size=4000)
    covered = [low <= p <= high for low, high in (wilson(int(k), 800) for k in hits)]
    assert 0.93 <= np.mean(covered) <= 0.97
