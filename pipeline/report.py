"""Stage `report`: which design choices matter, with numbers and plots.

For each single-factor study: per level the trial count, mean, standard deviation and
best objective, parameters and multiply-accumulates; the effect of each level against
the base level with a bootstrap confidence interval over the seed repeats, and whether
it is a real effect (the interval excludes zero and the effect is larger than the
seed-to-seed noise of the base level). The regularisation study answers whether dropout
and batch normalisation work well together. For the joint study: Optuna's parameter
importances and the Pareto front of accuracy against parameter count. Writes
`reports/ablation.md`, `reports/ablation.json` and `reports/plots/*.png`, and logs them
to MLflow.

Run: `ablate report` (or `dvc repro report`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import plots
from pipeline.errors import UserError
from pipeline.experiments import Experiment
from pipeline.fsutil import atomic_path, write_json
from pipeline.params import Paths
from pipeline.records import TrialRecord
from pipeline.selection import finished_studies
from pipeline.stats import LevelStats, at_best_rates, level_effects, pareto_front
from pipeline.studies import Study

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


def regularization_answer(stats: list[LevelStats]) -> str:
    """The course's claim: dropout and batch normalisation may not work well together."""
    by = {s.level: s for s in stats}
    needed = ("dropout", "batchnorm", "both")
    if any(by.get(k) is None or by[k].mean is None for k in needed):
        return "Not enough completed trials to compare dropout, batchnorm and both."
    alone = max((by["dropout"], by["batchnorm"]), key=lambda s: s.mean)
    diff = by["both"].mean - alone.mean
    noise = max(s.std or 0.0 for s in stats)
    if abs(diff) <= noise:
        verdict = "no worse and no better than"
    elif diff < 0:
        verdict = "worse than"
    else:
        verdict = "better than"
    return (
        f"Dropout and batch normalisation together scored {by['both'].mean:.4f} on average, "
        f"{verdict} the better of the two alone ({alone.level}: {alone.mean:.4f}; difference "
        f"{diff:+.4f}, seed-to-seed noise up to {noise:.4f}). "
        + (
            "Here the course's warning holds."
            if verdict == "worse than"
            else "Here the course's warning does not show."
        )
    )


# -- writing -------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def factor_table(stats: list[LevelStats], base_level: Any, confidence: float) -> list[str]:
    pct = int(confidence * 100)
    lines = [
        f"| level | trials | pruned | failed | mean | std | best | params | MACs | "
        f"effect vs {base_level} | {pct}% CI | real effect? |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        ci = f"[{s.ci_low:+.4f}, {s.ci_high:+.4f}]" if s.ci_low is not None else "-"
        effect = f"{s.effect:+.4f}" if s.effect is not None else "(base)"
        real = {True: "**yes**", False: "no, within noise", None: "-"}[s.real_effect]
        lines.append(
            f"| {s.level} | {s.n} | {s.n_pruned} | {s.n_failed} | {_fmt(s.mean)} | "
            f"{_fmt(s.std)} | {_fmt(s.best)} | {_fmt(s.n_params)} | {_fmt(s.macs)} | "
            f"{effect} | {ci} | {real} |"
        )
    return lines


def report_factor(
    name: str,
    factor: str,
    base_level: Any,
    records: list[TrialRecord],
    paths: Paths,
    settings,
    rates: tuple[float, ...] = (),
) -> tuple[list[str], dict[str, Any]]:
    """One single-factor study's section, and its plots; with `rates`, each level at its
    own best learning rate."""
    chosen_rates: dict[str, float] = {}
    if rates:
        records, chosen_rates = at_best_rates(records, factor)
    stats = level_effects(
        records, factor, base_level, settings.bootstrap, settings.confidence, settings.seed
    )
    groups = {
        s.level: [
            t.value
            for t in records
            if str(t.params.get(factor)) == s.level and t.state == "COMPLETE"
        ]
        for s in stats
    }
    lines = [f"## {name}: {factor}", ""]
    if chosen_rates:
        shown = ", ".join(f"{level} at {rate:g}" for level, rate in sorted(chosen_rates.items()))
        lines += [
            f"Each level ran at the learning rates {', '.join(f'{r:g}' for r in rates)} and is "
            f"compared at its best one by mean over seeds: {shown}.",
            "",
        ]
    lines += factor_table(stats, base_level, settings.confidence)
    lines.append("")
    for s in stats:
        if s.n == 0 and s.n_pruned:
            reason = next((t for t in records if str(t.params.get(factor)) == s.level), None)
            lines.append(f"- `{s.level}`: every trial was pruned (trial {reason.number}).")
    if any(groups.values()):
        plots.strip_plot(
            {k: v for k, v in groups.items() if v},
            paths.report_plot(name, "levels"),
            f"{name}: val_accuracy per level",
        )
        lines.append(f"![{name} levels]({_link(paths, paths.report_plot(name, 'levels'))})")
    best_histories = {}
    for s in stats:
        done = [
            t
            for t in records
            if str(t.params.get(factor)) == s.level and t.state == "COMPLETE" and t.history
        ]
        if done:
            best_histories[s.level] = max(done, key=lambda t: t.value).history
    if best_histories:
        plots.curves_by_level(
            best_histories,
            paths.report_plot(name, "curves"),
            f"{name}: learning curves of each level's best trial",
        )
        curves = _link(paths, paths.report_plot(name, "curves"))
        lines.append(f"![{name} learning curves]({curves})")
    lines.append("")
    summary = {
        "learning_rates": chosen_rates,
        "factor": factor,
        "base_level": str(base_level),
        "levels": {s.level: {k: v for k, v in vars(s).items() if k != "level"} for s in stats},
    }
    if factor == "regularization":
        answer = regularization_answer(stats)
        lines += ["**Dropout together with batch normalisation?** " + answer, ""]
        summary["answer"] = answer
    return lines, summary


def report_joint(
    name: str, records: list[TrialRecord], study: Study, paths: Paths
) -> tuple[list[str], dict[str, Any]]:
    """The joint study's section: best trial, importances, Pareto front and its plot."""
    done = [t for t in records if t.state == "COMPLETE"]
    weights = study.importances() if len(done) > 1 else {}
    points = [(float(t.n_params), float(t.value)) for t in done if t.n_params]
    front = pareto_front(points)
    lines = [
        f"## {name}: all factors at once",
        "",
        f"{len(done)} complete, {sum(t.state == 'PRUNED' for t in records)} pruned, "
        f"{sum(t.state == 'FAIL' for t in records)} failed.",
        "",
    ]
    if done:
        best = max(done, key=lambda t: t.value)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
        lines += [f"Best val_accuracy {best.value:.4f} (trial {best.number}): {params}.", ""]
    if weights:
        lines += [
            f"Parameter importances (Optuna's default, fANOVA) over the {len(done)} "
            "complete trials; pruned ones do not count, so with few complete trials "
            "read them as a hint.",
            "",
        ]
        lines += ["| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in weights.items()]
        lines.append("")
    if points:
        plots.pareto(points, front, paths.report_plot(name, "pareto"))
        lines += [
            "Pareto front (fewest parameters for the accuracy):",
            "",
            "| parameters | val_accuracy |",
            "|---|---|",
        ]
        lines += [f"| {int(p):,} | {a:.4f} |" for p, a in front]
        lines += [
            "",
            f"![{name} Pareto front]({_link(paths, paths.report_plot(name, 'pareto'))})",
            "",
        ]
    summary = {
        "importances": weights,
        "pareto": [{"n_params": int(p), "val_accuracy": a} for p, a in front],
    }
    return lines, summary


def _link(paths: Paths, plot: Path) -> str:
    """`plot` relative to the report's Markdown file, as an image link needs it."""
    return plot.relative_to(paths.report_markdown.parent).as_posix()


def build_report(
    studies: dict[str, tuple[Experiment, dict[str, Any]]],
    storage_url: str,
    paths: Paths,
    settings,
    heartbeat_seconds: int = 10,
) -> tuple[str, dict[str, Any]]:
    """Markdown and JSON for every study in `studies` (name -> (experiment, sweep
    metrics)); the plots go where `paths` says, linked relative to the Markdown file."""
    paths.report_plots.mkdir(parents=True, exist_ok=True)
    lines = ["# Which Conv2D design choices matter", ""]
    results: dict[str, Any] = {}
    for name, (experiment, metrics) in studies.items():
        try:
            study = Study.open(storage_url, metrics["study"], heartbeat_seconds)
        except KeyError:
            raise UserError(
                f"study {metrics['study']} not in the Optuna storage; run the "
                "sweep again (`dvc repro`)"
            ) from None
        records = study.records(finished_only=True)
        if experiment.is_grid and len(experiment.factors) == 1:
            factor = next(iter(experiment.factors))
            base_level = experiment.base_level.get(factor, experiment.factors[factor][0])
            section, summary = report_factor(
                name, factor, base_level, records, paths, settings, experiment.learning_rates
            )
        else:
            section, summary = report_joint(name, records, study, paths)
        summary["best_value"] = metrics.get("best_value")
        lines += section
        results[name] = summary
    return "\n".join(lines) + "\n", results


def heldout_section(config: Config, studies: dict) -> tuple[list[str], dict[str, Any]]:
    """Each study's chosen model scored once on the held-out images beside its validation
    score (the best of many trials on the validation images, so optimistic), and the
    submission's own held-out estimate when `ablate submit` has run on this data."""
    import keras

    from pipeline.dataset import load_prepared
    from pipeline.ensemble import holdout_estimate

    paths, data = config.paths, load_prepared(config.paths.prepared)
    if len(data.y_holdout) == 0:
        return [], {}
    lines = [
        "## Validation versus held-out",
        "",
        f"The {len(data.y_holdout)} held-out images were used by no selection. Each study's "
        "validation score is the best of its trials, so it is optimistic; the held-out "
        "accuracy (95% Wilson interval) is what to expect on the leaderboard.",
        "",
        "| model | validation | held-out | 95% interval |",
        "|---|---|---|---|",
    ]
    results: dict[str, Any] = {}
    for name, (_, metrics) in studies.items():
        if paths.sweep_model(name).is_file():
            model = keras.models.load_model(paths.sweep_model(name))
            estimate = holdout_estimate([model], data, config.submit.batch_size)
            results[name] = {"val_accuracy": metrics.get("best_value"), **estimate}
    if paths.submission_json.is_file():
        sidecar = json.loads(paths.submission_json.read_text())
        if sidecar.get("data_hash") == data.meta.data_hash and sidecar.get("holdout_ci95"):
            results[f"submission ({sidecar['strategy']})"] = {
                "val_accuracy": None,
                **{k: sidecar[k] for k in ("holdout_accuracy", "holdout_ci95", "holdout_n")},
            }
    for name, row in results.items():
        low, high = row["holdout_ci95"]
        lines.append(
            f"| {name} | {_fmt(row['val_accuracy'])} | {row['holdout_accuracy']:.4f} | "
            f"[{low:.4f}, {high:.4f}] |"
        )
    return [*lines, ""], results


def main(config: Config) -> None:
    paths = config.paths
    studies = finished_studies(config, "report")
    markdown, results = build_report(
        studies,
        config.sweep.storage,
        paths,
        config.report,
        config.sweep.heartbeat_seconds,
    )
    heldout, results["heldout"] = heldout_section(config, studies)
    markdown += "\n".join(heldout)
    with atomic_path(paths.report_markdown) as tmp:
        tmp.write_text(markdown)
    write_json(paths.report_json, results)
    _log_to_mlflow(config, studies)
    log.info("report: wrote %s (%d studies)", paths.report_markdown, len(studies))


def _log_to_mlflow(config: Config, studies: dict) -> None:
    from pipeline.tracking import Tracker

    tracker = Tracker.connect(config.tracking.uri, config.tracking.experiment)
    run_id = tracker.start_run(
        "report",
        tags={
            f"study.{name}": metrics.get("parent_run_id", "")
            for name, (_, metrics) in studies.items()
        },
    )
    tracker.log_artifacts(run_id, Path(config.paths.reports))
    tracker.end_run(run_id)
