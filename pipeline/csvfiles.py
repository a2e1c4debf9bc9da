"""Reading and checking a pixel-CSV competition's files (`train.csv`, `test.csv`,
`sample_submission.csv`): columns, pixels, labels and ids. Every problem is a `UserError`
naming the file, line and column, and what to do about it. `pipeline.prepare` turns what
passes into images.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import UserError

PIXEL = re.compile(r"pixel(\d+)$")


def read_csv(path: Path) -> pd.DataFrame:
    """Read a CSV; missing, empty and malformed files become one-line errors."""
    if not path.is_file():
        raise UserError(f"{path}: file not found; run `ablate fetch` (or check data.zip)")
    try:
        frame = pd.read_csv(path, low_memory=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty; download the competition data again") from None
    except pd.errors.ParserError as exc:
        detail = str(exc).strip().splitlines()[-1]
        raise UserError(f"{path}: malformed CSV ({detail}); fix or re-download it") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file") from None
    if _is_number(frame.columns[0]):
        # pandas took the first data row as the header; say so, not "column missing".
        shown = ",".join(map(str, list(frame.columns)[:4]))
        raise UserError(
            f"{path}: wrong or missing header (line 1 starts {shown}, which is data); "
            "the first line must name the columns, e.g. label,pixel0,pixel1,... or ImageId,Label"
        )
    if frame.empty:
        raise UserError(f"{path}: has a header but no rows")
    return frame


def _is_number(text: object) -> bool:
    try:
        float(str(text))
    except ValueError:
        return False
    return True


def _shown(value: object) -> str:
    """`repr` of a cell without numpy 2's `np.int64(...)` wrapper."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _line(row: int) -> int:
    """File line of data row `row` (0-based): line 1 is the header."""
    return row + 2


def find_column(frame: pd.DataFrame, name: str) -> str | None:
    """The column of `frame` called `name`, ignoring case."""
    matches = [c for c in frame.columns if str(c).lower() == name.lower()]
    return matches[0] if matches else None


def pixel_columns(frame: pd.DataFrame, path: Path, allowed: set[str]) -> list[str]:
    """The `pixel0..pixelN-1` columns, in order; anything else unexpected is an error."""
    pixels = [c for c in frame.columns if PIXEL.match(str(c))]
    others = [c for c in frame.columns if c not in pixels and c not in allowed]
    if not pixels or others:
        shown = ", ".join(map(str, list(frame.columns)[:4]))
        expect = ", ".join(sorted(allowed) + ["pixel0", "pixel1", "..."])
        what = f"unexpected column {others[0]!r}" if others else "no pixel columns"
        raise UserError(
            f"{path}: wrong or missing header ({what}; starts {shown}); expected {expect}"
        )
    expected = [f"pixel{i}" for i in range(len(pixels))]
    if pixels != expected:
        wrong = next(p for p, e in zip(pixels, expected, strict=True) if p != e)
        raise UserError(
            f"{path}: pixel columns must be pixel0..pixel{len(pixels) - 1} in order; "
            f"found {wrong!r} out of place"
        )
    return pixels


def image_side(n_pixels: int, path: Path, image_size: int | None) -> int:
    """The side of a square image with `n_pixels`, checked against `prepare.image_size`."""
    side = math.isqrt(n_pixels)
    if image_size is not None:
        if image_size * image_size != n_pixels:
            raise UserError(
                f"{path}: {n_pixels} pixel columns do not make {image_size}x{image_size} "
                "images; fix prepare.image_size in params.yaml (or set it to null)"
            )
        return image_size
    if side * side != n_pixels:
        raise UserError(
            f"{path}: {n_pixels} pixel columns is not a perfect square, so the images "
            "cannot be square; set prepare.image_size or check the file"
        )
    return side


def numeric_block(frame: pd.DataFrame, columns: list[str], path: Path) -> np.ndarray:
    """`frame[columns]` as float64, rejecting text, missing values and values off 0..255."""
    block = frame[columns]
    for col in columns:
        if not pd.api.types.is_numeric_dtype(block[col]):
            coerced = pd.to_numeric(block[col], errors="coerce")
            bad = coerced.isna() & block[col].notna()
            if bad.any():
                row = int(np.argmax(bad.to_numpy()))
                raise UserError(
                    f"{path}: line {_line(row)}, column {col}: {_shown(block[col].iloc[row])} is "
                    "not a number; pixels must be numbers 0..255"
                )
    values = block.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    missing = np.argwhere(np.isnan(values))
    if len(missing):
        row, col = missing[0]
        raise UserError(
            f"{path}: line {_line(row)}, column {columns[col]}: missing value (NaN); "
            "every pixel needs a value 0..255"
        )
    outside = np.argwhere((values < 0) | (values > 255))
    if len(outside):
        row, col = outside[0]
        raise UserError(
            f"{path}: line {_line(row)}, column {columns[col]}: {values[row, col]:g} is "
            "outside 0..255"
        )
    return values


def integer_labels(
    frame: pd.DataFrame, column: str, path: Path, min_class_share: float = 0.0
) -> np.ndarray:
    """The label column as int64 class indices: the classes 0..K-1, K >= 2, each present
    with at least `min_class_share` of the median class's rows."""
    raw = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(raw) | (raw != np.round(raw)) | (raw < 0)
    if bad.any():
        row = int(np.argmax(bad))
        raise UserError(
            f"{path}: line {_line(row)}, column {column}: {_shown(frame[column].iloc[row])} is not "
            "a class label; labels must be integers 0, 1, 2, ..."
        )
    labels = raw.astype(np.int64)
    n_classes = int(labels.max()) + 1
    missing = sorted(set(range(n_classes)) - set(labels.tolist()))
    if n_classes < 2 or missing:
        raise UserError(
            f"{path}: column {column} must hold the classes 0..K-1, each at least "
            f"once; "
            + (
                f"classes {missing} have no row (labels run 0..{n_classes - 1})"
                if missing
                else "every row has label 0, a single class"
            )
            + ": check the label column, or that the file is the competition's train.csv"
        )
    counts = np.bincount(labels)
    median = float(np.median(counts))
    stray = [k for k, n in enumerate(counts) if n < min_class_share * median]
    if stray:
        shown = ", ".join(f"{k} ({counts[k]} row{'' if counts[k] == 1 else 's'})" for k in stray)
        raise UserError(
            f"{path}: column {column}: class{'es' if len(stray) > 1 else ''} {shown} against "
            f"a median of {median:g} rows per class look like stray labels; fix or drop "
            "those rows, or set prepare.min_class_share: 0 in params.yaml to keep them"
        )
    return labels


def unique_ids(values: pd.Series, path: Path, column: str) -> np.ndarray:
    duplicated = values.duplicated().to_numpy()
    if duplicated.any():
        row = int(np.argmax(duplicated))
        raise UserError(
            f"{path}: line {_line(row)}, column {column}: duplicate id {_shown(values.iloc[row])}; "
            "ids must be unique"
        )
    if values.isna().any():
        row = int(np.argmax(values.isna().to_numpy()))
        raise UserError(f"{path}: line {_line(row)}, column {column}: missing id")
    return np.asarray(values.tolist())


def submission_layout(sample: pd.DataFrame, path: Path) -> tuple[str, str]:
    """(id column, label column) of the competition's sample submission."""
    if sample.shape[1] != 2:
        raise UserError(
            f"{path}: expected two columns (id, label) like ImageId,Label; found "
            f"{', '.join(map(str, sample.columns))}"
        )
    return str(sample.columns[0]), str(sample.columns[1])


def check_test_ids(
    test_ids: np.ndarray, sample_ids: np.ndarray, test_path: Path, sample_path: Path
) -> None:
    """Test rows and sample submission rows must describe the same ids."""
    if len(test_ids) != len(sample_ids):
        raise UserError(
            f"{test_path} has {len(test_ids)} rows but {sample_path} has {len(sample_ids)}: "
            "they must match; re-download the competition data"
        )
    test_set = {str(v) for v in test_ids}
    missing = [v for v in sample_ids if str(v) not in test_set]
    if missing:
        raise UserError(
            f"{sample_path}: id {_shown(missing[0])} has no row in {test_path}; "
            "test rows must match the sample submission"
        )
