"""The sections of `params.yaml` as typed, validated dataclasses, and where files live.

Every section is a frozen dataclass; `pipeline.fields.from_dict` checks one section's keys
and value types and fails with a `UserError` naming the file, the key and the allowed
values; each `__post_init__` checks what a type cannot say (ranges, names). `Paths` is
the one place that knows where each stage's outputs go. `pipeline.config` assembles the
sections into one `Config`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pipeline.errors import redact


@dataclass(frozen=True)
class Paths:
    """The folders in `params.yaml`, and every file name under them (`dvc.yaml` uses the
    same folders through `${paths.*}`, and the same names: keep the two in step)."""

    raw: str = "data/raw"
    prepared: str = "data/prepared"
    models: str = "models"
    metrics: str = "metrics"
    reports: str = "reports"
    submissions: str = "submissions"
    experiments: str = "experiments"

    def raw_data(self, competition: str) -> Path:
        return Path(self.raw) / competition

    def experiment_file(self, name: str) -> Path:
        return Path(self.experiments) / f"{name}.yaml"

    @property
    def data_metrics(self) -> Path:
        return Path(self.metrics) / "data.json"

    @property
    def train_model(self) -> Path:
        return Path(self.models) / "train" / "best.keras"

    @property
    def train_metrics(self) -> Path:
        return Path(self.metrics) / "train.json"

    @property
    def sweep_models(self) -> Path:
        return Path(self.models) / "sweeps"

    @property
    def sweep_metrics_dir(self) -> Path:
        return Path(self.metrics) / "sweeps"

    def sweep_model(self, experiment: str) -> Path:
        return self.sweep_models / experiment / "best.keras"

    def sweep_metrics(self, experiment: str) -> Path:
        """The study's record: its name, best trial and parameters, run ids, model URI."""
        return self.sweep_metrics_dir / f"{experiment}.json"

    def sweep_scores(self, experiment: str) -> Path:
        """The study's numbers alone: what `dvc metrics show` and `dvc exp show` list."""
        return self.sweep_metrics_dir / f"{experiment}.scores.json"

    @property
    def report_markdown(self) -> Path:
        return Path(self.reports) / "ablation.md"

    @property
    def report_json(self) -> Path:
        return Path(self.reports) / "ablation.json"

    @property
    def report_html(self) -> Path:
        """The report with its plots embedded: one file for a browser or MLflow."""
        return Path(self.reports) / "ablation.html"

    @property
    def report_summary(self) -> Path:
        """Each level's effect against its base, flat, for `dvc metrics show`."""
        return Path(self.metrics) / "summary.json"

    @property
    def report_plots(self) -> Path:
        return Path(self.reports) / "plots"

    def report_plot(self, experiment: str, kind: str) -> Path:
        """`kind`: levels, curves or pareto."""
        return self.report_plots / f"{experiment}_{kind}.png"

    @property
    def submission_csv(self) -> Path:
        return Path(self.submissions) / "submission.csv"

    @property
    def submission_json(self) -> Path:
        """The submission's record: its strategy, members, data hash and run id."""
        return Path(self.submissions) / "submission.json"

    @property
    def submission_scores(self) -> Path:
        """The submission's numbers alone: what `dvc metrics show` and `dvc exp show` list."""
        return Path(self.submissions) / "submission.scores.json"


@dataclass(frozen=True)
class DataParams:
    source: Literal["auto", "kaggle", "zip", "embedded"] = "auto"
    competition: str = "digit-recognizer"
    zip: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", self.competition or ""):
            raise ValueError(
                f"competition {self.competition!r} must be the competition's short name as in "
                "its URL, e.g. digit-recognizer: letters, digits and hyphens only"
            )


@dataclass(frozen=True)
class PrepareParams:
    val_fraction: float = 0.2
    seed: int = 42
    image_size: int | None = None
    # labelled rows no selection ever sees: the final model's expected score (0: none)
    holdout_fraction: float = 0.0
    # a class with fewer rows than this share of the median class's is refused as a
    # likely stray label (a 10 among the digits 0..9); 0 accepts any class size
    min_class_share: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("must be between 0 and 1 (exclusive), e.g. 0.2")
        if not 0.0 <= self.holdout_fraction < 1.0 - self.val_fraction:
            raise ValueError("holdout_fraction must be >= 0 and leave rows for training")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError("must be a positive integer or null (infer from pixel count)")
        if not 0.0 <= self.min_class_share <= 1.0:
            raise ValueError("min_class_share must be between 0 and 1, e.g. 0.1")


Split = Literal["fixed", "per_seed"]
Schedule = Literal["constant", "cosine", "plateau"]
# auto: mixed_float16 on a GPU, mixed_bfloat16 on a CPU with AMX or AVX-512 BF16, else float32
Precision = Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]


@dataclass(frozen=True)
class TrainParams:
    """The training recipe. The defaults are the first recipe (constant rate, early
    stopping after 3 epochs without progress, no augmentation); `params.yaml` sets the
    one in use."""

    epochs: int = 15
    batch_size: int = 64
    patience: int | None = 3  # epochs without a better val_loss before stopping; null: never
    seed: int = 0
    deterministic: bool = False
    schedule: Schedule = "constant"  # the learning rate over the epochs
    min_epochs: int = 0  # early stopping never stops before this many epochs
    augment: bool = False  # random rotation, shift and zoom of training images
    rotation: float = 10.0  # degrees, either way
    shift: float = 0.1  # fraction of the image side, either way
    zoom: float = 0.1  # fraction, in or out
    # fixed: the prepared train/validation split for every seed; per_seed: each seed
    # redraws it (stratified, same size) from the same images, so repeats vary the data
    # as well as the weights, and every level sees the same split for the same seed
    split: Split = "fixed"
    # batch norm's moving-average momentum (Keras's default); bench/recipe.py measures 0.9
    bn_momentum: float = 0.99
    precision: Precision = "float32"  # the Keras dtype policy; params.yaml sets auto

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.patience is not None and self.patience < 0:
            raise ValueError("patience must be >= 0, or null for no early stopping")
        if not 0 <= self.min_epochs <= self.epochs:
            raise ValueError("min_epochs must be between 0 and epochs")
        if not (0 <= self.rotation <= 180 and 0 <= self.shift < 1 and 0 <= self.zoom < 1):
            raise ValueError("rotation must be 0..180 degrees, shift and zoom fractions 0..1")
        if not 0 < self.bn_momentum < 1:
            raise ValueError("bn_momentum must be between 0 and 1 (exclusive)")


TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "postgresql", "mysql", "databricks")
# where each store's password comes from instead of a URL in params.yaml (and so dvc.lock)
PASSWORD_SOURCES = {
    "http": "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
    "https": "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
    "postgresql": "PGPASSWORD or ~/.pgpass",
    "mysql": "the MySQL client's ~/.my.cnf",
    "redis": "REDIS_PASSWORD",
    "rediss": "REDIS_PASSWORD",
}


def _no_inline_password(url: str) -> None:
    """Refuse a URL that holds a password: params.yaml values are copied to dvc.lock."""
    parts = urlsplit(url)
    if parts.password:
        scheme = parts.scheme.split("+")[0]
        source = PASSWORD_SOURCES.get(scheme)
        instead = f"set {source} instead" if source else "pass it as its client allows"
        raise ValueError(
            f"{redact(url)} holds a password, which would be copied into dvc.lock and git "
            f"(or shown by ps); remove it from the URL and {instead}"
        )


@dataclass(frozen=True)
class TrackingParams:
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "conv-ablation"

    def __post_init__(self) -> None:
        scheme = urlsplit(self.uri).scheme.split("+")[0]
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(
                f"{redact(self.uri)}: unknown scheme {scheme!r}; use e.g. "
                "sqlite:///mlflow.db, http://host:5000 or a folder"
            )
        _no_inline_password(self.uri)


@dataclass(frozen=True)
class SweepParams:
    storage: str = "sqlite:///optuna.db"
    n_trials: int | None = None
    isolate: bool = False
    trials_per_process: int | None = None
    n_workers: int = 1
    max_consecutive_failures: int = 5
    max_retries: int = 2  # a grid point that fails with an error is tried this often again
    heartbeat_seconds: int = 10
    reuse: bool = True  # a training already done (same model, recipe, seed, data) is reused

    @property
    def per_process(self) -> int | None:
        """Trials one process runs before a fresh one takes over (None: no limit).

        Recycling processes bounds whatever a long-lived process still accumulates (the
        allocator's high-water mark, a leak in another TensorFlow version) and contains a
        native crash, for a TensorFlow import (about 8 s) per process; `isolate` is one
        trial each."""
        return 1 if self.isolate else self.trials_per_process

    def __post_init__(self) -> None:
        if self.n_trials is not None and self.n_trials < 1:
            raise ValueError("n_trials must be >= 1 or null (use each experiment's budget)")
        if self.n_workers < 1:
            raise ValueError("n_workers must be >= 1")
        if self.trials_per_process is not None and self.trials_per_process < 1:
            raise ValueError("trials_per_process must be >= 1 or null (no limit)")
        if self.max_consecutive_failures < 1:
            raise ValueError("max_consecutive_failures must be >= 1")
        _no_inline_password(self.storage)
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")


@dataclass(frozen=True)
class ReportParams:
    # intervals at this confidence; a real effect has a Holm-adjusted p under 1 - it
    confidence: float = 0.95
    # a smaller effect on the objective is never called real, however consistent
    min_effect: float = 0.001

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise ValueError("confidence must be at least 0.5 and below 1, e.g. 0.95")
        if self.min_effect < 0:
            raise ValueError("min_effect must be >= 0, e.g. 0.001 (a tenth of a point)")


@dataclass(frozen=True)
class SubmitParams:
    # best: one checkpoint; refit: the best config again on all labelled data; ensemble:
    # the top `members` configs refit so, averaged (see pipeline/ensemble.py)
    strategy: Literal["best", "refit", "ensemble"] = "best"
    members: int = 3
    experiment: str | None = None  # `best` only: this study's model instead of the best
    batch_size: int = 512
    # refit and ensemble: also average each chosen config's trial checkpoints (one a seed)
    trial_checkpoints: bool = False
    # test-time augmentation: each model also sees every image turned this many degrees
    # either way, and the three predictions are averaged (0: off)
    tta_rotation: float = 0.0
    # refit and ensemble: each refit trains this many times the epochs its trials kept
    # (the schedule stretched to match): more images, and no validation split to stop on
    refit_epoch_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.members < 1:
            raise ValueError("members must be >= 1")
        if not 0 < self.refit_epoch_scale <= 10:
            raise ValueError(
                "refit_epoch_scale must be above 0 and at most 10 (1: the epochs the "
                f"trials kept), e.g. 2; got {self.refit_epoch_scale:g}"
            )
        if not 0 <= self.tta_rotation <= 45:
            raise ValueError(
                f"tta_rotation must be 0 (off) to 45 degrees, e.g. 8; got {self.tta_rotation:g}"
            )
