"""The real `dvc repro` on a copy of the repository, with the offline embedded digits.

Stages after `prepare` may need inputs the copy lacks, so the quick tests target
`prepare`; the slow one runs the whole pipeline on one tiny study and checks what DVC
shows of it: metrics files of numbers only, every file written declared, and the
README's `dvc exp show` on one screen.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.dataset import load_prepared

# What a run leaves in the workspace besides the declared outputs: DVC's and git's own
# files, and the stores MLflow and Optuna keep for themselves (params.yaml's tracking.uri
# and sweep.storage, and MLflow's artifact folder beside its SQLite store).
NOT_OUTPUTS = re.compile(
    r"(\.git|\.dvc|mlruns)/|(.*/)?\.gitignore$|dvc\.lock$|mlflow\.db$|optuna\.db"
)

SCREEN = 120  # characters: what the README's `dvc exp show` must fit in


def _dvc(run_cmd, repo, *args: str) -> str:
    result = run_cmd(["dvc", *args], cwd=repo)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def _readme_command(start: str) -> list[str]:
    """The README's command line that starts with `start`, without its comment."""
    from support import REPO_ROOT

    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    (line,) = [line for line in lines if line.startswith(start)]
    return shlex.split(line, comments=True)


def _git(repo: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
    )


def _stages(repo: Path) -> dict:
    """What `dvc.yaml` declares, templated: stage -> its outputs (path -> metrics, plots
    or outs) and its params files (path -> keys; [] is the whole file)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        return {
            stage.name: {
                "outputs": {
                    out.def_path: "metrics" if out.metric else "plots" if out.plot else "outs"
                    for out in stage.outs
                },
                "params": {
                    dep.def_path: list(dep.params)
                    for dep in stage.deps
                    if isinstance(dep, ParamsDependency)
                },
                "deps": [dep.def_path for dep in stage.deps],
            }
            for stage in dvc.index.stages
        }


def _not_numbers(data, where: str = "") -> list[str]:
    """Every leaf of `data` that is not a number (strings, lists, null), as `key: value`."""
    if isinstance(data, dict):
        return [bad for k, v in data.items() for bad in _not_numbers(v, f"{where}{k}.")]
    if isinstance(data, int | float):  # bool is an int
        return []
    return [f"{where.rstrip('.')}: {data!r}"]


def _declared_metrics(repo: Path) -> list[str]:
    stages = _stages(repo).values()
    return [path for s in stages for path, kind in s["outputs"].items() if kind == "metrics"]


def _listed(repo: Path) -> list[str]:
    return yaml.safe_load((repo / "params.yaml").read_text())["experiments"]


def test_dvc_repro_prepare_runs_once_then_is_up_to_date(repo_copy, run_cmd, write_params):
    write_params(repo_copy / "params.yaml", data={"source": "embedded"})

    first = _dvc(run_cmd, repo_copy, "repro", "prepare")
    assert "Running stage 'fetch'" in first
    assert "Running stage 'prepare'" in first

    prepared = repo_copy / "data" / "prepared"
    assert sorted(p.name for p in prepared.iterdir()) == [
        "holdout.npz",
        "meta.json",
        "test.npz",
        "train.npz",
        "val.npz",
    ]
    metrics = json.loads((repo_copy / "metrics" / "data.json").read_text())
    assert metrics["image_side"] == 8
    assert sum(metrics["rows"].values()) == 1797
    assert _not_numbers(metrics) == []
    assert load_prepared(prepared).meta.competition == "digit-recognizer"
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())
    assert {"fetch", "prepare"} <= set(lock["stages"])

    assert "up to date" in _dvc(run_cmd, repo_copy, "status", "prepare")

    again = _dvc(run_cmd, repo_copy, "repro", "prepare")
    assert "Running stage" not in again
    assert "didn't change, skipping" in again


def test_a_new_study_is_one_file_and_one_list_entry(repo_copy, run_cmd, write_params):
    (repo_copy / "experiments" / "kernel.yaml").write_text(
        "# Run: dvc repro sweep@kernel\nfactors:\n  kernel_size: [3, 5]\n"
    )
    write_params(
        repo_copy / "params.yaml",
        experiments=[
            "padding",
            "strides",
            "dilation",
            "pooling",
            "regularization",
            "joint",
            "kernel",
        ],
    )

    stages = _dvc(run_cmd, repo_copy, "stage", "list")
    assert "sweep@kernel" in stages
    # the report and the submission read every study's results: they wait for the new one
    for stage in ("report", "submit"):
        dag = _dvc(run_cmd, repo_copy, "dag", "--dot", stage)
        assert f'"sweep@kernel" -> "{stage}"' in dag


def test_each_study_has_its_whole_experiment_file_as_params(repo_copy, run_cmd):
    stages = _stages(repo_copy)
    for name in _listed(repo_copy):
        sweep = stages[f"sweep@{name}"]
        assert sweep["params"][f"experiments/{name}.yaml"] == [], name  # every key
        assert sweep["deps"].count(f"experiments/{name}.yaml") == 1, name  # as params only

    # so a changed level is a params change, in `dvc params diff` and `dvc exp show`
    _git(repo_copy, "add", "-A")
    _git(repo_copy, "commit", "-q", "-m", "the pipeline")
    padding = repo_copy / "experiments" / "padding.yaml"
    padding.write_text(padding.read_text().replace("repeats: 3", "repeats: 5"))
    diff = json.loads(_dvc(run_cmd, repo_copy, "params", "diff", "--json"))
    assert diff == {"experiments/padding.yaml": {"repeats": {"old": 3, "new": 5, "diff": 2}}}


def test_records_are_outputs_and_their_numbers_metrics(repo_copy):
    """`dvc metrics show` lists the files of numbers; the records beside them (study
    names, run ids, model URIs, member lists) are plain outputs the later stages read."""
    from pipeline.params import Paths

    paths, listed = Paths(), _listed(repo_copy)
    kinds = {path: kind for s in _stages(repo_copy).values() for path, kind in s["outputs"].items()}
    records = [paths.submission_json, paths.report_json, *map(paths.sweep_metrics, listed)]
    numbers = [paths.data_metrics, paths.train_metrics, paths.submission_scores]
    numbers += map(paths.sweep_scores, listed)
    assert {str(p): kinds[str(p)] for p in records} == {str(p): "outs" for p in records}
    assert {str(p): kinds[str(p)] for p in numbers} == {str(p): "metrics" for p in numbers}


@pytest.mark.slow
def test_dvc_shows_numbers_and_every_file_written_is_declared(repo_copy, run_cmd, write_params):
    write_params(
        repo_copy / "params.yaml",
        experiments=["padding"],
        data={"source": "embedded"},
        train={"epochs": 1},
        sweep={"n_trials": 2},
        submit={"strategy": "best"},
    )
    _git(repo_copy, "add", "-A")
    _git(repo_copy, "commit", "-q", "-m", "the pipeline")
    before = {p for p in repo_copy.rglob("*") if p.is_file()}

    _dvc(run_cmd, repo_copy, "repro")

    for path in _declared_metrics(repo_copy):
        data = json.loads((repo_copy / path).read_text())
        assert data and _not_numbers(data) == [], path
    declared = [Path(p) for s in _stages(repo_copy).values() for p in s["outputs"]]
    written = sorted(
        str(p.relative_to(repo_copy))
        for p in repo_copy.rglob("*")
        if p.is_file() and p not in before
    )
    undeclared = [
        p
        for p in written
        if not NOT_OUTPUTS.match(p) and not any(Path(p).is_relative_to(d) for d in declared)
    ]
    assert undeclared == []

    # the README's `dvc exp show`, after an experiment: one screen, what changed
    _git(repo_copy, "add", "-A")
    _git(repo_copy, "commit", "-q", "-m", "a run")
    _dvc(run_cmd, repo_copy, "exp", "run", "-S", "submit.strategy=refit")
    command = _readme_command("dvc exp show")
    result = run_cmd(["env", "COLUMNS=1000", *command, "--no-pager"], cwd=repo_copy)
    assert result.returncode == 0, result.stderr
    assert max(len(line.rstrip()) for line in result.stdout.splitlines()) <= SCREEN, result.stdout
    header = _dvc(run_cmd, repo_copy, *command[1:], "--csv").splitlines()[0].split(",")
    assert "submit.strategy" in header
    # no column named by a path (code, data, each study's numbers) but the levels'
    assert [c for c in header if "/" in c and not c.startswith("experiments/")] == []
