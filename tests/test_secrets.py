"""Credentials never land in files or output: a password in a params.yaml URL is refused
(DVC would copy it into dvc.lock) with one line that names where it goes instead and
does not print it; a tracking URI nobody can serve is one line too; a sweep logs into an
MLflow server with basic authentication through the environment, as the README says."""

from __future__ import annotations

import secrets

import pytest
from support import Project, running_mlflow_server

from pipeline.storage_urls import with_redis_password

SECRET = "hunter2"


@pytest.mark.parametrize(
    "section, key, url, source",
    [
        (
            "tracking",
            "uri",
            f"http://bob:{SECRET}@mlflow.example:5000/",
            "MLFLOW_TRACKING_PASSWORD",
        ),
        ("sweep", "storage", f"postgresql://bob:{SECRET}@db.example/optuna", "PGPASSWORD"),
        ("sweep", "storage", f"redis://:{SECRET}@cache.example:6379/0", "REDIS_PASSWORD"),
    ],
    ids=["mlflow", "postgresql", "redis"],
)
def test_a_password_in_a_url_is_refused_and_never_printed(
    tmp_path, run_cmd, write_params, section, key, url, source
):
    write_params(tmp_path / "params.yaml", **{section: {key: url}})

    result = run_cmd(["ablate", "train"], cwd=tmp_path)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"params.yaml: {section}" in lines[0] and source in lines[0]
    assert SECRET not in result.stdout + result.stderr
    assert not (tmp_path / "dvc.lock").exists()


def test_a_tracking_uri_with_an_unknown_scheme_is_one_line(tmp_path, run_cmd, write_params):
    write_params(tmp_path / "params.yaml", tracking={"uri": "htp:/oops"})

    result = run_cmd(["ablate", "train"], cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: tracking: htp:/oops: unknown scheme 'htp'; use e.g. "
        "sqlite:///mlflow.db, http://host:5000 or a folder"
    ]


def test_the_redis_password_comes_from_the_environment(monkeypatch):
    url = "redis://127.0.0.1:6379/3"
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    assert with_redis_password(url) == url
    monkeypatch.setenv("REDIS_PASSWORD", "p@ss:word")
    assert with_redis_password(url) == "redis://:p%40ss%3Aword@127.0.0.1:6379/3"
    assert with_redis_password("redis://:own@127.0.0.1:6379/3") == "redis://:own@127.0.0.1:6379/3"


def test_a_sweep_logs_into_an_mlflow_server_with_basic_auth(tmp_path, prepared_digits, monkeypatch):
    """`mlflow server --app-name basic-auth`, no access without a login: without
    credentials the sweep stops at once with one line saying which variables to set; with
    MLFLOW_TRACKING_USERNAME/PASSWORD it and its two workers log every trial, and the
    password appears in no output, param or tag."""
    admin_password, password = (f"{who}-{secrets.token_hex(8)}" for who in ("admin", "user"))
    (tmp_path / "server").mkdir()
    backend = f"sqlite:///{tmp_path / 'server' / 'mlflow.db'}"
    with running_mlflow_server(tmp_path / "server", backend, admin_password) as url:
        from mlflow.server.auth.client import AuthServiceClient

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
        AuthServiceClient(url).create_user("kaggler", password)
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")

        project = Project(tmp_path / "project", prepared_digits, tracking_uri=url)
        project.add_experiment("padding")
        project.configure(sweep={"n_trials": 2, "n_workers": 2}, train={"epochs": 1})
        args = ("sweep", "--experiment", "padding")
        refused = project.start(*args, name="no-login")
        assert project.wait(refused) == [2]
        said = (project.root / "no-login.log").read_text().strip().splitlines()
        assert len(said) == 1 and said[0].startswith("error: tracking.uri"), said
        assert "MLFLOW_TRACKING_USERNAME" in said[0]

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "kaggler")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        try:
            sweep = project.start(*args, name="sweep")
            assert project.wait(sweep, timeout=600) == [0], project.logs()
        finally:
            project.stop_all()

        study = project.study()
        assert project.parent(study).info.status == "FINISHED"
        children = project.children(study)
        assert sorted(children) == [0, 1]
        assert {r.info.status for r in children.values()} == {"FINISHED"}
        assert project.client.search_model_versions("name LIKE '%-padding'")
        for run in project.runs():
            recorded = [*run.data.params.values(), *run.data.tags.values()]
            assert not any(password in str(v) for v in recorded), run.info.run_name
    assert password not in project.logs() and admin_password not in project.logs()
