"""Optuna behind one door: the only module that imports it.

A `Study` is one experiment's study in a storage (SQLite, PostgreSQL/MySQL with Optuna's
heartbeat, or Redis through the journal storage). Its whole budget is queued up front as
WAITING trials (each grid point, or an empty slot for TPE/random to fill); workers
anywhere `claim` them one at a time through the storage's atomic state change, so together
they never exceed the budget or run a grid point twice. Trials left RUNNING by a dead
worker are failed (same host: its process is gone; other hosts: a stale heartbeat) and, on
shared storages, queued again once. The rest of the pipeline gets plain values back:
`TrialRecord`s (`pipeline.records`), summaries, importances.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState

from pipeline.errors import UserError, redact
from pipeline.experiments import Experiment, suggest
from pipeline.processes import died_here, every, worker_id
from pipeline.records import TrialRecord
from pipeline.storage_urls import with_driver, with_redis_password

log = logging.getLogger(__name__)

PARENT_ATTR = "mlflow_parent_run_id"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# `fail_kind` of a FAIL trial whose work was cut short: it says nothing about its config,
# and its grid point (or budget slot) is run again.
CUT_SHORT = ("interrupted", "died")


# -- storages ---------------------------------------------------------------------------------
def make_storage(url: str, heartbeat_seconds: int):
    """An Optuna storage for `url`: SQLite (serialised writes, one machine),
    PostgreSQL/MySQL (Optuna's heartbeat; a stale trial is retried once), Redis (the
    journal storage). A connection or driver problem is a `UserError`."""
    from optuna.storages import RDBStorage

    with warnings.catch_warnings():  # the journal backend and heartbeat are "experimental"
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            if url.startswith(("redis://", "rediss://", "unix://")):
                from optuna.storages.journal import JournalRedisBackend

                backend = JournalRedisBackend(with_redis_password(url))
                return optuna.storages.JournalStorage(backend)
            if url.startswith("sqlite"):
                storage = RDBStorage(
                    url, engine_kwargs={"connect_args": {"timeout": 120, "isolation_level": None}}
                )
                _lock_on_begin(storage.engine)
                return storage
            if url.startswith(("postgresql", "mysql")):
                return RDBStorage(
                    with_driver(url),
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat_seconds,
                    grace_period=3 * heartbeat_seconds,
                    heartbeat_stale_trial_callback=requeue,
                )
        except Exception as exc:  # connection refused, bad credentials, missing driver
            raise UserError(
                f"sweep.storage: cannot open the Optuna storage ({redact(url)}): "
                f"{str(exc).splitlines()[0]}"
            ) from None
    raise UserError(
        f"sweep.storage {redact(url)!r}: use sqlite:///FILE, postgresql://..., "
        "mysql://... or redis://..."
    )


def _lock_on_begin(engine) -> None:
    """SQLite: every transaction takes the write lock when it begins (BEGIN IMMEDIATE).

    pysqlite otherwise begins at the first write, so two processes could both read a trial
    as WAITING and both mark it RUNNING: `claim` would hand one trial to two workers."""
    from sqlalchemy import event

    event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))


def requeue(study, trial) -> None:
    """Queue a dead worker's trial again, once (Optuna's retry), without the attributes of
    the dead run: a retry still naming its dead worker would look dead itself between its
    claim and its new worker writing its own id, and be failed again by another worker."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    trial = copy.copy(trial)
    trial.user_attrs = {
        k: v for k, v in trial.user_attrs.items() if k not in ("worker", "error", "mlflow_run_id")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def _cut_short(trial) -> bool:
    return trial.state == TrialState.FAIL and trial.user_attrs.get("fail_kind") in CUT_SHORT


def _name_objective(study, objective: str) -> None:
    """Name the study's value `objective`, once (a study reopened keeps its name)."""
    if study.metric_names != [objective]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([objective])


def _sampler(experiment: Experiment):
    spec = dict(experiment.sampler)
    name, seed = spec.pop("name"), spec.pop("seed", 0)
    if name == "tpe":
        try:
            return optuna.samplers.TPESampler(seed=seed, **spec)
        except TypeError as exc:
            raise UserError(f"experiments/{experiment.name}.yaml: sampler: {exc}") from None
    # grid studies have every point queued with fixed params; the sampler never picks
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(experiment: Experiment):
    spec = dict(experiment.pruner)
    kinds = {
        "none": optuna.pruners.NopPruner,
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    }
    try:
        return kinds[spec.pop("name")](**spec)
    except TypeError as exc:
        raise UserError(f"experiments/{experiment.name}.yaml: pruner: {exc}") from None


# -- a study ---------------------------------------------------------------------------------
class Study:
    """One experiment's study in one storage."""

    def __init__(self, study, storage):
        self.optuna = study
        self.storage = storage
        self.name = study.study_name
        self._id = storage.get_study_id_from_name(self.name)

    @classmethod
    def open(
        cls,
        url: str,
        name: str,
        heartbeat_seconds: int = 10,
        experiment: Experiment | None = None,
        create: bool = False,
    ) -> Study:
        """The study `name`; created when `create`, with the experiment's objective as its
        metric name (what optuna-dashboard and `trials_dataframe` call the value). A
        missing one raises KeyError."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = make_storage(url, heartbeat_seconds)
        kwargs = {"study_name": name, "storage": storage}
        if experiment is not None:
            kwargs.update(sampler=_sampler(experiment), pruner=_pruner(experiment))
        if create:
            study = optuna.create_study(
                direction=experiment.direction, load_if_exists=True, **kwargs
            )
            _name_objective(study, experiment.objective)
        else:
            study = optuna.load_study(**kwargs)
        return cls(study, storage)

    @property
    def shared(self) -> bool:
        """A storage other machines can reach (heartbeats and retries apply)."""
        return (
            not isinstance(self.storage, optuna.storages.RDBStorage)
            or self.storage.engine.url.get_backend_name() != "sqlite"
        )

    @property
    def parent_run_id(self) -> str | None:
        return self.optuna.user_attrs.get(PARENT_ATTR)

    @parent_run_id.setter
    def parent_run_id(self, run_id: str) -> None:
        self.optuna.set_user_attr(PARENT_ATTR, run_id)

    def _retried(self, trials: list) -> set[int]:
        """Failed trials that Optuna's heartbeat retry queued again."""
        return {t.system_attrs["failed_trial"] for t in trials if "failed_trial" in t.system_attrs}

    def _slots(self) -> list:
        """The frozen trials that take a budget slot: not those cut short (interrupted, or
        their worker died), whose slot goes to the trial run in their place."""
        trials = self.optuna.get_trials(deepcopy=False)
        retried = self._retried(trials)
        return [t for t in trials if t.number not in retried and not _cut_short(t)]

    def attempts(self) -> dict[str, int]:
        """How many trials were cut short (interrupted or a dead worker's) and how many
        were a grid point's second or later attempt."""
        trials = self.optuna.get_trials(deepcopy=False)
        points = [json.dumps(t.system_attrs.get("fixed_params"), sort_keys=True) for t in trials]
        fixed = [p for p in points if p != "null"]
        return {
            "n_interrupted": sum(_cut_short(t) for t in trials) + len(self._retried(trials)),
            "n_retried": len(fixed) - len(set(fixed)),
        }

    def records(self, finished_only: bool = False, retried: bool = False) -> list[TrialRecord]:
        """The trials as plain values, one per budget slot (with `retried`, also the
        failed trials whose retry took their slot)."""
        trials = self.optuna.get_trials(deepcopy=False) if retried else self._slots()
        return [
            TrialRecord(t.number, t.state.name, dict(t.params), t.value, dict(t.user_attrs))
            for t in trials
            if t.state in FINISHED or not finished_only
        ]

    def count(self, state: str) -> int:
        return len(self.optuna.get_trials(deepcopy=False, states=(TrialState[state],)))

    def fill_queue(self, experiment: Experiment, max_retries: int = 2) -> int:
        """Queue WAITING trials for whatever of the budget has no trial done or under way;
        returns how many. A grid point is done once a trial of it completed or was pruned;
        a point whose trials were cut short runs again, and one that failed with an error
        runs again up to `max_retries` times. Sampled studies count finished trials."""
        if not experiment.is_grid:
            missing = max(experiment.n_trials - len(self._slots()), 0)
            for _ in range(missing):
                self.optuna.enqueue_trial({})
            return missing
        trials = self.optuna.get_trials(deepcopy=False)
        retried = self._retried(trials)
        queued = 0
        for point in experiment.grid()[: experiment.n_trials]:
            tried = [t for t in trials if t.system_attrs.get("fixed_params", t.params) == point]
            if any(t.state not in (TrialState.FAIL,) for t in tried):
                continue  # complete, pruned, waiting or running
            errors = sum(not _cut_short(t) and t.number not in retried for t in tried)
            if errors > max_retries:
                continue  # given up: the report counts it as failed
            self.optuna.enqueue_trial(point)
            queued += 1
        return queued

    def claim(self) -> Trial | None:
        """Atomically take one WAITING trial (RUNNING from now on), or None when none is
        left. The storage's state change succeeds for one caller only."""
        for frozen in self.optuna.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._id, frozen.number)
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                if self.storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return Trial(self, optuna.Trial(self.optuna, trial_id), trial_id)
        return None

    def fail_dead_trials(self) -> list[int]:
        """Fail RUNNING trials whose worker is gone: on this host a dead process, on shared
        RDB storages a stale Optuna heartbeat. Shared storages queue them again once."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.optuna)
        failed = []
        for trial in self.optuna.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = trial.user_attrs.get("worker", "")
            if not died_here(owner):
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(self._id, trial.number)
            try:  # the error first: a finished trial's attributes can no longer be set
                self.storage.set_trial_user_attr(
                    trial_id, "error", f"worker {owner} died during the trial"
                )
                self.storage.set_trial_user_attr(trial_id, "fail_kind", "died")
                if not self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            failed.append(trial.number)
            if self.shared:
                requeue(self.optuna, self.optuna.trials[trial.number])
        if failed:
            log.warning("trials %s were left RUNNING by a dead worker: marked FAIL", failed)
        return failed

    def find_complete(self, reuse_key: str) -> TrialRecord | None:
        """A COMPLETE trial with this `reuse_key` in any study of this storage (this one
        first), with `where` ("study#number") added to its attributes."""
        names = optuna.get_all_study_names(self.storage)
        for name in sorted(names, key=lambda n: n != self.name):
            study_id = self.storage.get_study_id_from_name(name)
            for t in self.storage.get_all_trials(study_id, False, (TrialState.COMPLETE,)):
                if t.user_attrs.get("reuse_key") == reuse_key and "metrics" in t.user_attrs:
                    attrs = dict(t.user_attrs) | {"where": f"{name}#{t.number}"}
                    return TrialRecord(t.number, t.state.name, dict(t.params), t.value, attrs)
        return None

    def best(self) -> TrialRecord | None:
        complete = [r for r in self.records() if r.state == "COMPLETE"]
        if not complete:
            return None
        pick = max if self.optuna.direction == optuna.study.StudyDirection.MAXIMIZE else min
        return pick(complete, key=lambda r: r.value)

    def importances(self) -> dict[str, float]:
        """Optuna's default (fANOVA) parameter importances over complete trials."""
        try:
            weights = optuna.importance.get_param_importances(self.optuna)
        except (RuntimeError, ValueError) as exc:  # too few trials, or no variation
            log.warning("no parameter importances for %s (%s)", self.name, exc)
            return {}
        return {k: float(v) for k, v in weights.items()}

    def wall_seconds(self) -> float:
        trials = self.optuna.get_trials(deepcopy=False, states=FINISHED)
        starts = [t.datetime_start for t in trials if t.datetime_start]
        ends = [t.datetime_complete for t in trials if t.datetime_complete]
        return round((max(ends) - min(starts)).total_seconds(), 1) if starts and ends else 0.0


# -- one claimed trial ---------------------------------------------------------------------
class Trial:
    """A trial this process claimed: what it sampled, its attributes, and its end."""

    def __init__(self, study: Study, trial, trial_id: int):
        self.study, self._trial, self._id = study, trial, trial_id
        self.number = trial.number
        trial.set_user_attr("worker", worker_id())

    def suggest(self, experiment: Experiment) -> dict[str, Any]:
        return suggest(self._trial, experiment)

    def set_attrs(self, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            self._trial.set_user_attr(key, value)

    def tell(self, state: str, value: float | None = None) -> None:
        if state == "COMPLETE":
            self.study.optuna.tell(self._trial, value)
        else:
            self.study.optuna.tell(self._trial, state=TrialState[state])

    def report(self, value: float, step: int) -> bool:
        """Report an intermediate value; True when the pruner says stop."""
        self._trial.report(value, step)
        return self._trial.should_prune()

    def heartbeat(self, interval: float):
        """Optuna's heartbeat while the trial trains (RDB storages that ask for one)."""
        storage = self.study.storage
        if not getattr(storage, "get_heartbeat_interval", lambda: None)():
            return contextlib.nullcontext()
        return every(interval, lambda: storage.record_heartbeat(self._id))
