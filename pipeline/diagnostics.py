"""What a trained model looks like, as files: its summary, learning curves, validation
confusion matrix, and the first conv layer's kernels and feature maps (the course's
"interpreting CNNs"). Plain files in a folder; whoever wants them tracked logs the folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import plots
from pipeline.dataset import Dataset
from pipeline.model import predict_labels


def model_summary(model) -> str:
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    return "\n".join(lines) + "\n"


def write_diagnostics(
    model, history: dict[str, list[float]], data: Dataset, folder: Path
) -> list[Path]:
    """Write every diagnostic of `model` into `folder`; returns the files written."""
    from sklearn.metrics import confusion_matrix

    (folder / "model_summary.txt").write_text(model_summary(model))
    written = [folder / "model_summary.txt"]
    written.append(plots.learning_curves(history, folder / "learning_curves.png"))
    predicted = predict_labels(model, data.x_val)
    matrix = confusion_matrix(data.y_val, predicted, labels=range(data.meta.n_classes))
    written.append(plots.confusion_matrix(matrix, folder / "confusion_matrix.png"))
    conv = next((layer for layer in model.layers if layer.name == "conv0"), None)
    if conv is not None:
        written += _first_layer(model, conv, data, folder)
    return written


def _first_layer(model, conv, data: Dataset, folder: Path) -> list[Path]:
    import keras

    kernels = np.asarray(conv.get_weights()[0])  # (k, k, in, filters)
    written = [
        plots.image_grid(
            np.moveaxis(kernels[:, :, 0, :], -1, 0), folder / "conv0_kernels.png", "conv0 kernels"
        )
    ]
    probe = keras.Model(model.inputs, model.get_layer("act0").output)
    maps = np.asarray(probe.predict(data.x_val[:1], verbose=0))[0]
    title = f"conv0 feature maps (validation image, label {data.y_val[0]})"
    written.append(
        plots.image_grid(np.moveaxis(maps, -1, 0), folder / "conv0_feature_maps.png", title)
    )
    return written
