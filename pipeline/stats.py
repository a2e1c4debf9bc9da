"""The statistics behind the report, as pure functions of trial values: per-level
summaries, each level's effect against the base level with its interval, and the Pareto
front of accuracy against size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.records import TrialRecord


@dataclass(frozen=True)
class LevelStats:
    level: str
    n: int
    n_pruned: int
    n_failed: int
    mean: float | None
    std: float | None
    best: float | None
    n_params: int | None
    macs: int | None
    effect: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    real_effect: bool | None = None


def bootstrap_diff(
    values: list[float],
    base: list[float],
    n_resamples: int,
    confidence: float,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(values) - mean(base)."""
    a = rng.choice(np.asarray(values), size=(n_resamples, len(values)), replace=True)
    b = rng.choice(np.asarray(base), size=(n_resamples, len(base)), replace=True)
    diffs = a.mean(axis=1) - b.mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(low), float(high)


def level_effects(
    trials: list[TrialRecord],
    factor: str,
    base_level: Any,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[LevelStats]:
    """Per-level statistics and each level's effect against `base_level`.

    A level is a real effect when the bootstrap interval excludes zero and the effect is
    larger than the base level's seed-to-seed standard deviation.
    """
    rng = np.random.default_rng(seed)
    levels: dict[str, list[TrialRecord]] = {}
    for trial in trials:
        if factor in trial.params:
            levels.setdefault(str(trial.params[factor]), []).append(trial)
    base_key = str(base_level)
    base_values = [t.value for t in levels.get(base_key, []) if t.state == "COMPLETE"]
    noise = float(np.std(base_values, ddof=1)) if len(base_values) > 1 else 0.0
    stats = []
    for level, group in levels.items():
        done = [t for t in group if t.state == "COMPLETE"]
        values = [t.value for t in done]
        row: dict[str, Any] = dict(
            level=level,
            n=len(values),
            n_pruned=sum(t.state == "PRUNED" for t in group),
            n_failed=sum(t.state == "FAIL" for t in group),
            mean=float(np.mean(values)) if values else None,
            std=float(np.std(values, ddof=1)) if len(values) > 1 else (0.0 if values else None),
            best=float(max(values)) if values else None,
            n_params=next((t.n_params for t in group if t.n_params), None),
            macs=next((t.macs for t in group if t.macs), None),
        )
        if level != base_key and values and base_values:
            effect = float(np.mean(values) - np.mean(base_values))
            low, high = bootstrap_diff(values, base_values, n_resamples, confidence, rng)
            row.update(
                effect=effect,
                ci_low=low,
                ci_high=high,
                real_effect=bool((low > 0 or high < 0) and abs(effect) > noise),
            )
        stats.append(LevelStats(**row))
    return sorted(stats, key=lambda s: (s.level != base_key, s.level))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(size, accuracy) points not beaten by a smaller-or-equal, more accurate one."""
    front, best = [], -math.inf
    for size, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append((size, accuracy))
            best = accuracy
    return front


def at_best_rates(
    trials: list[TrialRecord], factor: str
) -> tuple[list[TrialRecord], dict[str, float]]:
    """Each level's trials at the learning rate with its best mean over seeds (complete
    trials only), so that levels are compared at their own best rates; and that rate per
    level. Every level gets the same choice, so the comparison stays even."""
    by_rate: dict[tuple[str, float], list[float]] = {}
    for t in trials:
        if t.state == "COMPLETE":
            key = (str(t.params[factor]), t.params["learning_rate"])
            by_rate.setdefault(key, []).append(t.value)
    best: dict[str, float] = {}
    for (level, rate), values in by_rate.items():
        current = best.get(level)
        if current is None or np.mean(values) > np.mean(by_rate[level, current]):
            best[level] = rate
    kept = [t for t in trials if best.get(str(t.params[factor])) == t.params.get("learning_rate")]
    return kept, best
