"""`pipeline.tracking`: a tracked training run records every config field, one metric
point per epoch, its tags and artifacts, against a SQLite store and a real `mlflow
server`; an unreachable tracking URI fails in seconds, before any training."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow.tracking import MlflowClient

from pipeline.dataset import save_prepared
from pipeline.errors import UserError
from pipeline.model import ConvBlock, ModelConfig, flatten_config
from pipeline.params import TrainParams
from pipeline.tracking import Tracker
from pipeline.train import train_tracked

CONFIG = ModelConfig(
    blocks=(
        ConvBlock(filters=4, padding="same", pooling="none", regularization="batchnorm"),
        ConvBlock(filters=6, padding="valid", pooling="max", regularization="dropout"),
    ),
    dense_units=(16,),
    dense_dropout=0.1,
    learning_rate=3e-3,
)
TWO_EPOCHS = TrainParams(epochs=2, batch_size=128, patience=5, seed=0)
ARTIFACTS = {
    "model_summary.txt",
    "learning_curves.png",
    "confusion_matrix.png",
    "conv0_kernels.png",
    "conv0_feature_maps.png",
    "best.keras",
}
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reset_tracking_uri(mp: pytest.MonkeyPatch) -> None:
    """`Tracker.connect` sets MLflow's process-wide URI (and MLFLOW_TRACKING_URI, which
    subprocesses inherit); `mp` restores the variable, this clears the global."""
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)


@pytest.fixture(autouse=True)
def _isolated_tracking_uri(monkeypatch):
    _reset_tracking_uri(monkeypatch)


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _git_repo(folder: Path) -> str:
    """Make `folder` a git repository with one commit; returns the commit hash."""

    def git(*args: str) -> str:
        return subprocess.run(
            [
                "git",
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "commit.gpgsign=false",
                *args,
            ],
            cwd=folder,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "test")
    return git("rev-parse", "HEAD").strip()


def _val_loss(model, data) -> float:
    y = np.eye(data.meta.n_classes, dtype=np.float32)[data.y_val]
    return model.evaluate(data.x_val, y, batch_size=256, verbose=0, return_dict=True)["loss"]


def _other_filesystem(folder: Path) -> Path | None:
    """/dev/shm when it is a writable filesystem other than `folder`'s, else None."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != folder.stat().st_dev:
        return shm
    return None


# -- a SQLite store --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory, digits):
    """One `train_tracked` run (two epochs) into `sqlite:///<tmp>/mlflow.db`, run from a tmp git
    repository (MLflow's default artifact root `./mlruns` lands there too). Temporary
    files go to another filesystem when there is one, as on systems whose /tmp is tmpfs."""
    root = tmp_path_factory.mktemp("sqlite-tracking")
    commit = _git_repo(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    shm = _other_filesystem(root)
    with pytest.MonkeyPatch.context() as mp, contextlib.ExitStack() as stack:
        if shm is not None:
            mp.setattr(
                tempfile, "tempdir", stack.enter_context(tempfile.TemporaryDirectory(dir=shm))
            )
        mp.chdir(root)
        _reset_tracking_uri(mp)
        tracker = Tracker.connect(uri, "test-tracking")
        checkpoint = root / "models" / "train" / "best.keras"
        result = train_tracked(tracker, CONFIG, TWO_EPOCHS, digits, checkpoint)
        run = MlflowClient(uri).search_runs([tracker.experiment_id])[0]
    return {
        "uri": uri,
        "root": root,
        "commit": commit,
        "tracker": tracker,
        "checkpoint": checkpoint,
        "result": result,
        "run": run,
        "cross_device": shm is not None,
    }


def test_run_records_every_config_field(sqlite_run):
    params = sqlite_run["run"].data.params
    for key, value in flatten_config(CONFIG).items():
        assert params[key] == str(value), key
    assert params["blocks.0.padding"] == "same"
    assert params["blocks.1.regularization"] == "dropout"
    assert params["n_blocks"] == "2"
    for key, value in vars(TWO_EPOCHS).items():
        assert params[f"train.{key}"] == str(value), key


def test_run_has_one_metric_point_per_epoch(sqlite_run):
    client = MlflowClient(sqlite_run["uri"])
    run_id = sqlite_run["run"].info.run_id
    history = sqlite_run["result"].history
    for key in EPOCH_METRICS:
        points = sorted(client.get_metric_history(run_id, f"epoch_{key}"), key=lambda m: m.step)
        assert [m.step for m in points] == [0, 1], key
        assert [m.value for m in points] == pytest.approx(history[key], rel=1e-6), key
    logged = sqlite_run["run"].data.metrics
    metrics = sqlite_run["result"].metrics
    # the run's val_accuracy and val_loss are the kept weights', not the last epoch's
    assert logged["val_accuracy"] == pytest.approx(metrics["val_accuracy"])
    assert logged["val_loss"] == pytest.approx(metrics["val_loss"])
    assert logged["n_params"] == metrics["n_params"]
    assert logged["epochs_run"] == 2


def test_run_tags_and_status(sqlite_run, digits):
    run = sqlite_run["run"]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train-base"
    assert run.data.tags["competition"] == digits.meta.competition == "digit-recognizer"
    assert run.data.tags["data_hash"] == digits.meta.data_hash
    assert run.data.tags["git_commit"] == sqlite_run["commit"]


def test_run_artifacts(sqlite_run, tmp_path):
    client = MlflowClient(sqlite_run["uri"])
    run_id = sqlite_run["run"].info.run_id
    assert {a.path for a in client.list_artifacts(run_id)} >= ARTIFACTS
    # Artifacts live under the run's own artifact root, not in the working directory.
    assert sqlite_run["run"].info.artifact_uri.startswith(
        (str(sqlite_run["root"]), f"file://{sqlite_run['root']}")
    )
    folder = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    for name in ARTIFACTS - {"best.keras", "model_summary.txt"}:
        assert (folder / name).read_bytes()[:8] == PNG_MAGIC, name
    summary = (folder / "model_summary.txt").read_text()
    assert "conv0" in summary and "batchnorm0" in summary and "dropout1" in summary


def test_checkpoint_holds_the_best_model(sqlite_run, digits):
    import keras

    checkpoint = sqlite_run["checkpoint"]
    assert checkpoint.is_file()
    model = keras.models.load_model(checkpoint)
    assert _val_loss(model, digits) == pytest.approx(
        sqlite_run["result"].metrics["val_loss"], rel=1e-4
    )


def test_checkpoint_is_written_across_filesystems(sqlite_run):
    """The temporary folder sat on another filesystem than `models/`: the checkpoint must
    be copied there, since a rename fails with EXDEV."""
    if not sqlite_run["cross_device"]:
        pytest.skip("no second writable filesystem (/dev/shm) on this machine")
    assert sqlite_run["run"].info.status == "FINISHED"
    assert sqlite_run["checkpoint"].is_file()
    assert not list(sqlite_run["checkpoint"].parent.glob(".*.tmp"))


def test_failed_training_marks_the_run_failed(sqlite_run, digits):
    collapsing = ModelConfig(blocks=(ConvBlock(kernel_size=9, padding="valid"),))
    tracker = sqlite_run["tracker"]
    with pytest.raises(UserError, match=r"blocks\[0\]\.conv"):
        train_tracked(tracker, collapsing, TWO_EPOCHS, digits, sqlite_run["root"] / "x.keras")
    runs = MlflowClient(sqlite_run["uri"]).search_runs(
        [tracker.experiment_id], "attributes.status = 'FAILED'"
    )
    assert len(runs) == 1
    assert runs[0].data.params["blocks.0.kernel_size"] == "9"


# -- unreachable URIs -----------------------------------------------------------------------
def test_unreachable_server_fails_fast():
    uri = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(UserError, match=r"tracking\.uri http://127\.0\.0\.1:\d+: cannot reach"):
        Tracker.connect(uri, "never")
    assert time.monotonic() - start < 5


def test_sqlite_in_a_missing_folder_fails_fast(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Tracker.connect(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}", "never")


def test_cli_train_with_unreachable_server_exits_before_training(
    tmp_path, digits, write_params, run_cmd
):
    uri = f"http://127.0.0.1:{_closed_port()}"
    write_params(tmp_path / "params.yaml", tracking={"uri": uri}, train={"epochs": 1})
    save_prepared(digits, tmp_path / "data" / "prepared")

    start = time.monotonic()
    done = run_cmd(["ablate", "train", "--params", "params.yaml"], cwd=tmp_path, timeout=120)
    seconds = time.monotonic() - start

    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: tracking.uri {uri}: cannot reach the MLflow server")
    assert not (tmp_path / "models").exists()
    assert not (tmp_path / "metrics" / "train.json").exists()
    assert seconds < 60  # imports only: training one epoch and saving would add more


# -- a real MLflow server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_run(mlflow_server, tmp_path_factory, digits):
    """One `train_tracked` run (two epochs) against the live server; artifacts go through it."""
    root = tmp_path_factory.mktemp("server-tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        _reset_tracking_uri(mp)
        tracker = Tracker.connect(mlflow_server, "test-server")
        checkpoint = root / "best.keras"
        result = train_tracked(tracker, CONFIG, TWO_EPOCHS, digits, checkpoint)
        run_id = tracker.client.search_runs([tracker.experiment_id])[0].info.run_id
    return {
        "url": mlflow_server,
        "run_id": run_id,
        "result": result,
        "root": root,
        "checkpoint": checkpoint,
    }


def _rest(url: str, endpoint: str, **query) -> dict:
    response = requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=query, timeout=10)
    response.raise_for_status()
    return response.json()


def test_server_run_through_the_rest_api(server_run, digits):
    url, run_id = server_run["url"], server_run["run_id"]
    run = _rest(url, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert {k: str(v) for k, v in flatten_config(CONFIG).items()}.items() <= params.items()
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["competition"] == digits.meta.competition
    assert tags["data_hash"] == digits.meta.data_hash
    assert tags["git_commit"]

    history = _rest(url, "metrics/get-history", run_id=run_id, metric_key="epoch_val_loss")
    points = sorted(history["metrics"], key=lambda m: m["step"])
    assert [m["step"] for m in points] == [0, 1]
    assert [m["value"] for m in points] == pytest.approx(
        server_run["result"].history["val_loss"], rel=1e-6
    )


def test_server_stores_artifacts(server_run):
    url, run_id = server_run["url"], server_run["run_id"]
    listed = _rest(url, "artifacts/list", run_id=run_id)
    assert {f["path"] for f in listed["files"]} >= ARTIFACTS
    summary = requests.get(
        f"{url}/get-artifact", timeout=10, params={"path": "model_summary.txt", "run_uuid": run_id}
    )
    summary.raise_for_status()
    assert "conv0" in summary.text
    assert server_run["checkpoint"].is_file()
    # Nothing was written next to the client: the server proxied every artifact.
    assert sorted(p.name for p in server_run["root"].iterdir()) == ["best.keras"]


def test_an_experiment_deleted_in_the_ui_is_restored_with_a_warning(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker.connect(uri, "deleted-here")
    run_id = first.start_run("before")
    first.end_run(run_id)
    MlflowClient(uri).delete_experiment(first.experiment_id)

    with caplog.at_level("WARNING", logger="pipeline.tracking"):
        again = Tracker.connect(uri, "deleted-here")
    assert again.experiment_id == first.experiment_id
    assert MlflowClient(uri).get_experiment(again.experiment_id).lifecycle_stage == "active"
    assert "was deleted; restored it" in caplog.text
    again.end_run(again.start_run("after"))  # runs go in again


def test_an_epoch_the_store_refused_in_the_background_is_written_when_the_run_ends(tmp_path):
    """The per-epoch batch goes to MLflow's background thread; while another connection
    holds SQLite's write lock that write fails for real. `end_run` writes it again."""
    import sqlite3

    db = tmp_path / "mlflow.db"
    tracker = Tracker.connect(f"sqlite:///{db}", "background")
    run_id = tracker.start_run("refused")
    logger = tracker.epoch_logger(run_id)
    lock = sqlite3.connect(db, timeout=0, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        logger.on_epoch_end(0, {"loss": 0.5, "val_accuracy": 0.75})
        [(operations, _)] = tracker._pending[run_id]
        with pytest.raises(mlflow.exceptions.MlflowException):
            operations.wait()  # the background write, refused: the lock is held
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    tracker.end_run(run_id)

    client = MlflowClient(f"sqlite:///{db}")
    assert [m.value for m in client.get_metric_history(run_id, "epoch_val_accuracy")] == [0.75]
    assert [m.value for m in client.get_metric_history(run_id, "epoch_loss")] == [0.5]
    assert client.get_run(run_id).info.status == "FINISHED"
