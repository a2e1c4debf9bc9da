"""Submission files: Kaggle's layout, refused when invalid, and the opt-in upload."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from fake_kaggle import TEST_KEY, FakeKaggle
from support import Project

from pipeline import cli, fetch, prepare
from pipeline.config import load_config
from pipeline.dataset import Dataset, Meta, load_prepared, save_prepared
from pipeline.errors import UserError
from pipeline.submit import make_submission, validate


def _tiny_model(input_shape, n_classes: int) -> keras.Model:
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, keras.layers.Dense(n_classes, activation="softmax")(x))


@pytest.fixture
def project(tmp_path, monkeypatch, write_params):
    """Embedded data fetched and prepared, one study's metrics and its model on disk."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", data={"source": "embedded"}, submit={"strategy": "best"})
    config = load_config("params.yaml")
    fetch.main(config)
    prepare.main(config)
    (tmp_path / "metrics" / "sweeps").mkdir(parents=True)
    (tmp_path / "metrics" / "sweeps" / "padding.json").write_text(
        json.dumps({"best_value": 0.9, "study": "padding-x"})
    )
    model_path = tmp_path / "models" / "sweeps" / "padding" / "best.keras"
    model_path.parent.mkdir(parents=True)
    _tiny_model((8, 8, 1), 10).save(model_path)
    return tmp_path


def _csv(root: Path) -> Path:
    return root / "submissions" / "submission.csv"


def test_submission_has_the_sample_layout_and_a_sidecar(project):
    assert cli.main(["submit"]) == 0
    sample = pd.read_csv(project / "data/raw/digit-recognizer/sample_submission.csv")
    written = pd.read_csv(_csv(project))
    assert list(written.columns) == ["ImageId", "Label"]
    assert written["ImageId"].tolist() == sample["ImageId"].tolist()
    assert written["Label"].between(0, 9).all()
    sidecar = json.loads((project / "submissions" / "submission.json").read_text())
    assert sidecar["experiment"] == "padding" and sidecar["study"] == "padding-x"
    assert sidecar["tta_rotation"] == load_config("params.yaml").submit.tta_rotation
    assert sidecar["data_hash"] == load_prepared("data/prepared").meta.data_hash
    scores = json.loads(load_config("params.yaml").paths.submission_scores.read_text())
    assert scores["n_members"] == 1 and scores["holdout_accuracy"] == sidecar["holdout_accuracy"]
    assert all(isinstance(v, int | float) for v in scores.values())  # DVC's metrics: numbers


def test_a_model_with_the_wrong_number_of_classes_is_refused(project, capsys):
    _tiny_model((8, 8, 1), 3).save(project / "models" / "sweeps" / "padding" / "best.keras")
    assert cli.main(["submit"]) == 2
    assert "predicts 3 classes but the competition has 10" in capsys.readouterr().err
    assert not _csv(project).exists()


def test_test_ids_that_do_not_match_the_sample_are_refused(project, capsys):
    sample_path = project / "data/raw/digit-recognizer/sample_submission.csv"
    sample = pd.read_csv(sample_path)
    sample.loc[5, "ImageId"] = 99999
    sample.to_csv(sample_path, index=False)
    assert cli.main(["submit"]) == 2
    err = capsys.readouterr().err
    assert "do not match sample_submission.csv" in err and "99999" in err
    assert not _csv(project).exists()


def test_explicit_ids_follow_the_sample_order():
    meta = Meta("kannada", "id", "label", True, 3, (2, 2, 1), "h")
    data = Dataset(*(np.zeros(0),) * 4, np.zeros((3, 2, 2, 1)), np.array([10, 11, 12]), meta)
    sample = pd.DataFrame({"id": [12, 10, 11], "label": 0})
    submission = make_submission(np.array([0, 1, 2]), data, sample)
    assert submission.to_dict("list") == {"id": [12, 10, 11], "label": [2, 0, 1]}


def test_an_ensemble_averages_its_members_without_tensorflow_warnings(capfd, caplog):
    """Eight members: the mean of each one's softmax, batch by batch, and none of the
    retracing warnings that `model.predict` in a loop sets off after five models."""
    from pipeline.ensemble import probabilities

    keras.utils.set_random_seed(0)
    meta = Meta("digit-recognizer", "ImageId", "Label", True, 3, (4, 4, 1), "h")
    data = Dataset(*(np.zeros(0),) * 6, meta)
    models = [_tiny_model((4, 4, 1), 3) for _ in range(8)]
    x = np.random.default_rng(0).random((37, 4, 4, 1), dtype=np.float32)

    with caplog.at_level("WARNING"):
        mean = probabilities(models, x, data, batch_size=8)

    each = [np.asarray(model(x, training=False)) for model in models]
    assert mean.shape == (37, 3)
    assert np.allclose(mean, np.mean(each, axis=0), atol=1e-6)
    assert np.allclose(mean.sum(axis=1), 1)
    assert "retracing" not in capfd.readouterr().err + caplog.text


def test_test_time_augmentation_averages_each_member_over_the_turned_images():
    """`submit.tta_rotation`: each member also predicts every image turned that many
    degrees each way, and all those predictions are averaged. A quarter turn moves every
    pixel exactly onto another, so numpy's `rot90` gives the views to compare with."""
    from pipeline.ensemble import probabilities

    keras.utils.set_random_seed(0)
    meta = Meta("digit-recognizer", "ImageId", "Label", True, 3, (6, 6, 1), "h")
    data = Dataset(*(np.zeros(0),) * 6, meta)
    models = [_tiny_model((6, 6, 1), 3) for _ in range(2)]
    x = np.random.default_rng(1).random((9, 6, 6, 1), dtype=np.float32)
    quarter_turns = [x, np.rot90(x, 1, axes=(1, 2)), np.rot90(x, -1, axes=(1, 2))]

    turned = probabilities(models, x, data, batch_size=4, rotation=90)

    each = [np.asarray(m(v, training=False)) for m in models for v in quarter_turns]
    assert np.allclose(turned, np.mean(each, axis=0), atol=1e-5)
    plain = probabilities(models, x, data, batch_size=4, rotation=0)
    assert np.allclose(plain, np.mean([np.asarray(m(x)) for m in models], axis=0), atol=1e-6)
    assert not np.allclose(turned, plain, atol=1e-3)


@pytest.mark.parametrize("value", [-1, 46, "eight"])
def test_a_bad_tta_rotation_is_refused_with_its_field(project, write_params, capsys, value):
    write_params(
        project / "params.yaml", data={"source": "embedded"}, submit={"tta_rotation": value}
    )
    assert cli.main(["submit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "submit" in err and "tta_rotation" in err and str(value) in err
    assert not _csv(project).exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.iloc[:-1], "rows"),
        (lambda s: s.assign(Label=[np.nan] + [0] * (len(s) - 1)), "missing values"),
        (lambda s: s.assign(Label=10), "labels must be 0..9"),
        (lambda s: s.rename(columns={"Label": "label"}), "columns"),
    ],
)
def test_validate_refuses_what_kaggle_would(change, message):
    sample = pd.DataFrame({"ImageId": [1, 2, 3], "Label": 0})
    with pytest.raises(UserError, match=message):
        validate(change(sample.copy()), sample, 10)


def _submit(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "submit", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_upload_sends_the_file_with_the_official_client(project):
    with FakeKaggle() as fake:
        result = _submit(project, fake.client_env(project / "home"), "--upload", "-m", "try 1")
        assert result.returncode == 0, result.stderr
        assert "Successfully submitted to digit-recognizer (ref 1)" in result.stderr
        assert list(fake.uploads.values()) == [_csv(project).read_bytes()]
        created = fake.api_calls("CreateSubmission")[0].json
        assert created["submissionDescription"] == "try 1"
    assert TEST_KEY not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (403, "accept the competition rules at https://www.kaggle.com/competitions/"),
        (429, "daily submission limit"),
    ],
)
def test_upload_errors_are_actionable_and_keep_the_key_secret(project, status, expected):
    with FakeKaggle(status=status) as fake:
        result = _submit(project, fake.client_env(project / "home"), "--upload", "-m", "x")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert expected in result.stderr
    assert TEST_KEY not in result.stdout + result.stderr


def test_upload_without_credentials_says_where_they_go(project):
    with FakeKaggle() as fake:
        result = _submit(
            project, fake.client_env(project / "home", credentials=None), "--upload", "-m", "x"
        )
        assert fake.requests == []
    assert result.returncode == 2
    assert "kaggle.json" in result.stderr and "KAGGLE_USERNAME" in result.stderr
    assert not _csv(project).exists()  # credentials are checked before anything is done


def test_upload_needs_a_message(project, capsys):
    assert cli.main(["submit", "--upload"]) == 2
    assert "-m" in capsys.readouterr().err


# -- strategies on a real (tiny) study ----------------------------------------------------
@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """Embedded digits with a held-out split, and the padding study run on them: two
    levels times two seeds, two epochs a trial."""
    from pipeline.fetch import write_embedded
    from pipeline.params import PrepareParams

    root = tmp_path_factory.mktemp("swept")
    raw = root / "raw" / "digit-recognizer"
    raw.mkdir(parents=True)
    write_embedded(raw)
    data, _ = prepare.prepare(raw, "digit-recognizer", PrepareParams(holdout_fraction=0.1))
    save_prepared(data, root / "prepared")
    project = Project(root, root / "prepared")
    project.add_experiment("padding")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        project.configure(
            experiments=["padding"], train={"epochs": 2}, sweep={"n_trials": 4, "n_workers": 1}
        )
        project.sweep("padding")
    return project


@pytest.mark.parametrize(("strategy", "members"), [("refit", 1), ("ensemble", 2)])
def test_refit_and_ensemble_submissions_say_what_they_are_and_what_to_expect(
    swept, monkeypatch, strategy, members
):
    monkeypatch.chdir(swept.root)
    swept.configure(
        experiments=["padding"],
        train={"epochs": 2},
        sweep={"n_trials": 4, "n_workers": 1},
        submit={"strategy": strategy, "members": members, "trial_checkpoints": False},
    )
    assert swept.cli("submit") == 0

    sidecar = json.loads((swept.root / "submissions" / "submission.json").read_text())
    assert sidecar["strategy"] == strategy
    labels = [m["label"] for m in sidecar["members"]]
    assert len(labels) == len(set(labels)) == members
    for member in sidecar["members"]:
        assert member["n_seeds"] == 2  # ranked by the mean over both seeds of its level
        assert member["mean_val_accuracy"] == pytest.approx(np.mean(member["values"]), abs=1e-5)
    means = [m["mean_val_accuracy"] for m in sidecar["members"]]
    assert means == sorted(means, reverse=True)
    held = load_prepared(swept.prepared).y_holdout
    assert sidecar["holdout_n"] == len(held) > 0
    low, high = sidecar["holdout_ci95"]
    assert 0 <= low <= sidecar["holdout_accuracy"] <= high <= 1
    run = swept.client.get_run(sidecar["mlflow_run_id"])
    assert run.info.run_name == f"submit-{strategy}"
    assert run.data.metrics["holdout_accuracy"] == pytest.approx(sidecar["holdout_accuracy"])
    scores = json.loads(swept.config().paths.submission_scores.read_text())
    assert scores == {
        "holdout_accuracy": sidecar["holdout_accuracy"],
        "holdout_ci95_low": low,
        "holdout_ci95_high": high,
        "holdout_n": len(held),
        "n_members": members,
        "n_models": members,
    }
    assert {k: run.data.metrics[k] for k in scores} == pytest.approx(scores)
    written = pd.read_csv(swept.root / "submissions" / "submission.csv")
    assert len(written) == sidecar["rows"]


def test_an_ensemble_also_averages_its_members_trial_checkpoints(swept, monkeypatch, caplog):
    """`submit.trial_checkpoints`: each member's own trials (both seeds) join its refit;
    a checkpoint the MLflow store lost is left out with a warning, not a failure."""
    monkeypatch.chdir(swept.root)
    common = {"experiments": ["padding"], "train": {"epochs": 2}}
    from pipeline.ensemble import members as ensemble_members

    data = load_prepared(swept.prepared)
    swept.configure(
        **common, submit={"strategy": "ensemble", "members": 2, "trial_checkpoints": True}
    )
    chosen = ensemble_members(swept.config(), data)

    assert len(chosen.models) == 2 + 2 * 2  # two refits, two seeds' checkpoints each
    by_run = {r.info.run_id: r for r in swept.client.search_runs([_experiment_id(swept)])}
    for member in chosen.described:
        runs = member["trial_checkpoints"]
        assert len(runs) == 2
        level = "same" if member["label"] == "base" else member["label"].split("=")[1]
        for run_id in runs:  # each a trial run of this very configuration
            run = by_run[run_id]
            assert run.data.params["trial.padding"] == level
            assert run.data.tags["state"] == "COMPLETE"
    lost = chosen.described[0]["trial_checkpoints"][0]
    artifact = Path(swept.client.get_run(lost).info.artifact_uri.removeprefix("file://"))
    (artifact / "checkpoint" / "best.keras").unlink()

    with caplog.at_level("WARNING"):
        fewer = ensemble_members(swept.config(), data)

    assert len(fewer.models) == len(chosen.models) - 1
    assert lost not in fewer.described[0]["trial_checkpoints"]
    assert f"trial checkpoint of run {lost} left out" in caplog.text


def _experiment_id(project) -> str:
    return project.client.get_experiment_by_name(project.tracking_experiment).experiment_id


def test_a_refit_trains_its_trials_kept_epochs_times_the_scale(swept, monkeypatch):
    """`submit.refit_epoch_scale`: each refit trains round(scale x the median of the
    epochs its trials kept), all of them, and the sidecar says how many."""
    from pipeline import train as training
    from pipeline.ensemble import members as ensemble_members

    monkeypatch.chdir(swept.root)
    swept.configure(
        experiments=["padding"],
        train={"epochs": 2},
        submit={"strategy": "ensemble", "members": 2, "refit_epoch_scale": 2.5},
    )
    trained, real_train = [], training.train

    def recording(config, params, data, *args, **kwargs):
        result = real_train(config, params, data, *args, **kwargs)
        trained.append((params.epochs, result.metrics["epochs_run"]))
        return result

    monkeypatch.setattr(training, "train", recording)
    chosen = ensemble_members(swept.config(), load_prepared(swept.prepared))

    assert len(trained) == 2
    for member, (asked, ran) in zip(chosen.described, trained, strict=True):
        assert member["kept_epochs"] in (1, 2)
        assert member["refit_epochs"] == asked == ran == round(2.5 * member["kept_epochs"])


@pytest.mark.parametrize("value", [0, -1, 11, "twice"])
def test_a_bad_refit_epoch_scale_is_refused_with_its_field(project, write_params, capsys, value):
    write_params(
        project / "params.yaml", data={"source": "embedded"}, submit={"refit_epoch_scale": value}
    )
    assert cli.main(["submit"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "refit_epoch_scale" in err and str(value) in err
    assert not _csv(project).exists()
