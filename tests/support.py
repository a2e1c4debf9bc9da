"""What the tests share: a throwaway project (params, stores, experiments, read-back),
the services (PostgreSQL, Redis, a real `mlflow server`), free ports, polling and process
control. Fixtures live in `conftest.py`; plain helpers live here, imported by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PARENT_TAG = "mlflow.parentRunId"
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


# -- params --------------------------------------------------------------------------------
def _merge(base: dict, changes: dict) -> dict:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_params_file(path: Path, **sections: Any) -> Path:
    """Write a params file at `path`: the repository's `params.yaml` with `sections` merged
    in (nested keys override one by one). Returns `path`."""
    base = yaml.safe_load((REPO_ROOT / "params.yaml").read_text()) or {}
    path.write_text(yaml.safe_dump(_merge(base, sections), sort_keys=False))
    return path


# -- processes, ports, polling -------------------------------------------------------------
def subprocess_env(cwd: Path | None = None) -> dict[str, str]:
    """The environment for a subprocess: this interpreter's scripts (`ablate`, `dvc`) first
    on PATH, and the `pipeline` package imported from `cwd` when it has one."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    if cwd is not None and (cwd / "pipeline").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), env.get("PYTHONPATH")]))
    env["DVC_NO_ANALYTICS"] = "1"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(
    found: Callable[[], Any],
    timeout: float,
    what: str,
    explain: Callable[[], str] = str,
    poll: float = 0.1,
) -> Any:
    """Call `found()` until it returns something truthy and return that; fail the test
    after `timeout` seconds, saying `what` did not happen and `explain()`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = found()
        if result:
            return result
        time.sleep(poll)
    pytest.fail(f"{what} within {timeout:.0f}s:\n{explain()}")


def stop_process_group(process: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM the process's own group (it and whatever it started), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # children left behind by the parent


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


# -- services ------------------------------------------------------------------------------
def unavailable(reason: str) -> None:
    """Skip, except in CI where a missing service is a broken setup, not a reason."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: services are required)")
    pytest.skip(reason)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running_mlflow_server(
    root: Path, backend_store_uri: str, admin_password: str | None = None
) -> Iterator[str]:
    """Start `mlflow server` on a free 127.0.0.1 port with `backend_store_uri` and artifacts
    proxied through it into `root/artifacts`; yield its URL; stop its process group.

    With `admin_password`, the server runs MLflow's basic authentication (`--app-name
    basic-auth`): user `admin` with that password, and no access for anyone else until
    granted (`default_permission = NO_PERMISSIONS`)."""
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        url.rsplit(":", 1)[1],
        "--workers",
        "1",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
    ]
    # No background job runners (huey consumers): nothing here uses them, CPUs are few.
    env = {**subprocess_env(root), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if admin_password is not None:
        config = root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{root / 'auth.db'}\n"
            "admin_username = admin\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        )
        command += ["--app-name", "basic-auth"]
        env |= {
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),  # its CSRF tokens
        }
    log = root / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:

        def up() -> bool:
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited with {process.returncode}:\n{tail(log)}")
            return _healthy(url)

        wait_for(up, 120, f"mlflow server at {url} not healthy", lambda: tail(log), poll=0.3)
        yield url
    finally:
        stop_process_group(process)


class Postgres:
    """Throwaway databases on the local server, dropped by `drop_all`."""

    def __init__(self, user: str, admin):
        self.user, self._admin, self._created = user, admin, []

    @classmethod
    def connect(cls) -> Postgres:
        """As the first of `postgres`, `root` that the server trusts (skip if none)."""
        import psycopg2

        errors = []
        for user in ("postgres", "root"):
            try:
                admin = psycopg2.connect(
                    host=PG_HOST, port=PG_PORT, user=user, dbname="test", connect_timeout=3
                )
                break
            except psycopg2.Error as exc:
                errors.append(f"{user}: {str(exc).strip().splitlines()[0]}")
        else:
            unavailable(f"PostgreSQL at {PG_HOST}:{PG_PORT} (database test): {'; '.join(errors)}")
        admin.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
        return cls(user, admin)

    def create(self) -> str:
        name = f"ablate_{uuid.uuid4().hex[:12]}"
        with self._admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return name

    def url(self, database: str, driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{PG_HOST}:{PG_PORT}/{database}"

    def drop_all(self) -> None:
        with self._admin.cursor() as cursor:
            for name in self._created:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._admin.close()


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """`redis://127.0.0.1:6379/N` on a database index nobody was using, flushed afterwards.
    The pipeline's journal keys carry no prefix, so the index is what keeps studies apart."""
    redis = pytest.importorskip("redis")
    claim = f"ablate-test-claim:{uuid.uuid4().hex}"
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        unavailable(f"Redis at {REDIS_HOST}:{REDIS_PORT}: {exc}")
    for index in random.sample(range(1, 16), 15):
        db = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=index)
        if db.dbsize() == 0 and db.set(claim, "1", nx=True) and db.dbsize() == 1:
            break
    else:
        unavailable("Redis: no empty database index among 1..15 to use")
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{index}"
    finally:
        db.flushdb()
        db.close()


# -- a throwaway project -------------------------------------------------------------------
@dataclass
class Project:
    """One folder holding `params.yaml`, `experiments/`, the Optuna and MLflow stores (or
    URLs of shared ones), models and metrics, with ways to run the pipeline in it and to
    read every store back."""

    root: Path
    prepared: Path
    storage: str = ""
    tracking_uri: str = ""
    tracking_experiment: str = "conv-ablation"
    procs: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.storage = self.storage or f"sqlite:///{self.root}/optuna.db"
        self.tracking_uri = self.tracking_uri or f"sqlite:///{self.root}/mlflow.db"
        (self.root / "experiments").mkdir(parents=True, exist_ok=True)

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    def add_experiment(self, name: str, text: str | None = None) -> None:
        """`experiments/<name>.yaml`: `text`, or the repository's file of that name."""
        path = self.root / "experiments" / f"{name}.yaml"
        if text is None:
            text = (REPO_ROOT / "experiments" / f"{name}.yaml").read_text()
        path.write_text(text)

    def configure(self, **sections: Any) -> None:
        """The repository's params with every path in this folder, these stores, and
        `sections` merged in."""
        folders = {
            k: str(self.root / k)
            for k in ("raw", "models", "metrics", "reports", "submissions", "experiments")
        }
        defaults = {
            "paths": {**folders, "prepared": str(self.prepared)},
            "tracking": {"uri": self.tracking_uri, "experiment": self.tracking_experiment},
            "sweep": {"storage": self.storage},
        }
        write_params_file(self.params, **_merge(defaults, sections))

    def config(self):
        from pipeline.config import load_config

        return load_config(self.params)

    # running
    def sweep(self, experiment: str = "padding") -> dict[str, Any]:
        """`ablate sweep` in this process."""
        from pipeline import sweep

        return sweep.main(self.config(), experiment)

    def cli(self, *args: str) -> int:
        from pipeline import cli

        return cli.main([*args, "--params", str(self.params)])

    def start(self, *args: str, name: str) -> subprocess.Popen:
        """`ablate ARGS --params ...` in the background in its own process group, output
        to `<name>.log`; stopped by `stop_all`."""
        with (self.root / f"{name}.log").open("w") as out:
            proc = subprocess.Popen(
                ["ablate", *args, "--params", str(self.params)],
                cwd=self.root,
                env=subprocess_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def wait(self, *procs: subprocess.Popen, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(max(1.0, deadline - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout:.0f}s:\n{self.logs()}")

    def stop_all(self) -> None:
        for proc in self.procs:
            stop_process_group(proc, grace=5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{tail(p)}" for p in sorted(self.root.glob("*.log")))

    # reading back
    def job(self, experiment: str = "padding"):
        from pipeline.trial import Job

        return Job.load(self.config(), experiment)

    def study_name(self, experiment: str = "padding") -> str:
        return self.job(experiment).study_name

    def study(self, name: str | None = None, experiment: str = "padding"):
        """The Optuna study `name` (default: this experiment's only study)."""
        import optuna

        from pipeline.studies import make_storage

        storage = make_storage(self.storage, 10)
        if name is None:
            (name,) = [
                n for n in optuna.get_all_study_names(storage) if n.startswith(f"{experiment}-")
            ]
        return optuna.load_study(study_name=name, storage=storage)

    def metrics(self, experiment: str = "padding") -> dict[str, Any]:
        return json.loads((self.root / "metrics" / "sweeps" / f"{experiment}.json").read_text())

    def model_file(self, experiment: str = "padding") -> Path:
        return self.root / "models" / "sweeps" / experiment / "best.keras"

    @property
    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def runs(self, query: str = "") -> list:
        experiment = self.client.get_experiment_by_name(self.tracking_experiment)
        assert experiment is not None, f"no MLflow experiment {self.tracking_experiment}"
        return self.client.search_runs([experiment.experiment_id], query, max_results=1000)

    def parent(self, study):
        from pipeline.studies import PARENT_ATTR

        return self.client.get_run(study.user_attrs[PARENT_ATTR])

    def children(self, study) -> dict[int, Any]:
        """Child runs of the study's parent run by trial number; one per trial, no more."""
        from pipeline.studies import PARENT_ATTR

        runs = self.runs(f"tags.`{PARENT_TAG}` = '{study.user_attrs[PARENT_ATTR]}'")
        numbers = [int(r.data.tags["trial_number"]) for r in runs]
        assert len(numbers) == len(set(numbers)), f"several runs for one trial: {numbers}"
        return {int(r.data.tags["trial_number"]): r for r in runs}
