"""Stage `prepare`: validate a pixel-CSV competition and turn it into image arrays.

Reads `train.csv`, `test.csv` and `sample_submission.csv` from `data/raw/<competition>/`.
Works for `digit-recognizer` (test rows numbered 1..N implicitly, submission
`ImageId,Label`) and for competitions whose `test.csv` has an explicit id column named
like the submission's first column (Kannada-MNIST: `id,label`). Pixels are validated,
scaled to float32 in [0, 1], shaped (N, H, W, 1) and split stratified into train,
validation and held-out. Writes `data/prepared/{train,val,holdout,test}.npz` and `meta.json`
atomically, plus `metrics/data.json` (row and class counts, image side: numbers only).

Run: `ablate prepare` (or `dvc repro prepare`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.csvfiles import (
    check_test_ids,
    find_column,
    image_side,
    integer_labels,
    numeric_block,
    pixel_columns,
    read_csv,
    submission_layout,
    unique_ids,
)
from pipeline.dataset import Dataset, Meta, data_hash, save_prepared
from pipeline.errors import UserError
from pipeline.fsutil import write_json
from pipeline.params import PrepareParams

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


def to_images(values: np.ndarray, side: int) -> np.ndarray:
    """Pixels 0..255 as float32 images in [0, 1] of shape (N, side, side, 1)."""
    return (values.astype(np.float32) / 255.0).reshape(-1, side, side, 1)


def split_train_val(x: np.ndarray, y: np.ndarray, params: PrepareParams):
    """Stratified (train, validation, held-out) split of the labelled rows: x_train,
    x_val, x_holdout, y_train, y_val, y_holdout. Every class needs a row on each side."""
    counts = np.bincount(y)
    rare = [c for c, n in enumerate(counts) if 0 < n < 2]
    if rare:
        raise UserError(
            f"train.csv: class {rare[0]} has a single row; a stratified validation split "
            "needs at least two per class"
        )
    n_val, n_hold = (math.ceil(f * len(y)) for f in (params.val_fraction, params.holdout_fraction))
    if n_hold:
        x, x_hold, y, y_hold = _split(x, y, n_hold, params, "holdout_fraction")
    else:
        x_hold, y_hold = x[:0], y[:0]
    x_train, x_val, y_train, y_val = _split(x, y, n_val, params, "val_fraction")
    return x_train, x_val, x_hold, y_train, y_val, y_hold


def _split(x: np.ndarray, y: np.ndarray, n_out: int, params: PrepareParams, name: str):
    """`n_out` rows split off, stratified; one line naming `name` when it cannot be."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(y)
    n_present = int(np.count_nonzero(counts))
    if min(n_out, len(y) - n_out) < n_present or counts[counts > 0].min() < 2:
        raise UserError(
            f"train.csv: {len(y)} rows split {len(y) - n_out} / {n_out} "
            f"(prepare.{name} {getattr(params, name)}) cannot hold all {n_present} "
            f"classes on both sides; use more rows or change prepare.{name}"
        )
    return train_test_split(x, y, test_size=n_out, random_state=params.seed, stratify=y)


def prepare(raw_dir: Path, competition: str, params: PrepareParams) -> tuple[Dataset, dict]:
    """Validate the raw CSVs and build the dataset plus its summary metrics."""
    train_path, test_path = raw_dir / "train.csv", raw_dir / "test.csv"
    sample_path = raw_dir / "sample_submission.csv"
    sample = read_csv(sample_path)
    id_column, label_column = submission_layout(sample, sample_path)
    train, test = read_csv(train_path), read_csv(test_path)

    train_label = find_column(train, label_column)
    if train_label is None:
        raise UserError(
            f"{train_path}: label column {label_column.lower()!r} is missing; the training "
            "file needs one label per row (is this test.csv?)"
        )
    if find_column(test, label_column) is not None:
        raise UserError(
            f"{test_path}: has a label column {find_column(test, label_column)!r}; test data "
            "must not carry labels (are train.csv and test.csv swapped?)"
        )
    train_id, test_id = find_column(train, id_column), find_column(test, id_column)
    train_pixels = pixel_columns(train, train_path, {train_label} | ({train_id} - {None}))
    test_pixels = pixel_columns(test, test_path, {test_id} - {None})
    if len(train_pixels) != len(test_pixels):
        raise UserError(
            f"{test_path}: {len(test_pixels)} pixel columns but {train_path} has "
            f"{len(train_pixels)}; both must hold images of the same size"
        )
    side = image_side(len(train_pixels), train_path, params.image_size)

    labels = integer_labels(train, train_label, train_path, params.min_class_share)
    n_classes = int(labels.max()) + 1
    x_all = to_images(numeric_block(train, train_pixels, train_path), side)
    x_test = to_images(numeric_block(test, test_pixels, test_path), side)
    sample_ids = unique_ids(sample[id_column], sample_path, id_column)
    if test_id is not None:
        test_ids = unique_ids(test[test_id], test_path, test_id)
    else:
        test_ids = np.arange(1, len(test) + 1)
    check_test_ids(test_ids, sample_ids, test_path, sample_path)

    x_train, x_val, x_hold, y_train, y_val, y_hold = split_train_val(x_all, labels, params)
    held = (x_hold, y_hold) if len(y_hold) else ()  # no holdout: the hash of before
    meta = Meta(
        competition=competition,
        id_column=id_column,
        label_column=label_column,
        explicit_ids=test_id is not None,
        n_classes=n_classes,
        image_shape=(side, side, 1),
        data_hash=data_hash(x_train, y_train, x_val, y_val, x_test, *held),
    )
    metrics = {
        "rows": {
            "train": len(y_train),
            "val": len(y_val),
            "holdout": len(y_hold),
            "test": len(x_test),
        },
        "class_counts": {
            str(c): int(n) for c, n in enumerate(np.bincount(labels, minlength=n_classes))
        },
        "image_side": side,  # numbers only: DVC shows a list as a string
        "n_classes": n_classes,
    }
    dataset = Dataset(x_train, y_train, x_val, y_val, x_test, test_ids, meta, x_hold, y_hold)
    return dataset, metrics


def main(config: Config) -> None:
    paths, competition = config.paths, config.data.competition
    dataset, metrics = prepare(paths.raw_data(competition), competition, config.prepare)
    save_prepared(dataset, Path(paths.prepared))
    write_json(paths.data_metrics, metrics)
    rows = metrics["rows"]
    log.info(
        "prepare: %d train, %d validation, %d held-out, %d test images of %s, %d classes",
        rows["train"],
        rows["val"],
        rows["holdout"],
        rows["test"],
        "x".join(map(str, dataset.meta.image_shape)),
        metrics["n_classes"],
    )
