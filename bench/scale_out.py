"""How much a second worker speeds up one study (ideal: 2 workers / 1 worker = 0.5).

One grid study (the `padding` experiment, `--repeats` seeds: 8 trials by default) runs
twice as a user runs it, `ablate sweep --n-workers N` in a fresh process: first with one
worker (trials in the sweep process), then with `--workers` worker processes. Each run
gets a fresh PostgreSQL database as its Optuna storage (created on `--postgres`'s server,
dropped afterwards) and its own workspace with a SQLite MLflow store, unless
`--tracking-uri` names a server. Timed: the whole command (imports, every worker's start,
the trials and the best model's registration), and the trials' own span (first start to
last end, from the study), which leaves the fixed costs out.

Run:   python bench/scale_out.py                           # shared MNIST-10k, 1 vs 2 workers
Smoke: python bench/scale_out.py --data embedded --repeats 2 -S train.epochs=2
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import common

EXPERIMENT = "padding"


def parse_args():
    parser = common.make_parser(__doc__)
    parser.add_argument(
        "--repeats",
        type=int,
        default=4,
        help="seeds per padding level: 2 x REPEATS trials (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="worker processes of the second run (default: %(default)s)",
    )
    parser.add_argument(
        "--postgres",
        default="postgresql://postgres@127.0.0.1:5432/test",
        help="an existing database to connect to and create the throwaway "
        "storage databases from (default: %(default)s)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking server for both runs (default: a SQLite store "
        "in each run's workspace)",
    )
    return parser.parse_args()


class Databases:
    """Throwaway PostgreSQL databases on the server of `admin_url`."""

    def __init__(self, admin_url: str):
        import psycopg2

        parts = urlsplit(admin_url)
        self._parts = parts
        try:
            self._admin = psycopg2.connect(
                host=parts.hostname,
                port=parts.port or 5432,
                user=parts.username,
                password=parts.password,
                dbname=parts.path.lstrip("/") or "postgres",
                connect_timeout=5,
            )
        except psycopg2.Error as exc:
            raise common.UserError(f"--postgres {admin_url}: {str(exc).strip()}") from None
        self._admin.autocommit = True  # CREATE DATABASE cannot run in a transaction
        self._created: list[str] = []

    def create(self) -> str:
        """A new empty database; returns its URL (`postgresql://...`, as a user writes it)."""
        name = f"ablate_bench_{uuid.uuid4().hex[:10]}"
        with self._admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return urlunsplit(self._parts._replace(path=f"/{name}"))

    def close(self) -> None:
        with self._admin.cursor() as cursor:
            for name in self._created:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._admin.close()


def run_sweep(
    workspace: common.Workspace, storage: str, tracking_uri: str, n_workers: int
) -> float:
    """`ablate sweep --n-workers N` of this checkout as a fresh process; wall seconds."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(common.REPO), os.environ.get("PYTHONPATH")])
        ),
    }
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "sweep",
        "--params",
        str(workspace.params_path),
        "--experiment",
        EXPERIMENT,
        "--storage",
        storage,
        "--tracking-uri",
        tracking_uri,
        "--n-workers",
        str(n_workers),
    ]
    log = workspace.root / "sweep.log"
    with log.open("w") as out, common.Stopwatch() as clock:
        code = subprocess.run(
            command, cwd=workspace.root, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
        ).returncode
    if code != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise common.UserError(f"ablate sweep --n-workers {n_workers} exited {code}:\n{tail}")
    return clock.seconds


def trials_span(workspace: common.Workspace) -> tuple[float, int]:
    """(seconds from the first trial's start to the last one's end, trials finished)."""
    import json

    metrics = json.loads((workspace.root / "metrics" / "sweeps" / f"{EXPERIMENT}.json").read_text())
    done = metrics["n_complete"] + metrics["n_pruned"] + metrics["n_failed"]
    return metrics["wall_seconds"], done


def main() -> None:
    args = parse_args()
    common.setup_logging(args.verbose)
    if args.repeats < 1 or args.workers < 2:
        raise common.UserError("--repeats must be >= 1 and --workers >= 2")
    raw = common.read_params(common.parse_overrides(args.overrides))
    _, params = common.base_config(raw)
    data, label = common.load_data(args.data, raw)
    n_trials = 2 * args.repeats
    databases = Databases(args.postgres)
    results: dict[int, tuple[float, float]] = {}
    try:
        with common.temporary_folder("bench-scale-out-", args.keep) as root:
            for n_workers in (1, args.workers):
                workspace = common.make_workspace(
                    Path(root) / f"workers-{n_workers}",
                    data,
                    raw,
                    experiments={EXPERIMENT: {"repeats": args.repeats, "n_trials": n_trials}},
                )
                storage = databases.create()
                common.note(f"{n_workers} worker(s): {n_trials} trials, storage {storage}")
                seconds = run_sweep(
                    workspace, storage, args.tracking_uri or workspace.tracking_uri, n_workers
                )
                span, done = trials_span(workspace)
                if done != n_trials:
                    raise common.UserError(
                        f"{n_workers} worker(s): {done} of {n_trials} trials finished"
                    )
                results[n_workers] = (seconds, span)
                common.note(f"{n_workers} worker(s): {seconds:.1f} s in all, trials {span:.1f} s")
    finally:
        databases.close()

    (one, one_span), (many, many_span) = results[1], results[args.workers]
    print(
        f"scale_out data={label} trials={n_trials} epochs={params.epochs} cpus={os.cpu_count()}: "
        f"1 worker {one:.1f} s, {args.workers} workers {many:.1f} s, ratio {many / one:.2f} "
        f"(ideal {1 / args.workers:.2f}); trials alone {one_span:.1f} s vs {many_span:.1f} s, "
        f"ratio {many_span / one_span:.2f}"
    )


if __name__ == "__main__":
    common.run_main(main)
