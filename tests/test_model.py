"""`pipeline.model`: the shape arithmetic agrees with Keras, counts agree with Keras, and
bad configs fail at the edge with messages naming the field."""

from __future__ import annotations

import dataclasses
import itertools
import re

import pytest

from pipeline import model as model_module
from pipeline.errors import UserError
from pipeline.model import (
    ConvBlock,
    ModelConfig,
    ShapeError,
    build_model,
    check_shapes,
    count_macs,
    count_params,
    flatten_config,
)

# Keras Conv2D refuses strides > 1 together with dilation > 1, and so does ConvBlock.
STRIDE_DILATION = ((1, 1), (2, 1), (3, 1), (1, 2))
POOLS = (("none", 2), ("max", 2), ("avg", 3))
GRID = list(itertools.product((28, 9, 5), ("valid", "same"), STRIDE_DILATION, (1, 3, 5), POOLS))


def _block(**changes) -> ConvBlock:
    return dataclasses.replace(ConvBlock(filters=2), **changes)


def _keras_name(name: str) -> str:
    """`check_shapes` layer name -> the Keras layer `build_model` gives it."""
    if name.startswith("blocks["):
        index, kind = name[len("blocks[") :].split("].")
        return f"{kind}{index}"
    return name.replace("[", "").replace("]", "")  # dense[0] -> dense0; output


def _keras_shapes(model) -> dict[str, tuple[int, ...]]:
    return {layer.name: tuple(layer.output.shape[1:]) for layer in model.layers}


def _expected(shape) -> tuple[int, ...]:
    """Keras's shape for a `LayerShape`: dense layers are (units,), not (units, 1, 1)."""
    return shape.output[:1] if shape.name.startswith(("dense", "output")) else shape.output


def _grid_config(padding, stride_dilation, kernel, pool, **model) -> ModelConfig:
    """One conv block from a GRID row."""
    (strides, dilation), (pooling, pool_size) = stride_dilation, pool
    block = _block(
        kernel_size=kernel,
        padding=padding,
        strides=strides,
        dilation_rate=dilation,
        pooling=pooling,
        pool_size=pool_size,
    )
    return ModelConfig(blocks=(block,), **model)


@pytest.mark.parametrize(
    ("size", "padding", "stride_dilation", "kernel", "pool"),
    GRID,
    ids=[f"{s}px-{p}-s{sd[0]}d{sd[1]}-k{k}-{pl[0]}{pl[1]}" for s, p, sd, k, pl in GRID],
)
def test_check_shapes_matches_keras(size, padding, stride_dilation, kernel, pool, monkeypatch):
    config = _grid_config(padding, stride_dilation, kernel, pool, dense_units=(3,))
    input_shape = (size, size, 1)
    try:
        shapes = check_shapes(config, input_shape, n_classes=4)
    except ShapeError:
        # Keras itself must refuse the same design when the check is bypassed.
        monkeypatch.setattr(model_module, "check_shapes", lambda *args: [])
        with pytest.raises(ValueError, match="zero or negative"):
            build_model(config, input_shape, 4)
        return
    keras_shapes = _keras_shapes(build_model(config, input_shape, 4))
    for shape in shapes:
        assert keras_shapes[_keras_name(shape.name)] == _expected(shape), shape.name


def test_grid_covers_both_outcomes():
    """The grid above is only meaningful if some designs collapse and most do not."""
    collapsed = 0
    for size, padding, stride_dilation, kernel, pool in GRID:
        config = _grid_config(padding, stride_dilation, kernel, pool)
        try:
            check_shapes(config, (size, size, 1), 4)
        except ShapeError:
            collapsed += 1
    assert 10 < collapsed < len(GRID) // 2


def test_check_shapes_matches_keras_for_a_stack():
    config = ModelConfig(
        blocks=(
            _block(
                filters=4,
                kernel_size=5,
                padding="valid",
                pooling="none",
                regularization="batchnorm",
            ),
            _block(
                filters=3,
                kernel_size=3,
                padding="same",
                strides=2,
                pooling="avg",
                pool_size=3,
                regularization="both",
            ),
            _block(filters=5, kernel_size=3, padding="valid", dilation_rate=2, pooling="max"),
        ),
        dense_units=(7, 6),
        dense_dropout=0.2,
    )
    shapes = check_shapes(config, (45, 41, 2), 3)
    keras_shapes = _keras_shapes(build_model(config, (45, 41, 2), 3))
    assert [s.name for s in shapes] == [
        "blocks[0].conv",
        "blocks[0].batchnorm",
        "blocks[1].conv",
        "blocks[1].batchnorm",
        "blocks[1].pool",
        "blocks[2].conv",
        "blocks[2].pool",
        "dense[0]",
        "dense[1]",
        "output",
    ]
    for shape in shapes:
        assert keras_shapes[_keras_name(shape.name)] == _expected(shape), shape.name
    # Non-square inputs keep their own height and width.
    assert shapes[0].output == (41, 37, 4)
    assert shapes[6].output == (1, 1, 5)


BATCHNORM_BOTH = ModelConfig(
    blocks=(
        _block(filters=6, regularization="batchnorm", pooling="none"),
        _block(filters=8, kernel_size=5, padding="valid", regularization="both", pooling="avg"),
    ),
    dense_units=(16,),
)


@pytest.mark.parametrize(
    ("config", "input_shape"),
    [
        (ModelConfig(), (28, 28, 1)),
        (
            ModelConfig.from_dict(
                {
                    "blocks": [
                        {"filters": 32, "padding": "same", "pooling": "none"},
                        {"filters": 64, "pooling": "max"},
                    ],
                    "dense_units": [128],
                    "dense_dropout": 0.3,
                    "learning_rate": 0.002,
                }
            ),
            (28, 28, 1),
        ),
        (BATCHNORM_BOTH, (12, 12, 3)),
        (
            ModelConfig(
                blocks=(_block(strides=3, padding="valid", pooling="none"),), dense_units=()
            ),
            (9, 9, 1),
        ),
        (ModelConfig(blocks=(), dense_units=(32, 16)), (8, 8, 1)),  # fully connected
        (ModelConfig(blocks=(), dense_units=()), (8, 8, 1)),  # logistic regression
    ],
    ids=["default", "params-yaml-base", "batchnorm", "strided-no-dense", "dense-only", "linear"],
)
def test_count_params_matches_keras(config, input_shape):
    assert (
        count_params(check_shapes(config, input_shape, 10))
        == build_model(config, input_shape, 10).count_params()
    )


def test_batch_norm_layers_take_the_recipes_momentum():
    config = ModelConfig(blocks=(_block(regularization="batchnorm"), _block(regularization="both")))
    model = build_model(config, (8, 8, 1), 3, bn_momentum=0.9)
    momenta = [layer.momentum for layer in model.layers if "batchnorm" in layer.name]
    assert momenta == [0.9, 0.9]


def test_macs_by_hand():
    # 6x6x1 -> conv 3x3 valid, 2 filters -> 4x4x2 -> max pool 2 -> 2x2x2 = 8 features
    # -> dense 5 -> output 3.
    config = ModelConfig(
        blocks=(_block(kernel_size=3, padding="valid", pooling="max", pool_size=2),),
        dense_units=(5,),
    )
    layers = check_shapes(config, (6, 6, 1), 3)
    conv_macs = (4 * 4) * 2 * (3 * 3 * 1)  # every output value: one 3x3x1 dot product
    dense_macs = 8 * 5
    output_macs = 5 * 3
    assert [layer.macs for layer in layers] == [conv_macs, 0, dense_macs, output_macs]
    assert count_macs(layers) == 288 + 40 + 15
    assert count_params(layers) == (9 * 2 + 2) + (8 * 5 + 5) + (5 * 3 + 3)


def test_dilation_and_stride_change_macs_as_the_arithmetic_says():
    base = _block(filters=4, kernel_size=3, padding="same", pooling="none")
    same = check_shapes(ModelConfig(blocks=(base,), dense_units=()), (10, 10, 2), 2)[0]
    strided = check_shapes(
        ModelConfig(blocks=(dataclasses.replace(base, strides=2),), dense_units=()), (10, 10, 2), 2
    )[0]
    dilated = check_shapes(
        ModelConfig(
            blocks=(dataclasses.replace(base, padding="valid", dilation_rate=2),), dense_units=()
        ),
        (10, 10, 2),
        2,
    )[0]
    assert same.macs == 10 * 10 * 4 * 9 * 2
    assert strided.macs == 5 * 5 * 4 * 9 * 2
    assert dilated.output == (6, 6, 4)  # effective kernel 5
    assert dilated.macs == 6 * 6 * 4 * 9 * 2  # but still 9 taps per output
    assert same.params == strided.params == dilated.params == 9 * 2 * 4 + 4


def test_collapse_names_the_layer_and_sizes():
    config = ModelConfig(
        blocks=(
            _block(kernel_size=3, padding="valid", pooling="max"),  # 8 -> 6 -> 3
            _block(kernel_size=5, padding="valid", pooling="none"),  # 3 -> -1
        )
    )
    with pytest.raises(ShapeError, match=r"blocks\[1\]\.conv") as caught:
        check_shapes(config, (8, 8, 1), 10)
    message = str(caught.value)
    assert "input 3x3" in message
    assert "kernel 5" in message
    assert "-1x-1" in message
    assert "padding same" in message  # says how to fix it
    assert isinstance(caught.value, UserError)


def test_collapse_in_pooling_names_the_pool():
    config = ModelConfig(blocks=(_block(padding="same", pooling="max", pool_size=3),) * 3)
    with pytest.raises(ShapeError, match=r"blocks\[2\]\.pool: input 1x1 .* gives 0x0"):
        check_shapes(config, (9, 9, 1), 10)


def test_build_model_checks_shapes_first():
    config = ModelConfig(blocks=(_block(kernel_size=5, padding="valid"),))
    with pytest.raises(ShapeError, match=r"blocks\[0\]\.conv"):
        build_model(config, (4, 4, 1), 10)


def _model_dict(**block_changes) -> dict:
    return {"blocks": [{"filters": 8, **block_changes}], "dense_units": [16]}


@pytest.mark.parametrize(
    ("data", "patterns"),
    [
        (
            _model_dict(padding="full"),
            [r"model\.blocks\[0\]\.padding", "'full' is not allowed", "valid, same"],
        ),
        (_model_dict(pooling="global"), [r"blocks\[0\]\.pooling", "none, max, avg"]),
        (
            _model_dict(regularization="l2"),
            [r"blocks\[0\]\.regularization", "none, dropout, batchnorm, both"],
        ),
        (_model_dict(dropout_rate=-0.1), [r"blocks\[0\]", "dropout_rate", r"\[0, 1\)", "-0.1"]),
        (_model_dict(strides=0), [r"blocks\[0\]", "strides", ">= 1", "got 0"]),
        (_model_dict(kernel_size=3.5), [r"blocks\[0\]\.kernel_size", "expected an integer"]),
        (
            _model_dict(strides=2, dilation_rate=2),
            [r"blocks\[0\]", "strides > 1 together with dilation_rate > 1", "set one of them to 1"],
        ),
        (
            _model_dict(kernal_size=3),
            [
                r"blocks\[0\]",
                r"unknown key\(s\) \['kernal_size'\]",
                "allowed: filters, kernel_size",
            ],
        ),
        (
            {**_model_dict(), "dense_unit": [8]},
            [r"unknown key\(s\) \['dense_unit'\]", "allowed: blocks, dense_units"],
        ),
        ({**_model_dict(), "dense_dropout": 1.0}, ["dense_dropout", r"\[0, 1\)"]),
        ({**_model_dict(), "learning_rate": 0}, ["learning_rate", "> 0"]),
        ({**_model_dict(), "dense_units": 128}, ["dense_units", "list of integers"]),
        ({"blocks": {"filters": 8}}, [r"model\.blocks", "list of conv blocks"]),
        ([1, 2], ["expected a mapping"]),
    ],
    ids=[
        "padding",
        "pooling",
        "regularization",
        "negative-dropout",
        "stride-0",
        "float-kernel",
        "strides-with-dilation",
        "unknown-block-key",
        "unknown-model-key",
        "dense-dropout-1",
        "learning-rate-0",
        "dense-units-int",
        "blocks-mapping",
        "not-a-mapping",
    ],
)
def test_invalid_config_names_field_and_allowed_values(data, patterns):
    with pytest.raises(UserError) as caught:
        ModelConfig.from_dict(data, "params.yaml: model")
    message = str(caught.value)
    assert message.startswith("params.yaml: model")
    assert "\n" not in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_from_dict_round_trips_to_dict():
    config = ModelConfig(
        blocks=(BATCHNORM_BOTH.blocks[1], _block(activation="gelu")),
        dense_units=(4, 2),
        dense_dropout=0.1,
        learning_rate=0.01,
    )
    assert ModelConfig.from_dict(config.to_dict()) == config


def test_flatten_config_names_are_config_fields():
    config = ModelConfig(
        blocks=(_block(padding="valid"), _block(strides=2)),
        dense_units=(64, 32),
        dense_dropout=0.2,
        learning_rate=0.003,
    )
    flat = flatten_config(config)
    block_fields = [f.name for f in dataclasses.fields(ConvBlock)]
    expected_block_keys = {f"blocks.{i}.{name}" for i in range(2) for name in block_fields}
    assert expected_block_keys <= set(flat)
    assert set(flat) - expected_block_keys == {
        "n_blocks",
        "dense_units",
        "dense_dropout",
        "learning_rate",
    }
    assert flat["blocks.0.padding"] == "valid"
    assert flat["blocks.1.strides"] == 2
    assert flat["n_blocks"] == 2
    assert flat["dense_units"] == "64,32"
    # Every flat name resolves back to the config value it came from.
    for i, block in enumerate(config.blocks):
        for name in block_fields:
            assert flat[f"blocks.{i}.{name}"] == getattr(block, name)
    assert flat["dense_dropout"] == config.dense_dropout
    assert flat["learning_rate"] == config.learning_rate


def test_flatten_config_of_the_dense_baseline():
    flat = flatten_config(ModelConfig(blocks=(), dense_units=()))
    assert flat == {
        "n_blocks": 0,
        "dense_units": "none",
        "dense_dropout": 0.0,
        "learning_rate": 1e-3,
    }


def test_missing_model_keys_keep_the_defaults_and_empty_blocks_is_the_baseline():
    assert ModelConfig.from_dict({}) == ModelConfig()
    assert ModelConfig.from_dict({"learning_rate": 0.01}).blocks == ModelConfig().blocks
    assert ModelConfig.from_dict({"blocks": []}).blocks == ()
