"""MLflow at the edge: the only module that imports it, for runs, metrics, artifacts and
the model registry. It knows nothing of training or Optuna; callers hand it plain values.

`Tracker.connect` fails fast when the tracking URI cannot be reached (before any
training). Runs are created through `MlflowClient` with explicit run ids, so one process
can write a parent run and many child runs, and workers on other machines can add
children to the same parent (`mlflow.parentRunId`). Per-epoch metrics go in one batched
call per epoch, written by MLflow's background thread while the next epoch trains;
`end_run` waits for them and writes again, synchronously, any batch the store refused.
Full `mlflow.keras.log_model` is reserved for best models.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from pipeline.errors import UserError, redact

log = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"


def git_commit() -> str:
    """The commit checked out in the working directory, or "unknown"."""
    return _commit_in(os.getcwd())


@functools.cache  # once per folder: every trial's run asks
def _commit_in(folder: str) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
            cwd=folder,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(competition: str, data_hash: str) -> dict[str, str]:
    """The tags that say what a run was trained on, and with which code."""
    return {"competition": competition, "data_hash": data_hash, "git_commit": git_commit()}


def check_reachable(uri: str) -> None:
    """Fail within seconds when `uri` cannot work, instead of after training."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        import requests

        try:
            requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
        except requests.RequestException as exc:
            raise UserError(
                f"tracking.uri {uri}: cannot reach the MLflow server ({type(exc).__name__}); "
                "start it (`mlflow server --host 127.0.0.1 --port 5000`) or fix tracking.uri"
            ) from None
    elif parsed.scheme == "sqlite":
        path = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
        if path is not None and not path.parent.resolve().is_dir():
            raise UserError(f"tracking.uri {uri}: folder {path.parent} does not exist")


def _flush(metrics: dict[str, float], step: int):
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]


def _experiment_id(client, name: str) -> str:
    """The id of MLflow experiment `name`, created if missing and restored if deleted."""
    found = client.get_experiment_by_name(name)
    if found is not None and found.lifecycle_stage == "deleted":
        # deleted in the UI: its runs are still there, and a new experiment of that name
        # cannot be made until it is purged; bring it back, and say so
        client.restore_experiment(found.experiment_id)
        log.warning(
            "MLflow experiment %r was deleted; restored it (tracking.experiment names "
            "another to start afresh)",
            name,
        )
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another worker created it first
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _refusal(exc: Exception, experiment: str) -> str:
    code = getattr(exc, "error_code", "")
    if code == "UNAUTHENTICATED":
        return (
            "the server wants a login; set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD in the environment (wrong ones are refused the same way)"
        )
    if code == "PERMISSION_DENIED":
        return (
            f"this user may not use experiment {experiment!r}; ask the server's admin for "
            "access, or name another in tracking.experiment"
        )
    return f"cannot use experiment {experiment!r}: {str(exc).splitlines()[0]}"


class Tracker:
    """A connection to one MLflow experiment."""

    def __init__(self, client, experiment_id: str, uri: str):
        self.client = client
        self.experiment_id = experiment_id
        self.uri = uri
        # Per-epoch metrics go to MLflow's background thread while training goes on;
        # `end_run` waits for them. False: each epoch's write waits (bench/tracking_overhead.py
        # measures both).
        self.asynchronous = True
        self._pending: dict[str, list] = {}

    @classmethod
    def connect(cls, uri: str, experiment: str) -> Tracker:
        import mlflow
        from mlflow.tracking import MlflowClient

        check_reachable(uri)
        # Background logging: batches wait at most 1 s (and a run's end wakes the thread at
        # once, instead of a 1 s poll), written one at a time (SQLite has one writer).
        os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
        os.environ.setdefault("MLFLOW_ASYNC_LOGGING_THREADPOOL_SIZE", "1")
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        try:
            experiment_id = _experiment_id(client, experiment)
        except Exception as exc:  # a login the server refuses, or a bad store
            raise UserError(f"tracking.uri {redact(uri)}: {_refusal(exc, experiment)}") from None
        return cls(client, experiment_id, uri)

    # -- runs ---------------------------------------------------------------------------
    def start_run(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
        parent_id: str | None = None,
    ) -> str:
        from mlflow.entities import Param

        all_tags = {RUN_NAME_TAG: name, **(tags or {})}
        if parent_id:
            all_tags[PARENT_TAG] = parent_id
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()}
        )
        run_id = run.info.run_id
        items = [Param(k, str(v)) for k, v in (params or {}).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])
        return run_id

    def end_run(
        self, run_id: str, status: str = "FINISHED", tags: dict[str, Any] | None = None
    ) -> None:
        from mlflow.entities import RunTag

        self._wait_for(run_id)
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
        self.client.set_terminated(run_id, status)

    def _wait_for(self, run_id: str) -> None:
        """Wait until the run's per-epoch metrics are written. A batch the store refused
        in the background (say, SQLite busy) is written again here, synchronously; one
        refused twice is a warning, and the run still ends."""
        for operations, metrics in self._pending.pop(run_id, []):
            try:
                operations.wait()
            except Exception:  # MLflow logged why; try once more, in the foreground
                try:
                    self.client.log_batch(run_id, metrics=metrics)
                except Exception as exc:
                    log.warning("run %s: per-epoch metrics not logged: %s", run_id, exc)

    def reopen(self, run_id: str) -> None:
        """Mark a run RUNNING again (a resumed sweep's parent run)."""
        self.client.update_run(run_id, status="RUNNING")

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        self.client.log_batch(run_id, metrics=_flush(metrics, step))

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def download_artifact(self, run_id: str, path: str, dest: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, path, str(dest)))

    def log_history(self, run_id: str, history: dict[str, list[float]]) -> None:
        """Per-epoch metrics after the fact (a reused trial's, copied from its original)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(EPOCH_SERIES[k], float(v), now, step)
            for k, values in history.items()
            for step, v in enumerate(values)
            if k in EPOCH_SERIES
        ]
        for start in range(0, len(rows), 1000):
            self.client.log_batch(run_id, metrics=rows[start : start + 1000])

    def epoch_logger(self, run_id: str):
        """A Keras callback that logs each epoch's metrics in one batched call, in the
        background unless `asynchronous` is off."""
        import keras

        tracker = self

        class EpochLogger(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                logs = {EPOCH_SERIES[k]: v for k, v in (logs or {}).items() if k in EPOCH_SERIES}
                metrics = _flush(logs, epoch)
                if not tracker.asynchronous:
                    tracker.client.log_batch(run_id, metrics=metrics)
                    return
                operations = tracker.client.log_batch(run_id, metrics=metrics, synchronous=False)
                if operations is not None:  # None: nothing to log
                    tracker._pending.setdefault(run_id, []).append((operations, metrics))

        return EpochLogger()

    def runs_under(self, parent_id: str, status: str | None = None) -> list:
        query = f"tags.`{PARENT_TAG}` = '{parent_id}'"
        if status:
            query += f" and attributes.status = '{status}'"
        return self.client.search_runs([self.experiment_id], query, max_results=50000)

    # -- models ---------------------------------------------------------------------------
    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_keras_model(
        self,
        run_id: str,
        model,
        example: np.ndarray,
        registered_name: str | None = None,
        alias: str = "champion",
        model_name: str = "model",
        version_tags: dict[str, Any] | None = None,
        description: str = "",
    ) -> str:
        """Log `model` with a signature under `run_id` (the run that trained it) as
        `model_name`; optionally register it as `registered_name@alias`, with tags and a
        description on the version. When that alias already points at this run's
        `model_name`, nothing is logged again: a rerun registers no new version."""
        import keras
        import mlflow
        import tensorflow as tf
        from mlflow.models import infer_signature

        if registered_name:
            current = self._version(registered_name, alias)
            if current and (current.run_id, current.tags.get("model_name")) == (run_id, model_name):
                return current.source
        signature = infer_signature(example, np.asarray(model.predict(example, verbose=0)))
        # Naming the requirements skips MLflow's inference, a subprocess that imports
        # TensorFlow again (about 6 s per call here).
        requirements = [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}"]
        status = self.client.get_run(run_id).info.status
        with mlflow.start_run(run_id=run_id), _quiet():
            info = mlflow.keras.log_model(
                model,
                name=model_name,
                signature=signature,
                pip_requirements=requirements,
                registered_model_name=registered_name,
            )
        self.client.set_terminated(run_id, status)  # as it was: a trial's run stays FINISHED
        if registered_name:
            versions = self.client.search_model_versions(f"name='{registered_name}'")
            mine = [v for v in versions if v.run_id == run_id] or versions
            latest = max(mine, key=lambda v: int(v.version))
            for key, value in {**(version_tags or {}), "model_name": model_name}.items():
                self.client.set_model_version_tag(registered_name, latest.version, key, str(value))
            if description:
                self.client.update_model_version(registered_name, latest.version, description)
            self.client.set_registered_model_alias(registered_name, alias, latest.version)
        return info.model_uri

    def _version(self, registered_name: str, alias: str):
        """The version `alias` points at, or None."""
        try:
            return self.client.get_model_version_by_alias(registered_name, alias)
        except Exception:  # no such model or alias yet
            return None


# Keras's per-epoch names -> the series' names on a run. A run's `val_accuracy` is the
# score of the weights it keeps (a trial's objective); the series must not look like it.
EPOCH_SERIES = {k: f"epoch_{k}" for k in ("loss", "accuracy", "val_loss", "val_accuracy")}


@contextlib.contextmanager
def _quiet():
    """MLflow prints registry chatter ("Successfully registered model ...") itself."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
