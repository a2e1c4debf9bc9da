"""Optuna storages: which one a URL names, how it is opened, and what happens to a dead
worker's trial on a shared one. `pipeline.studies` is the only other module that imports
Optuna.

SQLite serialises writes on one machine; PostgreSQL/MySQL use Optuna's heartbeat (a stale
trial is queued again once); Redis holds Optuna's journal storage. The Redis password comes
from the environment, never from the URL in `params.yaml`.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from urllib.parse import quote, urlsplit, urlunsplit

import optuna

from pipeline.errors import UserError, redact


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


def with_redis_password(url: str) -> str:
    """`url` with `REDIS_PASSWORD` from the environment, when it names none itself."""
    password, parts = os.environ.get("REDIS_PASSWORD"), urlsplit(url)
    if not password or parts.password or parts.scheme == "unix":
        return url
    user = quote(parts.username or "", safe="")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}"))


def with_driver(url: str) -> str:
    """SQLAlchemy >= 2.1 reads a bare `postgresql://` as psycopg 3; this project installs
    psycopg2, so name it unless psycopg 3 is there."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None:
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url
