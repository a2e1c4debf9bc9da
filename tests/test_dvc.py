"""The real `dvc repro` on a copy of the repository, with the offline embedded digits.

Stages after `prepare` may need inputs the copy lacks, so every command targets `prepare`.
"""

from __future__ import annotations

import json

import yaml

from pipeline.dataset import load_prepared


def _dvc(run_cmd, repo, *args: str) -> str:
    result = run_cmd(["dvc", *args], cwd=repo)
    assert result.returncode == 0, f"dvc {' '.join(args)} failed:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


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
    assert metrics["image_shape"] == [8, 8, 1]
    assert sum(metrics["rows"].values()) == 1797
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
