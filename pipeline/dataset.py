"""The prepared data set: what `prepare` writes to `data/prepared/` and every later stage
reads, as arrays plus the `Meta` that describes them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.fsutil import atomic_dir


@dataclass(frozen=True)
class Meta:
    """What later stages need to know about the prepared data."""

    competition: str
    id_column: str
    label_column: str
    explicit_ids: bool
    n_classes: int
    image_shape: tuple[int, int, int]
    data_hash: str


@dataclass
class Dataset:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    test_ids: np.ndarray
    meta: Meta
    # labelled images kept from every selection, for one final estimate (may be empty)
    x_holdout: np.ndarray | None = None
    y_holdout: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.x_holdout is None:
            self.x_holdout = self.x_train[:0]
            self.y_holdout = self.y_train[:0]


def save_prepared(dataset: Dataset, dest: Path) -> None:
    """Write the arrays and `meta.json` into `dest`, replacing it atomically."""
    with atomic_dir(dest) as tmp:
        np.savez(tmp / "train.npz", x=dataset.x_train, y=dataset.y_train)
        np.savez(tmp / "val.npz", x=dataset.x_val, y=dataset.y_val)
        np.savez(tmp / "test.npz", x=dataset.x_test, ids=dataset.test_ids)
        np.savez(tmp / "holdout.npz", x=dataset.x_holdout, y=dataset.y_holdout)
        (tmp / "meta.json").write_text(json.dumps(asdict(dataset.meta), indent=2) + "\n")


def load_prepared(folder: str | Path) -> Dataset:
    """Read what `save_prepared` wrote."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise UserError(f"{folder}: no prepared data; run `ablate prepare` (or `dvc repro`)")
    raw = json.loads((folder / "meta.json").read_text())
    raw["image_shape"] = tuple(raw["image_shape"])
    meta = Meta(**raw)
    with (
        np.load(folder / "train.npz") as tr,
        np.load(folder / "val.npz") as va,
        np.load(folder / "test.npz", allow_pickle=True) as te,
    ):
        data = Dataset(tr["x"], tr["y"], va["x"], va["y"], te["x"], te["ids"], meta)
    if (folder / "holdout.npz").is_file():
        with np.load(folder / "holdout.npz") as ho:
            data.x_holdout, data.y_holdout = ho["x"], ho["y"]
    return data


def labelled_for_refit(data: Dataset) -> Dataset:
    """Every labelled image but the held-out ones as training data, with no validation
    images: what a final model is refit on."""
    empty_x, empty_y = data.x_val[:0], data.y_val[:0]
    return Dataset(
        np.concatenate([data.x_train, data.x_val]),
        np.concatenate([data.y_train, data.y_val]),
        empty_x,
        empty_y,
        data.x_test,
        data.test_ids,
        data.meta,
        data.x_holdout,
        data.y_holdout,
    )


def split_for_seed(data: Dataset, seed: int) -> Dataset:
    """The same labelled images, with the train/validation split redrawn for `seed`:
    stratified, the validation set the same size. Every caller with the same seed gets
    the same split; the held-out and test images are untouched."""
    from sklearn.model_selection import train_test_split

    if len(data.y_val) == 0:
        return data
    x = np.concatenate([data.x_train, data.x_val])
    y = np.concatenate([data.y_train, data.y_val])
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=len(data.y_val), random_state=seed, stratify=y
    )
    return Dataset(
        x_train,
        y_train,
        x_val,
        y_val,
        data.x_test,
        data.test_ids,
        data.meta,
        data.x_holdout,
        data.y_holdout,
    )


def data_hash(*arrays: np.ndarray) -> str:
    """A short hash of the arrays' shapes and bytes: `Meta.data_hash`."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]
