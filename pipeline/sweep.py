"""Stage `sweep`: one Optuna study per experiment file, every trial a nested MLflow run.

The study is created once with its whole budget queued (`pipeline.studies`), and an
MLflow parent run is made for it. Workers run the trials (`pipeline.workers`): here, in
`sweep.n_workers` processes, or `ablate worker` on other machines. Re-running continues
the same study (its name hashes the effective config and the data): trials a dead worker
left RUNNING are failed and their MLflow runs closed, and only missing trials run. At the
end the best checkpoint goes to `models/sweeps/<experiment>/best.keras`, is logged to the
parent run as a Keras model and registered as `<competition>-<experiment>@champion`, and
the study's record to `metrics/sweeps/<experiment>.json` and its numbers alone (`SCORES`,
what `dvc metrics show` lists) to `metrics/sweeps/<experiment>.scores.json`.

Run: `ablate sweep --experiment padding` (or `dvc repro sweep@padding`).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

from pipeline import interrupts, workers
from pipeline.config import Config
from pipeline.errors import UserError, redact
from pipeline.fsutil import atomic_path, write_json
from pipeline.model import flatten_config
from pipeline.studies import Study
from pipeline.tracking import Tracker, provenance
from pipeline.trial import CHECKPOINT, RUN_STATUS, Job, label

log = logging.getLogger(__name__)

# A study's numbers, under the same names on its MLflow parent run and in its DVC metrics
# file; the strings (study name, run ids, model URI) are in its record only.
SCORES = ("best_value", "n_complete", "n_pruned", "n_failed", "epochs_run", "wall_seconds")


def main(config: Config, experiment: str) -> dict[str, Any]:
    job = Job.load(config, experiment)
    tracker = Tracker.connect(config.tracking.uri, config.tracking.experiment)
    study = job.open_study(create=True)
    parent_id = parent_run(job, study, tracker)
    study.fail_dead_trials()
    close_orphan_runs(tracker, study, parent_id)
    queued = study.fill_queue(job.experiment, config.sweep.max_retries)
    log.info(
        "sweep %s: study %s, budget %d, %d newly queued, storage %s",
        experiment,
        study.name,
        job.experiment.n_trials,
        queued,
        redact(config.sweep.storage),
    )

    def run_waiting() -> None:
        if config.sweep.n_workers > 1:
            workers.run_in_processes(job, config.sweep.n_workers)
        elif config.sweep.per_process:
            workers.run_in_fresh_processes(job, study, config.sweep.per_process)
        else:
            workers.work(job, study, tracker, parent_id)

    try:
        while True:
            run_waiting()
            workers.wait_for_running(study, run_waiting)
            if not study.fill_queue(job.experiment, config.sweep.max_retries):
                break  # every planned point done (or given up after its retries)
    except UserError as exc:  # e.g. too many failures in a row: the parent run ends too
        tracker.end_run(parent_id, "FAILED", {"error": str(exc)})
        raise
    except (interrupts.Interrupted, KeyboardInterrupt):
        with interrupts.deferred(raise_after=False):
            tracker.end_run(parent_id, "KILLED", {"error": "interrupted"})
        raise
    close_orphan_runs(tracker, study, parent_id)
    try:
        summary = finalize(job, study, tracker, parent_id)
    except OSError as exc:  # a full disk: the trials are kept; the rerun finalizes
        with contextlib.suppress(Exception):  # the store may sit on the same full disk
            tracker.end_run(parent_id, "FAILED", {"error": f"finalize: {exc.strerror}"})
        raise
    log.info(
        "sweep %s: best %s %.4f (trial %d); %d complete, %d pruned, %d failed",
        experiment,
        job.experiment.objective,
        summary["best_value"],
        summary["best_trial"],
        summary["n_complete"],
        summary["n_pruned"],
        summary["n_failed"],
    )
    return summary


def parent_run(job: Job, study: Study, tracker: Tracker) -> str:
    """The study's MLflow parent run id, created once and stored on the study."""
    if study.parent_run_id is not None:
        tracker.reopen(study.parent_run_id)
        return study.parent_run_id
    experiment, meta = job.experiment, job.data.meta
    study.parent_run_id = tracker.start_run(
        f"sweep-{experiment.name}",
        params={
            "experiment": experiment.name,
            "n_trials": experiment.n_trials,
            "sampler": experiment.sampler["name"],
            "pruner": experiment.pruner["name"],
            "objective": experiment.objective,
            **flatten_config(job.config.model),
        },
        tags={
            "study": experiment.name,
            "study_name": study.name,
            "experiment": experiment.name,
            **provenance(meta.competition, meta.data_hash),
        },
    )
    return study.parent_run_id


def close_orphan_runs(tracker: Tracker, study: Study, parent_id: str) -> int:
    """Close MLflow child runs still RUNNING whose trial has finished (a dead worker's)."""
    finished = {r.number: r for r in study.records(finished_only=True, retried=True)}
    closed = 0
    for run in tracker.runs_under(parent_id, status="RUNNING"):
        record = finished.get(int(run.data.tags.get("trial_number", -1)))
        if record is not None:
            tracker.end_run(
                run.info.run_id,
                RUN_STATUS[record.state],
                {"state": record.state, "error": record.attrs.get("error", "worker died")},
            )
            closed += 1
    return closed


def summarize(study: Study, job: Job) -> dict[str, Any]:
    """The study's budget, outcome counts, epochs and best trial, as plain values."""
    records = study.records()
    count = {s: sum(r.state == s for r in records) for s in ("COMPLETE", "PRUNED", "FAIL")}
    best = study.best()
    return {
        "study": study.name,
        "best_value": best.value if best else None,
        "best_params": best.params if best else {},
        "best_trial": best.number if best else None,
        "n_trials": job.experiment.n_trials,
        "n_complete": count["COMPLETE"],
        "n_pruned": count["PRUNED"],
        "n_rejected": sum(r.state == "PRUNED" and r.rejected for r in records),
        "n_failed": count["FAIL"],
        "n_reused": sum("reused_from" in r.attrs for r in records),
        **study.attempts(),
        "epochs_run": sum(int(r.attrs.get("epochs_run", 0)) for r in records),
        "wall_seconds": study.wall_seconds(),
    }


def finalize(job: Job, study: Study, tracker: Tracker, parent_id: str) -> dict[str, Any]:
    """Best checkpoint to its model file, logged and registered; the study's record and
    its numbers."""
    import keras

    summary = summarize(study, job)
    best = study.best()
    if best is None:
        tracker.end_run(parent_id, "FAILED", {"error": "no trial completed"})
        raise UserError(
            f"{job.experiment.name}: no trial completed "
            f"({summary['n_pruned']} pruned, {summary['n_failed']} failed); "
            "see the trial runs in MLflow for the errors"
        )
    paths = job.config.paths
    source = best.attrs.get("checkpoint_run_id", best.run_id)  # the run that trained it
    with tempfile.TemporaryDirectory() as tmp:
        local = tracker.download_artifact(source, CHECKPOINT, Path(tmp))
        model = keras.models.load_model(local)
        with atomic_path(paths.sweep_model(job.experiment.name)) as out:
            out.write_bytes(local.read_bytes())
    name = f"{job.data.meta.competition}-{job.experiment.name}"
    objective = job.experiment.objective
    summary["model_uri"] = tracker.log_keras_model(
        source,
        model,
        job.data.x_val[:5],
        registered_name=name,
        model_name=f"{job.experiment.name}-best",
        version_tags={
            "study": job.experiment.name,
            "study_name": study.name,
            "trial": best.number,
            objective: f"{best.value:.6f}",
            **{k: v for k, v in best.params.items()},
        },
        description=(
            f"Best of study {job.experiment.name}: trial {best.number} "
            f"({label(best.params)}), {objective} {best.value:.4f}."
        ),
    )
    summary["parent_run_id"] = parent_id
    summary["best_run_id"] = best.run_id
    summary["registered_model"] = f"{name}@champion"
    _describe_parent(job, study, tracker, parent_id)
    scores = {k: summary[k] for k in SCORES}
    tracker.log_metrics(parent_id, scores)
    tracker.end_run(parent_id, "FINISHED", {"best_trial": best.number, "best_run_id": best.run_id})
    write_json(paths.sweep_scores(job.experiment.name), scores)
    write_json(paths.sweep_metrics(job.experiment.name), summary)
    return summary


def _describe_parent(job: Job, study: Study, tracker: Tracker, parent_id: str) -> None:
    """The study's answer on its parent run: a table as the run's description (MLflow
    shows it on the Overview page), per-level metrics, and each level's learning curves."""
    from pipeline import plots
    from pipeline.tables import study_answer

    experiment = job.experiment
    records = study.records(finished_only=True)
    done = [r for r in records if r.state == "COMPLETE"]
    if experiment.is_grid and len(experiment.factors) == 1:
        text, metrics = study_answer(
            experiment.name, experiment, records, job.config.report.confidence
        )
        tracker.log_metrics(parent_id, metrics)
        factor = next(iter(experiment.factors))
        by_level: dict[str, Any] = {}
        for r in done:
            level = str(r.params.get(factor))
            if r.history and (level not in by_level or r.value > by_level[level].value):
                by_level[level] = r
        if by_level:
            with tempfile.TemporaryDirectory() as tmp:
                plots.curves_by_level(
                    {level: r.history for level, r in by_level.items()},
                    Path(tmp) / f"{experiment.name}_curves.png",
                    f"{experiment.name}: learning curves of each level's best trial",
                )
                tracker.log_artifacts(parent_id, Path(tmp), "curves")
    else:
        best = max(done, key=lambda r: r.value)
        text = (
            f"**{experiment.name}**: {experiment.description}. {len(done)} complete, "
            f"{sum(r.state == 'PRUNED' for r in records)} pruned, "
            f"{sum(r.state == 'FAIL' for r in records)} failed. Best {experiment.objective} "
            f"{best.value:.4f} (trial {best.number}): {label(best.params)}.\n"
        )
    tracker.set_tags(parent_id, {"mlflow.note.content": text})
