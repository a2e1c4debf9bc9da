"""Each submission strategy's score, side by side, on one finished pipeline run.

Takes a workspace where `dvc repro` has run (for example the one `end_to_end.py --keep`
leaves) and builds, with `pipeline.ensemble` itself, every model a submission can average:
the best checkpoint (`best`), the top `max(--members)` configurations refit on all
labelled data (seeds 0, 1, ...), and each of those configurations' trial checkpoints (one
per seed, from MLflow). Each model predicts the test and held-out images once; then each
variant averages its share of them:

- `best`; `refit` (the top configuration refit); `ensemble of K` (the top K refit);
- `+ trial checkpoints` (`submit.trial_checkpoints`): the same, also averaging the chosen
  configurations' trial checkpoints;
- each of these again `+ TTA` (`submit.tta_rotation`, `--tta` degrees): every model also
  predicts the images turned that many degrees each way, the three predictions averaged.

So every variant is scored against the solution file on the very same models, and only
the refits train (their seconds are printed). The held-out estimate with its 95% Wilson
interval is printed beside each score. Nothing in the workspace changes.

Run: python bench/strategies.py --repo /tmp/bench-e2e-XXXX/repo --members 3 5 --tta 8
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import common
import numpy as np
from score_submission import score


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument("--repo", type=Path, required=True, help="a workspace after dvc repro")
    parser.add_argument("--solution", type=Path, default=common.MNIST_SOLUTION)
    parser.add_argument(
        "--members", type=int, nargs="+", default=[3], help="ensemble sizes (default: 3)"
    )
    parser.add_argument(
        "--tta", type=float, default=8.0, help="test-time rotation in degrees (default: 8)"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    repo = args.repo.resolve()
    if not (repo / "dvc.lock").is_file():
        raise common.UserError(f"--repo {repo}: no dvc.lock; run dvc repro there first")
    with common.working_directory(repo):
        rows = measure(repo, args.solution.resolve(), sorted(set(args.members)), args.tta)
    print("| variant | configurations | models | score | held-out estimate [95% CI] |")
    print("|---|---|---|---|---|")
    for name, configs, models, result, held in rows:
        print(
            f"| {name} | {configs} | {models} | {result.accuracy:.4f} "
            f"({result.correct}/{result.total}) | {held} |"
        )


def measure(repo: Path, solution: Path, sizes: list[int], turn: float) -> list[tuple]:
    from pipeline import ensemble
    from pipeline.config import load_config
    from pipeline.csvfiles import read_csv
    from pipeline.dataset import load_prepared
    from pipeline.submit import make_submission

    config = load_config(repo / "params.yaml")
    config = dataclasses.replace(
        config, submit=dataclasses.replace(config.submit, trial_checkpoints=True)
    )
    data = load_prepared(config.paths.prepared)
    sample = read_csv(config.paths.raw_data(config.data.competition) / "sample_submission.csv")
    batch = config.submit.batch_size

    test_views = ensemble.views(data.x_test, turn)
    held_views = ensemble.views(data.x_holdout, turn) if len(data.y_holdout) else []

    def outputs(models: list) -> list[dict[bool, tuple]]:
        """Per model, its (test, held-out) probabilities without and with TTA."""
        found = []
        for m in models:
            test = [ensemble.probabilities([m], v, data, batch) for v in test_views]
            held = [ensemble.probabilities([m], v, data, batch) for v in held_views]
            found.append(
                {
                    False: (test[0], held[0] if held else None),
                    True: (np.mean(test, axis=0), np.mean(held, axis=0) if held else None),
                }
            )
        return found

    best = outputs(ensemble.best_checkpoint(config).models)
    with common.Stopwatch() as clock:
        members = ensemble.refits(config, data, max(sizes))
    common.note(f"{max(sizes)} refits and their trial checkpoints in {clock.seconds:.0f} s")
    refits = outputs(members.models[: len(members.described)])
    rest, checkpoints = outputs(members.models[len(members.described) :]), []
    for described in members.described:
        n = len(described["trial_checkpoints"])
        checkpoints.append(rest[:n])
        rest = rest[n:]

    def scored(name: str, configs: int, chosen: list, tta: bool) -> tuple:
        name = f"{name} + TTA" if tta else name
        chosen = [model[tta] for model in chosen]
        test = np.mean([t for t, _ in chosen], axis=0)
        submission = make_submission(test.argmax(axis=1), data, sample)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "submission.csv"
            submission.to_csv(path, index=False)
            result = score(path, solution)
        held = "-"
        if len(data.y_holdout):
            correct = int(
                (np.mean([h for _, h in chosen], axis=0).argmax(1) == data.y_holdout).sum()
            )
            low, high = ensemble.wilson(correct, len(data.y_holdout))
            held = f"{correct / len(data.y_holdout):.4f} [{low:.4f}, {high:.4f}]"
        common.note(f"{name}: {result}")
        return name, configs, len(chosen), result, held

    rows = []
    for tta in (False, True):
        rows.append(scored("best", 1, best, tta))
        for k in [1, *sizes]:
            label = "refit" if k == 1 else f"ensemble of {k}"
            rows.append(scored(label, k, refits[:k], tta))
            with_checkpoints = refits[:k] + [c for member in checkpoints[:k] for c in member]
            rows.append(scored(f"{label} + trial checkpoints", k, with_checkpoints, tta))
    return rows


if __name__ == "__main__":
    common.run_main(main)
