"""Training recipes side by side on the base model: what the schedule, the stopping policy
and augmentation do to accuracy and time.

Each recipe is `params.yaml`'s `train` section with a few settings changed; every one
trains the same base model (and, with `--batchnorm`, the base model with batch norm in
every block) on the same data and seeds, one after another in this process. The table
gives validation accuracy (the kept epoch), accuracy on the test set when a solution file
is known (MNIST-10k's `solution.csv`), epochs run and seconds, as means over the seeds.

Run:   python bench/recipe.py                        # shared MNIST-10k, 2 seeds
Smoke: python bench/recipe.py --data embedded --seeds 1 -S train.epochs=2
"""

from __future__ import annotations

import dataclasses
import statistics

import common
import numpy as np

# The recipe of the second session: cosine over 15 epochs at batch 64, augmented, no early
# stop, Keras's batch norm momentum. Every row below states all it changes from it, so the
# table keeps its meaning whatever `params.yaml` says.
COSINE = {
    "schedule": "cosine",
    "patience": None,
    "min_epochs": 0,
    "augment": True,
    "epochs": 15,
    "batch_size": 64,
    "bn_momentum": 0.99,
}
# name -> the `train` settings of that recipe
RECIPES = {
    "first (constant, patience 3, 15 epochs)": {
        **COSINE,
        "schedule": "constant",
        "patience": 3,
        "augment": False,
    },
    "cosine 15, augmented": COSINE,
    "cosine 15, not augmented": {**COSINE, "augment": False},
    "cosine 15, augmented, bn momentum 0.9": {**COSINE, "bn_momentum": 0.9},
    "cosine 15, augmented, bn 0.9, batch 128": {**COSINE, "bn_momentum": 0.9, "batch_size": 128},
    "cosine 12, augmented, bn 0.9, batch 128": {
        **COSINE,
        "bn_momentum": 0.9,
        "batch_size": 128,
        "epochs": 12,
    },
    "cosine 20, augmented": {**COSINE, "epochs": 20},
    "plateau 20, augmented": {**COSINE, "schedule": "plateau", "epochs": 20},
}


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=2, help="seeds per recipe (default: 2)")
    parser.add_argument(
        "--batchnorm", action="store_true", help="also the base model with batch norm"
    )
    parser.add_argument(
        "--only", action="append", default=[], help="run only recipes whose name has this"
    )
    return parser.parse_args()


def test_labels(data_label: str) -> np.ndarray | None:
    """The test set's labels in test-row order, where the data has a known solution."""
    import pandas as pd

    if data_label != "mnist10k" or not common.MNIST_SOLUTION.is_file():
        return None
    return pd.read_csv(common.MNIST_SOLUTION).sort_values("ImageId")["Label"].to_numpy()


def run(config, params, data, labels) -> dict:
    from pipeline.model import predict_labels
    from pipeline.train import train

    result = train(config, params, data)
    row = {
        "val": result.metrics["val_accuracy"],
        "epochs": result.metrics["epochs_run"],
        "seconds": result.metrics["train_seconds"],
    }
    if labels is not None:
        row["test"] = float((predict_labels(result.model, data.x_test) == labels).mean())
    return row


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    if args.seeds < 1:
        raise common.UserError("--seeds must be >= 1")
    raw = common.read_params(common.parse_overrides(args.overrides))
    base, train_params = common.base_config(raw)
    data, label = common.load_data(args.data, raw)
    labels = test_labels(label)
    models = {"base": base}
    if args.batchnorm:
        blocks = tuple(dataclasses.replace(b, regularization="batchnorm") for b in base.blocks)
        models["batchnorm"] = dataclasses.replace(base, blocks=blocks)
    recipes = {k: v for k, v in RECIPES.items() if not args.only or any(o in k for o in args.only)}

    lines = [
        "| model | recipe | val_accuracy | test accuracy | epochs | seconds |",
        "|---" * 6 + "|",
    ]
    done: dict = {}  # a training that two rows share (momentum without batch norm) runs once
    for model_name, config in models.items():
        uses_batchnorm = any(b.regularization in ("batchnorm", "both") for b in config.blocks)
        for recipe, changes in recipes.items():
            rows = []
            for seed in range(args.seeds):
                params = dataclasses.replace(train_params, **changes, seed=seed)
                if not uses_batchnorm:
                    params = dataclasses.replace(params, bn_momentum=0.99)
                if (config, params) not in done:
                    done[config, params] = run(config, params, data, labels)
                rows.append(done[config, params])
                common.note(f"{model_name} / {recipe} / seed {seed}: {rows[-1]}")
            mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
            test = f"{mean['test']:.4f}" if "test" in mean else "-"
            lines.append(
                f"| {model_name} | {recipe} | {mean['val']:.4f} | {test} | "
                f"{mean['epochs']:.1f} | {mean['seconds']:.0f} |"
            )
    print(f"recipe data={label} seeds={args.seeds}")
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_main(main)
