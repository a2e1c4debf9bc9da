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

# name -> changes to the `train` section of params.yaml
RECIPES = {
    "first (constant, patience 3, 15 epochs)": {
        "schedule": "constant",
        "patience": 3,
        "min_epochs": 0,
        "augment": False,
        "epochs": 15,
    },
    "cosine 15, augmented": {"schedule": "cosine", "patience": None, "augment": True, "epochs": 15},
    "cosine 15, not augmented": {
        "schedule": "cosine",
        "patience": None,
        "augment": False,
        "epochs": 15,
    },
    "cosine 20, augmented": {"schedule": "cosine", "patience": None, "augment": True, "epochs": 20},
    "plateau 20, augmented": {
        "schedule": "plateau",
        "patience": None,
        "augment": True,
        "epochs": 20,
    },
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
    for model_name, config in models.items():
        for recipe, changes in recipes.items():
            rows = []
            for seed in range(args.seeds):
                params = dataclasses.replace(train_params, **changes, seed=seed)
                rows.append(run(config, params, data, labels))
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
