"""What full MLflow tracking costs on top of training (target: tracked/bare <= 1.03).

The base model of `params.yaml`, the same data and the same seed are trained bare,
`train(config, params, data)`, and fully tracked, `train_tracked(tracker, ...)` (params,
per-epoch metrics, tags, the artifacts of the `train` stage and the checkpoint) against a
temporary SQLite store, alternating, `--repeats` times each after one untimed warm-up of
each (the first fit pays for graph tracing and lazy imports). Then one
`Tracker.log_keras_model(...)` with registration, the one-off logging of a study's best
model, is timed on its own.

Run:   python bench/tracking_overhead.py                      # shared MNIST-10k, 3 repeats
Smoke: python bench/tracking_overhead.py --data embedded --repeats 1 -S train.epochs=2
"""

from __future__ import annotations

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


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    if args.repeats < 1:
        raise common.UserError("--repeats must be >= 1")
    raw = common.read_params(common.parse_overrides(args.overrides))
    config, params = common.base_config(raw)
    data, label = common.load_data(args.data, raw)

    from pipeline.tracking import Tracker
    from pipeline.train import train, train_tracked

    with (
        common.temporary_folder("bench-tracking-", args.keep) as root,
        common.working_directory(root),
    ):
        tracker = Tracker.connect(f"sqlite:///{root / 'mlflow.db'}", "bench-tracking-overhead")
        checkpoint = Path(root) / "models" / "best.keras"

        def bare():
            return train(config, params, data)

        def tracked():
            return train_tracked(tracker, config, params, data, checkpoint)

        if args.warmup:
            common.note("warm-up: one bare and one tracked run, untimed")
            bare()
            tracked()
        seconds: dict[str, list[float]] = {"bare": [], "tracked": []}
        fit_seconds: dict[str, list[float]] = {"bare": [], "tracked": []}
        result = None
        for repeat in range(args.repeats):
            for kind, run in (("bare", bare), ("tracked", tracked)):
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

    bare_s, tracked_s = common.median(seconds["bare"]), common.median(seconds["tracked"])
    ratio = tracked_s / bare_s
    fit_ratio = common.median(fit_seconds["tracked"]) / common.median(fit_seconds["bare"])
    print(
        f"tracking_overhead data={label} repeats={args.repeats} epochs={params.epochs}: "
        f"bare {bare_s:.2f} s, tracked {tracked_s:.2f} s (median), ratio {ratio:.3f} "
        f"(target <= {TARGET_RATIO}: {common.verdict(ratio <= TARGET_RATIO)}); "
        f"fit alone ratio {fit_ratio:.3f}; log_keras_model+register {log_model_seconds:.2f} s"
    )


if __name__ == "__main__":
    common.run_main(main)
