"""The `sweep` stage for real on the embedded 8x8 digits: Optuna trials, MLflow runs, the
best model, resuming, pruning, failures, and the ways of running workers.

Each test gets its own folder holding `params.yaml`, the SQLite Optuna and MLflow stores,
`models/`, `metrics/` and `experiments/`; the prepared digits are made once per session.
Studies are tiny (two epochs, a few trials). Only the failure tests replace `train()`:
what they check is how the sweep records trials that raise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from support import Project, wait_for

import pipeline.train
from pipeline import cli
from pipeline.studies import PARENT_ATTR, make_storage
from pipeline.sweep import SCORES
from pipeline.train import training_data
from pipeline.trial import CHECKPOINT

COMPETITION = "digit-recognizer"
PARENT_TAG = "mlflow.parentRunId"

# On 8x8 digits with the base model's two 3x3 blocks (the second max-pooled), `valid`
# padding gives 8 -> 6 -> 4 -> 2. Stride 2 collapses at the second block's pooling,
# dilation 2 at the second conv, and both together are refused by the config.
COLLAPSE = """\
# Run: ablate sweep --experiment collapse
factors: {strides: [1, 2], dilation_rate: [1, 2], padding: [valid]}
"""

# Twice the width is about three times the base model's multiply-accumulates: over the cap.
COSTLY = """\
factors: {width: [1.0, 2.0]}
max_macs_ratio: 1.5
"""

# Two learning rates, in this order: the tiny one cannot match the first trial after one
# epoch, so the median pruner (one startup trial, no warm-up) stops it there.
HOPELESS = """\
factors: {learning_rate: [0.003, 1.0e-7]}
pruner: {name: median, n_startup_trials: 1, n_warmup_steps: 0}
"""


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made (seconds of migrations), to copy."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _make_project(root: Path, prepared: Path, mlflow_db: Path) -> Project:
    """The padding, strides, collapse, hopeless and costly experiments; two epochs, budget two."""
    shutil.copy2(mlflow_db, root / "mlflow.db")
    project = Project(root, prepared)
    project.add_experiment("padding")
    project.add_experiment("strides")
    project.add_experiment("collapse", COLLAPSE)
    project.add_experiment("hopeless", HOPELESS)
    project.add_experiment("costly", COSTLY)
    configure(project)
    return project


def configure(project: Project, *, train: dict | None = None, sweep: dict | None = None):
    project.configure(
        sweep={"n_trials": 2, "n_workers": 1, "isolate": False, **(sweep or {})},
        train={"epochs": 2, **(train or {})},
    )


@pytest.fixture
def workdir(tmp_path, prepared_digits, empty_mlflow_db, monkeypatch) -> Project:
    """A fresh project as the working directory (MLflow puts artifacts in ./mlruns)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    return _make_project(tmp_path, prepared_digits, empty_mlflow_db)


def _by_state(study: optuna.Study) -> Counter:
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


# -- (a) one small grid study, read back from every store --------------------------------------


@pytest.fixture(scope="module")
def padding_sweep(tmp_path_factory, prepared_digits, empty_mlflow_db):
    """`padding` with a budget of two (valid and same, seed 0), run once for the module."""
    root = tmp_path_factory.mktemp("padding-sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
        work = _make_project(root, prepared_digits, empty_mlflow_db)
        summary = work.sweep("padding")
    return work, summary, work.study(summary["study"])


def test_sweep_writes_metrics(padding_sweep):
    work, summary, study = padding_sweep
    metrics = work.metrics()

    assert metrics == summary
    assert metrics["study"] == work.study_name() == study.study_name
    assert (metrics["n_complete"], metrics["n_pruned"], metrics["n_failed"]) == (2, 0, 0)
    trials = study.get_trials()
    assert sorted(t.params["padding"] for t in trials) == ["same", "valid"]
    best = max(trials, key=lambda t: t.value)
    assert metrics["best_value"] == best.value
    assert 0.0 < metrics["best_value"] <= 1.0
    assert metrics["best_params"] == best.params == {"padding": best.params["padding"], "seed": 0}
    assert metrics["best_trial"] == best.number
    assert metrics["epochs_run"] == sum(t.user_attrs["epochs_run"] for t in trials) == 4
    assert metrics["wall_seconds"] > 0
    assert metrics["registered_model"] == f"{COMPETITION}-padding@champion"


def test_sweep_gives_dvc_its_numbers_alone_and_optuna_the_objectives_name(padding_sweep):
    work, summary, study = padding_sweep
    scores = json.loads(work.config().paths.sweep_scores("padding").read_text())

    assert scores == {k: summary[k] for k in SCORES}
    assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in scores.values())
    parent = work.client.get_run(summary["parent_run_id"])
    assert {k: parent.data.metrics[k] for k in SCORES} == pytest.approx(scores)
    assert study.metric_names == ["val_accuracy"]  # optuna-dashboard's name for the value


def test_sweep_saves_the_best_trials_model(padding_sweep, digits):
    import keras

    work, summary, _ = padding_sweep
    model = keras.models.load_model(work.model_file())

    assert model.input_shape == (None, 8, 8, 1)
    assert model.output_shape == (None, 10)
    assert model.get_layer("conv0").padding == summary["best_params"]["padding"]
    seed = summary["best_params"]["seed"]
    split = training_data(digits, dataclasses.replace(work.config().train, seed=seed))
    accuracy = float((model.predict(split.x_val, verbose=0).argmax(1) == split.y_val).mean())
    assert accuracy == pytest.approx(summary["best_value"], abs=0.01)


def test_sweep_records_one_parent_run_and_one_child_run_per_trial(padding_sweep):
    work, summary, study = padding_sweep
    parent = work.parent(study)
    children = work.children(study)
    trials = {t.number: t for t in study.get_trials()}

    parents = [
        r
        for r in work.runs(f"tags.study_name = '{study.study_name}'")
        if PARENT_TAG not in r.data.tags
    ]
    assert [r.info.run_id for r in parents] == [parent.info.run_id]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["experiment"] == "padding"
    assert parent.data.params["n_trials"] == "2"
    assert parent.data.metrics["best_value"] == summary["best_value"]
    assert (
        parent.data.tags["best_run_id"] == trials[summary["best_trial"]].user_attrs["mlflow_run_id"]
    )

    assert set(children) == set(trials)
    for number, run in children.items():
        trial = trials[number]
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.info.status == "FINISHED"
        level, seed = trial.params["padding"], trial.params["seed"]
        assert run.info.run_name == f"padding={level} seed={seed}"
        tags = run.data.tags
        assert (tags["study"], tags["study_name"]) == ("padding", study.study_name)
        assert (tags["factor"], tags["level"], tags["seed"]) == ("padding", level, str(seed))
        assert tags["competition"] == COMPETITION
        assert tags["data_hash"] == work.job().data.meta.data_hash
        assert tags["git_commit"] == parent.data.tags["git_commit"]
        assert tags["state"] == "COMPLETE"
        params = run.data.params
        assert params["trial.padding"] == trial.params["padding"]
        assert params["trial.seed"] == str(trial.params["seed"])
        assert params["blocks.0.padding"] == params["blocks.1.padding"] == trial.params["padding"]
        assert params["blocks.1.pooling"] == "max"  # the base model's, unchanged
        assert run.data.metrics["val_accuracy"] == trial.value  # the objective
        assert not [k for k in run.data.metrics if k.startswith("best_") and k != "best_epoch"]
        history = work.client.get_metric_history(run.info.run_id, "epoch_val_accuracy")
        assert [m.step for m in history] == [0, 1]


def test_sweep_registers_the_best_model_as_champion(padding_sweep):
    work, summary, study = padding_sweep
    version = work.client.get_model_version_by_alias(f"{COMPETITION}-padding", "champion")
    best = study.best_trial

    best_run = best.user_attrs["mlflow_run_id"]
    assert version.run_id == best_run  # the trial that trained it, not the sweep's run
    assert work.client.get_run(best_run).info.status == "FINISHED"
    tags = version.tags
    assert (tags["study"], tags["trial"], tags["model_name"]) == (
        "padding",
        str(best.number),
        "padding-best",
    )
    assert tags["padding"] == best.params["padding"]
    assert float(tags["val_accuracy"]) == pytest.approx(best.value)
    assert version.description.startswith(f"Best of study padding: trial {best.number} (padding=")
    artifacts = [a.path for a in work.client.list_artifacts(best_run, "checkpoint")]
    assert artifacts == [CHECKPOINT]


def test_the_sweeps_parent_run_carries_its_answer(padding_sweep):
    work, _, study = padding_sweep
    parent = work.parent(study)
    description = parent.data.tags["mlflow.note.content"]

    assert description.startswith("**padding**")
    assert "| same (base) | 1 |" in description and "| valid | 1 |" in description
    assert "too few trials" in description  # one seed per level: no verdict
    levels = {t.params["padding"]: t.value for t in study.get_trials()}
    assert parent.data.metrics["valid.mean"] == pytest.approx(levels["valid"])
    assert parent.data.metrics["valid.effect"] == pytest.approx(levels["valid"] - levels["same"])
    assert parent.data.metrics["same.n"] == 1
    curves = [a.path for a in work.client.list_artifacts(parent.info.run_id, "curves")]
    assert curves == ["curves/padding_curves.png"]


def test_a_sampled_studys_runs_are_named_by_number_and_its_parent_names_the_best(workdir):
    workdir.add_experiment(
        "sampled", "factors: {padding: [valid, same], width: [0.5, 1.0]}\nsampler: random\n"
    )
    summary = workdir.sweep("sampled")
    study = workdir.study(summary["study"])
    parent = workdir.parent(study)

    names = sorted(r.info.run_name for r in workdir.children(study).values())
    assert names == ["sampled #0", "sampled #1"]
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("**sampled**")
    assert (
        f"val_accuracy {summary['best_value']:.4f} (trial {summary['best_trial']})" in description
    )


# -- (b) resuming ------------------------------------------------------------------------------


def test_rerun_continues_the_same_study_and_new_train_params_start_another(workdir):
    first = workdir.sweep()
    study = workdir.study(first["study"])
    parent_id = study.user_attrs[PARENT_ATTR]
    assert len(study.get_trials()) == 2

    versions = workdir.client.search_model_versions(f"name='{COMPETITION}-padding'")
    again = workdir.sweep()  # the same params: nothing left to run, nothing to register
    assert workdir.client.search_model_versions(f"name='{COMPETITION}-padding'") == versions
    assert again["study"] == first["study"]
    assert len(study.get_trials()) == 2
    assert (again["n_complete"], again["best_value"]) == (2, first["best_value"])

    configure(workdir, sweep={"n_trials": 3})  # a bigger budget continues the study
    more = workdir.sweep()
    assert more["study"] == first["study"]
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3
    assert trials[2].params == {"padding": "valid", "seed": 1}  # the next grid point
    assert study.user_attrs[PARENT_ATTR] == parent_id
    assert set(workdir.children(study)) == {0, 1, 2}
    assert workdir.metrics()["n_complete"] == 3

    configure(workdir, sweep={"n_trials": 1}, train={"epochs": 1})  # defines another study
    other = workdir.sweep()
    assert other["study"] != first["study"]
    assert len(workdir.study(other["study"]).get_trials()) == 1
    assert sorted(optuna.get_all_study_names(workdir.storage)) == sorted(
        [first["study"], other["study"]]
    )


def test_two_studies_sharing_the_base_level_train_it_once(workdir):
    padding = workdir.sweep("padding")  # valid and same (the base), seed 0
    strides = workdir.sweep("strides")  # 1 (the base) and 2, seed 0

    base_in_padding = next(
        t for t in workdir.study(padding["study"]).get_trials() if t.params["padding"] == "same"
    )
    trials = {t.params["strides"]: t for t in workdir.study(strides["study"]).get_trials()}
    reused = trials[1]
    assert reused.user_attrs["reused_from"] == f"{padding['study']}#{base_in_padding.number}"
    assert reused.value == base_in_padding.value
    assert reused.user_attrs["epochs_run"] == 0
    assert reused.user_attrs["history"] == base_in_padding.user_attrs["history"]
    assert "reused_from" not in trials[2].user_attrs
    assert (strides["n_reused"], strides["epochs_run"]) == (1, 2)  # only stride 2 trained
    run = workdir.children(workdir.study(strides["study"]))[reused.number]
    assert run.data.tags["reused_from"] == reused.user_attrs["reused_from"]
    assert run.data.metrics["val_accuracy"] == reused.value
    history = workdir.client.get_metric_history(run.info.run_id, "epoch_val_accuracy")
    assert [m.value for m in history] == base_in_padding.user_attrs["history"]["val_accuracy"]


def test_reuse_can_be_switched_off(workdir):
    configure(workdir, sweep={"reuse": False})
    workdir.sweep("padding")
    strides = workdir.sweep("strides")
    assert (strides["n_reused"], strides["epochs_run"]) == (0, 4)


# -- (c) the pruner, and designs that collapse, prune trials ---------------------------------


def test_the_pruner_stops_a_hopeless_trial(workdir):
    configure(workdir, train={"epochs": 3}, sweep={"n_trials": None})
    summary = workdir.sweep("hopeless")
    study = workdir.study(summary["study"])
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    pruned = study.get_trials(states=(TrialState.PRUNED,))

    assert (len(complete), len(pruned), summary["n_rejected"]) == (1, 1, 0)
    assert pruned[0].params["learning_rate"] == pytest.approx(1e-7)
    assert pruned[0].user_attrs["epochs_run"] == 1
    assert pruned[0].user_attrs["prune_reason"].startswith("pruned after epoch 1:")
    assert summary["epochs_run"] == complete[0].user_attrs["epochs_run"] + 1
    run = workdir.children(study)[pruned[0].number]
    assert (run.info.status, run.data.tags["state"]) == ("KILLED", "PRUNED")
    assert len(workdir.client.get_metric_history(run.info.run_id, "epoch_val_accuracy")) == 1


def test_collapsing_configs_are_pruned_without_training(workdir):
    configure(workdir, sweep={"n_trials": None})  # the whole grid: 4 trials
    summary = workdir.sweep("collapse")
    study = workdir.study(summary["study"])
    children = workdir.children(study)

    assert (summary["n_complete"], summary["n_pruned"], summary["n_failed"]) == (1, 3, 0)
    assert summary["n_rejected"] == 3
    assert summary["best_params"] == {
        "strides": 1,
        "dilation_rate": 1,
        "padding": "valid",
        "seed": 0,
    }
    expected = {
        (2, 1): "blocks[1].pool",
        (1, 2): "blocks[1].conv",
        (2, 2): "strides > 1 together with dilation_rate > 1",
    }
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert len(pruned) == 3
    for trial in pruned:
        reason = expected[trial.params["strides"], trial.params["dilation_rate"]]
        assert reason in trial.user_attrs["prune_reason"]
        assert trial.user_attrs["prune_reason"].startswith("rejected before training")
        assert trial.user_attrs["epochs_run"] == 0
        assert trial.intermediate_values == {}
        run = children[trial.number]
        assert run.info.status == "KILLED"
        assert run.data.tags["state"] == "PRUNED"
        assert reason in run.data.tags["prune_reason"]
        assert run.data.metrics == {}
    complete = study.best_trial
    assert summary["epochs_run"] == complete.user_attrs["epochs_run"] == 2


def test_a_model_over_the_studys_cost_cap_is_rejected_without_training(workdir):
    summary = workdir.sweep("costly")
    study = workdir.study(summary["study"])
    by_width = {t.params["width"]: t for t in study.get_trials()}

    assert (summary["n_complete"], summary["n_rejected"], summary["epochs_run"]) == (1, 1, 2)
    assert by_width[1.0].state == TrialState.COMPLETE
    costly = by_width[2.0]
    assert costly.state == TrialState.PRUNED
    reason = costly.user_attrs["prune_reason"]
    assert reason.startswith("rejected before training")
    assert "over max_macs_ratio 1.5 x the base model's" in reason
    assert (costly.user_attrs["epochs_run"], costly.intermediate_values) == (0, {})
    run = workdir.children(study)[costly.number]
    assert (run.info.status, run.data.tags["prune_reason"]) == ("KILLED", reason)
    assert run.data.metrics == {}


# -- (d) resuming after the sweep process is killed --------------------------------------------


def _wait_for_running_trial(
    work: Project, name: str, proc: subprocess.Popen, log: Path, timeout: float = 180.0
) -> int:
    """The number of a RUNNING trial that already has its MLflow run."""
    storage = make_storage(work.storage, 10)

    def running_trial() -> int | None:
        if proc.poll() is not None:
            pytest.fail(
                f"the sweep ended (exit {proc.returncode}) before it could be "
                f"killed:\n{log.read_text()}"
            )
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # the study is not created yet
            return None
        return next(
            (
                t.number + 1
                for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if "mlflow_run_id" in t.user_attrs
            ),
            None,
        )

    return wait_for(running_trial, timeout, "no trial started", log.read_text) - 1


def test_sweep_resumes_after_sigkill(workdir):
    budget = 4
    configure(workdir, sweep={"n_trials": budget}, train={"epochs": 5})
    name = workdir.study_name()
    log = workdir.root / "sweep.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    ablate = Path(sys.executable).parent / "ablate"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(ablate), "sweep", "--experiment", "padding", "--params", str(workdir.params)],
            cwd=workdir.root,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            victim = _wait_for_running_trial(workdir, name, proc, log)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()  # reaped: a zombie would still look alive to the pid check
    study = workdir.study(name)
    victim_run = study.trials[victim].user_attrs["mlflow_run_id"]
    assert study.trials[victim].state == TrialState.RUNNING
    assert workdir.client.get_run(victim_run).info.status == "RUNNING"

    assert workdir.cli("sweep", "--experiment", "padding") == 0

    trials = study.get_trials()
    states = _by_state(study)
    assert states["RUNNING"] == states["WAITING"] == 0
    assert states["COMPLETE"] == budget and states["FAIL"] == 1 == len(trials) - budget
    points = [json.dumps(t.params, sort_keys=True) for t in trials if t.state != TrialState.FAIL]
    assert len(set(points)) == len(points) == budget  # every grid point, once
    killed = study.trials[victim]
    assert killed.state == TrialState.FAIL
    assert "died during the trial" in killed.user_attrs["error"]
    assert killed.user_attrs["fail_kind"] == "died"

    metrics = workdir.metrics()
    assert metrics["study"] == name
    assert (metrics["n_complete"], metrics["n_failed"], metrics["n_interrupted"]) == (budget, 0, 1)

    children = workdir.children(study)
    assert set(children) == {t.number for t in trials}
    assert [r.info.run_id for r in children.values() if r.info.status == "RUNNING"] == []
    assert children[victim].info.run_id == victim_run
    assert children[victim].info.status == "FAILED"
    assert "died during the trial" in children[victim].data.tags["error"]
    assert workdir.parent(study).info.status == "FINISHED"


# -- (e) trials that raise ---------------------------------------------------------------------


def test_failed_trial_is_recorded_and_the_study_goes_on(workdir, monkeypatch):
    real_train = pipeline.train.train

    def train_failing_on_valid(config, params, data, callbacks=(), layers=None):
        if config.blocks[0].padding == "valid":
            raise RuntimeError("simulated failure with valid padding")
        return real_train(config, params, data, callbacks, layers)

    monkeypatch.setattr(pipeline.train, "train", train_failing_on_valid)
    # valid, same, valid: two failures but never two in a row, and not retried
    configure(workdir, sweep={"n_trials": 3, "max_consecutive_failures": 2, "max_retries": 0})

    summary = workdir.sweep()

    assert (summary["n_complete"], summary["n_pruned"], summary["n_failed"]) == (1, 0, 2)
    assert summary["best_params"]["padding"] == "same"
    study = workdir.study(summary["study"])
    children = workdir.children(study)
    for trial in study.get_trials():
        run = children[trial.number]
        if trial.params["padding"] == "same":
            assert trial.state == TrialState.COMPLETE
            continue
        error = "RuntimeError: simulated failure with valid padding"
        assert trial.state == TrialState.FAIL
        assert trial.user_attrs["error"] == error
        assert run.info.status == "FAILED"
        assert run.data.tags["state"] == "FAIL"
        assert run.data.tags["error"] == error
    assert (workdir.model_file()).is_file()


def test_a_grid_point_that_fails_is_retried_until_it_completes(workdir, monkeypatch):
    real_train = pipeline.train.train
    failures = Counter()

    def train_failing_twice_on_valid(config, params, data, callbacks=(), layers=None):
        if config.blocks[0].padding == "valid" and failures["valid"] < 2:
            failures["valid"] += 1
            raise RuntimeError("simulated flaky failure")
        return real_train(config, params, data, callbacks, layers)

    monkeypatch.setattr(pipeline.train, "train", train_failing_twice_on_valid)
    configure(workdir, sweep={"max_retries": 2})

    summary = workdir.sweep()

    study = workdir.study(summary["study"])
    assert _by_state(study) == {"COMPLETE": 2, "FAIL": 2}
    done = [t.params["padding"] for t in study.get_trials() if t.state == TrialState.COMPLETE]
    assert sorted(done) == ["same", "valid"]
    assert (summary["n_complete"], summary["n_retried"], summary["n_interrupted"]) == (2, 2, 0)


def test_a_grid_point_is_given_up_after_its_retries(workdir, monkeypatch):
    real_train = pipeline.train.train
    calls = Counter()

    def train_failing_on_valid(config, params, data, callbacks=(), layers=None):
        calls[config.blocks[0].padding] += 1
        if config.blocks[0].padding == "valid":
            raise RuntimeError("simulated failure with valid padding")
        return real_train(config, params, data, callbacks, layers)

    monkeypatch.setattr(pipeline.train, "train", train_failing_on_valid)
    configure(workdir, sweep={"max_retries": 1})

    summary = workdir.sweep()
    assert calls == {"valid": 2, "same": 1}  # one try and one retry
    assert (summary["n_complete"], summary["n_failed"]) == (1, 2)
    assert workdir.sweep()["n_failed"] == 2  # a rerun does not try again
    assert calls["valid"] == 2


def test_consecutive_failures_stop_the_sweep(workdir, monkeypatch, capsys):
    calls = []

    def train_always_failing(config, params, data, callbacks=(), layers=None):
        calls.append(config)
        raise RuntimeError(f"simulated failure number {len(calls)}")

    monkeypatch.setattr(pipeline.train, "train", train_always_failing)
    configure(workdir, sweep={"n_trials": 4, "max_consecutive_failures": 2})

    assert workdir.cli("sweep", "--experiment", "padding") == cli.EXIT_USER_ERROR

    err = capsys.readouterr().err
    assert "2 trials in a row failed" in err
    assert "last error: RuntimeError: simulated failure number 2" in err
    assert len(calls) == 2
    study = workdir.study(workdir.study_name())
    assert _by_state(study) == {"FAIL": 2, "WAITING": 2}
    children = workdir.children(study)
    assert {r.info.status for r in children.values()} == {"FAILED"}
    assert workdir.parent(study).info.status == "FAILED"
    assert not (workdir.root / "metrics" / "sweeps" / "padding.json").exists()
    assert not (workdir.model_file()).exists()


def test_study_where_every_trial_fails_ends_with_an_error(workdir, monkeypatch, capsys):
    def train_always_failing(config, params, data, callbacks=(), layers=None):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(pipeline.train, "train", train_always_failing)
    configure(workdir, sweep={"max_retries": 0})

    assert workdir.cli("sweep", "--experiment", "padding") == cli.EXIT_USER_ERROR

    assert "no trial completed (0 pruned, 2 failed)" in capsys.readouterr().err
    study = workdir.study(workdir.study_name())
    assert workdir.parent(study).info.status == "FAILED"


# -- (f) other ways of running the workers -----------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [{"isolate": True}, {"trials_per_process": 1}, {"n_workers": 2}],
    ids=["isolate", "one-trial-per-process", "two-workers"],
)
def test_sweep_with_worker_processes(workdir, option):
    configure(workdir, sweep=option)

    summary = workdir.sweep()

    assert (summary["n_complete"], summary["n_pruned"], summary["n_failed"]) == (2, 0, 0)
    study = workdir.study(summary["study"])
    trials = study.get_trials()
    assert sorted(t.params["padding"] for t in trials) == ["same", "valid"]
    workers = {t.user_attrs["worker"] for t in trials}
    assert f"{socket.gethostname()}:{os.getpid()}" not in workers
    if option.get("isolate") or option.get("trials_per_process") == 1:
        assert len(workers) == 2  # a fresh process per trial
    children = workdir.children(study)
    assert set(children) == {t.number for t in trials}
    assert {r.info.status for r in children.values()} == {"FINISHED"}
    assert (workdir.model_file()).is_file()


# -- (g) command-line errors -------------------------------------------------------------------


def test_worker_for_a_study_that_does_not_exist(workdir, capsys):
    assert workdir.cli("worker", "--experiment", "padding", "--wait", "0") == cli.EXIT_USER_ERROR

    err = capsys.readouterr().err
    assert f"study {workdir.study_name()} not found" in err
    assert "ablate sweep --experiment padding" in err


def test_sweep_of_an_unknown_experiment(workdir, capsys):
    assert workdir.cli("sweep", "--experiment", "paddding") == cli.EXIT_USER_ERROR
    known = ", ".join(sorted(p.stem for p in (workdir.root / "experiments").glob("*.yaml")))
    assert "padding" in known
    assert f"no such experiment; known: {known}" in capsys.readouterr().err


def test_sweep_with_an_unknown_storage(workdir, capsys):
    code = workdir.cli("sweep", "--experiment", "padding", "--storage", "mongodb://u@host/db")
    assert code == cli.EXIT_USER_ERROR
    assert "sweep.storage 'mongodb://u@host/db'" in capsys.readouterr().err


def test_a_password_on_the_command_line_is_refused_unprinted(workdir, capsys):
    code = workdir.cli("sweep", "--experiment", "padding", "--storage", "mongodb://u:pw@host/db")
    assert code == cli.EXIT_USER_ERROR
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --storage: mongodb://u:***@host/db holds a password")
    assert ":pw@" not in line


def test_no_workers_is_refused_before_anything_runs(workdir, capsys):
    assert workdir.cli("sweep", "--experiment", "padding", "--n-workers", "0") == 2
    assert capsys.readouterr().err.strip() == "error: --n-workers: n_workers must be >= 1"
    assert not (workdir.root / "optuna.db").exists()


def test_params_naming_a_folder_is_one_line(workdir, capsys):
    from pipeline import cli

    assert cli.main(["train", "--params", str(workdir.root)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {workdir.root}: is a folder; --params takes a params.yaml file"
