"""Refits of the base configuration at several lengths: what `submit.refit_epoch_scale`
buys.

A refit trains a chosen configuration on every labelled image but the held-out ones, with
no validation split to stop on. Here the base model (`params.yaml`'s `model` and `train`)
is refit so for each `--epochs` count and `--seeds` seeds, one after another in this
process, and every model is scored on the held-out images (which decide the defaults) and,
where the data has a known solution (MNIST-10k's `solution.csv`), on the test set: plainly
and with test-time augmentation (`submit.tta_rotation`), then the seeds' mean softmax
output (an ensemble of that many refits, with TTA).

Run:   python bench/refits.py --epochs 15 30 45      # shared MNIST-10k, 3 seeds
Smoke: python bench/refits.py --data embedded --epochs 2 4 --seeds 2
"""

from __future__ import annotations

import dataclasses
import time

import common
import numpy as np
from recipe import test_labels


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument("--epochs", type=int, nargs="+", default=[15, 30], help="epoch counts")
    parser.add_argument("--seeds", type=int, default=3, help="refits per count (default: 3)")
    return parser.parse_args()


def correct(probabilities: np.ndarray, labels: np.ndarray | None) -> int | None:
    return None if labels is None else int((probabilities.argmax(axis=1) == labels).sum())


def show(count: int | None, total: int) -> str:
    return "-" if count is None else f"{count}/{total}"


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    if args.seeds < 1 or min(args.epochs) < 1:
        raise common.UserError("--seeds and every --epochs must be >= 1")
    raw = common.read_params(common.parse_overrides(args.overrides))
    config, recipe = common.base_config(raw)
    turn = float((raw.get("submit") or {}).get("tta_rotation") or 0)
    data, label = common.load_data(args.data, raw)
    if len(data.y_holdout) == 0:
        raise common.UserError("prepare.holdout_fraction is 0: nothing to score refits on")
    from pipeline.dataset import labelled_for_refit
    from pipeline.ensemble import probabilities
    from pipeline.train import train

    labels, held = test_labels(label), data.y_holdout
    n_test, n_held = len(data.x_test), len(held)
    everything = labelled_for_refit(data)
    lines = [
        f"| epochs | seed | seconds | test, plain | test, TTA {turn:g} | held-out, plain "
        f"| held-out, TTA {turn:g} |",
        "|---" * 7 + "|",
    ]
    for epochs in args.epochs:
        turned_test, turned_held = [], []
        for seed in range(args.seeds):
            params = dataclasses.replace(recipe, epochs=epochs, seed=seed)
            start = time.perf_counter()
            model = train(config, params, everything).model
            seconds = time.perf_counter() - start
            row = []
            for rotation in (0.0, turn):
                test = probabilities([model], data.x_test, data, 512, rotation)
                hold = probabilities([model], data.x_holdout, data, 512, rotation)
                row.append((correct(test, labels), correct(hold, held)))
            turned_test.append(test)
            turned_held.append(hold)
            (test_plain, held_plain), (test_tta, held_tta) = row
            lines.append(
                f"| {epochs} | {seed} | {seconds:.0f} | {show(test_plain, n_test)} | "
                f"{show(test_tta, n_test)} | {show(held_plain, n_held)} | "
                f"{show(held_tta, n_held)} |"
            )
            common.note(lines[-1])
        test = correct(np.mean(turned_test, axis=0), labels)
        hold = correct(np.mean(turned_held, axis=0), held)
        lines.append(
            f"| {epochs} | mean of {args.seeds} | - | - | {show(test, n_test)} | - | "
            f"{show(hold, n_held)} |"
        )
    print(f"refits data={label} seeds={args.seeds} images={len(everything.y_train)}")
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_main(main)
