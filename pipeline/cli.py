"""The `ablate` command: one subcommand per pipeline stage.

`dvc repro` calls these; you can too, e.g. `ablate prepare`, `ablate sweep --experiment
padding`, `ablate submit --upload -m "first try"`. Expected problems (bad input, missing
credentials) print one line and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipeline.errors import UserError

EXIT_USER_ERROR = 2


def _add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml",
                        help="params file (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ablate",
        description="Ablate Keras Conv2D design choices on a Kaggle image competition.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fetch", help="download or unpack the competition data into data/raw/")
    _add_params(p)
    p = sub.add_parser("prepare", help="validate, normalise and split into data/prepared/")
    _add_params(p)
    p = sub.add_parser("train", help="train the base model in params.yaml once, tracked in MLflow")
    _add_params(p)

    p = sub.add_parser("sweep", help="run one ablation study (an experiments/*.yaml file)")
    _add_params(p)
    p.add_argument("--experiment", required=True, help="experiment name, e.g. padding")
    p.add_argument("--storage", help="Optuna storage URL (default: sweep.storage)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.uri)")
    p.add_argument("--n-workers", type=int, help="worker processes (default: sweep.n_workers)")

    p = sub.add_parser("worker",
                       help="join an existing study and run trials until its budget is spent")
    _add_params(p)
    p.add_argument("--experiment", required=True, help="experiment name, e.g. joint")
    p.add_argument("--storage", help="Optuna storage URL shared by all workers")
    p.add_argument("--tracking-uri", help="MLflow tracking server shared by all workers")
    p.add_argument("--wait", type=float, default=600.0,
                   help="seconds to wait for the study to be created (default: %(default)s)")
    p.add_argument("--max-trials", type=int,
                   help="exit after this many trials (a process manager restarts the worker; "
                        "bounds a long-lived process's memory)")

    p = sub.add_parser("report", help="summarise the studies into reports/ablation.md")
    _add_params(p)

    p = sub.add_parser("submit", help="predict the test set and write submissions/submission.csv")
    _add_params(p)
    p.add_argument("--upload", action="store_true", help="also upload to Kaggle (opt-in)")
    p.add_argument("-m", "--message", help="submission description for --upload")
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    for noisy in ("tensorflow", "absl", "alembic", "mlflow", "urllib3", "optuna", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# command -> (module, function); each stage module's `main` takes the params path first.
ENTRY_POINTS = {"worker": ("pipeline.sweep", "worker_main")}


def run(args: argparse.Namespace) -> None:
    module, function = ENTRY_POINTS.get(args.command, (f"pipeline.{args.command}", "main"))
    entry = getattr(importlib.import_module(module), function)
    options = {k: v for k, v in vars(args).items() if k not in {"command", "verbose", "params"}}
    entry(args.params, **options)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
