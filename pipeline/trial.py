"""One trial of a study: suggest -> apply -> check -> train -> value.

`evaluate` is the objective without any tracking: it turns sampled values into a config,
checks its shapes, trains it and returns an `Outcome` (COMPLETE with a value, PRUNED with
a reason, FAIL with an error). `run_trial` wraps it for a claimed trial: an MLflow child
run opens before and closes after, with the epoch logger and the pruner as Keras
callbacks, and the outcome goes back to the study.

A training done before with the same model, recipe, seed and data, in any study of the
same storage, is reused instead of repeated (`sweep.reuse`): the trial takes over its
value, metrics and checkpoint, and its MLflow run says where they came from.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import interrupts
from pipeline import train as training
from pipeline.config import Config
from pipeline.dataset import Dataset, load_prepared
from pipeline.errors import Pruned, UserError
from pipeline.experiments import Experiment, load_experiment, study_name
from pipeline.factors import apply_factors
from pipeline.model import LayerShape, ModelConfig, check_shapes, count_macs, flatten_config
from pipeline.params import TrainParams
from pipeline.records import REJECTED, TrialRecord
from pipeline.studies import Study, Trial
from pipeline.tracking import Tracker, provenance

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint/best.keras"
# a trial's final state -> the status of its MLflow run
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}
RESULT_ATTRS = ("n_params", "macs", "epochs_run", "best_epoch")


@dataclass(frozen=True)
class Job:
    """One experiment on one data set under one config: what every worker needs."""

    config: Config
    experiment: Experiment
    data: Dataset

    @classmethod
    def load(cls, config: Config, experiment: str) -> Job:
        spec = load_experiment(
            config.paths.experiments, experiment, config.sweep.n_trials, config.model, config.train
        )
        return cls(config, spec, load_prepared(config.paths.prepared))

    @property
    def study_name(self) -> str:
        return study_name(
            self.experiment, self.config.model, self.config.train, self.data.meta.data_hash
        )

    def open_study(self, create: bool = False) -> Study:
        """This job's study (KeyError when it does not exist and `create` is false)."""
        return Study.open(
            self.config.sweep.storage,
            self.study_name,
            self.config.sweep.heartbeat_seconds,
            self.experiment,
            create,
        )


@dataclass
class Outcome:
    state: str  # COMPLETE, PRUNED or FAIL
    value: float | None = None
    reason: str = ""  # why it was pruned or failed
    attrs: dict[str, Any] = field(default_factory=dict)  # kept on the Optuna trial
    metrics: dict[str, float] = field(default_factory=dict)  # what `train()` measured
    model: Any = field(default=None, repr=False)


def configure(job: Job, values: dict[str, Any]) -> tuple[ModelConfig, TrainParams, str | None]:
    """The trial's config and training settings, or why the config is refused."""
    try:
        config, params = apply_factors(job.config.model, job.config.train, values)
    except ValueError as exc:  # a combination the config refuses, e.g. strides with dilation
        return job.config.model, job.config.train, str(exc)
    return config, params, over_cost(job, config)


def evaluate(job: Job, config: ModelConfig, params: TrainParams, callbacks: list) -> Outcome:
    """Check, train, and read the objective; nothing here knows MLflow or Optuna."""
    counter = _epoch_counter()
    try:
        layers: list[LayerShape] = check_shapes(
            config, job.data.meta.image_shape, job.data.meta.n_classes
        )
    except UserError as exc:
        return _rejected(str(exc))
    try:
        result = training.train(config, params, job.data, [counter, *callbacks], layers=layers)
    except Pruned as exc:
        return Outcome("PRUNED", reason=str(exc) or "pruned", attrs={"epochs_run": counter.epochs})
    except Exception as exc:
        interrupts.check()  # a signal that TensorFlow turned into an error of its own
        log.debug("trial failed", exc_info=True)
        return Outcome(
            "FAIL",
            reason=f"{type(exc).__name__}: {exc}"[:5000],
            attrs={"epochs_run": counter.epochs},
        )
    attrs = {k: result.metrics[k] for k in RESULT_ATTRS}
    attrs |= {"history": result.history, "metrics": result.metrics, "precision": result.precision}
    return Outcome(
        "COMPLETE",
        result.metrics[job.experiment.objective],
        attrs=attrs,
        metrics=result.metrics,
        model=result.model,
    )


def over_cost(job: Job, config: ModelConfig) -> str | None:
    """Why a model is over its study's `max_macs_ratio` (refused before any training or
    reuse, so the switch `sweep.reuse` never changes a study's outcome), or None."""
    ratio, meta = job.experiment.max_macs_ratio, job.data.meta
    if ratio is None:
        return None
    base = count_macs(check_shapes(job.config.model, meta.image_shape, meta.n_classes))
    try:
        macs = count_macs(check_shapes(config, meta.image_shape, meta.n_classes))
    except UserError:  # a shape that collapses: `evaluate` rejects it, saying where
        return None
    if macs <= ratio * base:
        return None
    return (
        f"{macs / 1e6:.1f} M multiply-accumulates an image, over max_macs_ratio {ratio:g} x "
        f"the base model's {base / 1e6:.1f} M"
    )


def _rejected(why: str) -> Outcome:
    return Outcome("PRUNED", reason=f"{REJECTED}: {why}", attrs={"epochs_run": 0})


def reuse_key(job: Job, config: ModelConfig, params: TrainParams) -> str:
    """What makes two trainings the same: model, recipe (seed included) and data."""
    payload = json.dumps(
        [config.to_dict(), dataclasses.asdict(params), job.data.meta.data_hash],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def reused(job: Job, found: TrialRecord) -> Outcome:
    """The outcome of a finished trial with the same key, taken over without training: the
    same objective value, metrics, history and checkpoint; zero epochs run here."""
    attrs = {k: found.attrs[k] for k in (*RESULT_ATTRS, "history", "metrics") if k in found.attrs}
    attrs |= {
        "epochs_run": 0,
        "reused_from": found.attrs["where"],
        "checkpoint_run_id": found.attrs.get("checkpoint_run_id", found.run_id),
    }
    metrics = found.attrs["metrics"]
    return Outcome("COMPLETE", metrics[job.experiment.objective], attrs=attrs, metrics=metrics)


def run_name(experiment: Experiment, number: int, values: dict[str, Any]) -> str:
    """A grid trial's run is named by what it varies (`padding=valid seed=1`); a sampled
    trial's by its study and number (`joint #7`): its values are its params."""
    return label(values) if experiment.is_grid else f"{experiment.name} #{number}"


def label(values: dict[str, Any]) -> str:
    """`padding=valid seed=1`: sampled values as a trial's name shows them."""
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def run_tags(job: Job, trial: Trial, values: dict[str, Any]) -> dict[str, Any]:
    """What a trial's run is filtered and grouped by in the MLflow UI: its study (plain and
    hashed), the factor and level of a single-factor study, the seed, the data and code."""
    experiment, meta = job.experiment, job.data.meta
    tags = {
        "study": experiment.name,
        "study_name": trial.study.name,
        "trial_number": trial.number,
        "state": "RUNNING",
        **provenance(meta.competition, meta.data_hash),
    }
    if "seed" in values:
        tags["seed"] = values["seed"]
    if len(experiment.factors) == 1:
        factor = next(iter(experiment.factors))
        tags |= {"factor": factor, "level": values.get(factor)}
    return tags


@dataclass
class Started:
    """A claimed trial with its MLflow run open: what `run_trial` needs."""

    trial: Trial
    values: dict[str, Any]
    config: ModelConfig
    params: TrainParams
    refused: str | None
    run_id: str
    found: TrialRecord | None  # a finished training to reuse


def start_trial(job: Job, trial: Trial, tracker: Tracker, parent_id: str) -> Started:
    """Sample the claimed trial and open its MLflow run, a child of `parent_id`. The caller
    holds signals from the claim on (`interrupts.hold`); `run_trial` releases them."""
    values = trial.suggest(job.experiment)
    config, params, refused = configure(job, values)
    run_id = tracker.start_run(
        run_name(job.experiment, trial.number, values),
        parent_id=parent_id,
        tags=run_tags(job, trial, values),
        params={
            **{f"trial.{k}": v for k, v in values.items()},
            **({} if refused else flatten_config(config)),
            "train.seed": params.seed,
        },
    )
    key = None if refused else reuse_key(job, config, params)
    trial.set_attrs({"mlflow_run_id": run_id, "reuse_key": key})
    found = trial.study.find_complete(key) if key and job.config.sweep.reuse else None
    return Started(trial, values, config, params, refused, run_id, found)


def run_trial(job: Job, started: Started, tracker: Tracker) -> Outcome:
    """Train (or reuse) a started trial and tell the study and MLflow how it ended. A
    signal meanwhile ends it FAIL with reason `interrupted` (its run KILLED), then goes on
    up; the study's end and the run's are never cut in half. The caller holds signals
    (`interrupts.hold()`) from the claim on; this releases them where it can clean up."""
    trial, run_id = started.trial, started.run_id
    try:
        interrupts.release()  # a signal since the claim is raised here, and handled
        if started.refused:
            outcome = _rejected(started.refused)
        elif started.found is not None:
            outcome = reused(job, started.found)
            tracker.log_history(run_id, outcome.attrs.get("history", {}))
        else:
            callbacks = [
                tracker.epoch_logger(run_id),
                _report_and_prune(trial, job.experiment.objective),
            ]
            with trial.heartbeat(job.config.sweep.heartbeat_seconds):
                outcome = evaluate(job, started.config, started.params, callbacks)
    except (interrupts.Interrupted, KeyboardInterrupt):
        with interrupts.deferred(raise_after=False):
            cut = Outcome("FAIL", reason="interrupted", attrs={"fail_kind": "interrupted"})
            _record(cut, trial, tracker, run_id, status="KILLED")
        raise
    with interrupts.deferred():
        try:
            _record(outcome, trial, tracker, run_id)
        finally:
            outcome.model = None
            gc.collect()
    return outcome


def _record(
    outcome: Outcome, trial: Trial, tracker: Tracker, run_id: str, status: str | None = None
) -> None:
    tags = {"state": outcome.state}
    if outcome.state == "COMPLETE":
        # the kept weights' scores: `val_accuracy` here is the study's objective
        tracker.log_metrics(run_id, outcome.metrics)
        if outcome.model is not None:  # trained here: its checkpoint, for finalize and reuse
            with tempfile.TemporaryDirectory() as tmp:
                outcome.model.save(Path(tmp) / "best.keras")
                tracker.log_artifact(run_id, Path(tmp) / "best.keras", "checkpoint")
            outcome.attrs["checkpoint_run_id"] = run_id
            tags["precision"] = outcome.attrs["precision"]
        else:
            tags["reused_from"] = outcome.attrs["reused_from"]
    elif outcome.state == "PRUNED":
        outcome.attrs["prune_reason"] = tags["prune_reason"] = outcome.reason
    else:
        outcome.attrs["error"] = tags["error"] = outcome.reason
    trial.set_attrs(outcome.attrs)
    trial.tell(outcome.state, outcome.value)
    tracker.end_run(run_id, status or RUN_STATUS[outcome.state], tags)


def _epoch_counter():
    """A Keras callback counting epochs, also for a trial stopped or failed midway."""
    import keras

    class EpochCounter(keras.callbacks.Callback):
        epochs = 0

        def on_epoch_end(self, epoch, logs=None):
            self.epochs = epoch + 1

    return EpochCounter()


def _report_and_prune(trial: Trial, monitor: str):
    """A Keras callback reporting `monitor` to the study each epoch; raises `Pruned` when
    the study's pruner says so."""
    import keras

    class ReportAndPrune(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(monitor)
            if value is not None and trial.report(float(value), epoch):
                raise Pruned(f"pruned after epoch {epoch + 1}: {monitor} {float(value):.4f}")

    return ReportAndPrune()
