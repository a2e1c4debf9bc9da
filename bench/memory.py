"""Does a long in-process sweep leak memory? (target: RSS growth <= 50 MB over 30 trials)

`--mode sweep` (default) runs a real study in this process, trial by trial, with the
pipeline's own functions (`Job.load`, `open_study`, `fill_queue`, `workers.work`) on
temporary SQLite stores for Optuna and MLflow: the joint study (TPE, successive
halving) with its budget set to `--trials`, so models of every width and kind are built,
trained, tracked and dropped. `--mode train` is the bare loop underneath: `train()` of the base
model, one seed per trial, no Optuna or MLflow, to tell a Keras/TensorFlow leak from a
tracking one. The resident set size (psutil) is read after every trial; reported are
RSS after trial 1, after the last, the growth between them and the least-squares slope
per trial from trial 1 on; when the largest model comes later than trial 1, the same
from that trial on (a bigger model raises the allocator's high-water mark for good,
which is not a leak).

Run:   python bench/memory.py                         # shared MNIST-10k, 30 trials
Smoke: python bench/memory.py --data embedded --trials 3 -S train.epochs=1
"""

from __future__ import annotations

import gc

import common

TARGET_GROWTH_MB = 50.0
MB = 1024 * 1024


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument(
        "--trials", type=int, default=30, help="trials run in this process (default: %(default)s)"
    )
    parser.add_argument(
        "--mode",
        choices=("sweep", "train"),
        default="sweep",
        help="sweep: the joint study through pipeline.sweep; train: a bare "
        "train() loop (default: %(default)s)",
    )
    parser.add_argument(
        "--experiment",
        default="joint",
        help="the study for --mode sweep; it needs a TPE or random sampler "
        "to hold --trials trials (default: %(default)s)",
    )
    return parser.parse_args()


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / MB


def sweep_trials(args, workspace, n_trials: int):
    """Yield after each trial of a real in-process study."""
    from pipeline import sweep, workers
    from pipeline.config import load_config
    from pipeline.tracking import Tracker
    from pipeline.trial import Job

    with common.working_directory(workspace.root):
        config = load_config(workspace.params_path)
        job = Job.load(config, args.experiment)
        if job.experiment.n_trials < n_trials:
            raise common.UserError(
                f"experiment {args.experiment} holds only {job.experiment.n_trials} trials "
                f"(a grid is capped at its size); use --experiment joint for {n_trials}"
            )
        tracker = Tracker.connect(config.tracking.uri, config.tracking.experiment)
        study = job.open_study(create=True)
        parent_id = sweep.parent_run(job, study, tracker)
        study.fill_queue(job.experiment)
        for _ in range(n_trials):
            if workers.work(job, study, tracker, parent_id, max_trials=1) == 0:
                return
            finished = [
                t
                for t in study.optuna.get_trials(deepcopy=False)
                if t.state.is_finished() and t.datetime_complete
            ]
            last = max(finished, key=lambda t: t.datetime_complete)
            epochs = last.user_attrs.get("epochs_run", 0)
            size = last.user_attrs.get("n_params", 0) if epochs else 0
            yield f"trial {last.number} {last.state.name}, {epochs} epochs", size
        tracker.end_run(parent_id)


def train_trials(raw, data, n_trials: int):
    """Yield after each bare `train()` of the base model, one seed per trial."""
    import dataclasses

    from pipeline.train import train

    config, params = common.base_config(raw)
    for i in range(n_trials):
        result = train(config, dataclasses.replace(params, seed=params.seed + i), data)
        accuracy, size = result.metrics["val_accuracy"], result.metrics["n_params"]
        del result
        gc.collect()  # as run_trial does after every trial
        yield f"seed {params.seed + i} val_accuracy {accuracy:.4f}", size


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    if args.trials < 2:
        raise common.UserError("--trials must be >= 2 to measure growth")
    overrides = common.parse_overrides(args.overrides)
    if args.mode == "sweep":
        overrides["sweep.n_trials"] = args.trials
    raw = common.read_params(overrides)
    data, label = common.load_data(args.data, raw)

    rss: list[float] = []
    sizes: list[int] = []
    with common.temporary_folder("bench-memory-", args.keep) as root:
        if args.mode == "sweep":
            workspace = common.make_workspace(root, data, raw)
            trials = sweep_trials(args, workspace, args.trials)
        else:
            trials = train_trials(raw, data, args.trials)
        common.note(f"RSS with the data loaded, before any trial: {rss_mb():.1f} MB")
        for i, (what, size) in enumerate(trials, start=1):
            rss.append(rss_mb())
            sizes.append(size)
            common.note(f"{i}/{args.trials} {what}: RSS {rss[-1]:.1f} MB")
    if len(rss) < 2:
        raise common.UserError(f"only {len(rss)} trial(s) ran; nothing to compare")

    growth = rss[-1] - rss[0]
    print(
        f"memory mode={args.mode} data={label} trials={len(rss)}: RSS after trial 1 "
        f"{rss[0]:.1f} MB, after trial {len(rss)} {rss[-1]:.1f} MB, growth {growth:+.1f} MB "
        f"(target <= {TARGET_GROWTH_MB:g} MB: {common.verdict(growth <= TARGET_GROWTH_MB)}), "
        f"slope {common.slope(rss):+.2f} MB/trial, peak {max(rss):.1f} MB"
        f"{since_largest(rss, sizes)}"
    )


def since_largest(rss: list[float], sizes: list[int]) -> str:
    """Growth from the trial that trained the largest model on: before it, RSS also rises
    because the allocator keeps the high-water mark of a bigger model, not from a leak."""
    largest = sizes.index(max(sizes))
    if largest == 0 or len(rss) - largest < 3:
        return ""
    tail = rss[largest:]
    return (
        f"; from trial {largest + 1} (the largest model, {sizes[largest]:,} parameters) "
        f"to {len(rss)}: {tail[-1] - tail[0]:+.1f} MB, slope {common.slope(tail):+.2f} "
        "MB/trial"
    )


if __name__ == "__main__":
    common.run_main(main)
