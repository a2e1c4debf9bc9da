"""`params.yaml` as one typed `Config`, read once where a command starts.

`load_config(path)` reads the file, validates every section (unknown sections, keys and
bad values fail with one line naming the file and the key) and returns frozen
dataclasses; command-line overrides are applied with `Config.override`. Stages receive the
`Config` or the sections they need, never the file or the raw mapping.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import yamlfile
from pipeline.errors import UserError
from pipeline.fields import from_dict
from pipeline.model import ModelConfig
from pipeline.params import (
    DataParams,
    Paths,
    PrepareParams,
    ReportParams,
    SubmitParams,
    SweepParams,
    TrackingParams,
    TrainParams,
)

SECTIONS: dict[str, type] = {
    "paths": Paths,
    "data": DataParams,
    "prepare": PrepareParams,
    "train": TrainParams,
    "tracking": TrackingParams,
    "sweep": SweepParams,
    "report": ReportParams,
    "submit": SubmitParams,
}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*$")
DEFAULT_EXPERIMENTS = ("padding", "strides", "dilation", "pooling", "regularization", "joint")


@dataclass(frozen=True)
class Config:
    """Every section of `params.yaml`, validated. `source` is the file it came from (worker
    processes read it again, with the same overrides)."""

    source: Path
    paths: Paths
    data: DataParams
    prepare: PrepareParams
    model: ModelConfig
    train: TrainParams
    tracking: TrackingParams
    sweep: SweepParams
    report: ReportParams
    submit: SubmitParams
    experiments: tuple[str, ...] = DEFAULT_EXPERIMENTS

    def override(
        self,
        *,
        storage: str | None = None,
        tracking_uri: str | None = None,
        n_workers: int | None = None,
    ) -> Config:
        """This config with the command line's `--storage`, `--tracking-uri` and
        `--n-workers` in place of the file's values (None keeps the file's)."""
        sweep, tracking = self.sweep, self.tracking
        for flag, value, section, field in (
            ("--storage", storage, "sweep", "storage"),
            ("--n-workers", n_workers, "sweep", "n_workers"),
            ("--tracking-uri", tracking_uri, "tracking", "uri"),
        ):
            if value is None:
                continue
            try:
                if section == "sweep":
                    sweep = dataclasses.replace(sweep, **{field: value})
                else:
                    tracking = dataclasses.replace(tracking, **{field: value})
            except ValueError as exc:
                raise UserError(f"{flag}: {exc}") from None
        return dataclasses.replace(self, sweep=sweep, tracking=tracking)


def read_params(path: str | Path) -> dict[str, Any]:
    """The raw mapping in `path`, with a clear error when it is missing or not YAML."""
    path = Path(path)
    try:
        data = yamlfile.load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found; run from the repository root") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; --params takes a params.yaml file") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}".replace("\n", " ")) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    allowed = {*SECTIONS, "model", "experiments"}
    unknown = set(data) - allowed
    if unknown:
        raise UserError(
            f"{path}: unknown section(s) {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )
    return data


def load_config(path: str | Path = "params.yaml") -> Config:
    """The whole validated config in `path` (defaults for missing sections and keys)."""
    raw = read_params(path)
    sections = {
        name: from_dict(cls, raw.get(name) or {}, f"{path}: {name}")
        for name, cls in SECTIONS.items()
    }
    model = ModelConfig.from_dict(raw.get("model") or {}, f"{path}: model")
    experiments = _experiment_names(
        raw.get("experiments", list(DEFAULT_EXPERIMENTS)), f"{path}: experiments"
    )
    return Config(source=Path(path), model=model, experiments=experiments, **sections)


def _experiment_names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: expected a list of experiment names, e.g. [padding, joint]")
    for name in value:
        if not isinstance(name, str) or not NAME.match(name):
            raise UserError(
                f"{where}: {name!r} is not an experiment name (the stem of a file "
                "in the experiments folder, e.g. padding)"
            )
    if len(set(value)) != len(value):
        raise UserError(f"{where}: names must be distinct; got {value}")
    return tuple(value)
