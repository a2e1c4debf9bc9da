"""Stage `submit`: predict the test set and write a Kaggle submission that Kaggle accepts.

Loads the best model across studies (or the study named by `submit.experiment`),
predicts the test images in batches, and writes `submissions/submission.csv` in exactly
the layout of the competition's `sample_submission.csv`: same columns, same id order. The
file is validated before it is written (row count, ids, label range, no missing values);
an invalid file is never written. `submissions/submission.json` records where it came
from. Uploading is opt-in and never part of `dvc repro`: `ablate submit --upload -m MSG`.

Run: `ablate submit` (or `dvc repro submit`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.dataset import Dataset, load_prepared
from pipeline.errors import UserError
from pipeline.fsutil import atomic_path, write_json
from pipeline.model import predict_labels
from pipeline.params import Paths
from pipeline.prepare import read_csv

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


def choose_study(paths: Paths, experiments: Sequence[str], wanted: str | None) -> dict:
    """The sweep metrics of `wanted`, or of the study with the best `best_value`."""
    found = {}
    metrics_dir = paths.sweep_metrics_dir
    for name in experiments:
        path = paths.sweep_metrics(name)
        if path.is_file():
            found[name] = json.loads(path.read_text())
    if wanted is not None:
        if wanted not in found:
            raise UserError(
                f"submit.experiment {wanted!r} has no results in {metrics_dir}/; "
                f"choose one of {', '.join(found) or 'none (run the sweeps)'}"
            )
        return {"experiment": wanted, **found[wanted]}
    scored = {k: v for k, v in found.items() if v.get("best_value") is not None}
    if not scored:
        raise UserError(f"no finished sweep in {metrics_dir}/; run `dvc repro` first")
    best = max(scored, key=lambda k: scored[k]["best_value"])
    return {"experiment": best, **scored[best]}


def make_submission(labels: np.ndarray, data: Dataset, sample: pd.DataFrame) -> pd.DataFrame:
    """Predictions in the sample submission's layout and id order, validated."""
    id_column, label_column = data.meta.id_column, data.meta.label_column
    if list(sample.columns) != [id_column, label_column]:
        raise UserError(
            f"sample_submission.csv has columns {list(sample.columns)} but the "
            f"data was prepared for {[id_column, label_column]}; run prepare again"
        )
    if len(labels) != len(data.test_ids):
        raise UserError(f"{len(labels)} predictions for {len(data.test_ids)} test images")
    by_id = {str(i): int(label) for i, label in zip(data.test_ids, labels, strict=True)}
    sample_ids = [str(i) for i in sample[id_column]]
    missing = [i for i in sample_ids if i not in by_id]
    if missing or len(sample_ids) != len(by_id):
        example = missing[0] if missing else "(row count differs)"
        raise UserError(
            f"test ids do not match sample_submission.csv (e.g. id {example}); "
            "the test set and the sample submission must describe the same rows"
        )
    submission = pd.DataFrame(
        {
            id_column: sample[id_column].to_numpy(),
            label_column: [by_id[i] for i in sample_ids],
        }
    )
    validate(submission, sample, data.meta.n_classes)
    return submission


def validate(submission: pd.DataFrame, sample: pd.DataFrame, n_classes: int) -> None:
    """Kaggle's checks, before anything is written."""
    if list(submission.columns) != list(sample.columns):
        raise UserError(
            f"submission columns {list(submission.columns)} differ from "
            f"sample_submission.csv {list(sample.columns)}"
        )
    if len(submission) != len(sample):
        raise UserError(
            f"submission has {len(submission)} rows, sample_submission.csv {len(sample)}"
        )
    if submission.isna().any().any():
        raise UserError("submission has missing values")
    id_column, label_column = sample.columns
    if (
        submission[id_column].astype(str).to_numpy() != sample[id_column].astype(str).to_numpy()
    ).any():
        raise UserError("submission ids are not those of sample_submission.csv, in order")
    labels = submission[label_column].to_numpy()
    if labels.min() < 0 or labels.max() >= n_classes:
        raise UserError(
            f"submission labels must be 0..{n_classes - 1}; got {labels.min()}..{labels.max()}"
        )


def predict(model, data: Dataset, batch_size: int) -> np.ndarray:
    """Class labels for the test set; refuses a model with the wrong number of classes."""
    n_out = int(model.output_shape[-1])
    if n_out != data.meta.n_classes:
        raise UserError(
            f"the model predicts {n_out} classes but the competition has "
            f"{data.meta.n_classes}; it was trained on other data: run the sweeps "
            "again (`dvc repro`)"
        )
    expected = tuple(model.input_shape[1:])
    if expected != tuple(data.meta.image_shape):
        raise UserError(
            f"the model expects images of {expected} but the test images are "
            f"{tuple(data.meta.image_shape)}; run the sweeps again"
        )
    return predict_labels(model, data.x_test, batch_size)


def write_submission(submission: pd.DataFrame, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        submission.to_csv(tmp, index=False)


def upload_submission(csv: Path, competition: str, message: str) -> str:
    """Send `csv` with the official client; returns Kaggle's submission reference."""
    from pipeline.kaggle_client import kaggle_api

    if not csv.is_file():
        raise UserError(f"{csv}: no submission to upload; run `ablate submit` first")
    with kaggle_api(competition) as api:
        response = api.competition_submit(str(csv), message, competition, quiet=True)
    ref = getattr(response, "ref", None) or ""
    return f"{getattr(response, 'message', '') or 'submitted'} (ref {ref})".strip()


def main(config: Config, upload: bool = False, message: str | None = None) -> dict[str, Any]:
    import keras

    from pipeline.tracking import Tracker

    paths, competition = config.paths, config.data.competition
    if upload and not message:
        raise UserError('--upload needs a description: ablate submit --upload -m "message"')
    chosen = choose_study(paths, config.experiments, config.submit.experiment)
    model_path = paths.sweep_model(chosen["experiment"])
    if not model_path.is_file():
        raise UserError(f"{model_path}: no model; run `dvc repro sweep@{chosen['experiment']}`")
    data = load_prepared(paths.prepared)
    sample = read_csv(paths.raw_data(competition) / "sample_submission.csv")
    model = keras.models.load_model(model_path)
    submission = make_submission(predict(model, data, config.submit.batch_size), data, sample)

    csv = paths.submission_csv
    write_submission(submission, csv)
    sidecar = {
        "experiment": chosen["experiment"],
        "study": chosen.get("study"),
        "mlflow_run_id": chosen.get("parent_run_id"),
        "best_trial_run_id": chosen.get("best_run_id"),
        "model_uri": chosen.get("model_uri"),
        "registered_model": chosen.get("registered_model"),
        "val_accuracy": chosen.get("best_value"),
        "data_hash": data.meta.data_hash,
        "rows": len(submission),
    }
    write_json(paths.submission_json, sidecar)
    if chosen.get("parent_run_id"):
        tracker = Tracker.connect(config.tracking.uri, config.tracking.experiment)
        tracker.log_artifact(chosen["parent_run_id"], csv, "submission")
    log.info(
        "submit: wrote %s (%d rows) from %s, val_accuracy %.4f",
        csv,
        len(submission),
        chosen["experiment"],
        chosen.get("best_value") or float("nan"),
    )
    if upload:
        log.info("submit: uploaded to Kaggle: %s", upload_submission(csv, competition, message))
    return sidecar
