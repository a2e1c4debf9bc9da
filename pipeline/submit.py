"""Stage `submit`: predict the test set and write a Kaggle submission that Kaggle accepts.

Predicts the test images with the members `submit.strategy` picks (`pipeline.ensemble`:
the best checkpoint, the best configuration refit on all labelled data, or an ensemble of
the top configurations), and writes `submissions/submission.csv` in exactly the layout of
the competition's `sample_submission.csv`: same columns, same id order. The file is
validated before it is written (row count, ids, label range, no missing values); an
invalid file is never written. `submissions/submission.json` records the strategy, its
members and the accuracy expected on the leaderboard, measured once on held-out images
that no selection saw, with its 95% interval; `submissions/submission.scores.json` holds
its numbers alone (what `dvc metrics show` lists), and an MLflow run `submit-<strategy>`
the same. Uploading is opt-in and never part of `dvc repro`: `ablate submit --upload -m MSG`.

Run: `ablate submit` (or `dvc repro submit`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.csvfiles import read_csv
from pipeline.dataset import Dataset, load_prepared
from pipeline.errors import UserError
from pipeline.fsutil import atomic_path, write_json

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


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
    from pipeline import ensemble
    from pipeline.kaggle_client import KAGGLE_HELP, has_kaggle_credentials

    paths, competition, settings = config.paths, config.data.competition, config.submit
    if upload and not message:
        raise UserError('--upload needs a description: ablate submit --upload -m "message"')
    if upload and not has_kaggle_credentials():
        raise UserError(f"--upload: no Kaggle credentials found: {KAGGLE_HELP}")
    data = load_prepared(paths.prepared)
    sample = read_csv(paths.raw_data(competition) / "sample_submission.csv")
    members = ensemble.members(config, data)
    turn = settings.tta_rotation
    test = ensemble.probabilities(members.models, data.x_test, data, settings.batch_size, turn)
    submission = make_submission(test.argmax(axis=1), data, sample)
    estimate = ensemble.holdout_estimate(members.models, data, settings.batch_size, turn)

    csv = paths.submission_csv
    write_submission(submission, csv)
    chosen = members.chosen
    sidecar = {
        "strategy": settings.strategy,
        "members": members.described,
        "n_models": len(members.models),
        "tta_rotation": turn,
        **estimate,
        "experiment": chosen.get("experiment"),
        "study": chosen.get("study"),
        "val_accuracy": chosen.get("best_value"),
        "best_trial_run_id": chosen.get("best_run_id"),
        "registered_model": chosen.get("registered_model"),
        "data_hash": data.meta.data_hash,
        "rows": len(submission),
    }
    scores = submission_scores(sidecar)
    sidecar["mlflow_run_id"] = _log_to_mlflow(config, csv, sidecar, scores, data)
    write_json(paths.submission_scores, scores)
    write_json(paths.submission_json, sidecar)
    held = estimate["holdout_accuracy"]
    log.info(
        "submit: wrote %s (%d rows), strategy %s: %d configuration(s), %d model(s); "
        "held-out accuracy %s",
        csv,
        len(submission),
        settings.strategy,
        len(members.described),
        len(members.models),
        "n/a (prepare.holdout_fraction is 0)"
        if held is None
        else f"{held:.4f} (95% CI {estimate['holdout_ci95'][0]:.4f}-"
        f"{estimate['holdout_ci95'][1]:.4f}, {estimate['holdout_n']} images)",
    )
    if upload:
        log.info("submit: uploaded to Kaggle: %s", upload_submission(csv, competition, message))
    return sidecar


def submission_scores(sidecar: dict[str, Any]) -> dict[str, float]:
    """The submission's numbers: the held-out accuracy with its interval and image count
    (none without held-out images), and how many models it averages."""
    low, high = sidecar.get("holdout_ci95") or (None, None)
    scores = {
        "holdout_accuracy": sidecar["holdout_accuracy"],
        "holdout_ci95_low": low,
        "holdout_ci95_high": high,
        "holdout_n": sidecar["holdout_n"],
        "n_members": len(sidecar["members"]),
        "n_models": sidecar.get("n_models"),
    }
    return {k: v for k, v in scores.items() if v is not None}


def _log_to_mlflow(
    config: Config, csv: Path, sidecar: dict, scores: dict[str, float], data: Dataset
) -> str:
    """One `submit` run: the strategy, its members, its scores, the file."""
    from pipeline.tracking import Tracker, provenance

    tracker = Tracker.connect(config.tracking.uri, config.tracking.experiment)
    labels = [m.get("label") or m.get("experiment") for m in sidecar["members"]]
    run_id = tracker.start_run(
        f"submit-{sidecar['strategy']}",
        params={
            "strategy": sidecar["strategy"],
            "members": " | ".join(map(str, labels)),
            "tta_rotation": sidecar["tta_rotation"],
        },
        tags=provenance(data.meta.competition, data.meta.data_hash),
    )
    tracker.log_metrics(run_id, scores)
    tracker.log_artifact(run_id, csv, "submission")
    tracker.end_run(run_id)
    return run_id
