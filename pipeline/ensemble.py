"""What a submission predicts with, by `submit.strategy`.

- `best`: the single best checkpoint across studies (or of `submit.experiment`), as
  trained in its trial on the training split.
- `refit`: the best configuration by its mean over seeds, trained again on every labelled
  image but the held-out ones, for the median of the epochs its trials kept times
  `submit.refit_epoch_scale`.
- `ensemble`: the top `submit.members` distinct configurations, each refit like that
  (seeds 0, 1, ...), their softmax outputs averaged.

With `submit.trial_checkpoints`, `refit` and `ensemble` also average each chosen
configuration's own trial checkpoints, one per seed, as its sweeps trained them on that
seed's training split and logged them to MLflow: more models at no training cost. They
never saw the held-out images either.

Every member's probabilities are averaged; with `submit.tta_rotation` (test-time
augmentation) each member also predicts every image turned that many degrees either way,
and its three predictions join the average. The held-out images, which no selection saw,
then give the submission's expected accuracy once, predicted the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.dataset import Dataset, labelled_for_refit
from pipeline.errors import UserError
from pipeline.model import predict_probabilities
from pipeline.selection import finished_studies, rank_candidates, wilson

if TYPE_CHECKING:
    from pipeline.config import Config

log = logging.getLogger(__name__)


@dataclass
class Members:
    """The models a submission averages, and what each one is."""

    models: list = field(repr=False)
    described: list[dict[str, Any]]
    chosen: dict[str, Any] = field(default_factory=dict)  # `best`: the chosen study's metrics


def best_checkpoint(config: Config) -> Members:
    import keras

    chosen = choose_study(config)
    path = config.paths.sweep_model(chosen["experiment"])
    if not path.is_file():
        raise UserError(f"{path}: no model; run `dvc repro sweep@{chosen['experiment']}`")
    described = {
        "experiment": chosen["experiment"],
        "study": chosen.get("study"),
        "trial": chosen.get("best_trial"),
        "val_accuracy": chosen.get("best_value"),
        "params": chosen.get("best_params"),
    }
    return Members([keras.models.load_model(path)], [described], chosen)


def choose_study(config: Config) -> dict[str, Any]:
    """The sweep metrics of `submit.experiment`, or of the study with the best value."""
    found = {}
    for name in config.experiments:
        path = config.paths.sweep_metrics(name)
        if path.is_file():
            found[name] = json.loads(path.read_text())
    wanted, where = config.submit.experiment, config.paths.sweep_metrics_dir
    if wanted is not None:
        if wanted not in found:
            raise UserError(
                f"submit.experiment {wanted!r} has no results in {where}/; "
                f"choose one of {', '.join(found) or 'none (run the sweeps)'}"
            )
        return {"experiment": wanted, **found[wanted]}
    scored = {k: v for k, v in found.items() if v.get("best_value") is not None}
    if not scored:
        raise UserError(f"no finished sweep in {where}/; run `dvc repro` first")
    best = max(scored, key=lambda k: scored[k]["best_value"])
    return {"experiment": best, **scored[best]}


def refits(config: Config, data: Dataset, count: int) -> Members:
    """The `count` best configurations by mean over seeds, each refit on all labelled
    images but the held-out ones."""
    from pipeline import train as training
    from pipeline.studies import Study

    records = {}
    for name, (experiment, metrics) in finished_studies(config, "submit").items():
        try:
            study = Study.open(
                config.sweep.storage, metrics["study"], config.sweep.heartbeat_seconds
            )
        except KeyError:
            raise UserError(
                f"study {metrics['study']} not in the Optuna storage; run the sweep again "
                "(`dvc repro`)"
            ) from None
        records[name] = (experiment, study.records(finished_only=True))
    ranked = rank_candidates(records, config.model, config.train)
    if not ranked:
        raise UserError("no complete trial to refit; run the sweeps first (`dvc repro`)")
    everything = labelled_for_refit(data)
    models, described = [], []
    for seed, candidate in enumerate(ranked[:count]):
        epochs = max(1, round(candidate.epochs * config.submit.refit_epoch_scale))
        log.info(
            "submit: refitting %s (mean val_accuracy %.4f over %d seeds) on %d images, %d epochs",
            candidate.label,
            candidate.mean,
            len(candidate.values),
            len(everything.y_train),
            epochs,
        )
        recipe = dataclasses.replace(
            candidate.train,
            epochs=epochs,
            min_epochs=min(candidate.train.min_epochs, epochs),
            seed=seed,
        )
        models.append(training.train(candidate.config, recipe, everything).model)
        described.append(candidate.summary() | {"refit_seed": seed, "refit_epochs": epochs})
    if config.submit.trial_checkpoints:
        for candidate, entry in zip(ranked[:count], described, strict=True):
            loaded = trial_checkpoints(config, candidate.runs)
            models.extend(loaded.values())
            entry["trial_checkpoints"] = list(loaded)
    return Members(models, described)


def trial_checkpoints(config: Config, runs: tuple[str | None, ...]) -> dict[str, Any]:
    """run id -> the checkpoint its trial logged to MLflow; one that cannot be read is
    left out with a warning (the ensemble is then smaller, never wrong)."""
    import tempfile
    from pathlib import Path

    import keras

    from pipeline.tracking import Tracker
    from pipeline.trial import CHECKPOINT

    tracker = Tracker.connect(config.tracking.uri, config.tracking.experiment)
    loaded = {}
    for run_id in filter(None, runs):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = tracker.download_artifact(run_id, CHECKPOINT, Path(tmp))
                loaded[run_id] = keras.models.load_model(path)
        except Exception as exc:  # a store that lost it: the ensemble goes on without it
            log.warning("submit: trial checkpoint of run %s left out: %s", run_id, exc)
    return loaded


def members(config: Config, data: Dataset) -> Members:
    strategy = config.submit.strategy
    if strategy == "best":
        return best_checkpoint(config)
    return refits(config, data, 1 if strategy == "refit" else config.submit.members)


def views(x: np.ndarray, rotation: float = 0.0) -> list[np.ndarray]:
    """The images as the members see them: as they are and, for test-time augmentation,
    also turned `rotation` degrees each way (bilinear, black beyond the edges, as the
    training augmentation turns them)."""
    if not rotation:
        return [x]
    from scipy import ndimage

    turned = [
        ndimage.rotate(x, angle, axes=(2, 1), reshape=False, order=1, mode="constant", cval=0.0)
        for angle in (rotation, -rotation)
    ]
    return [x, *turned]


def probabilities(
    models: list, x: np.ndarray, data: Dataset, batch_size: int, rotation: float = 0.0
) -> np.ndarray:
    """The members' mean softmax output for `x`, over the `views` of it that `rotation`
    asks for; refuses a model made for other data."""
    seen = views(x, rotation)
    total = None
    for model in models:
        n_out = int(model.output_shape[-1])
        if n_out != data.meta.n_classes:
            raise UserError(
                f"the model predicts {n_out} classes but the competition has "
                f"{data.meta.n_classes}; it was trained on other data: run the sweeps "
                "again (`dvc repro`)"
            )
        expected = tuple(model.input_shape[1:])
        if expected != tuple(data.meta.image_shape):
            raise UserError(
                f"the model expects images of {expected} but the test images are "
                f"{tuple(data.meta.image_shape)}; run the sweeps again"
            )
        for view in seen:
            out = predict_probabilities(model, view, batch_size)
            total = out if total is None else total + out
    return total / (len(models) * len(seen))


def holdout_estimate(
    models: list, data: Dataset, batch_size: int, rotation: float = 0.0
) -> dict[str, Any]:
    """Accuracy on the held-out images with its 95% Wilson interval (None: no holdout),
    predicted as the test images are."""
    n = len(data.y_holdout)
    if n == 0:
        return {"holdout_accuracy": None, "holdout_n": 0}
    predicted = probabilities(models, data.x_holdout, data, batch_size, rotation)
    predicted = predicted.argmax(axis=1)
    correct = int((predicted == data.y_holdout).sum())
    low, high = wilson(correct, n)
    return {
        "holdout_accuracy": correct / n,
        "holdout_ci95": [round(low, 6), round(high, 6)],
        "holdout_n": n,
    }
