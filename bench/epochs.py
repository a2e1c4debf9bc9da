"""Cheaper epochs: seconds per epoch and training FLOP/s as a share of this CPU's
matrix-multiply peak, for the base model and the largest joint-study model, under
settings that could make an epoch cheaper (batch size, XLA, augmentation, threads,
precision: `default` is params.yaml's `train.precision: auto`).

The peak is a 2048x2048 `tf.matmul` (2 n^3 flops) in float32 and in bfloat16, measured by
this script before and after the models, so the share is this machine's own; a row is a
share of the peak in its policy's compute dtype (`mixed_bfloat16` of the bfloat16 peak).
A model's training flops per epoch are counted as 6 x MACs per training image (forward 2,
backward 4) plus 2 x MACs per validation image, from `check_shapes`' MACs. Every setting
trains in a fresh process (thread settings must precede TensorFlow's start) for `--epochs`
epochs with `pipeline.train.train`; the first epoch (tracing) is left out and the rest are averaged.

Run:   python bench/epochs.py                     # shared MNIST-10k, both models
Smoke: python bench/epochs.py --data embedded --epochs 2 --models base --settings default
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import common

# The largest model the joint study can draw: no pooling (a 28x28 map into the dense
# layer), double width, dropout and batch norm.
LARGEST = {
    "padding": "same",
    "strides": 1,
    "dilation_rate": 1,
    "pooling": "none",
    "regularization": "both",
    "width": 2.0,
}
MODELS = {"base": {}, "largest": LARGEST}
# name -> (changes to the train section, XLA on, intra-op threads or None for TF's choice)
SETTINGS = {
    "default": ({}, False, None),
    "batch 128": ({"batch_size": 128}, False, None),
    "batch 256": ({"batch_size": 256}, False, None),
    "no augmentation": ({"augment": False}, False, None),
    "XLA": ({}, True, None),
    "1 intra-op thread": ({}, False, 1),
    "float32": ({"precision": "float32"}, False, None),
    "mixed_bfloat16": ({"precision": "mixed_bfloat16"}, False, None),
}
# the matmul peak a policy's row is a share of
PEAK_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per setting (default 3)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS), metavar="S"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one measurement, in a child
    return parser.parse_args()


def matmul_peak(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """GFLOP/s of an n x n matmul in `dtype` on TensorFlow's default device, the best of
    three rounds of `repeats`."""
    import tensorflow as tf

    a = tf.cast(tf.random.normal((n, n)), dtype)
    b = tf.cast(tf.random.normal((n, n)), dtype)
    tf.matmul(a, b).numpy()
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            c = tf.matmul(a, b)
        c.numpy()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


class EpochClock:
    """A Keras callback: wall seconds of each epoch."""

    def __init__(self):
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                outer.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                outer.seconds.append(time.perf_counter() - outer.started)

        self.seconds: list[float] = []
        self.callback = Callback()


def measure_one(job: dict) -> dict:
    """In a fresh process: one model under one setting."""
    import tensorflow as tf

    if job["threads"]:
        tf.config.threading.set_intra_op_parallelism_threads(job["threads"])
    if job["what"] == "peak":
        return {"gflops": matmul_peak(dtype=job["dtype"])}
    import keras

    from pipeline.factors import apply_factors
    from pipeline.model import check_shapes, count_macs
    from pipeline.train import train

    raw = common.read_params(job["overrides"])
    base, params = common.base_config(raw)
    config, params = apply_factors(base, params, MODELS[job["model"]])
    params = dataclasses.replace(params, **job["train"], epochs=job["epochs"])
    data, _ = common.load_data(job["data"], raw)
    if job["xla"]:  # Keras compiles with XLA only on accelerators unless told to
        compile_ = keras.Model.compile
        keras.Model.compile = lambda self, *a, **k: compile_(self, *a, **k, jit_compile=True)
    clock = EpochClock()
    result = train(config, params, data, callbacks=[clock.callback])
    macs = count_macs(check_shapes(config, data.meta.image_shape, data.meta.n_classes))
    n_train, n_val = len(data.y_train), len(data.y_val)
    seconds = sum(clock.seconds[1:]) / max(1, len(clock.seconds) - 1)
    return {
        "seconds": seconds,
        "gflops": (6 * n_train + 2 * n_val) * macs / seconds / 1e9,
        "macs": macs,
        "policy": result.precision,
    }


def run_one(args, **job) -> dict:
    job = {"data": args.data, "overrides": common.parse_overrides(args.overrides), **job}
    return common.run_child(__file__, job)


def main() -> None:
    args = parse_args()
    if common.answer_as_child(args, measure_one):
        return
    common.setup_logging(args.verbose)
    if args.epochs < 2:
        raise common.UserError("--epochs must be >= 2 (the first epoch is left out)")
    dtypes = ("float32", "bfloat16")
    before = {d: run_one(args, what="peak", dtype=d, threads=None)["gflops"] for d in dtypes}
    common.note(f"matmul peaks {before} GFLOP/s")
    rows = []
    for model in args.models:
        for name in args.settings:
            train, xla, threads = SETTINGS[name]
            found = run_one(
                args,
                what="model",
                model=model,
                train=train,
                xla=xla,
                threads=threads,
                epochs=args.epochs,
            )
            common.note(f"{model} / {name}: {found}")
            rows.append((model, name, found))
    after = {d: run_one(args, what="peak", dtype=d, threads=None)["gflops"] for d in dtypes}
    peak = {d: max(before[d], after[d]) for d in dtypes}
    lines = [
        f"epochs data={args.data} matmul peaks: "
        + ", ".join(
            f"{d} {peak[d]:.0f} GFLOP/s (before {before[d]:.0f}, after {after[d]:.0f})"
            for d in dtypes
        ),
        "| model | setting | policy | s/epoch | vs default | GFLOP/s | share of peak |",
        "|---" * 7 + "|",
    ]
    default = {m: f["seconds"] for m, n, f in rows if n == "default"}
    for model, name, found in rows:
        ratio = f"{found['seconds'] / default[model]:.2f}" if model in default else "-"
        dtype = PEAK_DTYPE.get(found["policy"], "float32")
        share = f"{found['gflops'] / peak[dtype]:.0%} ({dtype})" if dtype in peak else "-"
        lines.append(
            f"| {model} ({found['macs'] / 1e6:.1f} M MACs) | {name} | {found['policy']} | "
            f"{found['seconds']:.2f} | {ratio} | {found['gflops']:.0f} | {share} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_main(main)
