"""The prepared data set: what `prepare` writes to `data/prepared/` and every later stage
reads, as arrays plus the `Meta` that describes them."""

from __future__ import annotations

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


def save_prepared(dataset: Dataset, dest: Path) -> None:
    """Write the arrays and `meta.json` into `dest`, replacing it atomically."""
    with atomic_dir(dest) as tmp:
        np.savez(tmp / "train.npz", x=dataset.x_train, y=dataset.y_train)
        np.savez(tmp / "val.npz", x=dataset.x_val, y=dataset.y_val)
        np.savez(tmp / "test.npz", x=dataset.x_test, ids=dataset.test_ids)
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
        return Dataset(tr["x"], tr["y"], va["x"], va["y"], te["x"], te["ids"], meta)
