"""The `ablate` command: one subcommand per pipeline stage.

`dvc repro` calls these; you can too, e.g. `ablate prepare`, `ablate sweep --experiment
padding`, `ablate submit --upload -m "first try"`. Expected problems (bad input, missing
credentials) print one line and exit with status 2; nothing is half-written.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable

from pipeline.config import Config, load_config
from pipeline.errors import UserError
from pipeline.interrupts import Interrupted, install

EXIT_USER_ERROR = 2
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _add_params(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )


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

    p = sub.add_parser(
        "worker", help="join an existing study and run trials until its budget is spent"
    )
    _add_params(p)
    p.add_argument("--experiment", required=True, help="experiment name, e.g. joint")
    p.add_argument("--storage", help="Optuna storage URL shared by all workers")
    p.add_argument("--tracking-uri", help="MLflow tracking server shared by all workers")
    p.add_argument(
        "--wait",
        type=float,
        default=600.0,
        help="seconds to wait for the study to be created (default: %(default)s)",
    )
    p.add_argument(
        "--max-trials",
        type=int,
        help="exit after this many trials (a process manager restarts the worker; "
        "bounds a long-lived process's memory)",
    )

    p = sub.add_parser("report", help="summarise the studies into reports/ablation.md")
    _add_params(p)

    p = sub.add_parser("submit", help="predict the test set and write submissions/submission.csv")
    _add_params(p)
    p.add_argument("--upload", action="store_true", help="also upload to Kaggle (opt-in)")
    p.add_argument("-m", "--message", help="submission description for --upload")
    return parser


def configure_logging(verbose: bool) -> None:
    """The project's own lines at INFO; the libraries' only when something is wrong."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    for noisy in (
        "tensorflow",
        "absl",
        "alembic",
        "mlflow",
        "urllib3",
        "optuna",
        "h5py",
        "matplotlib",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its own at import
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# TensorFlow's C++ side prints these straight to file descriptor 2 while it loads and
# first looks for a GPU, before any log level applies: on a CPU machine they are noise.
TF_BANNERS = re.compile(
    r"absl::InitializeLog|oneDNN custom operations|cudart_stub|cuInit|cuda_(driver|platform)"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|TF-TRT Warning|computation_placer"
    r"|This TensorFlow binary is optimized|rebuild TensorFlow with the appropriate"
)


def _load_tensorflow_quietly() -> None:
    """Import TensorFlow and look for GPUs once, dropping its start-up banners from the
    process's stderr and passing every other line through."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not TF_BANNERS.search(line):
                    print(line, file=sys.stderr)


# Each command: the stage function it reaches, called with the loaded config and the
# command's own options. Stage modules are imported when their command runs (TensorFlow
# takes seconds to import; `ablate fetch` never needs it).
def _fetch(config: Config, args: argparse.Namespace) -> None:
    from pipeline import fetch

    fetch.main(config)


def _prepare(config: Config, args: argparse.Namespace) -> None:
    from pipeline import prepare

    prepare.main(config)


def _train(config: Config, args: argparse.Namespace) -> None:
    _load_tensorflow_quietly()
    from pipeline import train

    train.main(config)


def _sweep(config: Config, args: argparse.Namespace) -> None:
    _load_tensorflow_quietly()
    from pipeline import sweep

    sweep.main(config, args.experiment)


def _worker(config: Config, args: argparse.Namespace) -> None:
    _load_tensorflow_quietly()
    from pipeline import workers

    workers.main(config, args.experiment, wait=args.wait, max_trials=args.max_trials)


def _report(config: Config, args: argparse.Namespace) -> None:
    _load_tensorflow_quietly()
    from pipeline import report

    report.main(config)


def _submit(config: Config, args: argparse.Namespace) -> None:
    _load_tensorflow_quietly()
    from pipeline import submit

    submit.main(config, upload=args.upload, message=args.message)


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], None]] = {
    "fetch": _fetch,
    "prepare": _prepare,
    "train": _train,
    "sweep": _sweep,
    "worker": _worker,
    "report": _report,
    "submit": _submit,
}


def load(args: argparse.Namespace) -> Config:
    """The params file with the command line's overrides applied."""
    return load_config(args.params).override(
        storage=getattr(args, "storage", None),
        tracking_uri=getattr(args, "tracking_uri", None),
        n_workers=getattr(args, "n_workers", None),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    install()  # Ctrl-C, SIGTERM and SIGHUP: cleaned up after, then exit 128 + signal
    try:
        COMMANDS[args.command](load(args), args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as exc:
        print(f"interrupted ({exc})", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(
            f"error: {exc.strerror}{where}: free some space and run it again; finished "
            "work is kept (outputs are written whole or not at all)",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
