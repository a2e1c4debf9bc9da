"""Interruption is normal: a real `ablate sweep` stopped by a signal while a trial trains
leaves nothing RUNNING in Optuna or MLflow and exits 128 + the signal; the rerun trains
exactly the grid points that have no finished trial, once each."""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from optuna.trial import TrialState
from support import Project, wait_for

import pipeline.train


def _training(project: Project, pid: int | None = None) -> int:
    """The number of a RUNNING trial that has logged an epoch (in process `pid`, when
    given), once there is one."""

    def found():
        try:
            study = project.study()
        except (KeyError, ValueError):  # not created yet
            return None
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if pid is not None and not t.user_attrs.get("worker", "").endswith(f":{pid}"):
                continue
            run_id = t.user_attrs.get("mlflow_run_id")
            if run_id and project.client.get_metric_history(run_id, "epoch_loss"):
                return t.number + 1  # truthy for trial 0 too
        return None

    return wait_for(found, 240, "no trial trained an epoch", project.logs) - 1


@pytest.mark.parametrize(
    "signum, workers",
    [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)],
    ids=["ctrl-c", "sigterm", "ctrl-c-two-workers"],
)
def test_a_signal_ends_the_trial_in_flight_and_leaves_nothing_running(
    tmp_path, prepared_digits, signum, workers
):
    project = Project(tmp_path, prepared_digits)
    project.add_experiment("padding")
    # a trial far longer than the test: the signal lands while it trains
    project.configure(sweep={"n_trials": 4, "n_workers": workers}, train={"epochs": 2000})
    proc = project.start("sweep", "--experiment", "padding", name="sweep")
    try:
        victim = _training(project)
        if workers == 1:
            proc.send_signal(signum)  # `kill`, or a scheduler stopping the job
        else:
            os.killpg(proc.pid, signum)  # a terminal's Ctrl-C: the whole process group
        assert project.wait(proc, timeout=120) == [128 + signum], project.logs()
    finally:
        project.stop_all()

    study = project.study()
    assert study.get_trials(states=(TrialState.RUNNING,)) == [], project.logs()
    cut = study.trials[victim]
    assert cut.state == TrialState.FAIL
    assert (cut.user_attrs["error"], cut.user_attrs["fail_kind"]) == ("interrupted", "interrupted")
    assert project.client.get_run(cut.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert project.parent(study).info.status == "KILLED"
    assert [r.info.run_name for r in project.runs() if r.info.status == "RUNNING"] == []


def test_a_hangup_ends_a_worker_alone_and_its_trial(tmp_path, prepared_digits):
    """`ablate worker` on another terminal that closes (SIGHUP): its trial ends FAIL
    "interrupted" and its run KILLED, while the sweep's own trial trains on."""
    project = Project(tmp_path, prepared_digits)
    project.add_experiment("padding")
    project.configure(sweep={"n_trials": 4, "n_workers": 1}, train={"epochs": 2000})
    sweep = project.start("sweep", "--experiment", "padding", name="sweep")
    worker = project.start("worker", "--experiment", "padding", name="worker")
    try:
        victim = _training(project, worker.pid)
        worker.send_signal(signal.SIGHUP)
        assert project.wait(worker, timeout=120) == [128 + signal.SIGHUP], project.logs()
        study = project.study()
        assert study.trials[victim].state == TrialState.FAIL
        assert sweep.poll() is None  # the sweep is not the worker's to stop
        sweep.send_signal(signal.SIGTERM)
        assert project.wait(sweep, timeout=120) == [128 + signal.SIGTERM], project.logs()
    finally:
        project.stop_all()

    study = project.study()
    cut = study.trials[victim]
    assert (cut.user_attrs["error"], cut.user_attrs["fail_kind"]) == ("interrupted", "interrupted")
    assert project.client.get_run(cut.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert study.get_trials(states=(TrialState.RUNNING,)) == []
    assert [r.info.run_name for r in project.runs() if r.info.status == "RUNNING"] == []


def test_the_rerun_after_an_interruption_trains_every_grid_point_once(
    tmp_path, prepared_digits, monkeypatch
):
    """Ctrl-C in the second trial (Python's KeyboardInterrupt, raised mid-training); the
    rerun trains that point and the two never started, and nothing twice."""
    project = Project(tmp_path, prepared_digits)
    project.add_experiment("padding")
    project.configure(sweep={"n_trials": 4, "n_workers": 1}, train={"epochs": 2})
    monkeypatch.chdir(tmp_path)
    real_train, calls = pipeline.train.train, []

    def interrupted_in_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pipeline.train, "train", interrupted_in_the_second)
    with pytest.raises(KeyboardInterrupt):
        project.sweep()
    study = project.study()
    assert Counter(t.state.name for t in study.get_trials()) == {
        "COMPLETE": 1,
        "FAIL": 1,
        "WAITING": 2,
    }
    assert project.parent(study).info.status == "KILLED"

    summary = project.sweep()

    done = [
        (t.params["padding"], t.params["seed"])
        for t in study.get_trials()
        if t.state == TrialState.COMPLETE
    ]
    assert sorted(done) == [("same", 0), ("same", 1), ("valid", 0), ("valid", 1)]
    assert len(calls) == 5  # four points, one of them twice
    assert (summary["n_complete"], summary["n_failed"], summary["n_interrupted"]) == (4, 0, 1)
    assert project.parent(study).info.status == "FINISHED"
    assert [r.info.run_name for r in project.runs() if r.info.status == "RUNNING"] == []


def test_workers_end_with_a_sweep_killed_outright(tmp_path, prepared_digits):
    import psutil

    project = Project(tmp_path, prepared_digits)
    project.add_experiment("padding")
    project.configure(sweep={"n_trials": 4, "n_workers": 2}, train={"epochs": 2000})
    proc = project.start("sweep", "--experiment", "padding", name="sweep")
    try:
        victim = _training(project)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)  # the sweep alone: no chance to clean up
        proc.wait()
        gone, alive = psutil.wait_procs(workers, timeout=120)
        assert alive == [], project.logs()
    finally:
        project.stop_all()

    study = project.study()
    cut = study.trials[victim]
    assert (cut.state, cut.user_attrs["fail_kind"]) == (TrialState.FAIL, "interrupted")
    assert study.get_trials(states=(TrialState.RUNNING,)) == []
    assert project.client.get_run(cut.user_attrs["mlflow_run_id"]).info.status == "KILLED"


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs at `tmp_path/disk` (root only: skipped elsewhere); unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    with open(disk / "filler", "wb", buffering=0) as out, pytest.raises(OSError, match="No space"):
        while True:
            out.write(b"\0" * 1024)


def test_a_full_disk_at_the_end_loses_nothing_and_the_rerun_finishes(
    tmp_path, prepared_digits, small_disk, capsys
):
    """The disk that holds the models fills up while the sweep saves its best model: one
    line, exit 2, nothing RUNNING; after space is freed the rerun trains nothing and
    finishes, registering the champion once."""
    project = Project(tmp_path, prepared_digits)
    project.add_experiment("padding")
    project.configure(
        paths={"models": str(small_disk / "models")},
        sweep={"n_trials": 2},
        train={"epochs": 2},
    )
    (small_disk / "models" / "sweeps").mkdir(parents=True)
    _fill(small_disk)
    capsys.readouterr()

    assert project.cli("sweep", "--experiment", "padding") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: No space left on device writing "), err
    assert "models/sweeps/padding" in err and "free some space" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1
    study = project.study()
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert project.parent(study).info.status == "FAILED"
    assert [r.info.run_name for r in project.runs() if r.info.status == "RUNNING"] == []
    assert not list((small_disk / "models").rglob("*.keras"))

    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    assert project.cli("sweep", "--experiment", "padding") == 0

    assert len(project.study().trials) == 2  # nothing trained again
    assert project.parent(study).info.status == "FINISHED"
    assert project.metrics()["n_complete"] == 2
    assert (small_disk / "models" / "sweeps" / "padding" / "best.keras").is_file()
    versions = project.client.search_model_versions("name LIKE '%-padding'")
    assert len(versions) == 1
