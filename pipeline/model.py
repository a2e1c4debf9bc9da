"""CNNs from a typed config: the ablation factors are fields of `ConvBlock`.

`ModelConfig` is a stack of conv blocks (Conv2D -> [BatchNorm] -> activation -> [pool] ->
[Dropout]), then Flatten, an optional dense head and a softmax output. No conv blocks at
all is the fully-connected baseline. `check_shapes` computes every layer's output size
with the convolution arithmetic before anything is built, so a collapsing design fails
(or is pruned in a sweep) without compute. `build_model` is a pure function of the config.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.errors import UserError
from pipeline.fields import from_dict

# The allowed values of each categorical field, written once: validation, experiment
# levels and the docs all read them from these types.
Padding = Literal["valid", "same"]
Activation = Literal["relu", "elu", "gelu", "swish", "tanh"]
Pooling = Literal["none", "max", "avg"]
Regularization = Literal["none", "dropout", "batchnorm", "both"]
PADDINGS = typing.get_args(Padding)
POOLINGS = typing.get_args(Pooling)
REGULARIZATIONS = typing.get_args(Regularization)


@dataclass(frozen=True)
class ConvBlock:
    filters: int = 32
    kernel_size: int = 3
    padding: Padding = "same"
    strides: int = 1
    dilation_rate: int = 1
    activation: Activation = "relu"
    pooling: Pooling = "max"
    pool_size: int = 2
    regularization: Regularization = "none"
    dropout_rate: float = 0.25

    def __post_init__(self) -> None:
        for name in ("filters", "kernel_size", "strides", "dilation_rate", "pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.strides > 1 and self.dilation_rate > 1:
            raise ValueError(
                "strides > 1 together with dilation_rate > 1 is not supported by Keras "
                "Conv2D; set one of them to 1"
            )


@dataclass(frozen=True)
class ModelConfig:
    blocks: tuple[ConvBlock, ...] = (ConvBlock(),)
    dense_units: tuple[int, ...] = (128,)
    dense_dropout: float = 0.0
    learning_rate: float = 1e-3

    def __post_init__(self) -> None:
        if any(u < 1 for u in self.dense_units):
            raise ValueError(f"dense_units must be integers >= 1, got {list(self.dense_units)}")
        if not 0.0 <= self.dense_dropout < 1.0:
            raise ValueError(f"dense_dropout must be in [0, 1), got {self.dense_dropout}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")

    @classmethod
    def from_dict(cls, data: Any, where: str = "params.yaml: model") -> ModelConfig:
        """Validate a `model:` mapping; errors name the exact field and allowed values."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(allowed)}")
        data = dict(data)
        # A missing key keeps the dataclass default; `blocks: []` is the dense baseline.
        blocks = data.pop("blocks", [dataclasses.asdict(b) for b in cls.blocks])
        units = data.pop("dense_units", list(cls.dense_units))
        if not isinstance(blocks, list):
            raise UserError(f"{where}.blocks: expected a list of conv blocks")
        if not isinstance(units, list) or not all(
            isinstance(u, int) and not isinstance(u, bool) for u in units
        ):
            raise UserError(f"{where}.dense_units: expected a list of integers, e.g. [128]")
        parsed = tuple(
            from_dict(ConvBlock, b, f"{where}.blocks[{i}]") for i, b in enumerate(blocks)
        )
        head = from_dict(_Head, data, where)
        try:
            return cls(blocks=parsed, dense_units=tuple(units), **dataclasses.asdict(head))
        except ValueError as exc:
            raise UserError(f"{where}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "blocks": [dataclasses.asdict(b) for b in self.blocks],
            "dense_units": list(self.dense_units),
            "dense_dropout": self.dense_dropout,
            "learning_rate": self.learning_rate,
        }


@dataclass(frozen=True)
class _Head:
    """The scalar fields of ModelConfig, for validation through `from_dict`."""

    dense_dropout: float = 0.0
    learning_rate: float = 1e-3


def flatten_config(config: ModelConfig) -> dict[str, Any]:
    """Flat `blocks.0.padding`-style names, as logged to MLflow."""
    flat: dict[str, Any] = {"n_blocks": len(config.blocks)}
    for i, block in enumerate(config.blocks):
        for key, value in dataclasses.asdict(block).items():
            flat[f"blocks.{i}.{key}"] = value
    flat["dense_units"] = ",".join(map(str, config.dense_units)) or "none"
    flat["dense_dropout"] = config.dense_dropout
    flat["learning_rate"] = config.learning_rate
    return flat


class ShapeError(UserError):
    """A config whose feature map shrinks below 1x1 at some layer."""


@dataclass(frozen=True)
class LayerShape:
    name: str
    output: tuple[int, int, int]
    params: int
    macs: int


def conv_output(size: int, kernel: int, stride: int, dilation: int, padding: str) -> int:
    """Output side of a convolution (or pooling, with dilation 1)."""
    if padding == "same":
        return math.ceil(size / stride)
    return math.floor((size - dilation * (kernel - 1) - 1) / stride) + 1


def check_shapes(
    config: ModelConfig, input_shape: tuple[int, int, int], n_classes: int
) -> list[LayerShape]:
    """Every layer's output shape, parameter count and multiply-accumulates per image.

    Raises ShapeError naming the first layer whose output would be smaller than 1x1.
    """
    height, width, channels = input_shape
    layers: list[LayerShape] = []

    def shrink(name: str, kernel: int, stride: int, dilation: int, padding: str):
        new_h = conv_output(height, kernel, stride, dilation, padding)
        new_w = conv_output(width, kernel, stride, dilation, padding)
        if new_h < 1 or new_w < 1:
            raise ShapeError(
                f"{name}: input {height}x{width} with kernel {kernel}, stride {stride}, "
                f"dilation {dilation}, padding {padding} gives {new_h}x{new_w}, below 1x1; "
                "use padding same, a smaller stride/dilation/pool, or fewer blocks"
            )
        return new_h, new_w

    for i, block in enumerate(config.blocks):
        name = f"blocks[{i}]"
        height, width = shrink(
            f"{name}.conv", block.kernel_size, block.strides, block.dilation_rate, block.padding
        )
        params = block.kernel_size**2 * channels * block.filters + block.filters
        macs = height * width * block.filters * block.kernel_size**2 * channels
        channels = block.filters
        layers.append(LayerShape(f"{name}.conv", (height, width, channels), params, macs))
        if block.regularization in ("batchnorm", "both"):
            layers.append(
                LayerShape(f"{name}.batchnorm", (height, width, channels), 4 * channels, 0)
            )
        if block.pooling != "none":
            height, width = shrink(f"{name}.pool", block.pool_size, block.pool_size, 1, "valid")
            layers.append(LayerShape(f"{name}.pool", (height, width, channels), 0, 0))

    features = height * width * channels
    for j, units in enumerate((*config.dense_units, n_classes)):
        name = f"dense[{j}]" if j < len(config.dense_units) else "output"
        layers.append(LayerShape(name, (units, 1, 1), features * units + units, features * units))
        features = units
    return layers


def count_params(layers: list[LayerShape]) -> int:
    return sum(layer.params for layer in layers)


def count_macs(layers: list[LayerShape]) -> int:
    return sum(layer.macs for layer in layers)


def build_model(
    config: ModelConfig,
    input_shape: tuple[int, int, int],
    n_classes: int,
    checked: list[LayerShape] | None = None,
    learning_rate: Any = None,
    bn_momentum: float = 0.99,
):
    """The compiled Keras model for `config`; shapes are checked first unless the caller
    passes what `check_shapes` already returned as `checked`. Adam runs at
    `config.learning_rate`, or at `learning_rate` (a rate or a schedule) when given;
    batch norm layers average their statistics with `bn_momentum`."""
    import keras
    from keras import layers

    if checked is None:
        check_shapes(config, input_shape, n_classes)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for i, block in enumerate(config.blocks):
        x = layers.Conv2D(
            block.filters,
            block.kernel_size,
            strides=block.strides,
            padding=block.padding,
            dilation_rate=block.dilation_rate,
            name=f"conv{i}",
        )(x)
        if block.regularization in ("batchnorm", "both"):
            x = layers.BatchNormalization(momentum=bn_momentum, name=f"batchnorm{i}")(x)
        x = layers.Activation(block.activation, name=f"act{i}")(x)
        if block.pooling == "max":
            x = layers.MaxPooling2D(block.pool_size, name=f"pool{i}")(x)
        elif block.pooling == "avg":
            x = layers.AveragePooling2D(block.pool_size, name=f"pool{i}")(x)
        if block.regularization in ("dropout", "both") and block.dropout_rate > 0:
            x = layers.Dropout(block.dropout_rate, name=f"dropout{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    for j, units in enumerate(config.dense_units):
        x = layers.Dense(units, activation="relu", name=f"dense{j}")(x)
        if config.dense_dropout > 0:
            x = layers.Dropout(config.dense_dropout, name=f"dense_dropout{j}")(x)
    # float32 softmax keeps the output stable under mixed precision.
    outputs = layers.Dense(n_classes, activation="softmax", dtype="float32", name="output")(x)
    model = keras.Model(inputs, outputs, name="ablation_cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate or config.learning_rate),
        loss="categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def predict_labels(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class index per image, predicted in batches."""
    return predict_probabilities(model, x, batch_size).argmax(axis=1)


def predict_probabilities(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """The model's softmax output per image, in batches, as float64. Called eagerly:
    `model.predict` traces a graph for each model, and TensorFlow warns about retracing
    once an ensemble passes five models."""
    import keras

    batches = [
        keras.ops.convert_to_numpy(model(x[start : start + batch_size], training=False))
        for start in range(0, len(x), batch_size)
    ]
    if not batches:
        return np.zeros((0, int(model.output_shape[-1])))
    return np.concatenate(batches).astype(np.float64)
