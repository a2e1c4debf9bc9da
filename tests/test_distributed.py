"""Scale out: several workers on one study through a shared Optuna storage (PostgreSQL, or
Redis through Optuna's journal storage) and a real `mlflow server` with proxied artifacts.

Every worker is a real process (`ablate sweep --n-workers 3`, or `ablate sweep` next to
`ablate worker`s), as on separate machines: they share only the storage URL and the
tracking server, never a disk. The checks are the scale-out promises: the budget is met
exactly, no trial number or grid point twice, one MLflow child run per trial under one
parent, nothing left RUNNING, and a worker killed mid-trial costs one failed trial that
is retried. Needs PostgreSQL and Redis on 127.0.0.1 (default ports, trust auth); without
them the tests skip, except under `CI=true` where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from conftest import running_mlflow_server, write_params_file
from optuna.trial import TrialState

from pipeline import sweep
from pipeline.experiments import load_experiment
from pipeline.fetch import write_embedded
from pipeline.params import PrepareParams
from pipeline.prepare import prepare, save_prepared

PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
PARENT_TAG = "mlflow.parentRunId"
# 2 levels x 3 seeds: two trials per worker when three share it.
GRID = """\
# Run: ablate sweep --experiment {name} --storage URL --tracking-uri URL --n-workers 3
factors:
  padding: [valid, same]
repeats: 3
sampler: grid
pruner: none
"""
BUDGET = 6
TIMEOUT = 300.0


def _unavailable(reason: str) -> None:
    """Skip, except in CI where a missing service is a broken setup, not a reason."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: services are required)")
    pytest.skip(reason)


# -- services --------------------------------------------------------------------------------------
class Postgres:
    """Throwaway databases on the local server, dropped when the module is done."""

    def __init__(self, user: str, admin):
        self.user = user
        self._admin = admin
        self._created: list[str] = []

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


@pytest.fixture(scope="module")
def postgres():
    """A `Postgres` connected as the first of `postgres`, `root` that the server trusts."""
    import psycopg2

    errors = []
    for user in ("postgres", "root"):
        try:
            admin = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=user, dbname="test",
                                     connect_timeout=3)
            break
        except psycopg2.Error as exc:
            errors.append(f"{user}: {str(exc).strip().splitlines()[0]}")
    else:
        _unavailable(f"PostgreSQL at {PG_HOST}:{PG_PORT} (database test): {'; '.join(errors)}")
    admin.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    server = Postgres(user, admin)
    try:
        yield server
    finally:
        server.drop_all()


@pytest.fixture(scope="module")
def optuna_pg(postgres) -> str:
    """A fresh PostgreSQL database as an Optuna storage URL, as a user writes it."""
    return postgres.url(postgres.create())


@pytest.fixture(scope="module")
def redis_url():
    """`redis://127.0.0.1:6379/N` on a database index nobody was using, flushed afterwards.
    The pipeline's journal keys carry no prefix, so the index is what keeps studies apart."""
    redis = pytest.importorskip("redis")
    claim = f"ablate-test-claim:{uuid.uuid4().hex}"
    try:
        redis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        _unavailable(f"Redis at {REDIS_HOST}:{REDIS_PORT}: {exc}")
    for index in random.sample(range(1, 16), 15):
        db = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=index)
        if db.dbsize() == 0 and db.set(claim, "1", nx=True) and db.dbsize() == 1:
            break
    else:
        _unavailable("Redis: no empty database index among 1..15 to use")
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{index}"
    finally:
        db.flushdb()
        db.close()


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@dataclass(frozen=True)
class Server:
    url: str
    artifacts: Path


@pytest.fixture(scope="module")
def pg_mlflow_server(postgres, tmp_path_factory) -> Server:
    """A real `mlflow server` with a PostgreSQL backend store and proxied artifacts
    (`--serve-artifacts`): workers upload and download checkpoints through HTTP only."""
    root = tmp_path_factory.mktemp("mlflow-pg")
    backend = postgres.url(postgres.create(), driver="psycopg2")
    with running_mlflow_server(root, backend, _subprocess_env()) as url:
        yield Server(url, root / "artifacts")


def _stop(process: subprocess.Popen) -> None:
    """End a process started here, with whatever it started (its own process group)."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
            return


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


# -- the project every worker shares ---------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """The embedded 8x8 digits, fetched and prepared once (read-only for the workers)."""
    root = tmp_path_factory.mktemp("digits")
    raw = root / "raw" / "digit-recognizer"
    raw.mkdir(parents=True)
    write_embedded(raw)
    data, _ = prepare(raw, "digit-recognizer", PrepareParams())
    save_prepared(data, root / "prepared")
    return root / "prepared"


@dataclass
class Project:
    """One study's folder: `params.yaml`, `experiments/<name>.yaml`, models, metrics, and
    one log file per process started in it."""

    root: Path
    experiment: str
    storage: str
    server: Server

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    def start(self, command: str, *extra: str, name: str) -> subprocess.Popen:
        """`ablate COMMAND --experiment ... --storage ... --tracking-uri ...` in the
        background, in its own process group; output to `<name>.log`."""
        args = ["ablate", command, "--params", str(self.params),
                "--experiment", self.experiment, "--storage", self.storage,
                "--tracking-uri", self.server.url, *extra]
        with (self.root / f"{name}.log").open("w") as out:
            return subprocess.Popen(args, cwd=self.root, env=_subprocess_env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{_tail(p)}" for p in sorted(self.root.glob("*.log")))

    def wait(self, *procs: subprocess.Popen, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        try:
            return [p.wait(max(1.0, deadline - time.monotonic())) for p in procs]
        except subprocess.TimeoutExpired:
            pytest.fail(f"workers still running after {timeout:.0f}s:\n{self.logs()}")

    def storage_object(self):
        return sweep.make_storage(self.storage, 10)

    def study(self, storage=None) -> optuna.Study:
        storage = storage or self.storage_object()
        (summary,) = [s for s in optuna.get_all_study_summaries(storage)
                      if s.study_name.startswith(f"{self.experiment}-")]
        return optuna.load_study(study_name=summary.study_name, storage=storage)

    @property
    def tracking_experiment(self) -> str:
        return f"distributed-{self.experiment}"

    def runs(self) -> list:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.server.url)
        found = client.get_experiment_by_name(self.tracking_experiment)
        assert found is not None, f"no MLflow experiment {self.tracking_experiment}"
        return client.search_runs([found.experiment_id], "", max_results=1000)


@pytest.fixture
def make_project(tmp_path, prepared):
    """`make_project(name, storage, server)`: a project whose params point every path into
    `tmp_path`, with the 6-trial grid `experiments/<name>.yaml` and two epochs a trial."""

    def make(name: str, storage: str, server: Server, epochs: int = 2) -> Project:
        folders = {k: str(tmp_path / k) for k in ("raw", "models", "metrics", "reports",
                                                 "submissions", "experiments")}
        write_params_file(
            tmp_path / "params.yaml",
            paths={**folders, "prepared": str(prepared)},
            data={"source": "embedded"},
            train={"epochs": epochs},
            tracking={"uri": server.url, "experiment": f"distributed-{name}"},
            sweep={"storage": storage, "n_workers": 1},
        )
        (tmp_path / "experiments").mkdir()
        (tmp_path / "experiments" / f"{name}.yaml").write_text(GRID.format(name=name))
        return Project(tmp_path, name, storage, server)

    return make


# -- what every distributed study must satisfy -----------------------------------------------------
def _owner_pid(trial) -> int | None:
    host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def check_study(project: Project, study: optuna.Study) -> dict:
    """The scale-out promises; returns facts the caller may check further."""
    trials = study.get_trials()
    states = Counter(t.state.name for t in trials)
    assert states["RUNNING"] == states["WAITING"] == 0, states
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), f"duplicate trial numbers: {numbers}"

    retried = {t.system_attrs["failed_trial"]: t for t in trials
               if "failed_trial" in t.system_attrs}
    slots = [t for t in trials if t.number not in retried]
    assert len(slots) == BUDGET, f"{len(slots)} budget slots: {states}"
    assert all(t.state.is_finished() for t in slots)
    assert len(trials) == BUDGET + len(retried)
    for number in retried:
        assert study.trials[number].state == TrialState.FAIL

    experiment = load_experiment(project.root / "experiments", project.experiment)
    points = [json.dumps(t.params, sort_keys=True) for t in slots]
    assert len(points) == len(set(points)), f"a grid point ran twice: {points}"
    assert set(points) == {json.dumps(p, sort_keys=True) for p in experiment.grid()}

    # MLflow: one parent, one child run per trial (retries included), none left RUNNING
    runs = project.runs()
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert [r.info.run_id for r in parents] == [study.user_attrs[sweep.PARENT_ATTR]]
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    per_trial = Counter(int(r.data.tags["trial_number"]) for r in children)
    assert per_trial == Counter(numbers), "not exactly one child run per trial"
    by_number = {int(r.data.tags["trial_number"]): r for r in children}
    for trial in trials:
        assert by_number[trial.number].info.run_id == trial.user_attrs["mlflow_run_id"]
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []

    # the best checkpoint went up to the server and came back down through it
    best = study.best_trial
    best_run = by_number[best.number]
    assert best_run.info.artifact_uri.startswith("mlflow-artifacts:"), best_run.info.artifact_uri
    uploaded = list(project.server.artifacts.rglob(
        f"{best_run.info.run_id}/artifacts/{sweep.CHECKPOINT}"))
    assert len(uploaded) == 1
    downloaded = project.root / "models" / project.experiment / "best.keras"
    assert zipfile.is_zipfile(downloaded)
    assert downloaded.read_bytes() == uploaded[0].read_bytes()

    metrics = json.loads((project.root / "metrics" / f"{project.experiment}.json").read_text())
    assert metrics["study"] == study.study_name
    assert metrics["n_complete"] + metrics["n_pruned"] + metrics["n_failed"] == BUDGET
    return {"trials": trials, "retried": retried, "children": by_number,
            "owners": {_owner_pid(t) for t in trials if t.state == TrialState.COMPLETE}}


def kill_mid_trial(project: Project, candidates, storage, sweep_proc: subprocess.Popen,
                   timeout: float = 180.0):
    """SIGKILL the first of `candidates()` (pids) seen owning a RUNNING trial that already
    has its MLflow run; returns (pid, trial number)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sweep_proc.poll() is not None:
            pytest.fail(f"the sweep ended before a worker could be killed:\n{project.logs()}")
        with contextlib.suppress(KeyError, ValueError):  # the study is not there yet
            study = project.study(storage)
            pids = candidates()
            for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                pid = _owner_pid(trial)
                if pid in pids and "mlflow_run_id" in trial.user_attrs:
                    os.kill(pid, signal.SIGKILL)
                    return pid, trial.number
        time.sleep(0.1)
    pytest.fail(f"no worker held a running trial within {timeout:.0f}s:\n{project.logs()}")


def check_recovered(found: dict, victim: int) -> None:
    """The killed worker's trial failed, was retried once, and its run was closed."""
    assert found["trials"][victim].state == TrialState.FAIL
    assert "died during the trial" in found["trials"][victim].user_attrs["error"]
    assert victim in found["retried"], "the killed trial was not re-queued"
    assert found["retried"][victim].state.is_finished()
    killed_run = found["children"][victim]
    assert killed_run.info.status == "FAILED"
    assert "died during the trial" in killed_run.data.tags["error"]


# -- the tests ------------------------------------------------------------------------------------
def test_three_workers_share_a_postgresql_study(make_project, optuna_pg, pg_mlflow_server):
    project = make_project("scale_pg", optuna_pg, pg_mlflow_server)
    sweep_proc = project.start("sweep", "--n-workers", "3", name="sweep")
    try:
        assert project.wait(sweep_proc) == [0], project.logs()
    finally:
        _stop(sweep_proc)

    found = check_study(project, project.study())
    assert found["retried"] == {}
    assert None not in found["owners"], "a trial without this host's worker pid"
    assert len(found["owners"]) > 1, f"one worker ran everything: {found['owners']}"
    assert sweep_proc.pid not in found["owners"], "the sweep itself trained with 3 workers"


@pytest.mark.slow
def test_a_killed_worker_costs_one_retried_trial_on_postgresql(make_project, optuna_pg,
                                                              pg_mlflow_server):
    import psutil

    project = make_project("kill_pg", optuna_pg, pg_mlflow_server, epochs=3)
    sweep_proc = project.start("sweep", "--n-workers", "3", name="sweep")
    try:
        # a worker process of the sweep: its parent reaps it late, a zombie meanwhile
        victim_pid, victim = kill_mid_trial(
            project, lambda: {c.pid for c in psutil.Process(sweep_proc.pid).children()},
            project.storage_object(), sweep_proc)
        assert project.wait(sweep_proc) == [0], project.logs()
    finally:
        _stop(sweep_proc)

    found = check_study(project, project.study())
    check_recovered(found, victim)
    assert victim_pid not in found["owners"]


def test_redis_workers_meet_the_budget_and_recover_a_killed_one(make_project, redis_url,
                                                                pg_mlflow_server):
    project = make_project("scale_redis", redis_url, pg_mlflow_server, epochs=3)
    procs = [project.start("sweep", name="sweep")]
    procs += [project.start("worker", name=f"worker{i}") for i in (1, 2)]
    try:
        victim_pid, victim = kill_mid_trial(
            project, lambda: {p.pid for p in procs[1:]}, project.storage_object(), procs[0])
        killed = next(p for p in procs if p.pid == victim_pid)
        assert project.wait(killed, timeout=10) == [-signal.SIGKILL]  # reaped: pid is gone
        rest = [p for p in procs if p is not killed]
        assert project.wait(*rest) == [0, 0], project.logs()
    finally:
        for proc in procs:
            _stop(proc)

    found = check_study(project, project.study())
    check_recovered(found, victim)
    assert len(found["owners"] - {None}) > 1, f"one worker ran everything: {found['owners']}"
