"""What the joint study's pruner buys (target: <= 0.5x the epochs, best within 0.3 points).

`experiments/joint.yaml` is run twice in this process through `pipeline.sweep.main`, each
time in a fresh workspace (new SQLite stores for Optuna and MLflow): once as it is (its
pruner, successive halving) and once with `pruner: none`, with the same sampler and
seed, the same trial budget (`--trials`, default the file's `n_trials`), data and
training settings.
Reported per run: epochs trained over all trials, wall time of the trials (first start
to last end) and of the whole sweep (including the best model's logging), best
val_accuracy, and trials complete, pruned (stopped by the pruner), rejected (a config
that fails the shape check, pruned before any compute in both runs) and failed; then the
ratios pruned/unpruned.

Early stopping (`train.patience`) cuts epochs in both runs alike. Once the first trial
is pruned, TPE sees different histories, so the two studies sample different configs
after that point: the comparison is of the whole procedure, not trial by trial.

Run:   python bench/pruning.py                                    # shared MNIST-10k
Smoke: python bench/pruning.py --data embedded --trials 8 -S train.epochs=3
"""

from __future__ import annotations

import common

EXPERIMENT = "joint"
TARGET_EPOCH_RATIO = 0.5
TARGET_POINTS = 0.3


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument(
        "--trials",
        type=int,
        help="trial budget of both studies (default: n_trials of "
        f"experiments/{EXPERIMENT}.yaml, or sweep.n_trials)",
    )
    return parser.parse_args()


def run(label: str, root, data, raw, changes: dict) -> dict:
    workspace = common.make_workspace(root / label, data, raw, {EXPERIMENT: changes})
    common.note(f"{label}: running the {EXPERIMENT} study in {workspace.root}")
    summary, seconds = common.run_sweep(workspace, EXPERIMENT)
    summary["total_seconds"] = seconds
    summary["n_stopped"] = summary["n_pruned"] - summary["n_rejected"]
    common.note(f"{label}: {describe(summary)}")
    return summary


def describe(summary: dict) -> str:
    return (
        f"{summary['epochs_run']} epochs, {summary['wall_seconds']:.0f} s of trials "
        f"({summary['total_seconds']:.0f} s total), best {summary['best_value']:.4f}, "
        f"{summary['n_complete']} complete/{summary['n_stopped']} pruned/"
        f"{summary['n_rejected']} rejected/{summary['n_failed']} failed"
    )


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    overrides = common.overrides_with_trials(args.overrides, args.trials)
    raw = common.read_params(overrides)
    data, label = common.load_data(args.data, raw)

    with common.temporary_folder("bench-pruning-", args.keep) as root:
        pruned = run("pruned", root, data, raw, {})
        unpruned = run("unpruned", root, data, raw, {"pruner": "none"})

    epoch_ratio = pruned["epochs_run"] / max(unpruned["epochs_run"], 1)
    wall_ratio = pruned["wall_seconds"] / max(unpruned["wall_seconds"], 1e-9)
    points = 100 * (unpruned["best_value"] - pruned["best_value"])
    ok = epoch_ratio <= TARGET_EPOCH_RATIO and points <= TARGET_POINTS
    print(
        f"pruning data={label} trials={pruned['n_trials']}: pruned {describe(pruned)} | "
        f"unpruned {describe(unpruned)} | epochs ratio {epoch_ratio:.2f}, wall ratio "
        f"{wall_ratio:.2f}, best {points:+.2f} points behind (targets <= "
        f"{TARGET_EPOCH_RATIO}x epochs, <= {TARGET_POINTS} points: {common.verdict(ok)})"
    )


if __name__ == "__main__":
    common.run_main(main)
