"""Shared fixtures: tiny real competitions, params files, a throwaway DVC repository,
the prepared 8x8 digits (`digits`, and on disk `prepared_digits`) and a live MLflow server
(`mlflow_server`). Plain helpers (projects, services, processes) are in `support.py`.

Fixtures build real inputs and shrink them (a few 4x4 images) instead of mocking. The
factories (`make_competition`, `write_params`, `run_cmd`) return plain functions so that a
test states only what differs from a good default.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from support import REPO_ROOT, running_mlflow_server, subprocess_env, write_params_file

# What `dvc repro` needs from the repository; everything else stays behind.
REPO_FILES = (
    "dvc.yaml",
    "params.yaml",
    "pyproject.toml",
    ".dvcignore",
    ".dvc/config",
    ".dvc/.gitignore",
)
REPO_DIRS = ("pipeline", "experiments")

LAYOUTS = ("digit-recognizer", "kannada")


@pytest.fixture(autouse=True)
def _keras_default_dtype_policy():
    """Keras's dtype policy is global to the process, and `train.precision: auto` sets
    bfloat16 on some CPUs: each test leaves Keras's float32 default behind it."""
    yield
    if "keras" in sys.modules:
        keras = sys.modules["keras"]
        if keras.mixed_precision.global_policy().name != "float32":
            keras.mixed_precision.set_global_policy("float32")


@dataclass(frozen=True)
class Competition:
    """What `make_competition` wrote, for tests to compare against."""

    folder: Path
    layout: str
    side: int
    n_classes: int
    train: pd.DataFrame
    test: pd.DataFrame
    sample: pd.DataFrame

    @property
    def train_path(self) -> Path:
        return self.folder / "train.csv"

    @property
    def test_path(self) -> Path:
        return self.folder / "test.csv"

    @property
    def sample_path(self) -> Path:
        return self.folder / "sample_submission.csv"

    @property
    def id_column(self) -> str:
        return str(self.sample.columns[0])

    @property
    def label_column(self) -> str:
        return str(self.sample.columns[1])


def write_competition(
    folder: Path,
    layout: str = "digit-recognizer",
    *,
    side: int = 4,
    n_classes: int = 3,
    per_class: int = 10,
    n_test: int = 6,
    test_ids: Sequence | None = None,
    seed: int = 0,
) -> Competition:
    """Write a synthetic pixel-CSV competition (`train.csv`, `test.csv`,
    `sample_submission.csv`) into `folder`.

    `digit-recognizer`: train `label,pixel0..`, test `pixel0..`, sample `ImageId,Label`
    with ImageId 1..N. `kannada` (Kannada-MNIST): train `label,pixel0..`, test
    `id,pixel0..`, sample `id,label`; ids are 0..N-1 unless `test_ids` is given.
    Pixels are integers 0..255; train holds `per_class` rows of each class, shuffled.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    columns = [f"pixel{i}" for i in range(side * side)]
    labels = rng.permutation(np.repeat(np.arange(n_classes), per_class))

    train = pd.DataFrame(rng.integers(0, 256, (len(labels), side * side)), columns=columns)
    train.insert(0, "label", labels)
    test = pd.DataFrame(rng.integers(0, 256, (n_test, side * side)), columns=columns)
    if layout == "digit-recognizer":
        sample = pd.DataFrame({"ImageId": np.arange(1, n_test + 1), "Label": 0})
    else:
        ids = np.arange(n_test) if test_ids is None else np.asarray(test_ids)
        if len(ids) != n_test:
            raise ValueError(f"test_ids needs {n_test} values, got {len(ids)}")
        test.insert(0, "id", ids)
        sample = pd.DataFrame({"id": ids, "label": 0})

    train.to_csv(folder / "train.csv", index=False)
    test.to_csv(folder / "test.csv", index=False)
    sample.to_csv(folder / "sample_submission.csv", index=False)
    return Competition(folder, layout, side, n_classes, train, test, sample)


@pytest.fixture
def make_competition() -> Callable[..., Competition]:
    """`make_competition(folder, layout, side=4, n_classes=3, ...)`: see `write_competition`."""
    return write_competition


@pytest.fixture
def embedded_raw(tmp_path: Path) -> Path:
    """`tmp_path/data/raw/digit-recognizer` holding the offline 8x8 digits from `fetch`."""
    from pipeline.fetch import write_embedded

    dest = tmp_path / "data" / "raw" / "digit-recognizer"
    dest.mkdir(parents=True)
    write_embedded(dest)
    return dest


@pytest.fixture
def write_params() -> Callable[..., Path]:
    """`write_params(path, data={"source": "embedded"}, ...)`: see `write_params_file`."""
    return write_params_file


@pytest.fixture
def run_cmd() -> Callable[..., subprocess.CompletedProcess]:
    """`run_cmd(["ablate", "prepare"], cwd=path)`: run a command as a user would, with
    this virtualenv's scripts on PATH; returns the completed process (text output)."""

    def run(args: Sequence[str], cwd: Path, timeout: float = 300, **kwargs):
        return subprocess.run(
            list(args),
            cwd=cwd,
            env=subprocess_env(Path(cwd)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )

    return run


@pytest.fixture
def repo_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh git + DVC repository in `tmp_path/repo` holding the pipeline's code,
    `dvc.yaml`, `params.yaml` and DVC config (no data, no `dvc.lock`). DVC's site cache
    goes under `tmp_path` too, so nothing outside it is touched."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in REPO_FILES:
        if (REPO_ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, repo / name)
    for name in REPO_DIRS:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(
                REPO_ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
    if not (repo / ".dvc" / "config").is_file():
        pytest.fail(f"{REPO_ROOT}/.dvc/config is missing: is this a DVC repository?")
    subprocess.run(["git", "init", "-q", str(repo)], check=True, capture_output=True)
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site-cache"))
    return repo


@pytest.fixture(scope="session")
def digits(prepared_digits: Path):
    """The offline 8x8 digits (`data.source: embedded`) through the real `prepare`:
    1150 train and 288 validation images, 10 classes. Shared; do not modify the arrays."""
    from pipeline.dataset import load_prepared

    return load_prepared(prepared_digits)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """The base URL (`http://127.0.0.1:PORT`) of a real `mlflow server` started for this
    test module: SQLite backend and proxied artifacts under a temporary folder, one
    worker. Stopped when the module's tests are done; its log is `<root>/server.log`."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}") as url:
        yield url


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory) -> Path:
    """The embedded digits, fetched and prepared once into a folder that tests only read."""
    from pipeline.dataset import save_prepared
    from pipeline.fetch import write_embedded
    from pipeline.params import PrepareParams
    from pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("digits")
    raw = root / "raw" / "digit-recognizer"
    raw.mkdir(parents=True)
    write_embedded(raw)
    data, _ = prepare(raw, "digit-recognizer", PrepareParams())
    save_prepared(data, root / "prepared")
    return root / "prepared"
