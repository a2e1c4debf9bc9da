"""The whole default pipeline, `dvc repro`, on a temporary copy of this repository: time
per stage and the submission's accuracy against the solution file.

The copy holds the repository's files as git lists them (tracked, plus untracked files
that are not ignored, unless `--tracked-only`; never `dvc.lock` or anything under the
output folders of `params.yaml`'s `paths`), in a fresh git repository. Its `params.yaml`
points `data` at the chosen data (`data.source: zip` and `data.zip` for a zip), then
takes the `-S` overrides. `dvc repro` runs there with this interpreter's tools (`ablate`,
`dvc`) and the copy's `pipeline` package; its output goes to stderr, and each stage's
time is from its "Running stage" line to the next one (the last to the end of the run).
Finally `submissions/submission.csv` is scored against the solution with
`bench/score_submission.py`.

Run:   python bench/end_to_end.py                         # shared MNIST-10k, full budget
Smoke: python bench/end_to_end.py --data embedded -S sweep.n_trials=2 -S train.epochs=2
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import common
import yaml
from score_submission import ScoreError, score

STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument(
        "--solution",
        type=Path,
        help="solution CSV (default: the shared solution.csv for mnist10k, "
        "generated for embedded, solution.csv next to a PATH.zip)",
    )
    parser.add_argument(
        "--tracked-only",
        action="store_true",
        help="copy only files git tracks, as a fresh clone would have",
    )
    return parser.parse_args()


# -- the copy -------------------------------------------------------------------------------------
def _git_files(args: list[str]) -> list[str]:
    try:
        out = subprocess.run(
            ["git", "-C", str(common.REPO), "ls-files", "-z", *args],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise common.UserError(
            f"{common.REPO}: cannot list files with git ({exc}); run this from a git checkout"
        ) from None
    return [name for name in out.stdout.decode().split("\0") if name]


def repo_files(tracked_only: bool, outputs: list[str]) -> list[str]:
    """What to copy: relative paths of existing files, outputs and `dvc.lock` left out."""
    names = set(_git_files([]))
    if not tracked_only:
        untracked = [
            n
            for n in _git_files(["--others", "--exclude-standard"])
            if n != "dvc.lock"
            and not any(n == o or n.startswith(o.rstrip("/") + "/") for o in outputs)
        ]
        if untracked:
            common.note(
                f"copying {len(untracked)} untracked file(s) too (--tracked-only "
                f"leaves them out): {', '.join(sorted(untracked)[:8])}"
                + (", ..." if len(untracked) > 8 else "")
            )
        names.update(untracked)
    return sorted(n for n in names if (common.REPO / n).is_file())


def make_copy(dest: Path, tracked_only: bool) -> None:
    paths = common.read_params().get("paths") or {}
    outputs = [str(v) for k, v in paths.items() if k != "experiments" and v]
    for name in repo_files(tracked_only, outputs):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(common.REPO / name, target)
    subprocess.run(["git", "init", "-q", str(dest)], check=True, capture_output=True)


def data_settings(source: str) -> dict:
    if source == "embedded":
        return {"data.source": "embedded", "data.zip": None}
    zip_path = common.MNIST_ZIP if source == "mnist10k" else Path(source).expanduser()
    if not zip_path.is_file():
        raise common.UserError(f"--data {source}: {zip_path.resolve()} not found")
    return {"data.source": "zip", "data.zip": str(zip_path.resolve())}


def write_params(dest: Path, settings: dict) -> dict:
    path = dest / "params.yaml"
    raw = common.apply_overrides(yaml.safe_load(path.read_text()) or {}, settings)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return raw


def find_solution(args, root: Path) -> Path:
    if args.solution is not None:
        if not args.solution.is_file():
            raise common.UserError(f"--solution {args.solution}: file not found")
        return args.solution
    if args.data == "embedded":
        return common.embedded_solution(root / "embedded-solution.csv")
    if args.data == "mnist10k":
        return common.MNIST_SOLUTION
    sibling = Path(args.data).expanduser().with_name("solution.csv")
    if sibling.is_file():
        return sibling
    raise common.UserError(f"no solution for {args.data}: pass --solution PATH")


# -- dvc repro ------------------------------------------------------------------------------------
def environment(repo: Path, root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")]))
    env.update(
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(root / "dvc-site-cache"),
        PYTHONUNBUFFERED="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


def repro(repo: Path, env: dict[str, str]) -> tuple[list[tuple[str, float]], float]:
    """Run `dvc repro`, echoing it to stderr; ([(stage, seconds)], total seconds)."""
    starts: list[tuple[str, float]] = []
    tail: deque[str] = deque(maxlen=30)
    start = time.monotonic()
    try:
        process = subprocess.Popen(
            ["dvc", "repro"],
            cwd=repo,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
    except FileNotFoundError:
        raise common.UserError(
            f"dvc not found next to {sys.executable}; install the project (make .venv/bin/ablate)"
        ) from None
    assert process.stdout is not None
    for line in process.stdout:
        now = time.monotonic()
        sys.stderr.write(line)
        tail.append(line.rstrip())
        match = STAGE_LINE.search(line)
        if match:
            starts.append((match.group(1), now))
            common.note(f"stage {match.group(1)} started at {now - start:.0f} s")
    code = process.wait()
    end = time.monotonic()
    if code != 0:
        raise common.UserError(
            f"dvc repro failed (exit status {code}); its last lines:\n" + "\n".join(tail)
        )
    stages = [
        (name, (starts[i + 1][1] if i + 1 < len(starts) else end) - t)
        for i, (name, t) in enumerate(starts)
    ]
    return stages, end - start


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    overrides = common.parse_overrides(args.overrides)
    settings = {**data_settings(args.data), **overrides}
    with common.temporary_folder("bench-e2e-", args.keep) as root:
        repo = root / "repo"
        make_copy(repo, args.tracked_only)
        raw = write_params(repo, settings)
        solution = find_solution(args, root)
        shown = " ".join(f"{k}={v}" for k, v in overrides.items())
        common.note(f"dvc repro in {repo} ({args.data}{', ' + shown if shown else ''})")
        stages, total = repro(repo, environment(repo, root))
        submissions = (raw.get("paths") or {}).get("submissions", "submissions")
        try:
            result = score(repo / submissions / "submission.csv", solution)
        except ScoreError as exc:
            raise common.UserError(str(exc)) from None
    label = args.data if args.data in ("embedded", "mnist10k") else Path(args.data).name
    per_stage = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages)
    print(
        f"end_to_end data={label}{' ' + shown if shown else ''}: {result} | total "
        f"{total:.0f} s | {per_stage}"
    )


if __name__ == "__main__":
    common.run_main(main)
