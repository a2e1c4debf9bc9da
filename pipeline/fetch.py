"""Stage `fetch`: put a competition's raw files in `data/raw/<competition>/`.

Sources (`params.yaml` -> `data.source`):
- `kaggle`: the official Kaggle client downloads the competition zip;
- `zip`: a competition zip you downloaded yourself (`data.zip`);
- `embedded`: scikit-learn's 8x8 digits laid out exactly like `digit-recognizer`;
- `auto`: the zip if `data.zip` is set, else Kaggle if credentials exist, else embedded.

Run: `ablate fetch` (or `dvc repro fetch`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from pipeline.errors import UserError
from pipeline.fsutil import atomic_dir
from pipeline.kaggle_client import has_kaggle_credentials, kaggle_api
from pipeline.params import DataParams, Paths

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


def choose_source(params: DataParams, env: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The concrete source for `params.source` and a one-line reason."""
    if params.source != "auto":
        return params.source, f"data.source is {params.source}"
    if params.zip:
        return "zip", f"data.zip is set ({params.zip})"
    if has_kaggle_credentials(env):
        return "kaggle", "Kaggle credentials found"
    return "embedded", "no data.zip and no Kaggle credentials: using the offline digits"


def write_embedded(dest: Path) -> None:
    """scikit-learn's digits as `train.csv`, `test.csv`, `sample_submission.csv`.

    Same columns as Kaggle's digit-recognizer (`label,pixel0..`; `ImageId,Label`), with
    the 8x8 images scaled from 0..16 to integers 0..255. A fixed shuffle keeps 80% for
    train and 20% for test.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.data * 255.0 / 16.0).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(pixels))
    n_test = len(pixels) // 5
    test_idx, train_idx = order[:n_test], order[n_test:]
    columns = [f"pixel{i}" for i in range(pixels.shape[1])]

    train = pd.DataFrame(pixels[train_idx], columns=columns)
    train.insert(0, "label", digits.target[train_idx])
    train.to_csv(dest / "train.csv", index=False)
    pd.DataFrame(pixels[test_idx], columns=columns).to_csv(dest / "test.csv", index=False)
    sample = pd.DataFrame({"ImageId": np.arange(1, n_test + 1), "Label": 0})
    sample.to_csv(dest / "sample_submission.csv", index=False)


# What `prepare` reads from every competition.
REQUIRED = ("train.csv", "test.csv", "sample_submission.csv")


def extract_zip(zip_path: Path, dest: Path) -> None:
    """Unpack a competition zip into `dest`, flattening one top-level folder if present.

    Nested zips (Kaggle ships some files as `train.csv.zip`) are unpacked too.
    """
    if not zip_path.is_file():
        raise UserError(f"{zip_path}: zip file not found; check data.zip in params.yaml")
    _unpack(zip_path, dest)
    entries = [p for p in dest.iterdir() if not p.name.startswith(("__MACOSX", "."))]
    if len(entries) == 1 and entries[0].is_dir():
        for child in entries[0].iterdir():
            child.rename(dest / child.name)
        entries[0].rmdir()
    # One level only, and no flattening: an inner `train.zip` holding `train/` keeps it.
    for inner in list(dest.glob("*.zip")):
        _unpack(inner, dest)
        inner.unlink()


def _unpack(zip_path: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(zip_path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise UserError(f"{zip_path}: corrupt member {bad}; download the zip again")
            for name in archive.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise UserError(f"{zip_path}: unsafe member path {name!r}; refusing it")
            archive.extractall(dest)
    # A damaged deflate stream surfaces as zlib.error or EOFError, not BadZipFile.
    except (zipfile.BadZipFile, zlib.error, EOFError):
        raise UserError(
            f"{zip_path}: not a valid zip file (corrupt or incomplete); download it again"
        ) from None


def download_kaggle(competition: str, dest: Path) -> None:
    """Download and unpack `competition` with the official client into `dest`."""
    download = Path(tempfile.mkdtemp(prefix=".download.", dir=dest.parent))
    try:
        with kaggle_api(competition) as api:
            api.competition_download_files(competition, path=str(download), quiet=True)
        zips = list(download.glob("*.zip"))
        if not zips:
            raise UserError(f"Kaggle returned no zip for competition {competition!r}")
        extract_zip(zips[0], dest)
    finally:
        shutil.rmtree(download, ignore_errors=True)


def fetch(data: DataParams, paths: Paths, env: Mapping[str, str] = os.environ) -> Path:
    """Fetch the competition's raw files; returns the folder they are in."""
    source, reason = choose_source(data, env)
    log.info("fetch: source %s (%s)", source, reason)
    dest = paths.raw_data(data.competition)
    with atomic_dir(dest) as tmp:
        if source == "embedded":
            write_embedded(tmp)
        elif source == "zip":
            if not data.zip:
                raise UserError("params.yaml: data.source is zip but data.zip is not set")
            extract_zip(Path(data.zip).expanduser(), tmp)
        else:
            download_kaggle(data.competition, tmp)
        missing = [name for name in REQUIRED if not (tmp / name).is_file()]
        if missing:  # the raw data already there, if any, stays as it was
            raise UserError(
                f"fetch: source {source} gave no {', '.join(missing)} (a competition needs "
                f"{', '.join(REQUIRED)}); {dest} is left as it was"
            )
    return dest


def main(config: Config) -> None:
    dest = fetch(config.data, config.paths)
    log.info("fetch: wrote %s", ", ".join(sorted(p.name for p in dest.iterdir())))
