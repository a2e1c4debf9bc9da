"""Credentials never land in files or output: a password in a params.yaml URL is refused
(DVC would copy it into dvc.lock) with one line that names where it goes instead and
does not print it; a tracking URI nobody can serve is one line too."""

from __future__ import annotations

import pytest

from pipeline.storages import _redis_password

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
    assert _redis_password(url) == url
    monkeypatch.setenv("REDIS_PASSWORD", "p@ss:word")
    assert _redis_password(url) == "redis://:p%40ss%3Aword@127.0.0.1:6379/3"
    assert _redis_password("redis://:own@127.0.0.1:6379/3") == "redis://:own@127.0.0.1:6379/3"
