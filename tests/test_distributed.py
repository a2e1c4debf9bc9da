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

import json
import os
import signal
import socket
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from support import Postgres, Project, redis_database, running_mlflow_server, wait_for

from pipeline.experiments import load_experiment
from pipeline.studies import PARENT_ATTR, Study
from pipeline.trial import CHECKPOINT

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


# -- services ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def postgres():
    server = Postgres.connect()
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
    with redis_database() as url:
        yield url


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
    with running_mlflow_server(root, backend) as url:
        yield Server(url, root / "artifacts")


@pytest.fixture
def make_project(tmp_path, prepared_digits):
    """`make_project(name, storage, server)`: a project on the shared storage and tracking
    server, with the 6-trial grid `experiments/<name>.yaml` and two epochs a trial. Every
    process it started is stopped afterwards."""
    made = []

    def make(name: str, storage: str, server: Server, epochs: int = 2, **sweep) -> Project:
        project = Project(tmp_path, prepared_digits, storage, server.url, f"distributed-{name}")
        project.add_experiment(name, GRID.format(name=name))
        project.configure(
            data={"source": "embedded"}, train={"epochs": epochs}, sweep={"n_workers": 1, **sweep}
        )
        made.append(project)
        return project

    yield make
    for project in made:
        project.stop_all()


# -- what every distributed study must satisfy -----------------------------------------------------
def _owner_pid(trial) -> int | None:
    host, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def check_study(project: Project, experiment: str, server: Server) -> dict:
    """The scale-out promises; returns facts the caller may check further."""
    study = project.study(experiment=experiment)
    trials = study.get_trials()
    states = Counter(t.state.name for t in trials)
    assert states["RUNNING"] == states["WAITING"] == 0, states
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), f"duplicate trial numbers: {numbers}"

    retried = {
        t.system_attrs["failed_trial"]: t for t in trials if "failed_trial" in t.system_attrs
    }
    slots = [t for t in trials if t.number not in retried]
    assert len(slots) == BUDGET, f"{len(slots)} budget slots: {states}"
    assert all(t.state.is_finished() for t in slots)
    assert len(trials) == BUDGET + len(retried)
    for number in retried:
        assert study.trials[number].state == TrialState.FAIL

    spec = load_experiment(project.root / "experiments", experiment)
    points = [json.dumps(t.params, sort_keys=True) for t in slots]
    assert len(points) == len(set(points)), f"a grid point ran twice: {points}"
    assert set(points) == {json.dumps(p, sort_keys=True) for p in spec.grid()}

    # MLflow: one parent, one child run per trial (retries included), none left RUNNING
    runs = project.runs()
    parents = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert [r.info.run_id for r in parents] == [study.user_attrs[PARENT_ATTR]]
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
    uploaded = list(server.artifacts.rglob(f"{best_run.info.run_id}/artifacts/{CHECKPOINT}"))
    assert len(uploaded) == 1
    downloaded = project.model_file(experiment)
    assert zipfile.is_zipfile(downloaded)
    assert downloaded.read_bytes() == uploaded[0].read_bytes()

    metrics = project.metrics(experiment)
    assert metrics["study"] == study.study_name
    assert metrics["n_complete"] + metrics["n_pruned"] + metrics["n_failed"] == BUDGET
    return {
        "trials": trials,
        "retried": retried,
        "children": by_number,
        "owners": {_owner_pid(t) for t in trials if t.state == TrialState.COMPLETE},
    }


def kill_mid_trial(
    project: Project, experiment: str, candidates, sweep_proc, timeout: float = 180.0
):
    """SIGKILL the first of `candidates()` (pids) seen owning a RUNNING trial that already
    has its MLflow run; returns (pid, trial number)."""

    def victim():
        if sweep_proc.poll() is not None:
            pytest.fail(f"the sweep ended before a worker could be killed:\n{project.logs()}")
        try:
            study = project.study(experiment=experiment)
        except ValueError:  # the study is not there yet
            return None
        pids = candidates()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = _owner_pid(trial)
            if pid in pids and "mlflow_run_id" in trial.user_attrs:
                os.kill(pid, signal.SIGKILL)
                return pid, trial.number
        return None

    return wait_for(victim, timeout, "no worker held a running trial", project.logs)


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
    # Each worker process may run at most two trials: six trials need all three, whichever
    # of them starts first.
    project = make_project("scale_pg", optuna_pg, pg_mlflow_server, trials_per_process=2)
    sweep_proc = project.start(
        "sweep", "--experiment", "scale_pg", "--n-workers", "3", name="sweep"
    )
    assert project.wait(sweep_proc) == [0], project.logs()

    found = check_study(project, "scale_pg", pg_mlflow_server)
    assert found["retried"] == {}
    assert None not in found["owners"], "a trial without this host's worker pid"
    assert sweep_proc.pid not in found["owners"], "the sweep itself trained with 3 workers"
    per_worker = Counter(_owner_pid(t) for t in found["trials"])
    assert max(per_worker.values()) <= 2, f"a worker ran more than its share: {per_worker}"
    assert len(per_worker) >= 3, f"fewer than three workers ran trials: {per_worker}"


@pytest.mark.slow
def test_a_killed_worker_costs_one_retried_trial_on_postgresql(
    make_project, optuna_pg, pg_mlflow_server
):
    import psutil

    project = make_project("kill_pg", optuna_pg, pg_mlflow_server, epochs=3)
    sweep_proc = project.start("sweep", "--experiment", "kill_pg", "--n-workers", "3", name="sweep")
    # a worker process of the sweep: its parent reaps it late, a zombie meanwhile
    victim_pid, victim = kill_mid_trial(
        project,
        "kill_pg",
        lambda: {c.pid for c in psutil.Process(sweep_proc.pid).children()},
        sweep_proc,
    )
    assert project.wait(sweep_proc) == [0], project.logs()

    found = check_study(project, "kill_pg", pg_mlflow_server)
    check_recovered(found, victim)
    assert victim_pid not in found["owners"]


def test_redis_workers_meet_the_budget_and_recover_a_killed_one(
    make_project, redis_url, pg_mlflow_server
):
    project = make_project("scale_redis", redis_url, pg_mlflow_server, epochs=3)
    args = (
        "--experiment",
        "scale_redis",
        "--storage",
        redis_url,
        "--tracking-uri",
        pg_mlflow_server.url,
    )
    procs = [project.start("sweep", *args, name="sweep")]
    procs += [project.start("worker", *args, name=f"worker{i}") for i in (1, 2)]
    victim_pid, victim = kill_mid_trial(
        project, "scale_redis", lambda: {p.pid for p in procs[1:]}, procs[0]
    )
    killed = next(p for p in procs if p.pid == victim_pid)
    assert project.wait(killed, timeout=10) == [-signal.SIGKILL]  # reaped: pid is gone
    rest = [p for p in procs if p is not killed]
    assert project.wait(*rest) == [0, 0], project.logs()

    found = check_study(project, "scale_redis", pg_mlflow_server)
    check_recovered(found, victim)
    assert victim_pid not in found["owners"]


@pytest.mark.parametrize("store", ["sqlite", "postgresql", "redis"])
def test_every_storage_names_the_value_after_the_objective_once(
    store, request, tmp_path, monkeypatch
):
    """optuna-dashboard labels a study's value with its metric name: the experiment's
    objective, set when the sweep creates the study and left alone when it reopens it."""
    (tmp_path / "named.yaml").write_text(GRID.format(name="named"))
    experiment = load_experiment(tmp_path, "named")
    url = {
        "sqlite": lambda: f"sqlite:///{tmp_path / 'optuna.db'}",
        "postgresql": lambda: request.getfixturevalue("optuna_pg"),
        "redis": lambda: request.getfixturevalue("redis_url"),
    }[store]()
    created = Study.open(url, "named-metric", 10, experiment, create=True)
    writes = []
    monkeypatch.setattr(optuna.Study, "set_metric_names", lambda _, names: writes.append(names))
    reopened = Study.open(url, "named-metric", 10, experiment, create=True)

    assert created.optuna.metric_names == reopened.optuna.metric_names == ["val_accuracy"]
    assert writes == []


def test_a_claim_lost_to_another_handle_takes_the_next_trial(tmp_path, monkeypatch):
    """Two handles on one storage, the second with a stale view of the queue (it listed
    the WAITING trials before the first claimed one): the storage's state change lets one
    claim win, so the second takes another trial, and the queue is never run twice."""
    from pipeline.experiments import parse_experiment

    experiment = parse_experiment(
        "padding", {"factors": {"padding": ["valid", "same"]}, "repeats": 2}, "padding.yaml"
    )
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = Study.open(url, "race", 10, experiment, create=True)
    assert first.fill_queue(experiment) == 4
    second = Study.open(url, "race", 10, experiment)
    stale = second.optuna.get_trials(deepcopy=False, states=(TrialState.WAITING,))

    won = first.claim()
    monkeypatch.setattr(second.optuna, "get_trials", lambda **kwargs: stale)
    lost_then_next = second.claim()
    monkeypatch.undo()

    assert won.number == stale[0].number
    assert lost_then_next.number == stale[1].number
    rest = [first.claim(), second.claim()]
    assert sorted(t.number for t in [won, lost_then_next, *rest]) == [0, 1, 2, 3]
    assert first.claim() is None and second.claim() is None
