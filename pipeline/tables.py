"""Markdown tables of single-factor studies, shared by the report and each sweep's MLflow
parent run: the study's trials and statistics (`FactorStudy`), one row per level against
its base, and the words that go with the verdicts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.experiments import Experiment
from pipeline.records import TrialRecord
from pipeline.stats import (
    REAL,
    TOO_FEW,
    LevelStats,
    at_best_rates,
    by_seed,
    compare,
    judge,
    level_effects,
)


@dataclass
class FactorStudy:
    """One single-factor study's trials and statistics."""

    name: str
    experiment: Experiment
    factor: str
    base_level: str
    records: list[TrialRecord]
    rates: dict[str, float]  # the learning rate each level is compared at, if searched
    stats: list[LevelStats]


def factor_study(name: str, experiment: Experiment, records: list[TrialRecord], confidence):
    factor = next(iter(experiment.factors))
    base_level = experiment.base_level.get(factor, experiment.factors[factor][0])
    rates: dict[str, float] = {}
    if experiment.learning_rates:
        records, rates = at_best_rates(records, factor)
    stats = level_effects(records, factor, base_level, confidence, judged=False)
    return FactorStudy(name, experiment, factor, str(base_level), records, rates, stats)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def verdict_text(s: LevelStats) -> str:
    return {REAL: "**real effect**", TOO_FEW: "too few trials"}.get(s.verdict, s.verdict or "-")


def interval_text(s: LevelStats) -> str:
    return f"[{s.ci_low:+.4f}, {s.ci_high:+.4f}]" if s.ci_low is not None else "-"


def summary_table(studies: list[FactorStudy], confidence: float) -> list[str]:
    """One row per level compared with its base, across every single-factor study."""
    pct = round(confidence * 100)
    lines = [
        f"| study | level vs base | effect | {pct}% interval, alone | P(beats base) | "
        "p (Holm) | verdict | params | MACs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for study in studies:
        for s in study.stats:
            if s.level == study.base_level:
                continue
            effect = f"{s.effect:+.4f}" if s.effect is not None else "-"
            lines.append(
                f"| {study.name} | {s.level} vs {study.base_level} | {effect} | "
                f"{interval_text(s)} | {fmt(s.p_better, 2)} | {fmt(s.p_adjusted, 3)} | "
                f"{verdict_text(s)} | {fmt(s.n_params)} | {fmt(s.macs)} |"
            )
    return lines


def method_note(studies: list[FactorStudy], confidence: float, min_effect: float) -> str:
    n_tests = sum(s.method is not None for study in studies for s in study.stats)
    seeds = sorted({s.n for study in studies for s in study.stats if s.n})
    judged = (
        f"Holm-adjusted p-value over all {n_tests} comparisons here"
        if n_tests
        else "Holm-adjusted p-value over all the comparisons (none yet: no level and its "
        "base have two complete trials each)"
    )
    return (
        "Effects are differences in the mean objective against the study's base level. A "
        "seed fixes the validation split, the data order and the initial weights for every "
        "level, so levels are compared seed by seed (a paired t interval; Welch's where "
        f"seeds do not pair). Intervals are {round(confidence * 100)}% t intervals of each "
        "comparison alone. A level "
        f"is a real effect when its {judged} is below {1 - confidence:.2f} and its effect "
        f"is at least {min_effect:g}; with fewer than two trials it gets no verdict. So an "
        "interval that leaves out zero can still be within noise: it answers for one "
        "comparison, the verdict for all of them. "
        "P(beats base) is the share of seeds where the level scored higher. Trials per "
        f"level: {', '.join(map(str, seeds)) or 'none'}; with three, only effects several "
        "times the seed-to-seed spread can be called real."
    )


def study_answer(
    name: str, experiment: Experiment, records: list[TrialRecord], confidence: float = 0.95
) -> tuple[str, dict[str, float]]:
    """A single-factor study's answer on its own, for its MLflow parent run: a Markdown
    table (the run's description) and per-level metrics. Verdicts here count this study's
    comparisons only; the report judges all studies together."""
    study = factor_study(name, experiment, records, confidence)
    study.stats = judge([study.stats], confidence)[0]
    pct = round(confidence * 100)
    lines = [
        f"**{name}**: {experiment.description or study.factor}. Objective: "
        f"{experiment.objective} of the kept weights; effects against {study.base_level}, "
        f"paired by seed, {pct}% t intervals, verdicts with Holm over this study's "
        "comparisons (the report judges every study together).",
        "",
        f"| level | trials | mean | std | effect | {pct}% interval, alone | P(beats base) | "
        "p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    metrics: dict[str, float] = {}
    for s in study.stats:
        base = s.level == study.base_level
        lines.append(
            f"| {s.level}{' (base)' if base else ''} | {s.n} | {fmt(s.mean)} | {fmt(s.std)} | "
            f"{fmt(s.effect)} | {interval_text(s)} | {fmt(s.p_better, 2)} | "
            f"{'-' if base else fmt(s.p_adjusted, 3)} | {'-' if base else verdict_text(s)} |"
        )
        for key in ("mean", "std", "effect", "ci_low", "ci_high", "p_better"):
            value = getattr(s, key)
            if value is not None:
                metrics[f"{s.level}.{key}"] = value
        metrics[f"{s.level}.n"] = s.n
    return "\n".join(lines) + "\n", metrics


def regularization_answer(
    stats: list[LevelStats],
    records: list[TrialRecord],
    n_tests: int = 1,
    confidence: float = 0.95,
):
    """The course's claim: dropout and batch normalisation may not work well together.
    `both` is compared with the better of the two alone, paired by seed, and judged with
    a Bonferroni share of the report's error rate, 1 - `confidence` (`n_tests`
    comparisons plus this one)."""
    by = {s.level: s for s in stats}
    needed = ("dropout", "batchnorm", "both")
    if any(by.get(k) is None or by[k].n < 2 for k in needed):
        return "Too few complete trials to compare dropout, batchnorm and both (two each needed)."
    alone = max((by["dropout"], by["batchnorm"]), key=lambda s: s.mean)

    def seeds(level: str) -> dict[Any, float]:
        return by_seed([t for t in records if str(t.params.get("regularization")) == level])

    found = compare(seeds("both"), seeds(alone.level), confidence)
    p = min(1.0, found.p_value * (n_tests + 1))
    verdict = (
        "no different from"
        if p >= 1 - confidence
        else ("worse than" if found.effect < 0 else "better than")
    )
    return (
        f"Dropout and batch normalisation together scored {by['both'].mean:.4f} on average "
        f"over {by['both'].n} trials, {verdict} the better of the two alone ({alone.level}: "
        f"{alone.mean:.4f} over {alone.n}): difference {found.effect:+.4f}, "
        f"{confidence:.0%} interval "
        f"[{found.ci_low:+.4f}, {found.ci_high:+.4f}] ({found.method}; p = {p:.3f} after "
        f"Bonferroni over {n_tests + 1} comparisons). "
        + (
            "Here the course's warning holds."
            if verdict == "worse than"
            else "Here the course's warning does not show."
        )
    )
