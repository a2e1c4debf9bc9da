"""`dvc repro sweep@padding` and `dvc exp run` on a copy of the repository, with the offline
embedded digits and a budget of two trials of two epochs."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml


def _dvc(run_cmd, repo, *args: str, stdout_only: bool = False) -> str:
    result = run_cmd(["dvc", *args], cwd=repo, timeout=600)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout if stdout_only else result.stdout + result.stderr


def _md_rows(table: str) -> list[dict[str, str]]:
    """The rows of a Markdown table as dicts keyed by the header cells."""
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header, *body = ([cell.strip() for cell in line.strip("|").split("|")] for line in lines)
    return [dict(zip(header, row, strict=True)) for row in body if not row[0].startswith("-")]


def _git(repo, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


@pytest.mark.slow
def test_dvc_repro_sweep_then_exp_run(repo_copy, run_cmd, write_params):
    write_params(
        repo_copy / "params.yaml",
        data={"source": "embedded"},
        sweep={"n_trials": 2},
        train={"epochs": 2},
    )

    first = _dvc(run_cmd, repo_copy, "repro", "sweep@padding")
    for stage in ("fetch", "prepare", "sweep@padding"):
        assert f"Running stage '{stage}'" in first
    metrics = json.loads((repo_copy / "metrics" / "sweeps" / "padding.json").read_text())
    assert (metrics["n_complete"], metrics["n_pruned"], metrics["n_failed"]) == (2, 0, 0)
    assert (repo_copy / "models" / "sweeps" / "padding" / "best.keras").is_file()
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())
    assert lock["stages"]["sweep@padding"]["params"]["params.yaml"]["sweep"]["n_trials"] == 2

    shown = json.loads(_dvc(run_cmd, repo_copy, "metrics", "show", "--json", stdout_only=True))
    padding = shown[""]["data"]["metrics/sweeps/padding.scores.json"]["data"]
    assert padding["best_value"] == metrics["best_value"]
    assert "metrics/sweeps/padding.json" not in shown[""]["data"]  # the record: strings
    assert "metrics/sweeps/padding.scores.json" in _dvc(run_cmd, repo_copy, "metrics", "show")

    again = _dvc(run_cmd, repo_copy, "repro", "sweep@padding")
    assert "Running stage" not in again
    assert "Stage 'sweep@padding' didn't change, skipping" in again

    # `dvc exp` needs a commit; a bigger budget continues the same study by one trial
    _git(repo_copy, "add", "-A")
    _git(repo_copy, "commit", "-q", "-m", "baseline sweep")
    run = _dvc(run_cmd, repo_copy, "exp", "run", "-S", "sweep.n_trials=3", "sweep@padding")
    assert "Running stage 'sweep@padding'" in run
    assert "Running stage 'prepare'" not in run
    more = json.loads((repo_copy / "metrics" / "sweeps" / "padding.json").read_text())
    assert more["study"] == metrics["study"]
    assert (more["n_trials"], more["n_complete"]) == (3, 3)

    rows = _md_rows(_dvc(run_cmd, repo_copy, "exp", "show", "--no-pager", "--md", stdout_only=True))
    by_name = {row["Experiment"]: row for row in rows}
    assert (by_name["master"]["n_complete"], by_name["master"]["sweep.n_trials"]) == ("2", "2")
    experiment = [row for name, row in by_name.items() if name not in ("workspace", "master")]
    assert [(row["n_complete"], row["sweep.n_trials"]) for row in experiment] == [("3", "3")]
    assert by_name["master"]["experiments/padding.yaml:factors.padding"] == "['valid', 'same']"
