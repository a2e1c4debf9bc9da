"""What full MLflow tracking costs on top of training (target: tracked/bare <= 1.03).

The base model of `params.yaml`, the same data and the same seed are trained bare,
`train(config, params, data)`, and fully tracked, `train_tracked(tracker, ...)` (params,
per-epoch metrics, tags, the artifacts of the `train` stage and the checkpoint) against a
temporary SQLite store, with the per-epoch metrics written in the background (the
default) and, as a third arm, synchronously (`Tracker.asynchronous = False`); alternating,
`--repeats` times each after one untimed warm-up of each (the first fit pays for graph
tracing and lazy imports). Besides the totals, it counts where a tracked run's extra time
goes: seconds inside MLflow client calls (per method) and inside `write_diagnostics`
(the train stage's plots, which a sweep trial does not make). Then one
`Tracker.log_keras_model(...)` with registration, the one-off logging of a study's best
model, is timed on its own.

Run:   python bench/tracking_overhead.py                      # shared MNIST-10k, 3 repeats
Smoke: python bench/tracking_overhead.py --data embedded --repeats 1 -S train.epochs=2
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import common

TARGET_RATIO = 1.03


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed runs of each kind, alternating (default: %(default)s)",
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed warm-up run of each kind",
    )
    return parser.parse_args()


def timed(name: str, function, seconds: collections.Counter):
    """`function`, adding the seconds each call takes to `seconds[name]`."""

    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - start

    return call


class Timed:
    """A stand-in for an object that times each method call on it, by method name."""

    def __init__(self, inner, seconds: collections.Counter):
        self._inner, self._seconds = inner, seconds

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        return timed(name, attr, self._seconds) if callable(attr) else attr


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    if args.repeats < 1:
        raise common.UserError("--repeats must be >= 1")
    raw = common.read_params(common.parse_overrides(args.overrides))
    config, params = common.base_config(raw)
    data, label = common.load_data(args.data, raw)

    import pipeline.diagnostics
    from pipeline.tracking import Tracker
    from pipeline.train import train, train_tracked

    spent = {kind: collections.Counter() for kind in ("tracked", "tracked sync")}
    write_diagnostics = pipeline.diagnostics.write_diagnostics

    with (
        common.temporary_folder("bench-tracking-", args.keep) as root,
        common.working_directory(root),
    ):
        tracker = Tracker.connect(f"sqlite:///{root / 'mlflow.db'}", "bench-tracking-overhead")
        client, wait_for = tracker.client, tracker._wait_for
        checkpoint = Path(root) / "models" / "best.keras"

        def bare():
            return train(config, params, data)

        def tracked(kind: str):
            counter = spent[kind]
            tracker.asynchronous = kind == "tracked"
            tracker.client = Timed(client, counter)
            # end_run's wait for the background writes
            tracker._wait_for = timed("wait for background writes", wait_for, counter)
            pipeline.diagnostics.write_diagnostics = timed(
                "write_diagnostics", write_diagnostics, counter
            )
            try:
                return train_tracked(tracker, config, params, data, checkpoint)
            finally:
                tracker.client, pipeline.diagnostics.write_diagnostics = client, write_diagnostics
                tracker._wait_for = wait_for

        runs = {
            "bare": bare,
            "tracked": lambda: tracked("tracked"),
            "tracked sync": lambda: tracked("tracked sync"),
        }
        if args.warmup:
            common.note("warm-up: one run of each kind, untimed")
            for run in runs.values():
                run()
            for counter in spent.values():
                counter.clear()
        seconds: dict[str, list[float]] = {kind: [] for kind in runs}
        fit_seconds: dict[str, list[float]] = {kind: [] for kind in runs}
        result = None
        for repeat in range(args.repeats):
            for kind, run in runs.items():
                with common.Stopwatch() as clock:
                    result = run()
                seconds[kind].append(clock.seconds)
                fit_seconds[kind].append(result.metrics["train_seconds"])
                common.note(
                    f"repeat {repeat + 1}/{args.repeats} {kind}: {clock.seconds:.2f} s "
                    f"(fit {result.metrics['train_seconds']:.2f} s, "
                    f"{result.metrics['epochs_run']} epochs)"
                )

        run_id = tracker.start_run("bench-log-keras-model")
        with common.Stopwatch() as clock:
            tracker.log_keras_model(
                run_id, result.model, data.x_val[:5], registered_name="bench-tracking-overhead"
            )
        tracker.end_run(run_id)
        log_model_seconds = clock.seconds

    bare_s = common.median(seconds["bare"])
    bare_fit = common.median(fit_seconds["bare"])
    parts = []
    for kind in ("tracked", "tracked sync"):
        ratio = common.median(seconds[kind]) / bare_s
        fit_ratio = common.median(fit_seconds[kind]) / bare_fit
        inside = {k: v / args.repeats for k, v in spent[kind].most_common()}
        calls = ", ".join(f"{k} {v:.2f}" for k, v in inside.items())
        verdict = common.verdict(ratio <= TARGET_RATIO)
        parts.append(
            f"{kind} {common.median(seconds[kind]):.2f} s, ratio {ratio:.3f} "
            f"(target <= {TARGET_RATIO}: {verdict}), fit alone {fit_ratio:.3f}, "
            f"seconds per run inside [{calls}]"
        )
    print(
        f"tracking_overhead data={label} repeats={args.repeats} epochs={params.epochs}: "
        f"bare {bare_s:.2f} s (median); "
        + "; ".join(parts)
        + f"; log_keras_model+register {log_model_seconds:.2f} s"
    )


if __name__ == "__main__":
    common.run_main(main)
