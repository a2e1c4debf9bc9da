"""`pipeline.train.train`: every ablation option trains on real (tiny) data, runs are
repeatable by seed, and early stopping hands back the best epoch by `val_loss`."""

from __future__ import annotations

import dataclasses
import gc
import math

import keras
import numpy as np
import pytest

from pipeline.device import (
    BFLOAT16_FLAGS,
    auto_policy,
    bfloat16_speedup,
    choose_policy,
    cpu_flags,
)
from pipeline.model import ConvBlock, ModelConfig, check_shapes, count_macs, predict_labels
from pipeline.params import TrainParams
from pipeline.train import HISTORY_KEYS, train

METRIC_KEYS = {
    "val_accuracy",
    "val_loss",
    "best_epoch",
    "epochs_run",
    "n_params",
    "macs",
    "train_seconds",
}
ONE_EPOCH = TrainParams(epochs=1, batch_size=128, patience=3, seed=0)

# Small enough to train in well under a second on 8x8 digits.
BASE = ConvBlock(
    filters=4,
    kernel_size=3,
    padding="same",
    pooling="none",
    regularization="none",
    dropout_rate=0.25,
)


def _config(*blocks: ConvBlock, **changes) -> ModelConfig:
    return ModelConfig(blocks=blocks, dense_units=(16,), learning_rate=3e-3, **changes)


OPTIONS = {
    "padding-same": _config(BASE),
    "padding-valid": _config(dataclasses.replace(BASE, padding="valid")),
    "strides-2": _config(dataclasses.replace(BASE, strides=2)),
    "dilation-2": _config(dataclasses.replace(BASE, dilation_rate=2, padding="valid")),
    "pooling-max": _config(dataclasses.replace(BASE, pooling="max")),
    "pooling-avg": _config(dataclasses.replace(BASE, pooling="avg")),
    "regularization-dropout": _config(dataclasses.replace(BASE, regularization="dropout")),
    "regularization-batchnorm": _config(dataclasses.replace(BASE, regularization="batchnorm")),
    "regularization-both": _config(dataclasses.replace(BASE, regularization="both", pooling="max")),
    "two-blocks": _config(
        BASE, dataclasses.replace(BASE, filters=8, pooling="max"), dense_dropout=0.3
    ),
    "dense-only": _config(),
}


def _one_hot(data) -> np.ndarray:
    return np.eye(data.meta.n_classes, dtype=np.float32)[data.y_val]


def _val_loss(model, data) -> float:
    return model.evaluate(data.x_val, _one_hot(data), batch_size=256, verbose=0, return_dict=True)[
        "loss"
    ]


def _layer_classes(model) -> dict[str, str]:
    return {layer.name: type(layer).__name__ for layer in model.layers}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_option_trains_one_epoch(option, digits):
    config = OPTIONS[option]
    result = train(config, ONE_EPOCH, digits)

    assert set(result.metrics) == METRIC_KEYS
    assert all(math.isfinite(v) for v in result.metrics.values()), result.metrics
    assert 0.0 <= result.metrics["val_accuracy"] <= 1.0
    assert result.metrics["val_loss"] > 0
    assert result.metrics["epochs_run"] == result.metrics["best_epoch"] == 1
    assert set(result.history) == set(HISTORY_KEYS)
    assert all(len(v) == 1 for v in result.history.values()), result.history
    assert result.metrics["val_loss"] == result.history["val_loss"][0]

    # The counts come from the shape arithmetic, and match the model actually trained.
    layers = check_shapes(config, digits.meta.image_shape, digits.meta.n_classes)
    assert result.metrics["n_params"] == result.model.count_params()
    assert result.metrics["macs"] == count_macs(layers)

    # The option reached the trained model.
    classes = _layer_classes(result.model)
    block = config.blocks[0] if config.blocks else None
    if block is None:
        assert not any(name.startswith("conv") for name in classes)
    else:
        conv = result.model.get_layer("conv0")
        assert conv.padding == block.padding
        assert conv.strides == (block.strides,) * 2
        assert conv.dilation_rate == (block.dilation_rate,) * 2
        pool = {"none": None, "max": "MaxPooling2D", "avg": "AveragePooling2D"}[block.pooling]
        assert classes.get("pool0") == pool
        assert ("batchnorm0" in classes) == (block.regularization in ("batchnorm", "both"))
        assert ("dropout0" in classes) == (block.regularization in ("dropout", "both"))
    predicted = predict_labels(result.model, digits.x_val)
    assert predicted.shape == digits.y_val.shape
    assert np.mean(predicted == digits.y_val) == pytest.approx(
        result.metrics["val_accuracy"], abs=1e-6
    )


@pytest.fixture
def _undo_op_determinism():
    """`deterministic=True` switches TensorFlow op determinism on for the whole process;
    switch it back off for the tests that follow (TensorFlow has no public API for it)."""
    from tensorflow.python.framework import config as tf_config

    was_on = tf_config.is_op_determinism_enabled()
    yield
    disable = getattr(tf_config, "disable_op_determinism", None)
    if not was_on and disable is not None:
        disable()


def test_a_model_trains_in_the_precision_asked_for(digits):
    params = TrainParams(epochs=3, batch_size=32, seed=0, precision="mixed_bfloat16")

    result = train(OPTIONS["pooling-max"], params, digits)

    conv = result.model.get_layer("conv0")
    assert result.precision == "mixed_bfloat16"
    assert (conv.compute_dtype, conv.kernel.dtype) == ("bfloat16", "float32")
    probabilities = result.model.predict(digits.x_val, verbose=0)
    assert probabilities.dtype == np.float32  # the softmax stays float32
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert result.metrics["val_accuracy"] > 0.5  # it learned: 10 classes, chance is 0.1


def test_auto_precision_takes_bfloat16_only_where_it_measures_faster():
    """The rule: a GPU -> mixed_float16; bfloat16 only on a CPU whose flags list bfloat16
    instructions and whose bfloat16 matmul beats float32 by the margin; the measurement
    runs only where the flags allow bfloat16 at all."""
    measured = []

    def speedup(value):
        return lambda: measured.append(value) or value

    assert choose_policy(True, {"avx512_bf16"}, speedup(2.0)) == "mixed_float16"
    assert choose_policy(False, {"avx512_bf16"}, speedup(2.0)) == "mixed_bfloat16"
    assert choose_policy(False, {"amx_bf16"}, speedup(1.3)) == "mixed_bfloat16"
    assert choose_policy(False, {"avx512_bf16"}, speedup(0.56)) == "float32"
    assert choose_policy(False, {"avx512_bf16"}, speedup(1.1)) == "float32"
    assert measured == [2.0, 1.3, 0.56, 1.1]
    assert choose_policy(False, {"avx2", "fma"}, speedup(9.0)) == "float32"
    assert measured == [2.0, 1.3, 0.56, 1.1]  # no bfloat16 flag: nothing measured


def test_auto_precision_trains_in_the_policy_the_rule_picks_here(digits):
    """`auto` end to end on this machine: the flags and convolution speed of this CPU."""
    import tensorflow as tf

    speedup = bfloat16_speedup()
    assert speedup > 0
    gpu = bool(tf.config.list_physical_devices("GPU"))
    expected = auto_policy()
    assert expected in {"mixed_float16", "mixed_bfloat16", "float32"}
    if not gpu and not cpu_flags() & BFLOAT16_FLAGS:
        assert expected == "float32"

    result = train(_config(BASE), TrainParams(epochs=1, precision="auto"), digits)

    assert result.precision == expected
    assert result.model.get_layer("conv0").compute_dtype == expected.removeprefix("mixed_")


def test_an_unknown_precision_in_params_yaml_is_one_line(tmp_path, run_cmd, write_params):
    write_params(tmp_path / "params.yaml", train={"precision": "bf16"})

    result = run_cmd(["ablate", "train"], cwd=tmp_path)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "params.yaml" in lines[0] and "precision" in lines[0] and "bf16" in lines[0]
    assert "mixed_bfloat16" in lines[0]  # what to write instead


@pytest.mark.usefixtures("_undo_op_determinism")
def test_seeded_runs_repeat(digits):
    config = _config(
        dataclasses.replace(BASE, regularization="both", pooling="max"), dense_dropout=0.3
    )
    params = TrainParams(epochs=2, batch_size=128, patience=3, seed=7, deterministic=True)
    first = train(config, params, digits)
    again = train(config, params, digits)
    other = train(config, dataclasses.replace(params, seed=8, epochs=1), digits)

    for key in HISTORY_KEYS:
        assert again.history[key] == pytest.approx(first.history[key], rel=1e-6, abs=1e-7)
    assert again.metrics["val_loss"] == pytest.approx(first.metrics["val_loss"], rel=1e-6)
    # The seed matters: initial weights, shuffling and dropout all follow it.
    assert other.history["loss"][0] != pytest.approx(first.history["loss"][0], rel=1e-6)


class _Sabotage(keras.callbacks.Callback):
    """Overwrite every weight at the start of epoch `at` so that epoch gets worse."""

    def __init__(self, at: int, value: float | None = None):
        super().__init__()
        self.at, self.value = at, value

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.at:
            return
        rng = np.random.default_rng(0)
        self.model.set_weights(
            [
                np.full(w.shape, self.value, w.dtype)
                if self.value is not None
                else (rng.normal(0, 3, w.shape)).astype(w.dtype)
                for w in self.model.get_weights()
            ]
        )


def test_best_epoch_is_kept(digits):
    config = _config(dataclasses.replace(BASE, pooling="max"))
    params = TrainParams(epochs=3, batch_size=128, patience=10, seed=0)
    result = train(config, params, digits, callbacks=[_Sabotage(at=2)])
    val_loss = result.history["val_loss"]

    assert result.metrics["epochs_run"] == 3
    assert all(len(v) == 3 for v in result.history.values())
    assert result.metrics["val_loss"] == min(val_loss)
    assert result.metrics["val_loss"] < val_loss[-1]  # the last epoch is not the best
    assert result.metrics["best_epoch"] == val_loss.index(min(val_loss)) + 1
    assert (
        result.metrics["val_accuracy"]
        == result.history["val_accuracy"][result.metrics["best_epoch"] - 1]
    )
    # The returned model holds the best epoch's weights, not the last epoch's.
    assert _val_loss(result.model, digits) == pytest.approx(result.metrics["val_loss"], rel=1e-4)


def test_early_stopping_stops_after_patience(digits):
    config = _config(dataclasses.replace(BASE, pooling="max"))
    params = TrainParams(epochs=10, batch_size=128, patience=1, seed=0)
    result = train(config, params, digits, callbacks=[_Sabotage(at=2)])

    assert result.metrics["epochs_run"] <= 3 < params.epochs
    assert all(len(v) == result.metrics["epochs_run"] for v in result.history.values())
    assert result.metrics["val_loss"] == min(result.history["val_loss"])
    assert _val_loss(result.model, digits) == pytest.approx(result.metrics["val_loss"], rel=1e-4)


def test_diverged_epochs_are_never_the_best(digits):
    """A NaN val_loss (diverged training, e.g. float16 overflow) is not an improvement for
    EarlyStopping, so the metrics must describe the epoch whose weights are returned."""
    config = _config(dataclasses.replace(BASE, pooling="max"))
    params = TrainParams(epochs=3, batch_size=128, patience=10, seed=0)
    result = train(config, params, digits, callbacks=[_Sabotage(at=1, value=np.nan)])
    val_loss = result.history["val_loss"]

    assert math.isfinite(val_loss[0]) and math.isnan(val_loss[1])
    assert result.metrics["best_epoch"] == 1
    assert result.metrics["val_loss"] == val_loss[0]
    assert result.metrics["val_accuracy"] == result.history["val_accuracy"][0]
    assert _val_loss(result.model, digits) == pytest.approx(val_loss[0], rel=1e-4)


def test_a_few_epochs_learn_the_digits(digits):
    result = train(OPTIONS["pooling-max"], TrainParams(epochs=3, batch_size=32, seed=0), digits)
    assert result.metrics["val_accuracy"] > 0.5  # ten classes: chance is 0.1


def _live_train_steps() -> int:
    return sum(
        1
        for o in gc.get_objects()
        if type(o).__name__ == "FuncGraph" and o.name == "one_step_on_data"
    )


def test_trained_models_are_freed_once_dropped(digits):
    # TensorFlow's gradient registry used to keep every traced train step alive
    # (about 10 MB a trial); a long in-process sweep must not accumulate them.
    gc.collect()
    before = _live_train_steps()
    for seed in range(2):
        result = train(
            OPTIONS["regularization-batchnorm"], dataclasses.replace(ONE_EPOCH, seed=seed), digits
        )
        del result
    gc.collect()
    assert _live_train_steps() == before


def test_a_model_trains_again_after_train_returns(digits):
    result = train(OPTIONS["padding-same"], ONE_EPOCH, digits)
    before = _val_loss(result.model, digits)
    result.model.fit(
        digits.x_train,
        np.eye(10, dtype=np.float32)[digits.y_train],
        epochs=3,
        batch_size=64,
        verbose=0,
    )
    assert _val_loss(result.model, digits) < before


def test_each_seed_draws_its_own_split_and_every_caller_the_same_one(digits):
    from pipeline.dataset import split_for_seed
    from pipeline.train import training_data

    first, again, other = (split_for_seed(digits, s) for s in (1, 1, 2))
    assert np.array_equal(first.y_val, again.y_val) and np.array_equal(first.x_val, again.x_val)
    assert not np.array_equal(first.x_val, other.x_val)
    assert len(first.y_val) == len(digits.y_val) and len(first.y_train) == len(digits.y_train)
    # stratified: class counts match the prepared split's within one image
    assert np.abs(np.bincount(first.y_val) - np.bincount(digits.y_val)).max() <= 1
    # the same images, redistributed; held-out and test untouched
    pooled = np.sort(np.concatenate([digits.x_train, digits.x_val]).reshape(-1))
    redrawn = np.sort(np.concatenate([first.x_train, first.x_val]).reshape(-1))
    assert np.array_equal(pooled, redrawn)
    assert first.x_test is digits.x_test and first.x_holdout is digits.x_holdout
    fixed = TrainParams(seed=1, split="fixed")
    assert training_data(digits, fixed) is digits
    per_seed = training_data(digits, TrainParams(seed=1, split="per_seed"))
    assert np.array_equal(per_seed.x_val, first.x_val)
