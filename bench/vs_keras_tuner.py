"""Our joint study against Keras Tuner's Hyperband and RandomSearch, same space and budget.

In one process, on the same data and machine:
- `joint`: `experiments/joint.yaml` through `pipeline.sweep.main` (TPE, successive halving,
  MLflow tracking, best model logged and registered) in a fresh temporary workspace;
- `hyperband`, `random`: Keras Tuner over the same factors and levels (padding, strides,
  dilation_rate, pooling, regularization, width, learning_rate), each model built by
  `pipeline.experiments.apply_factors` + `pipeline.model.build_model` from the same base
  model, trained on the same `tf.data` pipelines (`pipeline.train.make_datasets`) with
  the same early stopping. A config that `build_model` refuses (strides with dilation, a
  feature map below 1x1) raises `keras_tuner.errors.FailedTrialError`: a failed trial
  that costs no epochs, as our study prunes it before training.

Budget: the joint study's n_trials x train.epochs epochs. RandomSearch gets n_trials
trials of up to train.epochs epochs; Hyperband gets max_epochs = train.epochs and as many
iterations as bring its planned epochs closest to the budget. Epochs actually trained
are counted by a callback, for all three. `--joint-trials N` gives our study N trials
while Keras Tuner keeps its budget: pruned trials cost few epochs, so the same trial
count leaves much of the epoch budget, and the wall time, unspent.

Reported per method: best val_accuracy, wall time, trials run (failed ones in brackets),
epochs trained. Keras Tuner scores a trial by its best epoch's val_accuracy; our study by
the val_accuracy of the epoch with the lowest val_loss (the weights it keeps), so "best"
is given both ways for the joint study: `best` (ours) and `best any epoch` (comparable).
Our wall time includes MLflow tracking and the final model registration; Keras Tuner
tracks nothing beyond its own checkpoints.

Target (per tuner): a best value at least Keras Tuner's, compared on the best epoch's
val_accuracy, in at most its wall time (ours including tracking).

Needs keras-tuner: pip install -e '.[bench]'

Run:   python bench/vs_keras_tuner.py                         # shared MNIST-10k
Same time: python bench/vs_keras_tuner.py --joint-trials 40 --tuners hyperband
Smoke: python bench/vs_keras_tuner.py --data embedded --trials 4 -S train.epochs=2
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys

import common

EXPERIMENT = "joint"
TUNERS = ("hyperband", "random")


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument(
        "--trials",
        type=int,
        help="trial budget (default: n_trials of experiments/joint.yaml, or sweep.n_trials)",
    )
    parser.add_argument(
        "--joint-trials",
        type=int,
        help="our study's trial budget instead (default: the same as --trials); "
        "Keras Tuner's epoch budget stays trials x train.epochs. Pruned "
        "trials cost few epochs, so this spends the same budget or time",
    )
    parser.add_argument(
        "--tuners",
        default=",".join(TUNERS),
        help="Keras Tuner methods to run, comma-separated (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Keras Tuner's seed (default: %(default)s)"
    )
    return parser.parse_args()


def require_keras_tuner():
    try:
        import keras_tuner
    except ImportError:
        print(
            "error: keras-tuner is not installed; install the bench extra: "
            "pip install -e '.[bench]'  (or: pip install keras-tuner tensorboard)",
            file=sys.stderr,
        )
        sys.exit(common.EXIT_USER_ERROR)
    try:
        # keras-tuner imports it for every trial on the TensorFlow backend but does not
        # declare it; without it every trial fails.
        import tensorboard  # noqa: F401
    except ImportError:
        print(
            "error: keras-tuner needs tensorboard on the TensorFlow backend: "
            "pip install tensorboard",
            file=sys.stderr,
        )
        sys.exit(common.EXIT_USER_ERROR)
    return keras_tuner


# -- the Keras Tuner side ---------------------------------------------------------------------
def make_hypermodel(kt, spec, base, train_params, data):
    """A Keras Tuner build function over `spec`'s factors, on our model builder."""
    from pipeline.experiments import Range
    from pipeline.factors import FACTORS, apply_factors
    from pipeline.model import ShapeError, build_model

    def build(hp):
        values = {}
        for name, levels in spec.factors.items():
            if isinstance(levels, Range):
                sampling = "log" if levels.log else "linear"
                if FACTORS[name].kind is int:
                    values[name] = hp.Int(
                        name, int(levels.low), int(levels.high), sampling=sampling
                    )
                else:
                    values[name] = hp.Float(name, levels.low, levels.high, sampling=sampling)
            else:
                values[name] = hp.Choice(name, list(levels))
        try:
            config, _ = apply_factors(base, train_params, values)
            return build_model(config, data.meta.image_shape, data.meta.n_classes)
        except (ValueError, ShapeError) as exc:
            raise kt.errors.FailedTrialError(f"rejected before training: {exc}") from None

    return build


def hyperband_epochs(max_epochs: int, factor: int) -> int:
    """Epochs one Hyperband iteration plans (Keras Tuner's bracket arithmetic; a trial
    promoted to the next round resumes from its checkpoint)."""
    brackets, epochs = 0, float(max_epochs)
    while epochs >= 1:
        epochs /= factor
        brackets += 1
    end_size = math.ceil(1 + math.log(max_epochs, factor))
    total = 0
    for bracket in range(brackets):
        done = 0
        for round_ in range(bracket + 1):
            size = math.ceil(end_size / (bracket + 1) * factor ** (bracket - round_))
            target = math.ceil(max_epochs / factor ** (bracket - round_))
            total += size * (target - done)
            done = target
    return total


def _epoch_counter(keras, counts: dict):
    # Keras Tuner deep-copies callbacks for every trial; a plain function is copied by
    # reference, so the count survives the copies.
    def tick(epoch, logs):
        counts["epochs"] += 1

    return keras.callbacks.LambdaCallback(on_epoch_end=tick)


def _quiet_failed_trials(verbose: bool) -> None:
    """Keras Tuner prints a traceback for every failed trial (its `config.DEBUG`); the
    rejected configs are expected, and their messages are still checked afterwards."""
    try:
        from keras_tuner.src import config as kt_config
    except ImportError:  # another layout: keep its default
        return
    kt_config.DEBUG = verbose


def run_tuner(kt, name: str, args, root, spec, base, train_params, data, budget: int) -> dict:
    import keras

    from pipeline.device import configure_device
    from pipeline.train import make_datasets

    configure_device(train_params.precision)
    keras.utils.set_random_seed(train_params.seed)
    _quiet_failed_trials(args.verbose)
    build = make_hypermodel(kt, spec, base, train_params, data)
    common_kwargs = dict(
        objective=kt.Objective(spec.objective, spec.direction[:3]),
        seed=args.seed,
        directory=str(root / "keras-tuner"),
        project_name=name,
        overwrite=True,
        max_consecutive_failed_trials=10**6,
    )
    if name == "hyperband":
        per_iteration = hyperband_epochs(train_params.epochs, 3)
        iterations = max(1, round(budget / per_iteration))
        tuner = kt.Hyperband(
            build,
            max_epochs=train_params.epochs,
            factor=3,
            hyperband_iterations=iterations,
            **common_kwargs,
        )
        plan = f"{iterations} iteration(s) of ~{per_iteration} planned epochs"
    else:
        tuner = kt.RandomSearch(build, max_trials=spec.n_trials, **common_kwargs)
        plan = f"{spec.n_trials} trials of up to {train_params.epochs} epochs"
    common.note(f"{name}: {plan} (budget {budget} epochs)")
    train_ds, val_ds = make_datasets(data, train_params.batch_size, train_params.seed)
    counts = {"epochs": 0}
    stopper = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=train_params.patience, restore_best_weights=True
    )
    with common.Stopwatch() as clock, contextlib.redirect_stdout(sys.stderr):
        tuner.search(
            train_ds,
            validation_data=val_ds,
            epochs=train_params.epochs,
            callbacks=[stopper, _epoch_counter(keras, counts)],
            shuffle=False,
            verbose=0,
        )
    trials = list(tuner.oracle.trials.values())
    not_trained = [t for t in trials if t.status != "COMPLETED"]
    broken = [t for t in not_trained if "rejected before training" not in (t.message or "")]
    if broken:  # Keras Tuner logs these and carries on; a benchmark must not
        last = (broken[0].message or "no message").strip().splitlines()[-1]
        raise RuntimeError(
            f"{name}: {len(broken)} trial(s) failed for another reason than "
            f"a rejected config, e.g. trial {broken[0].trial_id}: {last}"
        )
    failed = len(not_trained)
    best = tuner.oracle.get_best_trials(1)
    result = {
        "best": best[0].score if best else None,
        "seconds": clock.seconds,
        "trials": len(trials),
        "failed": failed,
        "epochs": counts["epochs"],
    }
    common.note(f"{name}: {describe(result)}")
    return result


# -- our side -------------------------------------------------------------------------------------
def run_joint(root, data, raw) -> tuple[dict, object]:
    workspace = common.make_workspace(root / "joint", data, raw)
    common.note(f"joint: running the study in {workspace.root}")
    summary, seconds = common.run_sweep(workspace, EXPERIMENT)
    study = common.load_study(workspace, EXPERIMENT)
    seen = [v for t in study.get_trials(deepcopy=False) for v in t.intermediate_values.values()]
    result = {
        "best": summary["best_value"],
        "best_any_epoch": max(seen, default=None),
        "seconds": seconds,
        "trial_seconds": summary["wall_seconds"],
        "trials": summary["n_trials"],
        "failed": summary["n_rejected"],
        "epochs": summary["epochs_run"],
    }
    common.note(f"joint: {describe(result)}")
    return result, workspace


def describe(result: dict) -> str:
    best = "-" if result["best"] is None else f"{result['best']:.4f}"
    text = f"best {best}"
    if result.get("best_any_epoch") is not None:
        text += f" (any epoch {result['best_any_epoch']:.4f})"
    text += f", {result['seconds']:.0f} s"
    if "trial_seconds" in result:
        text += f" ({result['trial_seconds']:.0f} s of trials)"
    return (
        f"{text}, {result['trials']} trials ({result['failed']} not trained), "
        f"{result['epochs']} epochs"
    )


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    kt = require_keras_tuner()
    tuners = [t.strip() for t in args.tuners.split(",") if t.strip()]
    unknown = sorted(set(tuners) - set(TUNERS))
    if unknown:
        raise common.UserError(f"--tuners: unknown {unknown}; use {', '.join(TUNERS)}")
    overrides = common.overrides_with_trials(args.overrides, args.trials)
    raw = common.read_params(overrides)
    base, train_params = common.base_config(raw)
    data, label = common.load_data(args.data, raw)

    from pipeline.experiments import load_experiment

    sweep_section = raw.get("sweep") or {}
    spec = load_experiment(common.EXPERIMENTS, EXPERIMENT, sweep_section.get("n_trials"), base)
    budget = spec.n_trials * train_params.epochs
    results = {}
    with common.temporary_folder("bench-vs-kt-", args.keep) as root:
        joint_raw = raw
        if args.joint_trials is not None:
            joint_raw = common.apply_overrides(
                copy.deepcopy(raw), common.overrides_with_trials([], args.joint_trials)
            )
        results["joint"], _ = run_joint(root, data, joint_raw)
        for name in tuners:
            results[name] = run_tuner(kt, name, args, root, spec, base, train_params, data, budget)
    parts = [f"{name}: {describe(result)}" for name, result in results.items()]
    verdicts = [f"vs {name} {verdict(results['joint'], results[name])}" for name in tuners]
    print(
        f"vs_keras_tuner data={label} budget={spec.n_trials}x{train_params.epochs}="
        f"{budget} epochs | " + " | ".join(parts) + " | target: best >= theirs in <= their "
        "wall time: " + ", ".join(verdicts)
    )


def verdict(joint: dict, theirs: dict) -> str:
    """The issue's target against one tuner, on the comparable score (best epoch's
    val_accuracy, as Keras Tuner scores) and on wall time."""
    ours = joint.get("best_any_epoch")
    if ours is None or theirs["best"] is None:
        return "n/a"
    points = 100 * (ours - theirs["best"])
    ratio = joint["seconds"] / max(theirs["seconds"], 1e-9)
    ok = points >= 0 and ratio <= 1
    return f"{points:+.2f} points, {ratio:.2f}x time: {common.verdict(ok)}"


if __name__ == "__main__":
    common.run_main(main)
