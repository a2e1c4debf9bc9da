"""The GPU path: does training use the GPU, does mixed precision help, and how busy is
the device? For a machine with an NVIDIA GPU; about 3 to 5 minutes there.

For the base model and the largest joint-study model (as in `epochs.py`), at batch 64
(the default) and 256, in float32 and in mixed precision (`mixed_float16`; the softmax
stays float32), each in a fresh process, with `pipeline.train.train` for `--epochs`
epochs, the first (tracing) left out:
- seconds per epoch, and GFLOP/s counted as in `epochs.py`, as a share of this GPU's own
  matmul peak in the same precision (an 8192x8192 `tf.matmul`, float32 and float16,
  measured by the same run);
- the GPU's mean utilisation from `nvidia-smi`, sampled every 200 ms from the second
  epoch to the end of training, and TensorFlow's peak GPU memory over the same epochs
  (memory grows as needed: `TF_FORCE_GPU_ALLOW_GROWTH`);
- where the model's weights live, so a silent CPU fallback shows, and the precision
  policy it trained under (the pipeline itself picks mixed precision on any GPU, so this
  script sets each row's policy in its place). On Ampere and newer GPUs TensorFlow's
  float32 matmuls and convolutions run as TF32, in the peak and the models alike.
It refuses to run when TensorFlow sees no GPU (a CPU run measures the wrong thing);
`--allow-cpu` runs it anyway, as a smoke test of the script itself.

Run:   python bench/gpu.py                        # shared MNIST-10k
Smoke: python bench/gpu.py --allow-cpu --data embedded --epochs 2 --models base --batches 64 \
           --precisions float32      # (float16 on a CPU is very slow)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shutil
import subprocess
import tempfile
import time

import common
from epochs import MODELS, EpochClock, matmul_peak

PRECISIONS = ("float32", "mixed_float16")


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per row (default 4)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 256], metavar="N")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--allow-cpu", action="store_true", help="run without a GPU (smoke)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one measurement, in a child
    return parser.parse_args()


class Sampler:
    """`nvidia-smi` utilisation (%) every 200 ms between start and stop, into a file;
    nothing where there is no `nvidia-smi` or it reports no number (MIG, some boards)."""

    def __init__(self, path: str):
        self.path, self.process = path, None

    def start(self) -> None:
        if self.process is None and shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                    "-f",
                    self.path,
                ]
            )

    def stop(self) -> float | None:
        if self.process is None:
            return None
        self.process.terminate()
        self.process.wait()
        values = []
        with open(self.path) as lines:
            for line in lines:
                with contextlib.suppress(ValueError):  # "[N/A]", "[Not Supported]"
                    values.append(float(line.split(",")[0]))
        return sum(values) / len(values) if values else None


def measure_one(job: dict) -> dict:
    """In a fresh process: the device, then one model at one batch size and precision."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if job["what"] == "device":
        names = [
            tf.config.experimental.get_device_details(g).get("device_name", g.name) for g in gpus
        ]
        return {"gpus": names, "tensorflow": tf.__version__}
    if job["what"] == "peak":
        n, repeats = (8192, 20) if gpus else (1024, 2)  # a CPU smoke run: small and quick
        return {
            p: matmul_peak(n, repeats, "float16" if p == "mixed_float16" else "float32")
            for p in job["precisions"]
        }
    import keras

    from pipeline.factors import apply_factors
    from pipeline.model import check_shapes, count_macs
    from pipeline.train import train

    raw = common.read_params(job["overrides"])
    base, params = common.base_config(raw)
    config, params = apply_factors(base, params, MODELS[job["model"]])
    params = dataclasses.replace(
        params, batch_size=job["batch"], epochs=job["epochs"], precision=job["precision"]
    )
    data, _ = common.load_data(job["data"], raw)
    clock = EpochClock()
    sampler = Sampler(tempfile.mkstemp(prefix="bench-gpu-", suffix=".csv")[1])

    class Sample(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                sampler.start()
                if gpus:  # TensorFlow's own peak, from here on
                    tf.config.experimental.reset_memory_stats("GPU:0")

    result = train(config, params, data, callbacks=[clock.callback, Sample()])
    utilisation = sampler.stop()
    memory = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20 if gpus else None
    macs = count_macs(check_shapes(config, data.meta.image_shape, data.meta.n_classes))
    seconds = sum(clock.seconds[1:]) / max(1, len(clock.seconds) - 1)
    weights = result.model.trainable_weights[0]
    return {
        "seconds": seconds,
        "gflops": (6 * len(data.y_train) + 2 * len(data.y_val)) * macs / seconds / 1e9,
        "macs": macs,
        "weights_on": str(getattr(weights.value, "device", "?")),
        "policy": result.model.dtype_policy.name,
        "val_accuracy": result.metrics["val_accuracy"],
        "utilisation": utilisation,
        "memory_mib": memory,
    }


def run_one(args, **job) -> dict:
    job = {"data": args.data, "overrides": common.parse_overrides(args.overrides), **job}
    # memory as the model needs it, not all of the GPU that TensorFlow takes by default
    return common.run_child(__file__, job, env={"TF_FORCE_GPU_ALLOW_GROWTH": "true"})


def main() -> None:
    args = parse_args()
    if common.answer_as_child(args, measure_one):
        return
    common.setup_logging(args.verbose)
    if args.epochs < 2:
        raise common.UserError("--epochs must be >= 2 (the first epoch is left out)")
    started = time.perf_counter()
    device = run_one(args, what="device")
    if not device["gpus"] and not args.allow_cpu:
        raise common.UserError(
            "TensorFlow sees no GPU here (check `nvidia-smi` and that the installed "
            "tensorflow has CUDA: pip install 'tensorflow[and-cuda]'); "
            "--allow-cpu runs the script on the CPU as a smoke test"
        )
    common.note(f"devices: {device}")
    peaks = run_one(args, what="peak", precisions=args.precisions)
    common.note(f"matmul peaks (GFLOP/s): {peaks}")
    rows = []
    for model in args.models:
        for batch in args.batches:
            for precision in args.precisions:
                found = run_one(
                    args,
                    what="model",
                    model=model,
                    batch=batch,
                    precision=precision,
                    epochs=args.epochs,
                )
                common.note(f"{model} / batch {batch} / {precision}: {found}")
                rows.append((model, batch, precision, found))
    gpu = ", ".join(device["gpus"]) or "no GPU (--allow-cpu)"
    peak_text = ", ".join(f"{p} {v:.0f}" for p, v in peaks.items())
    lines = [
        f"gpu data={args.data} device={gpu} tensorflow={device['tensorflow']} "
        f"matmul peak GFLOP/s: {peak_text}; {time.perf_counter() - started:.0f} s in all",
        "| model | batch | precision | s/epoch | vs float32 | GFLOP/s | share of peak "
        "| GPU busy | GPU memory (MiB) | weights on | policy | val_accuracy |",
        "|---" * 12 + "|",
    ]
    float32 = {(m, b): f["seconds"] for m, b, p, f in rows if p == "float32"}
    for model, batch, precision, found in rows:
        base = float32.get((model, batch))
        ratio = f"{found['seconds'] / base:.2f}" if base else "-"
        busy = "-" if found["utilisation"] is None else f"{found['utilisation']:.0f}%"
        memory = "-" if found["memory_mib"] is None else f"{found['memory_mib']:.0f}"
        lines.append(
            f"| {model} ({found['macs'] / 1e6:.1f} M MACs) | {batch} | {precision} | "
            f"{found['seconds']:.2f} | {ratio} | {found['gflops']:.0f} | "
            f"{found['gflops'] / peaks[precision]:.0%} | {busy} | {memory} | "
            f"{found['weights_on']} | {found['policy']} | {found['val_accuracy']:.4f} |"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_main(main)
