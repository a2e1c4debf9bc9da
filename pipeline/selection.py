"""Choosing what to submit from every study's trials, and how sure to be of it.

A candidate is one distinct configuration (model and recipe, seeds aside) wherever it ran:
the base model trained in four studies is one candidate with all its seeds. Candidates
rank by their mean over seeds, and one seen with two or more seeds ranks ahead of one seen
once, so a single lucky seed does not win. `wilson` gives the interval of an accuracy
measured once on held-out images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import UserError
from pipeline.experiments import Experiment, load_experiment
from pipeline.factors import apply_factors
from pipeline.model import ModelConfig
from pipeline.params import TrainParams
from pipeline.records import TrialRecord

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


def finished_studies(config: Config, stage: str) -> dict[str, tuple[Experiment, dict[str, Any]]]:
    """name -> (experiment, sweep metrics) of every listed study that has finished; a
    missing one is a warning, none at all an error."""
    paths, studies = config.paths, {}
    for name in config.experiments:
        metrics_file = paths.sweep_metrics(name)
        if not metrics_file.is_file():
            log.warning(
                "%s: no %s; run `dvc repro sweep@%s` to include it", stage, metrics_file, name
            )
            continue
        experiment = load_experiment(paths.experiments, name, None, config.model, config.train)
        studies[name] = (experiment, json.loads(metrics_file.read_text()))
    if not studies:
        raise UserError(
            f"no sweep results in {paths.sweep_metrics_dir}/; run the sweeps first (`dvc repro`)"
        )
    return studies


@dataclass(frozen=True)
class Candidate:
    config: ModelConfig
    train: TrainParams  # the recipe, with the base seed
    label: str  # what it changes from the base, e.g. "padding=valid"
    values: tuple[float, ...]  # the objective, one per trial (seed)
    best_epochs: tuple[int, ...]
    trials: tuple[str, ...]  # "study#number" of each trial
    runs: tuple[str | None, ...] = ()  # the MLflow run holding each trial's checkpoint

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def epochs(self) -> int:
        """The epochs a refit trains: the median of the epochs its trials kept."""
        return max(1, round(statistics.median(self.best_epochs)))

    def summary(self) -> dict:
        return {
            "label": self.label,
            "mean_val_accuracy": round(self.mean, 6),
            "n_seeds": len(self.values),
            "values": [round(v, 6) for v in self.values],
            "kept_epochs": self.epochs,  # median over its trials
            "trials": list(self.trials),
        }


def rank_candidates(
    studies: dict[str, tuple[Experiment, list[TrialRecord]]],
    base: ModelConfig,
    train: TrainParams,
) -> list[Candidate]:
    """Every distinct configuration among the complete trials of studies that maximise
    val_accuracy, best first (those with two or more seeds ahead of the rest)."""
    grouped: dict[str, dict] = {}
    for name, (experiment, records) in studies.items():
        if experiment.objective != "val_accuracy":
            continue
        for record in records:
            if record.state != "COMPLETE" or record.value is None or "reused_from" in record.attrs:
                continue  # a reused trial is a copy of another: its seed counts once
            values = {k: v for k, v in record.params.items() if k != "seed"}
            config, recipe = apply_factors(base, train, values)
            key = json.dumps([config.to_dict(), dataclasses.asdict(recipe)], sort_keys=True)
            label = "base" if (config, recipe) == (base, train) else _label(values)
            entry = grouped.setdefault(
                key, {"config": config, "train": recipe, "label": label, "rows": []}
            )
            epoch = int(record.attrs.get("best_epoch", recipe.epochs))
            run = record.attrs.get("checkpoint_run_id", record.run_id)
            entry["rows"].append((record.value, epoch, f"{name}#{record.number}", run))
    candidates = [
        Candidate(
            e["config"],
            e["train"],
            e["label"],
            *(tuple(column) for column in zip(*e["rows"], strict=True)),
        )
        for e in grouped.values()
    ]
    return sorted(candidates, key=lambda c: (min(len(c.values), 2), c.mean), reverse=True)


def _label(values: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(values.items())) or "base"


def wilson(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of an accuracy of correct/total."""
    if total == 0:
        return math.nan, math.nan
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)
