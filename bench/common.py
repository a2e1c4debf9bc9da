"""Shared helpers for the benchmarks in `bench/`: data, params, workspaces, timing, output.

Every benchmark is a script (`python bench/NAME.py --help`) that prints progress to
stderr and exactly one summary line to stdout. Data comes from `--data`: `mnist10k` (the
shared digit-recognizer zip next to this checkout, the default when it exists),
`embedded` (scikit-learn's 8x8 digits, offline) or a path to any competition zip. It is
unpacked and prepared with the pipeline's own `fetch` and `prepare` functions. Sweeps
run in a throwaway workspace: prepared data, experiment files, a `params.yaml`, and
SQLite stores for Optuna and MLflow, all under one temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before TensorFlow is imported anywhere.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

REPO = Path(__file__).resolve().parents[1]
# The benchmarks measure this checkout's pipeline, even if another one is installed.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from pipeline.errors import UserError  # noqa: E402

SHARED_DATA = REPO / ".." / "shared" / "data" / "digit-recognizer-mnist10k"
MNIST_ZIP = SHARED_DATA / "digit-recognizer.zip"
MNIST_SOLUTION = SHARED_DATA / "solution.csv"
PARAMS = REPO / "params.yaml"
EXPERIMENTS = REPO / "experiments"
EXIT_USER_ERROR = 2


# -- command line -----------------------------------------------------------------------------
def default_data() -> str:
    return "mnist10k" if MNIST_ZIP.is_file() else "embedded"


def make_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark shares: `--data`, `-S`, `--keep`, `-v`."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        default=default_data(),
        metavar="embedded|mnist10k|PATH.zip",
        help="embedded: the offline 8x8 digits; mnist10k: the shared 28x28 digit-recognizer "
        "zip; or a competition zip (default: %(default)s)",
    )
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml value, e.g. -S train.epochs=2 (repeatable; the value "
        "is read as YAML)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary workspace and say where it is"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def overrides_with_trials(items: list[str], trials: int | None) -> dict[str, Any]:
    """`-S` overrides plus `--trials` as `sweep.n_trials` (checked >= 1)."""
    overrides = parse_overrides(items)
    if trials is not None:
        if trials < 1:
            raise UserError("--trials must be >= 1")
        overrides["sweep.n_trials"] = trials
    return overrides


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["train.epochs=2"]` -> `{"train.epochs": 2}`; values are parsed as YAML, so a
    top-level key takes a list too: `experiments=[padding,joint]`."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"-S {item!r}: expected SECTION.KEY=VALUE, e.g. train.epochs=2")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def setup_logging(verbose: bool) -> None:
    """Progress on stderr; the noisy libraries quiet, as the `ablate` command has them."""
    from pipeline.cli import configure_logging

    configure_logging(verbose)
    for noisy in ("git", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def note(message: str) -> None:
    """One line of progress on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_main(main) -> None:
    """Run a benchmark's `main()`; a `UserError` is one line on stderr and exit status 2."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# -- params -------------------------------------------------------------------------------------
def read_params(overrides: dict[str, Any] | None = None, path: Path = PARAMS) -> dict[str, Any]:
    """The repository's `params.yaml` with `overrides` (dotted keys) applied."""
    from pipeline.config import read_params as read

    raw = read(path)
    return apply_overrides(raw, overrides or {})


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"-S {key}: {part} is not a section of params.yaml")
            node = child
        node[leaf] = value
    return raw


def base_config(raw: dict[str, Any]):
    """(ModelConfig, TrainParams) of a params mapping, validated like the pipeline does."""
    from pipeline.fields import from_dict
    from pipeline.model import ModelConfig
    from pipeline.params import TrainParams

    config = ModelConfig.from_dict(raw.get("model") or {}, "params.yaml: model")
    return config, from_dict(TrainParams, raw.get("train") or {}, "params.yaml: train")


# -- data -----------------------------------------------------------------------------------------
def fetch_raw(source: str, dest: Path) -> str:
    """Put `train.csv`, `test.csv`, `sample_submission.csv` of `source` in `dest`; returns
    a one-word description of the data for the summary line."""
    from pipeline.fetch import extract_zip, write_embedded

    dest.mkdir(parents=True, exist_ok=True)
    if source == "embedded":
        write_embedded(dest)
        return "embedded"
    if source == "mnist10k":
        if not MNIST_ZIP.is_file():
            raise UserError(
                f"--data mnist10k: {MNIST_ZIP.resolve()} not found; "
                "use --data embedded or a PATH.zip"
            )
        extract_zip(MNIST_ZIP, dest)
        return "mnist10k"
    path = Path(source).expanduser()
    if path.suffix != ".zip":
        raise UserError(f"--data {source!r}: use embedded, mnist10k or a path to a .zip")
    extract_zip(path, dest)
    return path.name


def load_data(source: str, raw: dict[str, Any] | None = None):
    """(Dataset, label) for `--data`, prepared with `params.yaml`'s `prepare` section."""
    from pipeline.fields import from_dict
    from pipeline.params import DataParams, PrepareParams
    from pipeline.prepare import prepare

    raw = read_params() if raw is None else raw
    settings = from_dict(PrepareParams, raw.get("prepare") or {}, "params.yaml: prepare")
    competition = from_dict(DataParams, raw.get("data") or {}, "params.yaml: data").competition
    with tempfile.TemporaryDirectory(prefix="bench-raw-") as tmp:
        label = fetch_raw(source, Path(tmp))
        data, _ = prepare(Path(tmp), competition, settings)
    shape = "x".join(map(str, data.meta.image_shape[:2]))
    note(
        f"data {label}: {len(data.y_train)} train, {len(data.y_val)} validation, "
        f"{len(data.x_test)} test images of {shape}"
    )
    return data, label


def embedded_solution(dest: Path) -> Path:
    """The labels of the embedded digits' test rows, as `ImageId,Label` in `dest`.

    Recomputes `pipeline.fetch.write_embedded`'s split and checks it against the
    `test.csv` that function writes, so a change there fails here instead of scoring
    against the wrong labels.
    """
    import pandas as pd
    from sklearn.datasets import load_digits

    from pipeline.fetch import write_embedded

    digits = load_digits()
    pixels = np.rint(digits.data * 255.0 / 16.0).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(pixels))
    test_idx = order[: len(pixels) // 5]
    with tempfile.TemporaryDirectory() as tmp:
        write_embedded(Path(tmp))
        written = pd.read_csv(Path(tmp) / "test.csv").to_numpy()
    if not np.array_equal(written, pixels[test_idx]):
        raise RuntimeError(
            "pipeline.fetch.write_embedded changed its test split; "
            "update bench/common.py:embedded_solution to match"
        )
    solution = pd.DataFrame(
        {"ImageId": np.arange(1, len(test_idx) + 1), "Label": digits.target[test_idx]}
    )
    solution.to_csv(dest, index=False)
    return dest


# -- workspaces for sweeps ------------------------------------------------------------------------
@dataclass
class Workspace:
    """A temporary pipeline checkout-in-miniature: `params.yaml`, prepared data,
    experiment files, and SQLite stores for Optuna and MLflow."""

    root: Path
    params_path: Path

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.root / 'optuna.db'}"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def make_workspace(
    root: Path, data, raw: dict[str, Any], experiments: dict[str, dict[str, Any]] | None = None
) -> Workspace:
    """Write `data` prepared, the experiment files (with per-file `experiments` changes
    merged in) and a `params.yaml` pointing every path and store into `root`."""
    import copy

    from pipeline.dataset import save_prepared

    root.mkdir(parents=True, exist_ok=True)
    save_prepared(data, root / "data" / "prepared")
    exp_dir = root / "experiments"
    exp_dir.mkdir(exist_ok=True)
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        spec.update((experiments or {}).get(path.stem, {}))
        (exp_dir / path.name).write_text(yaml.safe_dump(spec, sort_keys=False))
    params = copy.deepcopy(raw)
    params["paths"] = {
        "raw": str(root / "data" / "raw"),
        "prepared": str(root / "data" / "prepared"),
        "models": str(root / "models"),
        "metrics": str(root / "metrics"),
        "reports": str(root / "reports"),
        "submissions": str(root / "submissions"),
        "experiments": str(exp_dir),
    }
    workspace = Workspace(root, root / "params.yaml")
    params.setdefault("tracking", {})["uri"] = workspace.tracking_uri
    params.setdefault("sweep", {})["storage"] = workspace.storage_url
    workspace.params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    return workspace


@contextlib.contextmanager
def temporary_folder(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A temporary folder, removed afterwards unless `keep`."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if keep:
            note(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run inside `path`: MLflow puts artifacts of a SQLite store under the current
    directory, and they belong in the workspace, not in the repository."""
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_sweep(workspace: Workspace, experiment: str) -> tuple[dict[str, Any], float]:
    """`ablate sweep --experiment NAME` in-process on the workspace; (summary, seconds)."""
    from pipeline import sweep
    from pipeline.config import load_config

    with working_directory(workspace.root), Stopwatch() as clock:
        summary = sweep.main(load_config(workspace.params_path), experiment)
    return summary, clock.seconds


def load_study(workspace: Workspace, experiment: str):
    """The finished Optuna study of `experiment` in the workspace, for a closer look."""
    from pipeline.config import load_config
    from pipeline.trial import Job

    with working_directory(workspace.root):
        return Job.load(load_config(workspace.params_path), experiment).open_study().optuna


# -- timing -------------------------------------------------------------------------------------
class Stopwatch:
    """`with Stopwatch() as clock: ...` then `clock.seconds` (wall clock)."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start


def median(values: list[float]) -> float:
    return statistics.median(values)


def slope(values: list[float]) -> float:
    """Least-squares slope of `values` against their index (per step)."""
    if len(values) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(values)), np.asarray(values, dtype=float), 1)[0])


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def answer_as_child(args, measure) -> bool:
    """In a child started by `run_child` (`--one JOB`): print `measure(job)` as JSON and
    say so; the parent goes on."""
    import json

    if not args.one:
        return False
    print(json.dumps(measure(json.loads(args.one))))
    return True


def run_child(script: str, job: dict[str, Any], env: dict[str, str] | None = None) -> dict:
    """`python SCRIPT --one JOB` in a fresh process (thread and device settings must come
    before TensorFlow starts); its last line of stdout, as JSON."""
    import json
    import subprocess

    done = subprocess.run(
        [sys.executable, script, "--one", json.dumps(job)],
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
    if done.returncode != 0:
        raise UserError(f"{job}: failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
