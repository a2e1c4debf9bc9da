"""Stage `sweep`: one Optuna study per experiment file, every trial a nested MLflow run.

The study is created once with its whole budget queued as WAITING trials (each grid
point, or an empty slot for TPE/random to fill). Workers, in this process, in
`sweep.n_workers` processes, or `ablate worker` on other machines, atomically claim
waiting trials from the shared storage, so together they never exceed the budget and
never run a grid point twice. Re-running continues the same study (its name hashes the
effective config and the data); trials left RUNNING by a dead worker are failed (same
host: the process is gone; other hosts: Optuna's heartbeat) and their MLflow runs closed.
At the end the best checkpoint goes to `models/<experiment>/best.keras`, is logged to the
parent run as a Keras model and registered as `<competition>-<experiment>@champion`.

Run: `ablate sweep --experiment padding` (or `dvc repro sweep@padding`).
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.experiments import Experiment, apply_factors, load_experiment, study_name, suggest
from pipeline.fsutil import atomic_path, write_json
from pipeline.model import ModelConfig, ShapeError, check_shapes, flatten_config
from pipeline.params import SweepParams, TrainParams, load_section, read_params
from pipeline.prepare import Dataset, load_prepared

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
CHECKPOINT = "checkpoint/best.keras"
REJECTED = "rejected before training"


@dataclass
class Context:
    """Everything a worker needs, built once from params and the command line."""

    params_path: str
    experiment: Experiment
    base: ModelConfig
    train: TrainParams
    sweep: SweepParams
    data: Dataset
    storage_url: str
    tracking_uri: str
    tracking_experiment: str
    models_dir: Path
    metrics_dir: Path

    @property
    def study_name(self) -> str:
        return study_name(self.experiment, self.base, self.train, self.data.meta.data_hash)

    @property
    def shared(self) -> bool:
        """A storage other machines can reach: heartbeats and retries are on."""
        return not self.storage_url.startswith("sqlite")


def load_context(params_path: str, experiment: str, storage: str | None = None,
                 tracking_uri: str | None = None) -> Context:
    raw = read_params(params_path)
    paths = load_section("paths", params_path, raw)
    sweep: SweepParams = load_section("sweep", params_path, raw)
    tracking = load_section("tracking", params_path, raw)
    base = ModelConfig.from_dict(raw.get("model") or {}, f"{params_path}: model")
    spec = load_experiment(paths.experiments, experiment, sweep.n_trials, base)
    return Context(
        params_path=params_path, experiment=spec, base=base,
        train=load_section("train", params_path, raw), sweep=sweep,
        data=load_prepared(paths.prepared), storage_url=storage or sweep.storage,
        tracking_uri=tracking_uri or tracking.uri, tracking_experiment=tracking.experiment,
        models_dir=Path(paths.models), metrics_dir=Path(paths.metrics),
    )


# -- storage ---------------------------------------------------------------------------------
def make_storage(url: str, heartbeat_seconds: int):
    """An Optuna storage for `url`: SQLite, PostgreSQL/MySQL (with heartbeat and retry of
    trials whose worker died), or Redis through the journal storage."""
    import optuna
    from optuna.storages import RDBStorage

    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            from optuna.storages.journal import JournalRedisBackend

            return optuna.storages.JournalStorage(JournalRedisBackend(url))
        if url.startswith("sqlite"):
            storage = RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120,
                                                                      "isolation_level": None}})
            _lock_on_begin(storage.engine)
            return storage
        if url.startswith(("postgresql", "mysql")):
            return RDBStorage(
                _with_driver(url), engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=heartbeat_seconds, grace_period=3 * heartbeat_seconds,
                heartbeat_stale_trial_callback=requeue,
            )
    except Exception as exc:  # connection refused, bad credentials, missing driver
        raise UserError(f"sweep.storage: cannot open the Optuna storage ({_redact(url)}): "
                        f"{str(exc).splitlines()[0]}") from None
    raise UserError(f"sweep.storage {_redact(url)!r}: use sqlite:///FILE, postgresql://..., "
                    "mysql://... or redis://...")


def _with_driver(url: str) -> str:
    """SQLAlchemy >= 2.1 reads a bare `postgresql://` as psycopg 3; this project installs
    psycopg2, so name it unless psycopg 3 is there."""
    import importlib.util

    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def _lock_on_begin(engine) -> None:
    """SQLite: every transaction takes the write lock when it begins (BEGIN IMMEDIATE).

    pysqlite otherwise begins at the first write, so two processes could both read a trial
    as WAITING and both mark it RUNNING: `claim` would hand one trial to two workers."""
    from sqlalchemy import event

    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))


def _redact(url: str) -> str:
    """The URL without its password."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def _sampler(experiment: Experiment):
    import optuna

    spec = dict(experiment.sampler)
    name = spec.pop("name")
    seed = spec.pop("seed", 0)
    if name == "tpe":
        try:
            return optuna.samplers.TPESampler(seed=seed, **spec)
        except TypeError as exc:
            raise UserError(f"experiments/{experiment.name}.yaml: sampler: {exc}") from None
    # grid studies have every point queued with fixed params; the sampler never picks
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(experiment: Experiment):
    import optuna

    spec = dict(experiment.pruner)
    name = spec.pop("name")
    try:
        return {
            "none": optuna.pruners.NopPruner,
            "median": optuna.pruners.MedianPruner,
            "hyperband": optuna.pruners.HyperbandPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        }[name](**spec)
    except TypeError as exc:
        raise UserError(f"experiments/{experiment.name}.yaml: pruner: {exc}") from None


def open_study(ctx: Context, create: bool):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(ctx.storage_url, ctx.sweep.heartbeat_seconds)
    kwargs = dict(study_name=ctx.study_name, storage=storage, sampler=_sampler(ctx.experiment),
                  pruner=_pruner(ctx.experiment))
    if create:
        return optuna.create_study(direction=ctx.experiment.direction, load_if_exists=True,
                                   **kwargs)
    return optuna.load_study(**kwargs)


# -- budget bookkeeping -----------------------------------------------------------------------
def _superseded(trials) -> set[int]:
    """Numbers of failed trials that Optuna re-queued (their retry takes their slot)."""
    return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}


def slots(study) -> list:
    """The study's trials minus failed ones that were retried: one per budget slot."""
    trials = study.get_trials(deepcopy=False)
    gone = _superseded(trials)
    return [t for t in trials if t.number not in gone]


def fill_queue(study, experiment: Experiment) -> int:
    """Queue WAITING trials until the study holds its whole budget; returns how many."""
    existing = slots(study)
    missing = experiment.n_trials - len(existing)
    if missing <= 0:
        return 0
    if experiment.is_grid:
        taken = {json.dumps(t.system_attrs.get("fixed_params", t.params), sort_keys=True)
                 for t in existing}
        points = [p for p in experiment.grid() if json.dumps(p, sort_keys=True) not in taken]
        for point in points[:missing]:
            study.enqueue_trial(point)
        return min(missing, len(points))
    for _ in range(missing):
        study.enqueue_trial({})
    return missing


def claim(study):
    """Atomically take one WAITING trial (RUNNING from now on), or None when none is left."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, frozen._trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


# -- recovering from dead workers -------------------------------------------------------------
def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def requeue(study, trial) -> None:
    """Queue a dead worker's trial again, once (Optuna's retry), without the attributes of
    the dead run: a retry still naming its dead worker would look dead itself between its
    claim and its new worker writing its own id, and be failed again by another worker."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    trial = copy.copy(trial)
    trial.user_attrs = {k: v for k, v in trial.user_attrs.items()
                        if k not in ("worker", "error", "mlflow_run_id")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A worker killed but not yet reaped by its parent (`sweep.n_workers`) is dead too."""
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def fail_dead_trials(study, retry: bool) -> list[int]:
    """Fail RUNNING trials whose worker is gone: same host and process dead, or (shared
    RDB storages) a stale Optuna heartbeat. Returns the numbers failed here."""
    import optuna
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    host = socket.gethostname()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker", "")
        owner_host, _, pid = owner.rpartition(":")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        try:
            # before FAIL: a finished trial's attributes can no longer be set
            study._storage.set_trial_user_attr(trial._trial_id, "error",
                                               f"worker {owner} died during the trial")
            if not study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        failed.append(trial.number)
        if retry:
            requeue(study, study.trials[trial.number])
    if failed:
        log.warning("trials %s were left RUNNING by a dead worker: marked FAIL", failed)
    return failed


def close_orphan_runs(tracker, study, parent_id: str) -> int:
    """Close MLflow child runs still RUNNING whose trial has finished."""
    from optuna.trial import TrialState

    status = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED",
              TrialState.FAIL: "FAILED"}
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run in tracker.runs_under(parent_id, status="RUNNING"):
        trial = by_number.get(int(run.data.tags.get("trial_number", -1)))
        if trial is not None and trial.state in status:
            tracker.end_run(run.info.run_id, status[trial.state],
                            {"state": trial.state.name,
                             "error": trial.user_attrs.get("error", "worker died")})
            closed += 1
    return closed


# -- one trial ----------------------------------------------------------------------------------
class _Heartbeat:
    """Optuna's heartbeat for a trial we run outside `study.optimize` (RDB storages)."""

    def __init__(self, storage, trial_id: int, interval: float):
        self._stop = threading.Event()
        self._thread = None
        if getattr(storage, "get_heartbeat_interval", lambda: None)():
            def beat():
                while not self._stop.is_set():
                    storage.record_heartbeat(trial_id)
                    self._stop.wait(interval)

            self._thread = threading.Thread(target=beat, daemon=True)

    def __enter__(self):
        if self._thread:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread:
            self._thread.join()


def _pruning_callback(trial, monitor: str):
    import keras
    import optuna

    class ReportAndPrune(keras.callbacks.Callback):
        epochs = 0

        def on_epoch_end(self, epoch, logs=None):
            self.epochs = epoch + 1
            value = (logs or {}).get(monitor)
            if value is None:
                return
            trial.report(float(value), epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}: "
                                         f"{monitor} {float(value):.4f}")

    return ReportAndPrune()


def run_trial(ctx: Context, study, trial, tracker, parent_id: str) -> tuple[str, Any]:
    """Train one trial and record it in Optuna and MLflow. Returns (state, value or error)."""
    import optuna

    from pipeline.train import train

    trial.set_user_attr("worker", _worker_id())
    values = suggest(trial, ctx.experiment)
    tags = {"trial_number": trial.number, "study": study.study_name, "state": "RUNNING"}
    try:
        config, train_params = apply_factors(ctx.base, ctx.train, values)
        config_params = flatten_config(config)
    except ValueError as exc:  # a combination the config refuses, e.g. strides with dilation
        config, train_params, config_params, invalid = None, ctx.train, {}, str(exc)
    else:
        invalid = None
    run_id = tracker.start_run(
        f"trial-{trial.number}", parent_id=parent_id, tags=tags,
        params={**{f"trial.{k}": v for k, v in values.items()}, **config_params,
                "train.seed": train_params.seed},
    )
    trial.set_user_attr("mlflow_run_id", run_id)
    pruning = _pruning_callback(trial, ctx.experiment.objective)
    try:
        if invalid is None:
            try:
                check_shapes(config, ctx.data.meta.image_shape, ctx.data.meta.n_classes)
            except ShapeError as exc:
                invalid = str(exc)
        if invalid is not None:
            raise optuna.TrialPruned(f"{REJECTED}: {invalid}")
        with _Heartbeat(study._storage, trial._trial_id, ctx.sweep.heartbeat_seconds):
            result = train(config, train_params, ctx.data,
                           callbacks=[tracker.epoch_logger(run_id), pruning])
        value = result.metrics[ctx.experiment.objective]
        for key in ("n_params", "macs", "epochs_run", "best_epoch"):
            trial.set_user_attr(key, result.metrics[key])
        trial.set_user_attr("history", result.history)
        tracker.log_metrics(run_id, {f"best_{k}": v for k, v in result.metrics.items()})
        if _is_best_so_far(study, value, ctx.experiment.direction):
            with tempfile.TemporaryDirectory() as tmp:
                result.model.save(Path(tmp) / "best.keras")
                tracker.log_artifact(run_id, Path(tmp) / "best.keras", "checkpoint")
        study.tell(trial, value)
        tracker.end_run(run_id, "FINISHED", {"state": "COMPLETE"})
        return "COMPLETE", value
    except optuna.TrialPruned as exc:
        reason = str(exc) or "pruned"
        trial.set_user_attr("epochs_run", pruning.epochs)
        trial.set_user_attr("prune_reason", reason)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        tracker.end_run(run_id, "KILLED", {"state": "PRUNED", "prune_reason": reason})
        return "PRUNED", reason
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[:5000]
        trial.set_user_attr("epochs_run", pruning.epochs)
        trial.set_user_attr("error", error)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        tracker.end_run(run_id, "FAILED", {"state": "FAIL", "error": error})
        log.debug("trial %d failed", trial.number, exc_info=True)
        return "FAIL", error
    finally:
        gc.collect()


def _is_best_so_far(study, value: float, direction: str) -> bool:
    from optuna.trial import TrialState

    done = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return True
    return value >= max(done) if direction == "maximize" else value <= min(done)


# -- workers --------------------------------------------------------------------------------------
def _progress_line(ctx: Context, study, trial, state: str, outcome: Any, started: float,
                   done_here: int) -> str:
    from optuna.trial import TrialState

    trials = slots(study)
    finished = sum(t.state.is_finished() for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = (max if ctx.experiment.direction == "maximize" else min)(
        (t.value for t in complete), default=None)
    elapsed = time.monotonic() - started
    left = elapsed / max(done_here, 1) * max(ctx.experiment.n_trials - finished, 0)
    sampled = " ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    result = f"{ctx.experiment.objective} {outcome:.4f}" if state == "COMPLETE" else \
        f"{state.lower()}: {str(outcome)[:80]}"
    best_text = f"{best:.4f}" if best is not None else "-"
    return (f"{ctx.experiment.name} {finished}/{ctx.experiment.n_trials} | trial {trial.number} "
            f"{sampled} | {result} | best {best_text} | {_clock(elapsed)} elapsed, "
            f"~{_clock(left)} left")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def work(ctx: Context, study, tracker, parent_id: str, max_trials: int | None = None) -> int:
    """Claim and run trials until none is waiting; returns how many ran here."""
    started, done, failures = time.monotonic(), 0, 0
    while max_trials is None or done < max_trials:
        fail_dead_trials(study, retry=ctx.shared)
        trial = claim(study)
        if trial is None:
            break
        state, outcome = run_trial(ctx, study, trial, tracker, parent_id)
        done += 1
        log.info(_progress_line(ctx, study, trial, state, outcome, started, done))
        failures = failures + 1 if state == "FAIL" else 0
        if failures >= ctx.sweep.max_consecutive_failures:
            raise UserError(f"{ctx.experiment.name}: {failures} trials in a row failed "
                            f"(sweep.max_consecutive_failures); last error: {outcome}")
    return done


def _worker_command(ctx: Context, max_trials: int | None) -> list[str]:
    command = [sys.executable, "-m", "pipeline.cli", "worker", "--params", ctx.params_path,
               "--experiment", ctx.experiment.name, "--storage", ctx.storage_url,
               "--tracking-uri", ctx.tracking_uri, "--wait", "0"]
    if max_trials is not None:
        command += ["--max-trials", str(max_trials)]
    return command


def _run_in_fresh_processes(ctx: Context, study, per_process: int) -> None:
    """`sweep.isolate` / `sweep.trials_per_process`: trials in fresh processes, at most
    `per_process` each, one after another, so no process lives long enough to bloat."""
    from optuna.trial import TrialState

    while waiting := len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
        code = subprocess.run(_worker_command(ctx, per_process), check=False).returncode
        left = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if code != 0 and left >= waiting:  # the process died before claiming a trial
            raise UserError(f"{ctx.experiment.name}: a trial process exited with status "
                            f"{code} before running a trial; see its error above")


def _run_processes(ctx: Context, n_workers: int) -> None:
    """`sweep.n_workers`: several worker processes on the same storage."""
    procs = [subprocess.Popen(_worker_command(ctx, ctx.sweep.per_process))
             for _ in range(n_workers)]
    codes = [p.wait() for p in procs]
    if any(codes):
        log.warning("worker exit codes: %s", codes)


def wait_for_running(ctx: Context, study, poll: float = 2.0, run_waiting=None) -> None:
    """Wait until trials claimed by other workers (other machines too) have finished.

    `run_waiting()`, when given, runs trials queued meanwhile (the retry of a dead
    worker's trial), which the workers that already left would never claim."""
    from optuna.trial import TrialState

    while True:
        fail_dead_trials(study, retry=ctx.shared)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if not running and not waiting:
            return
        if waiting and run_waiting is not None:
            run_waiting()
            continue
        log.info("waiting for %d running trial(s) on other workers", len(running))
        time.sleep(poll)


# -- finishing a study ----------------------------------------------------------------------
def is_rejected(trial) -> bool:
    """Pruned before any training (a config the shape check or its own rules refused), as
    opposed to stopped by the pruner; `n_rejected` counts these within `n_pruned`."""
    return str(trial.user_attrs.get("prune_reason", "")).startswith(REJECTED)


def summarize(study, experiment: Experiment) -> dict[str, Any]:
    from optuna.trial import TrialState

    trials = slots(study)
    count = {s: sum(t.state == s for t in trials)
             for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    best = study.best_trial if complete else None
    return {
        "study": study.study_name,
        "best_value": best.value if best else None,
        "best_params": best.params if best else {},
        "best_trial": best.number if best else None,
        "n_trials": experiment.n_trials,
        "n_complete": count[TrialState.COMPLETE],
        "n_pruned": count[TrialState.PRUNED],
        "n_rejected": sum(t.state == TrialState.PRUNED and is_rejected(t) for t in trials),
        "n_failed": count[TrialState.FAIL],
        "epochs_run": sum(int(t.user_attrs.get("epochs_run", 0)) for t in trials),
        "wall_seconds": round((max(ends) - min(starts)).total_seconds(), 1)
        if starts and ends else 0.0,
    }


def finalize(ctx: Context, study, tracker, parent_id: str) -> dict[str, Any]:
    """Best checkpoint to models/<experiment>/best.keras, logged and registered; metrics."""
    import keras

    summary = summarize(study, ctx.experiment)
    if summary["best_trial"] is None:
        tracker.end_run(parent_id, "FAILED", {"error": "no trial completed"})
        raise UserError(f"{ctx.experiment.name}: no trial completed "
                        f"({summary['n_pruned']} pruned, {summary['n_failed']} failed); "
                        "see the trial runs in MLflow for the errors")
    best = study.best_trial
    dest = ctx.models_dir / ctx.experiment.name / "best.keras"
    with tempfile.TemporaryDirectory() as tmp:
        local = tracker.download_artifact(best.user_attrs["mlflow_run_id"], CHECKPOINT, Path(tmp))
        model = keras.models.load_model(local)
        with atomic_path(dest) as out:
            out.write_bytes(local.read_bytes())
    name = f"{ctx.data.meta.competition}-{ctx.experiment.name}"
    uri = tracker.log_keras_model(parent_id, model, ctx.data.x_val[:5], registered_name=name)
    summary["model_uri"] = uri
    summary["parent_run_id"] = parent_id
    summary["best_run_id"] = best.user_attrs["mlflow_run_id"]
    summary["registered_model"] = f"{name}@champion"
    tracker.log_metrics(parent_id, {k: summary[k] for k in (
        "best_value", "n_complete", "n_pruned", "n_failed", "epochs_run", "wall_seconds")})
    tracker.end_run(parent_id, "FINISHED", {"best_trial": best.number,
                                           "best_run_id": best.user_attrs["mlflow_run_id"]})
    write_json(ctx.metrics_dir / f"{ctx.experiment.name}.json", summary)
    return summary


def parent_run(ctx: Context, study, tracker) -> str:
    """The study's MLflow parent run id, created once and stored on the study."""
    parent_id = study.user_attrs.get(PARENT_ATTR)
    if parent_id is None:
        parent_id = tracker.start_run(
            f"sweep-{ctx.experiment.name}",
            params={"experiment": ctx.experiment.name, "n_trials": ctx.experiment.n_trials,
                    "sampler": ctx.experiment.sampler["name"],
                    "pruner": ctx.experiment.pruner["name"],
                    "objective": ctx.experiment.objective, **flatten_config(ctx.base)},
            tags={"study": study.study_name, "experiment": ctx.experiment.name,
                  "competition": ctx.data.meta.competition,
                  "data_hash": ctx.data.meta.data_hash, **_git_tag()},
        )
        study.set_user_attr(PARENT_ATTR, parent_id)
    else:
        tracker.client.update_run(parent_id, status="RUNNING")
    return parent_id


def _git_tag() -> dict[str, str]:
    from pipeline.tracking import git_commit

    return {"git_commit": git_commit()}


def main(params_path: str = "params.yaml", experiment: str = "", storage: str | None = None,
         tracking_uri: str | None = None, n_workers: int | None = None) -> dict[str, Any]:
    from pipeline.tracking import Tracker

    ctx = load_context(params_path, experiment, storage, tracking_uri)
    tracker = Tracker.connect(ctx.tracking_uri, ctx.tracking_experiment)
    study = open_study(ctx, create=True)
    parent_id = parent_run(ctx, study, tracker)
    fail_dead_trials(study, retry=ctx.shared)
    close_orphan_runs(tracker, study, parent_id)
    queued = fill_queue(study, ctx.experiment)
    log.info("sweep %s: study %s, budget %d, %d newly queued, storage %s",
             ctx.experiment.name, study.study_name, ctx.experiment.n_trials, queued,
             _redact(ctx.storage_url))
    workers = n_workers or ctx.sweep.n_workers

    def run_waiting() -> None:
        if workers > 1:
            _run_processes(ctx, workers)
        elif ctx.sweep.per_process:
            _run_in_fresh_processes(ctx, study, ctx.sweep.per_process)
        else:
            work(ctx, study, tracker, parent_id)

    try:
        run_waiting()
        wait_for_running(ctx, study, run_waiting=run_waiting)
    except UserError as exc:  # e.g. too many failures in a row: the parent run ends too
        tracker.end_run(parent_id, "FAILED", {"error": str(exc)})
        raise
    close_orphan_runs(tracker, study, parent_id)
    summary = finalize(ctx, study, tracker, parent_id)
    log.info("sweep %s: best %s %.4f (trial %d); %d complete, %d pruned, %d failed",
             ctx.experiment.name, ctx.experiment.objective, summary["best_value"],
             summary["best_trial"], summary["n_complete"], summary["n_pruned"],
             summary["n_failed"])
    return summary


def worker_main(params_path: str = "params.yaml", experiment: str = "",
                storage: str | None = None, tracking_uri: str | None = None,
                wait: float = 600.0, max_trials: int | None = None) -> int:
    """`ablate worker`: join an existing study and run trials until its queue is empty."""
    import optuna

    from pipeline.tracking import Tracker

    ctx = load_context(params_path, experiment, storage, tracking_uri)
    tracker = Tracker.connect(ctx.tracking_uri, ctx.tracking_experiment)
    deadline = time.monotonic() + wait
    while True:
        try:
            study = open_study(ctx, create=False)
            parent_id = study.user_attrs.get(PARENT_ATTR)
            if parent_id:
                break
        except KeyError:
            pass
        if time.monotonic() >= deadline:
            raise UserError(
                f"study {ctx.study_name} not found in {_redact(ctx.storage_url)}; start it with "
                f"`ablate sweep --experiment {experiment}` (same params.yaml and data) first")
        time.sleep(2.0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ran = work(ctx, study, tracker, parent_id, max_trials)
    log.info("worker %s: ran %d trial(s) of study %s", _worker_id(), ran, study.study_name)
    return ran

