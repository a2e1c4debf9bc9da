"""Each submission strategy's score, side by side, on one finished pipeline run.

Takes a workspace where `dvc repro` has run (for example the one `end_to_end.py --keep`
leaves), runs `ablate submit` there once per strategy (`best`, `refit`, `ensemble`) with
`-S submit.strategy=...`, and scores each submission against the solution file. Also
prints each one's held-out estimate and interval from its sidecar, to compare with the
score. The workspace's own submission is restored afterwards.

Run: python bench/strategies.py --repo /tmp/bench-e2e-XXXX/repo
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import common
from score_submission import score

STRATEGIES = ("best", "refit", "ensemble")


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument("--repo", type=Path, required=True, help="a workspace after dvc repro")
    parser.add_argument("--solution", type=Path, default=common.MNIST_SOLUTION)
    parser.add_argument("--members", type=int, default=3, help="ensemble size (default: 3)")
    return parser.parse_args()


def submit(repo: Path, strategy: str, members: int) -> dict:
    """`ablate submit` with this strategy; returns its sidecar and the seconds it took."""
    import yaml

    params = repo / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw.setdefault("submit", {}).update(strategy=strategy, members=members)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    ablate = Path(sys.executable).parent / "ablate"
    env = {**os.environ, "PYTHONPATH": str(repo)}  # the workspace's own pipeline package
    with common.Stopwatch() as clock:
        result = subprocess.run(
            [str(ablate), "submit"], cwd=repo, env=env, capture_output=True, text=True, check=False
        )
    if result.returncode != 0:
        raise common.UserError(f"ablate submit ({strategy}) failed:\n{result.stderr[-2000:]}")
    sidecar = json.loads((repo / "submissions" / "submission.json").read_text())
    return {**sidecar, "seconds": clock.seconds}


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    repo = args.repo
    if not (repo / "dvc.lock").is_file():
        raise common.UserError(f"--repo {repo}: no dvc.lock; run dvc repro there first")
    saved = {n: (repo / n).read_bytes() for n in ("params.yaml",)}
    kept = repo / "submissions.before-strategies"
    shutil.copytree(repo / "submissions", kept, dirs_exist_ok=True)
    rows = []
    try:
        for strategy in STRATEGIES:
            sidecar = submit(repo, strategy, args.members)
            result = score(repo / "submissions" / "submission.csv", args.solution)
            rows.append((strategy, result, sidecar))
            common.note(f"{strategy}: {result.accuracy:.4f} in {sidecar['seconds']:.0f} s")
    finally:
        for name, data in saved.items():
            (repo / name).write_bytes(data)
        shutil.copytree(kept, repo / "submissions", dirs_exist_ok=True)
        shutil.rmtree(kept)
    print("| strategy | members | score | held-out estimate [95% CI] | seconds |")
    print("|---|---|---|---|---|")
    for strategy, result, sidecar in rows:
        low, high = sidecar.get("holdout_ci95") or (float("nan"), float("nan"))
        print(
            f"| {strategy} | {len(sidecar['members'])} | {result.accuracy:.4f} "
            f"({result.correct}/{result.total}) | {sidecar['holdout_accuracy']:.4f} "
            f"[{low:.4f}, {high:.4f}] | {sidecar['seconds']:.0f} |"
        )


if __name__ == "__main__":
    common.run_main(main)
