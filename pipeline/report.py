"""Stage `report`: which design choices matter, with numbers and plots.

The report opens with one table: every level of every single-factor study against its
study's base level, with the effect on the objective, its interval, the probability that
the level beats the base, the verdict and the cost in parameters and multiply-accumulates.
The statistics are `pipeline/stats.py`'s: paired by seed, t intervals, and a verdict with
Holm's adjustment over every comparison in the report; fewer than two trials get none.
Then one section per study in the pipeline's order, the joint study's importances and
Pareto front, and the chosen models' validation against held-out accuracy.

Writes `reports/ablation.md` (plots linked beside it), `reports/ablation.html` (plots
embedded: opens in a browser and in MLflow's artifact viewer), `reports/ablation.json`,
the flat `metrics/summary.json` for `dvc metrics show`, and logs them to MLflow.

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
from pipeline.outputs import flat_summary, to_html
from pipeline.params import Paths
from pipeline.records import TrialRecord
from pipeline.selection import finished_studies
from pipeline.stats import (
    judge,
    pareto_front,
)
from pipeline.studies import Study
from pipeline.tables import (
    FactorStudy,
    factor_study,
    fmt,
    interval_text,
    method_note,
    regularization_answer,
    summary_table,
    verdict_text,
)

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


# -- writing -------------------------------------------------------------------------------------
def report_factor(study: FactorStudy, paths: Paths, confidence: float, n_tests: int):
    """One single-factor study's section and its plots."""
    name, factor, stats = study.name, study.factor, study.stats
    lines = [f"## {name}: {study.experiment.description or factor}", ""]
    if study.rates:
        shown = ", ".join(f"{level} at {rate:g}" for level, rate in sorted(study.rates.items()))
        searched = ", ".join(f"{r:g}" for r in study.experiment.learning_rates)
        lines += [
            f"Each level ran at the learning rates {searched} and is compared at its best "
            f"one by mean over seeds: {shown}.",
            "",
        ]
    pct = round(confidence * 100)
    lines += [
        "| level | trials | pruned | failed | mean | std | best | params | MACs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        label = f"{s.level} (base)" if s.level == study.base_level else s.level
        lines.append(
            f"| {label} | {s.n} | {s.n_pruned} | {s.n_failed} | {fmt(s.mean)} | "
            f"{fmt(s.std)} | {fmt(s.best)} | {fmt(s.n_params)} | {fmt(s.macs)} |"
        )
    lines += [
        "",
        f"| level | effect vs {study.base_level} | {pct}% interval, alone | P(beats base) | "
        "p (Holm) | method | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        if s.level != study.base_level:
            lines.append(
                f"| {s.level} | {fmt(s.effect)} | {interval_text(s)} | {fmt(s.p_better, 2)} | "
                f"{fmt(s.p_adjusted, 3)} | {s.method or '-'} | {verdict_text(s)} |"
            )
    lines.append("")
    for s in stats:
        if s.n == 0 and s.n_pruned:
            first = next(t for t in study.records if str(t.params.get(factor)) == s.level)
            lines.append(f"- `{s.level}`: every trial was pruned (trial {first.number}).")
    done = [t for t in study.records if t.state == "COMPLETE"]
    groups = {
        s.level: [t.value for t in done if str(t.params.get(factor)) == s.level] for s in stats
    }
    if any(groups.values()):
        plot = plots.strip_plot(
            {k: v for k, v in groups.items() if v},
            paths.report_plot(name, "levels"),
            f"{name}: {study.experiment.objective} per level",
        )
        lines.append(f"![{name} levels]({_link(paths, plot)})")
    best_histories = {}
    for s in stats:
        tried = [t for t in done if str(t.params.get(factor)) == s.level and t.history]
        if tried:
            best_histories[s.level] = max(tried, key=lambda t: t.value).history
    if best_histories:
        plot = plots.curves_by_level(
            best_histories,
            paths.report_plot(name, "curves"),
            f"{name}: learning curves of each level's best trial",
        )
        lines.append(f"![{name} learning curves]({_link(paths, plot)})")
    lines.append("")
    summary = {
        "learning_rates": study.rates,
        "factor": factor,
        "base_level": study.base_level,
        "levels": {
            s.level: {
                **{k: v for k, v in vars(s).items() if k != "level"},
                "real_effect": s.real_effect,
            }
            for s in stats
        },
    }
    if factor == "regularization":
        answer = regularization_answer(stats, study.records, n_tests, confidence)
        lines += ["**Dropout together with batch normalisation?** " + answer, ""]
        summary["answer"] = answer
    return lines, summary


def _rejected_text(records: list[TrialRecord]) -> str:
    """` Of the pruned, 2 were rejected before training (1 over max_macs_ratio).`"""
    rejected = [t for t in records if t.state == "PRUNED" and t.rejected]
    if not rejected:
        return ""
    over = sum("max_macs_ratio" in str(t.attrs.get("prune_reason")) for t in rejected)
    verb = "was" if len(rejected) == 1 else "were"
    return (
        f" Of the pruned, {len(rejected)} {verb} rejected before training "
        f"({over} over the study's max_macs_ratio, the rest a shape that collapses)."
    )


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
        f"{sum(t.state == 'FAIL' for t in records)} failed.{_rejected_text(records)}",
        "",
    ]
    if done:
        best = max(done, key=lambda t: t.value)
        params = ", ".join(f"{k}={fmt(v)}" for k, v in best.params.items())
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
    metrics)), in their order; the plots go where `paths` says, linked relative to the
    Markdown file. Every single-factor study is judged together (Holm)."""
    paths.report_plots.mkdir(parents=True, exist_ok=True)
    factor_studies, joint = {}, {}
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
            factor_studies[name] = factor_study(name, experiment, records, settings.confidence)
        else:
            joint[name] = (records, study)
    judged = judge(
        [f.stats for f in factor_studies.values()], settings.confidence, settings.min_effect
    )
    for study, stats in zip(factor_studies.values(), judged, strict=True):
        study.stats = stats
    ordered = list(factor_studies.values())
    n_tests = sum(s.method is not None for f in ordered for s in f.stats)
    lines = ["# Which Conv2D design choices matter", ""]
    if ordered:
        lines += [
            *summary_table(ordered, settings.confidence),
            "",
            method_note(ordered, settings.confidence, settings.min_effect),
            "",
        ]
    results: dict[str, Any] = {}
    for name, (_, metrics) in studies.items():
        if name in factor_studies:
            section, summary = report_factor(
                factor_studies[name], paths, settings.confidence, n_tests
            )
        else:
            section, summary = report_joint(name, *joint[name], paths)
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
            f"| {name} | {fmt(row['val_accuracy'])} | {row['holdout_accuracy']:.4f} | "
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
    with atomic_path(paths.report_html) as tmp:
        tmp.write_text(to_html(markdown, paths.report_markdown.parent))
    write_json(paths.report_json, results)
    write_json(paths.report_summary, flat_summary(results))
    _log_to_mlflow(config, studies, markdown)
    log.info(
        "report: wrote %s and %s (%d studies)",
        paths.report_markdown,
        paths.report_html,
        len(studies),
    )


def _log_to_mlflow(config: Config, studies: dict, markdown: str) -> None:
    """The report as a run: the summary table as its description, every file as an
    artifact (the HTML renders in the artifact viewer)."""
    from pipeline.tracking import Tracker

    tracker = Tracker.connect(config.tracking.uri, config.tracking.experiment)
    summary = markdown.split("\n## ", 1)[0]
    run_id = tracker.start_run(
        "report",
        tags={
            "mlflow.note.content": summary,
            **{
                f"study.{name}": metrics.get("parent_run_id", "")
                for name, (_, metrics) in studies.items()
            },
        },
    )
    tracker.log_artifacts(run_id, Path(config.paths.reports))
    tracker.end_run(run_id)
