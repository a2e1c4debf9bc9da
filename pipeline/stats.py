"""The statistics behind the report, as pure functions of trial values: per-level
summaries, each level's effect against the base level with its interval, a verdict that
holds across every comparison in the report, and the Pareto front of accuracy against size.

Repeats of a grid study differ by seed, and a seed fixes the validation split, the data
order and the initial weights alike for every level (`train.split: per_seed`). So a level
and its base are compared seed by seed: a paired t interval of the per-seed differences.
Where fewer than two seeds pair up, Welch's t interval compares the two groups instead.
Both are right at small n, unlike a bootstrap, whose intervals are too narrow with three
values. A level is a real effect only when its Holm-adjusted p-value, over every
comparison the report makes, is below 1 - confidence, and its effect is at least
`report.min_effect` (consistent differences too small to matter, such as float noise
between two trainings of one config, are not effects); a level, or its base, with fewer
than two complete trials gets no verdict. `tests/test_stats.py` simulates null ablations
to show the false-verdict rate stays at or under 5%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from pipeline.records import TrialRecord

TOO_FEW = "too few trials"
REAL = "real effect"
NOISE = "within noise"


@dataclass(frozen=True)
class Comparison:
    """A level against its base: mean difference, its interval, the unadjusted two-sided
    p-value, and the probability that the level beats the base (ties count half)."""

    effect: float
    ci_low: float
    ci_high: float
    p_value: float
    p_better: float
    method: str  # "paired t (n seeds)" or "Welch t"


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
    p_value: float | None = None
    p_adjusted: float | None = None  # Holm, over every comparison in the report
    p_better: float | None = None
    method: str | None = None
    verdict: str | None = None  # None for the base level; else TOO_FEW, REAL or NOISE

    @property
    def real_effect(self) -> bool | None:
        """True or False once judged with enough trials; None otherwise."""
        return None if self.verdict in (None, TOO_FEW) else self.verdict == REAL


# Scores closer than this are equal: accuracies are counts over at most millions of images,
# so a real difference is at least 1e-7, and float subtraction leaves about 1e-16.
TIED = 1e-12


def compare(
    values: dict[Any, float], base: dict[Any, float], confidence: float = 0.95
) -> Comparison | None:
    """`values` against `base`, each keyed by seed; None when either has fewer than two.

    Seeds found in both are paired; with two or more pairs whose differences vary, the
    interval is the paired t interval, otherwise Welch's. Differences that agree to
    within `TIED` (float rounding of equal image counts) do not vary: a paired t test on
    them would be certain of a difference three seeds cannot show."""
    if len(values) < 2 or len(base) < 2:
        return None
    shared = sorted(set(values) & set(base), key=str)
    diffs = np.array([values[s] - base[s] for s in shared])
    if len(diffs) >= 2 and np.ptp(diffs) > TIED:
        n = len(diffs)
        effect, se, df = float(diffs.mean()), float(diffs.std(ddof=1) / math.sqrt(n)), n - 1
        p_better = float(np.mean((diffs > 0) + 0.5 * (diffs == 0)))
        method = f"paired t ({n} seeds)"
    else:
        a, b = np.array(list(values.values())), np.array(list(base.values()))
        effect = float(a.mean() - b.mean())
        va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
        se = float(math.sqrt(va + vb))
        df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else 1
        greater = a[:, None] - b[None, :]
        p_better = float(np.mean((greater > 0) + 0.5 * (greater == 0)))
        method = "Welch t"
    if se <= TIED:  # identical values throughout: the difference is exact
        return Comparison(effect, effect, effect, 0.0 if effect else 1.0, p_better, method)
    t = scipy_stats.t.ppf(0.5 + confidence / 2, df)
    p_value = float(2 * scipy_stats.t.sf(abs(effect) / se, df))
    return Comparison(effect, effect - t * se, effect + t * se, p_value, p_better, method)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: rejecting those below alpha keeps the chance of
    any false rejection among them at or below alpha."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def judge(
    tables: list[list[LevelStats]], confidence: float = 0.95, min_effect: float = 0.0
) -> list[list[LevelStats]]:
    """Verdicts for every compared level in `tables` (one per study) at once, with Holm's
    adjustment over all their comparisons. An effect smaller than `min_effect` is never
    real, however consistent: a hundredth of a point is no design choice's doing."""
    compared = [(t, i) for t, table in enumerate(tables) for i, s in enumerate(table) if s.method]
    adjusted = holm([tables[t][i].p_value for t, i in compared])
    judged = [list(table) for table in tables]
    for (t, i), p in zip(compared, adjusted, strict=True):
        real = p < 1 - confidence and abs(judged[t][i].effect) >= min_effect
        judged[t][i] = replace(judged[t][i], p_adjusted=p, verdict=REAL if real else NOISE)
    return judged


def level_effects(
    trials: list[TrialRecord],
    factor: str,
    base_level: Any,
    confidence: float = 0.95,
    judged: bool = True,
    min_effect: float = 0.0,
) -> list[LevelStats]:
    """Per-level statistics and each level's comparison with `base_level`.

    With `judged`, verdicts come from this study's comparisons alone; the report passes
    `judged=False` and judges every study together (`judge`)."""
    levels: dict[str, list[TrialRecord]] = {}
    for trial in trials:
        if factor in trial.params:
            levels.setdefault(str(trial.params[factor]), []).append(trial)
    base_key = str(base_level)
    base_by_seed = by_seed(levels.get(base_key, []))
    stats = []
    for level, group in levels.items():
        values = [t.value for t in group if t.state == "COMPLETE"]
        row = LevelStats(
            level=level,
            n=len(values),
            n_pruned=sum(t.state == "PRUNED" for t in group),
            n_failed=sum(t.state == "FAIL" for t in group),
            mean=float(np.mean(values)) if values else None,
            std=float(np.std(values, ddof=1)) if len(values) > 1 else None,
            best=float(max(values)) if values else None,
            n_params=next((t.n_params for t in group if t.n_params), None),
            macs=next((t.macs for t in group if t.macs), None),
        )
        if level != base_key:
            found = compare(by_seed(group), base_by_seed, confidence)
            if found is None:
                row = replace(row, verdict=TOO_FEW, effect=_mean_diff(values, base_by_seed))
            else:
                row = replace(row, **vars(found))
        stats.append(row)
    stats.sort(key=lambda s: (s.level != base_key, s.level))
    return judge([stats], confidence, min_effect)[0] if judged else stats


def by_seed(trials: list[TrialRecord]) -> dict[Any, float]:
    """Complete trials' values by seed (the mean where a seed ran more than once); a trial
    without a seed counts as a seed of its own."""
    grouped: dict[Any, list[float]] = {}
    for t in trials:
        if t.state == "COMPLETE":
            grouped.setdefault(t.params.get("seed", f"trial {t.number}"), []).append(t.value)
    return {seed: float(np.mean(v)) for seed, v in grouped.items()}


def _mean_diff(values: list[float], base: dict[Any, float]) -> float | None:
    if not values or not base:
        return None
    return float(np.mean(values) - np.mean(list(base.values())))


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
