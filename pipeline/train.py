"""One training function for every caller, and the `train` stage (the base model, tracked).

`train(config, params, data, callbacks)` seeds everything, feeds `tf.data` pipelines,
stops early on `val_loss` and keeps the best epoch's weights, and returns metrics. The
sweep's trials, `ablate train`, the benchmarks and the tests all call it. It knows
nothing about MLflow or Optuna: those come in as Keras callbacks. The stage itself
(`main`, `train_tracked`) records one run with every param, metric and diagnostic.

Run: `ablate train` (or `dvc repro train`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.dataset import Dataset, split_for_seed
from pipeline.device import configure_device
from pipeline.model import (
    LayerShape,
    ModelConfig,
    build_model,
    check_shapes,
    count_macs,
    count_params,
    flatten_config,
)
from pipeline.params import TrainParams

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass
class TrainResult:
    metrics: dict[str, float]
    history: dict[str, list[float]]
    model: Any = field(repr=False)
    precision: str = "float32"  # the dtype policy it trained under


def augmentation(params: TrainParams, seed: int):
    """Random rotation, shift and zoom of training images (Keras preprocessing layers,
    run in the input pipeline: never at inference), or None when `params.augment` is off.
    Empty space fills with 0, the background of digit images."""
    import keras
    from keras import layers

    steps = []
    if params.augment and params.rotation:
        steps.append(layers.RandomRotation(params.rotation / 360, fill_mode="constant", seed=seed))
    if params.augment and params.shift:
        steps.append(
            layers.RandomTranslation(params.shift, params.shift, fill_mode="constant", seed=seed)
        )
    if params.augment and params.zoom:
        steps.append(
            layers.RandomZoom((-params.zoom, params.zoom), fill_mode="constant", seed=seed)
        )
    return keras.Sequential(steps) if steps else None


def make_datasets(data: Dataset, batch_size: int, seed: int, augment=None):
    """Shuffled, batched, prefetched `tf.data` pipelines for train and validation (None
    when the data has no validation images); `augment`, a Keras layer, transforms each
    training batch."""
    import tensorflow as tf

    n_classes = data.meta.n_classes
    y_train = np.eye(n_classes, dtype=np.float32)[data.y_train]
    train_ds = (
        tf.data.Dataset.from_tensor_slices((data.x_train, y_train))
        .shuffle(len(y_train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
    )
    if augment is not None:
        train_ds = train_ds.map(
            lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    train_ds = train_ds.prefetch(tf.data.AUTOTUNE)
    if len(data.y_val) == 0:
        return train_ds, None
    y_val = np.eye(n_classes, dtype=np.float32)[data.y_val]
    val_ds = (
        tf.data.Dataset.from_tensor_slices((data.x_val, y_val))
        .batch(max(batch_size, 256))
        .prefetch(tf.data.AUTOTUNE)
    )
    return train_ds, val_ds


def training_data(data: Dataset, params: TrainParams) -> Dataset:
    """`data` as `train` splits it for `params`: redrawn for the seed when `params.split`
    is per_seed, as prepared otherwise."""
    return split_for_seed(data, params.seed) if params.split == "per_seed" else data


def learning_rate(rate: float, params: TrainParams, steps_per_epoch: int):
    """Adam's rate over training: constant, or cosine decay to 1% of it over all epochs
    (`plateau` halves it in a callback instead, see `_schedule_callbacks`)."""
    import keras

    if params.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(
            rate, decay_steps=params.epochs * steps_per_epoch, alpha=0.01
        )
    return rate


def _callbacks(params: TrainParams, rate: float, validated: bool) -> list:
    """Keep the best epoch by `val_loss` (stopping early if `patience` says so), and the
    plateau schedule. Without validation images the last epoch is kept."""
    import keras

    if not validated:
        return []
    patience = params.epochs if params.patience is None else params.patience
    kept = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss",
            patience=patience,
            restore_best_weights=True,
            start_from_epoch=params.min_epochs,
        )
    ]
    if params.schedule == "plateau":
        kept.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss", factor=0.5, patience=2, min_lr=rate / 100
            )
        )
    return kept


def train(
    config: ModelConfig,
    params: TrainParams,
    data: Dataset,
    callbacks: list | tuple = (),
    layers: list[LayerShape] | None = None,
) -> TrainResult:
    """Train `config` on `data` with the recipe `params`; the returned model holds the
    best epoch by `val_loss` (the last one when `data` has no validation images, as for
    a refit on all labelled data). With `params.split` per_seed, the seed redraws the
    train/validation split first.

    `layers` is `check_shapes`'s answer when the caller already has it."""
    import keras
    import tensorflow as tf

    if layers is None:
        layers = check_shapes(config, data.meta.image_shape, data.meta.n_classes)
    data = training_data(data, params)
    keras.backend.clear_session()
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    policy = configure_device(params.precision)
    steps = -(-len(data.y_train) // params.batch_size)
    rate = learning_rate(config.learning_rate, params, steps)
    model = build_model(
        config,
        data.meta.image_shape,
        data.meta.n_classes,
        checked=layers,
        learning_rate=rate,
        bn_momentum=params.bn_momentum,
    )
    train_ds, val_ds = make_datasets(
        data, params.batch_size, params.seed, augmentation(params, params.seed)
    )
    start = time.perf_counter()
    with _forget_traced_gradients():
        fit = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=params.epochs,
            verbose=0,
            shuffle=False,
            callbacks=[*_callbacks(params, config.learning_rate, val_ds is not None), *callbacks],
        )
    seconds = time.perf_counter() - start
    log.debug("trained in %.1f s under the %s policy", seconds, policy)
    history = {k: [float(v) for v in fit.history.get(k, [])] for k in HISTORY_KEYS}
    metrics = {
        **_best_epoch(history),
        "epochs_run": len(history["loss"]),
        "n_params": count_params(layers),
        "macs": count_macs(layers),
        "train_seconds": seconds,
    }
    return TrainResult(metrics, history, model, policy)


def _best_epoch(history: dict[str, list[float]]) -> dict[str, float]:
    """The kept epoch's validation scores: the lowest val_loss, or the last epoch."""
    if not history["val_loss"]:
        nan = float("nan")
        return {"val_accuracy": nan, "val_loss": nan, "best_epoch": len(history["loss"])}
    # EarlyStopping never counts a NaN val_loss as an improvement, so neither may we:
    # the metrics must describe the epoch whose weights it restored.
    val_loss = np.asarray(history["val_loss"], dtype=np.float64)
    best = int(np.argmin(np.where(np.isnan(val_loss), np.inf, val_loss)))
    return {
        "val_accuracy": history["val_accuracy"][best],
        "val_loss": history["val_loss"][best],
        "best_epoch": best + 1,
    }


@contextlib.contextmanager
def _forget_traced_gradients():
    """Unregister the gradient functions TensorFlow registers while `fit` traces its step.

    Keras's optimizer sums gradients across replicas with `tf.distribute`, which wraps
    them in `tf.custom_gradient`. Traced in graph mode, that registers a uniquely named
    gradient function ("CustomGradient-<n>") in TensorFlow's global gradient registry and
    never removes it, and the function's closure holds the traced train step's tensors:
    every trained model leaks its whole graph, 10 to 30 MB a trial here (the leak of
    keras-team/keras#17458). Gradients are looked up only while tracing, so once `fit`
    has returned the entries are dead weight. One training at a time per process.
    """
    try:
        from tensorflow.python.framework import ops

        registry = ops.gradient_registry._registry
    except (ImportError, AttributeError):  # another TensorFlow layout: nothing to forget
        yield
        return
    before = set(registry)
    try:
        yield
    finally:
        for name in set(registry) - before:
            if name.startswith("CustomGradient-"):
                del registry[name]


def train_tracked(
    tracker: Tracker, config: ModelConfig, params: TrainParams, data: Dataset, checkpoint: Path
) -> TrainResult:
    """Train `config` once as an MLflow run holding every config field and training
    setting, per-epoch metrics, the diagnostics and the checkpoint (also written to
    `checkpoint`)."""
    from pipeline.diagnostics import write_diagnostics
    from pipeline.fsutil import atomic_path
    from pipeline.tracking import provenance

    run_id = tracker.start_run(
        "train-base",
        params={**flatten_config(config), **{f"train.{k}": v for k, v in vars(params).items()}},
        tags=provenance(data.meta.competition, data.meta.data_hash),
    )
    try:
        layers = check_shapes(config, data.meta.image_shape, data.meta.n_classes)
        result = train(config, params, data, [tracker.epoch_logger(run_id)], layers)
        with tempfile.TemporaryDirectory() as tmp:
            write_diagnostics(result.model, result.history, training_data(data, params), Path(tmp))
            result.model.save(Path(tmp) / "best.keras")
            tracker.log_artifacts(run_id, Path(tmp))
            # Copy, not rename: the temp folder may be on another filesystem (tmpfs).
            with atomic_path(checkpoint) as out:
                shutil.copyfile(Path(tmp, "best.keras"), out)
        tracker.log_metrics(run_id, result.metrics)
        tracker.set_tags(run_id, {"precision": result.precision})
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    tracker.end_run(run_id)
    return result


def main(config: Config) -> dict[str, Any]:
    from pipeline.dataset import load_prepared
    from pipeline.fsutil import write_json
    from pipeline.tracking import Tracker

    data = load_prepared(config.paths.prepared)
    check_shapes(config.model, data.meta.image_shape, data.meta.n_classes)
    tracker = Tracker.connect(config.tracking.uri, config.tracking.experiment)
    result = train_tracked(tracker, config.model, config.train, data, config.paths.train_model)
    metrics = {
        k: result.metrics[k]
        for k in ("val_accuracy", "val_loss", "epochs_run", "best_epoch", "n_params", "macs")
    }
    write_json(config.paths.train_metrics, metrics)
    log.info(
        "train: val_accuracy %.4f (epoch %d of %d), %d parameters",
        metrics["val_accuracy"],
        metrics["best_epoch"],
        metrics["epochs_run"],
        metrics["n_params"],
    )
    return metrics
