"""One training function for every caller, and the `train` stage (the base model, tracked).

`train(config, params, data, callbacks)` seeds everything, feeds `tf.data` pipelines,
stops early on `val_loss` and keeps the best epoch's weights, and returns metrics. The
sweep objective, `ablate train`, the benchmarks and the tests all call it. It knows
nothing about MLflow or Optuna: those come in as Keras callbacks.

Run: `ablate train` (or `dvc repro train`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.model import ModelConfig, build_model, check_shapes, count_macs, count_params
from pipeline.params import TrainParams
from pipeline.prepare import Dataset

log = logging.getLogger(__name__)

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
OBJECTIVES = ("val_accuracy", "val_loss")


@dataclass
class TrainResult:
    metrics: dict[str, float]
    history: dict[str, list[float]]
    model: Any = field(repr=False)


def configure_device() -> str:
    """Mixed precision on a GPU, float32 on CPU; returns the policy name."""
    import keras
    import tensorflow as tf

    policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    if keras.mixed_precision.global_policy().name != policy:
        keras.mixed_precision.set_global_policy(policy)
    return policy


def make_datasets(data: Dataset, batch_size: int, seed: int):
    """Shuffled, batched, prefetched `tf.data` pipelines for train and validation."""
    import tensorflow as tf

    n_classes = data.meta.n_classes
    y_train = np.eye(n_classes, dtype=np.float32)[data.y_train]
    y_val = np.eye(n_classes, dtype=np.float32)[data.y_val]
    train_ds = (
        tf.data.Dataset.from_tensor_slices((data.x_train, y_train))
        .shuffle(len(y_train), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    val_ds = (
        tf.data.Dataset.from_tensor_slices((data.x_val, y_val))
        .batch(max(batch_size, 256))
        .prefetch(tf.data.AUTOTUNE)
    )
    return train_ds, val_ds


def train(config: ModelConfig, params: TrainParams, data: Dataset,
          callbacks: list | tuple = ()) -> TrainResult:
    """Train `config` on `data`; the returned model holds the best epoch by `val_loss`."""
    import keras
    import tensorflow as tf

    layers = check_shapes(config, data.meta.image_shape, data.meta.n_classes)
    keras.backend.clear_session()
    keras.utils.set_random_seed(params.seed)
    if params.deterministic:
        tf.config.experimental.enable_op_determinism()
    configure_device()
    model = build_model(config, data.meta.image_shape, data.meta.n_classes)
    train_ds, val_ds = make_datasets(data, params.batch_size, params.seed)
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=params.patience, restore_best_weights=True
    )
    start = time.perf_counter()
    with _forget_traced_gradients():
        fit = model.fit(
            train_ds, validation_data=val_ds, epochs=params.epochs, verbose=0, shuffle=False,
            callbacks=[stopper, *callbacks],
        )
    seconds = time.perf_counter() - start
    history = {k: [float(v) for v in fit.history.get(k, [])] for k in HISTORY_KEYS}
    # EarlyStopping never counts a NaN val_loss as an improvement, so neither may we:
    # the metrics must describe the epoch whose weights it restored.
    val_loss = np.asarray(history["val_loss"], dtype=np.float64)
    best = int(np.argmin(np.where(np.isnan(val_loss), np.inf, val_loss)))
    metrics = {
        "val_accuracy": history["val_accuracy"][best],
        "val_loss": history["val_loss"][best],
        "best_epoch": best + 1,
        "epochs_run": len(history["val_loss"]),
        "n_params": count_params(layers),
        "macs": count_macs(layers),
        "train_seconds": seconds,
    }
    return TrainResult(metrics, history, model)


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


def predict_labels(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class index per image, predicted in batches."""
    probabilities = model.predict(x, batch_size=batch_size, verbose=0)
    return np.asarray(probabilities).argmax(axis=1)


def main(params_path: str = "params.yaml") -> None:
    from pipeline import tracking
    from pipeline.fsutil import write_json
    from pipeline.params import load_section, read_params
    from pipeline.prepare import load_prepared

    raw = read_params(params_path)
    paths = load_section("paths", params_path, raw)
    params: TrainParams = load_section("train", params_path, raw)
    tracking_params = load_section("tracking", params_path, raw)
    config = ModelConfig.from_dict(raw.get("model") or {}, f"{params_path}: model")
    data = load_prepared(paths.prepared)
    check_shapes(config, data.meta.image_shape, data.meta.n_classes)
    tracker = tracking.Tracker.connect(tracking_params.uri, tracking_params.experiment)
    out_dir = Path(paths.models) / "train"
    result = tracker.train_run(config, params, data, out_dir / "best.keras")
    write_json(Path(paths.metrics) / "train.json", {
        k: result.metrics[k] for k in ("val_accuracy", "val_loss", "epochs_run", "best_epoch",
                                       "n_params", "macs")
    })
    log.info(
        "train: val_accuracy %.4f (epoch %d of %d), %d parameters",
        result.metrics["val_accuracy"], result.metrics["best_epoch"],
        result.metrics["epochs_run"], result.metrics["n_params"],
    )
