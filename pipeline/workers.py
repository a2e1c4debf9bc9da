"""Who runs a study's trials: this process, fresh processes, or workers anywhere.

`work` claims and runs trials until none is waiting, printing one line per trial. The
sweep runs it itself, in `sweep.n_workers` processes at once, or in a fresh process every
`sweep.trials_per_process` trials; `ablate worker` (`main`) joins a study another machine
created. Worker processes are children of the sweep: they end when it ends.

Run: `ablate worker --experiment joint --storage URL --tracking-uri URL`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from typing import Any

from pipeline import interrupts
from pipeline.config import Config
from pipeline.errors import UserError, redact
from pipeline.processes import PARENT_ENV, end_with_parent, worker_id
from pipeline.studies import Study
from pipeline.tracking import Tracker
from pipeline.trial import Job, Outcome, run_trial, start_trial

log = logging.getLogger(__name__)


def work(
    job: Job, study: Study, tracker: Tracker, parent_id: str, max_trials: int | None = None
) -> int:
    """Claim and run trials until none is waiting; returns how many ran here."""
    started, done, failures = time.monotonic(), 0, 0
    while max_trials is None or done < max_trials:
        interrupts.check()  # a signal some library swallowed still stops the loop
        claimed = None
        interrupts.hold()  # from the claim on, a signal waits for run_trial to clean up
        try:
            study.fail_dead_trials()
            trial = study.claim()
            claimed = trial and start_trial(job, trial, tracker, parent_id)
        finally:
            if not claimed:
                interrupts.release(raise_after=False)
        if not claimed:
            break
        outcome = run_trial(job, claimed, tracker)  # releases the hold
        done += 1
        log.info(progress_line(job, study, trial.number, outcome, started, done))
        failures = failures + 1 if outcome.state == "FAIL" else 0
        if failures >= job.config.sweep.max_consecutive_failures:
            raise UserError(
                f"{job.experiment.name}: {failures} trials in a row failed "
                f"(sweep.max_consecutive_failures); last error: {outcome.reason}"
            )
    return done


def progress_line(
    job: Job, study: Study, number: int, outcome: Outcome, started: float, done_here: int
) -> str:
    """`padding 3/6 | trial 2 padding=same seed=1 | val_accuracy 0.9861 | best 0.9861 | ...`"""
    experiment = job.experiment
    records = study.records()
    finished = sum(r.state in ("COMPLETE", "PRUNED", "FAIL") for r in records)
    best = study.best()
    params = next((r.params for r in records if r.number == number), {})
    elapsed = time.monotonic() - started
    left = elapsed / max(done_here, 1) * max(experiment.n_trials - finished, 0)
    sampled = " ".join(f"{k}={_short(v)}" for k, v in params.items())
    result = (
        f"{experiment.objective} {outcome.value:.4f}"
        if outcome.state == "COMPLETE"
        else f"{outcome.state.lower()}: {outcome.reason[:80]}"
    )
    if "reused_from" in outcome.attrs:
        result += f" (reused from {outcome.attrs['reused_from']})"
    best_text = f"{best.value:.4f}" if best is not None else "-"
    return (
        f"{experiment.name} {finished}/{experiment.n_trials} | trial {number} {sampled} | "
        f"{result} | best {best_text} | {_clock(elapsed)} elapsed, ~{_clock(left)} left"
    )


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -- processes -------------------------------------------------------------------------------
def _command(job: Job, max_trials: int | None) -> list[str]:
    """`ablate worker` for this job, with the config's source file and overrides."""
    config = job.config
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "worker",
        "--params",
        str(config.source),
        "--experiment",
        job.experiment.name,
        "--storage",
        config.sweep.storage,
        "--tracking-uri",
        config.tracking.uri,
        "--wait",
        "0",
    ]
    if max_trials is not None:
        command += ["--max-trials", str(max_trials)]
    return command


@contextlib.contextmanager
def _children(commands: list[list[str]]):
    """Start one process per command; whatever happens here, none outlives this block."""
    procs: list[subprocess.Popen] = []
    env = {**os.environ, PARENT_ENV: str(os.getpid())}
    try:
        procs += [subprocess.Popen(command, env=env) for command in commands]
        yield procs
    finally:
        with interrupts.deferred(raise_after=False):  # give them time to clean up
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def run_in_processes(job: Job, n_workers: int) -> None:
    """`sweep.n_workers`: several worker processes on the same storage at once."""
    with _children([_command(job, job.config.sweep.per_process)] * n_workers) as procs:
        codes = [proc.wait() for proc in procs]
    if any(codes):
        log.warning("worker exit codes: %s", codes)


def run_in_fresh_processes(job: Job, study: Study, per_process: int) -> None:
    """`sweep.isolate` / `sweep.trials_per_process`: one process after another, each for at
    most `per_process` trials, so that no process lives long enough to bloat."""
    while waiting := study.count("WAITING"):
        with _children([_command(job, per_process)]) as (proc,):
            code = proc.wait()
        if code != 0 and study.count("WAITING") >= waiting:  # died before claiming a trial
            raise UserError(
                f"{job.experiment.name}: a trial process exited with status "
                f"{code} before running a trial; see its error above"
            )


def wait_for_running(study: Study, run_waiting, poll: float = 2.0) -> None:
    """Wait until trials claimed by other workers (other machines too) have finished;
    `run_waiting()` runs trials queued meanwhile (the retry of a dead worker's trial),
    which the workers that already left would never claim."""
    while True:
        study.fail_dead_trials()
        running, waiting = study.count("RUNNING"), study.count("WAITING")
        if not running and not waiting:
            return
        if waiting:
            run_waiting()
            continue
        log.info("waiting for %d running trial(s) on other workers", running)
        time.sleep(poll)


def main(
    config: Config, experiment: str, wait: float = 600.0, max_trials: int | None = None
) -> int:
    """`ablate worker`: join an existing study and run trials until its queue is empty."""
    end_with_parent()
    job = Job.load(config, experiment)
    deadline = time.monotonic() + wait
    while True:
        with contextlib.suppress(KeyError):
            study = job.open_study()
            if study.parent_run_id:
                break
        if time.monotonic() >= deadline:
            raise UserError(
                f"study {job.study_name} not found in {redact(config.sweep.storage)}; start "
                f"it with `ablate sweep --experiment {experiment}` (same params.yaml and "
                "data) first"
            )
        time.sleep(2.0)
    # Only now: the sweep has set up the tracking store (on a new SQLite file, two
    # processes creating its tables at once collide).
    tracker = Tracker.connect(config.tracking.uri, config.tracking.experiment)
    ran = work(job, study, tracker, study.parent_run_id, max_trials)
    log.info("worker %s: ran %d trial(s) of study %s", worker_id(), ran, study.name)
    return ran
