"""Accuracy of a Kaggle submission against the competition's solution file.

Both files are CSVs with a header: the first column is the id (`ImageId`, `id`), the
second the label. Rows are joined on the id, so their order does not matter. The column
names must agree, ids must be unique, and both files must hold exactly the same ids;
anything else stops with one line saying what differs (exit status 2).

Run: python bench/score_submission.py submissions/submission.csv \\
         ../shared/data/digit-recognizer-mnist10k/solution.csv
Prints e.g. `accuracy 0.9870 (1974/2000)`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd


class ScoreError(Exception):
    """The two files cannot be compared: the message says why."""


@dataclass(frozen=True)
class Score:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    def __str__(self) -> str:
        return f"accuracy {self.accuracy:.4f} ({self.correct}/{self.total})"


def read_labels(path: Path) -> pd.DataFrame:
    """The id and label columns of `path`, as strings, checked."""
    if not path.is_file():
        raise ScoreError(f"{path}: file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ScoreError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        detail = str(exc).strip().splitlines()[-1]
        raise ScoreError(f"{path}: not a readable CSV ({detail})") from None
    if frame.shape[1] != 2:
        raise ScoreError(
            f"{path}: expected two columns (id, label), found {frame.shape[1]}: "
            f"{', '.join(map(str, frame.columns))}"
        )
    if frame.empty:
        raise ScoreError(f"{path}: has a header but no rows")
    frame = frame.apply(lambda column: column.str.strip())
    id_column, label_column = frame.columns
    for column in (id_column, label_column):
        blank = frame[column] == ""
        if blank.any():
            raise ScoreError(
                f"{path}: line {int(blank.to_numpy().argmax()) + 2}, column {column}: missing value"
            )
    duplicated = frame[id_column].duplicated()
    if duplicated.any():
        row = int(duplicated.to_numpy().argmax())
        raise ScoreError(f"{path}: line {row + 2}: duplicate id {frame[id_column].iloc[row]!r}")
    return frame


def _canonical(values: pd.Series) -> pd.Series:
    """Numbers compared as numbers (`7` equals `7.0`), anything else as text."""
    numbers = pd.to_numeric(values, errors="coerce")
    if not numbers.notna().all():
        return values
    if (numbers == numbers.round()).all():
        return numbers.map(lambda v: str(int(v)))
    return numbers.map(lambda v: repr(float(v)))


def score(submission_path: Path, solution_path: Path) -> Score:
    submission, solution = read_labels(submission_path), read_labels(solution_path)
    if list(submission.columns) != list(solution.columns):
        raise ScoreError(
            f"{submission_path} has columns {', '.join(submission.columns)} but "
            f"{solution_path} has {', '.join(solution.columns)}; they must match"
        )
    id_column, label_column = solution.columns
    sub_ids = _canonical(submission[id_column])
    sol_ids = _canonical(solution[id_column])
    missing = sorted(set(sol_ids) - set(sub_ids), key=_sort_key)
    extra = sorted(set(sub_ids) - set(sol_ids), key=_sort_key)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} id(s) of the solution missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} id(s) not in the solution (e.g. {extra[0]})")
        raise ScoreError(
            f"{submission_path} ({len(submission)} rows) and {solution_path} "
            f"({len(solution)} rows) hold different ids: " + "; ".join(parts)
        )
    predicted = pd.Series(_canonical(submission[label_column]).to_numpy(), index=sub_ids)
    truth = pd.Series(_canonical(solution[label_column]).to_numpy(), index=sol_ids)
    correct = int((predicted.loc[truth.index].to_numpy() == truth.to_numpy()).sum())
    return Score(correct, len(truth))


def _sort_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("submission", type=Path, help="the submission CSV (id, label)")
    parser.add_argument("solution", type=Path, help="the solution CSV (id, label)")
    args = parser.parse_args(argv)
    try:
        result = score(args.submission, args.solution)
    except ScoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
