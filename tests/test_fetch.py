"""Tests for `pipeline/fetch.py`: each source, for real, and each way it fails.

The Kaggle source runs the official client, unmocked, against `tests/fake_kaggle.py`. The
client reads its config dir when imported, so those runs, and every check of exit codes and
messages, go through `python -m pipeline.cli fetch` in a subprocess whose HOME, config dir
and proxy point into `tmp_path`. Pure helpers (`choose_source`, `write_embedded`,
`extract_zip`, `fetch`) are called directly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fake_kaggle import TEST_KEY, TEST_USERNAME, FakeKaggle, make_zip

from pipeline.errors import UserError
from pipeline.fetch import choose_source, extract_zip, fetch, write_embedded
from pipeline.params import DataParams, Paths

COMPETITION = "digit-recognizer"
DIGIT_FILES = {
    "train.csv": "label,pixel0,pixel1,pixel2\n1,0,255,12\n7,3,0,0\n",
    "test.csv": "pixel0,pixel1,pixel2\n0,0,9\n255,1,1\n",
    "sample_submission.csv": "ImageId,Label\n1,0\n2,0\n",
}
EMBEDDED_COLUMNS = [f"pixel{i}" for i in range(64)]


def write_fetch_params(root: Path, **data) -> Path:
    """A minimal params.yaml in `root`: the `data` section given, raw files under data/raw."""
    path = root / "params.yaml"
    content = {"data": {"competition": COMPETITION, **data}, "paths": {"raw": "data/raw"}}
    path.write_text(yaml.safe_dump(content))
    return path


def run_fetch(root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "fetch", "--params", "params.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's single `error:` line; fails on a traceback or any other exit code than 2."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def raw_dir(root: Path) -> Path:
    return root / "data" / "raw"


def assert_nothing_written(root: Path) -> None:
    """No competition folder, and no temporary or download folder left behind either."""
    raw = raw_dir(root)
    assert not raw.exists() or list(raw.iterdir()) == []


@pytest.fixture
def fake():
    with FakeKaggle(make_zip(DIGIT_FILES)) as server:
        yield server


# -- kaggle ----------------------------------------------------------------------------


@pytest.mark.parametrize("credentials", ["env", "file"])
def test_kaggle_downloads_and_unpacks_the_competition_zip(tmp_path, fake, credentials):
    write_fetch_params(tmp_path, source="kaggle")
    result = run_fetch(tmp_path, fake.client_env(tmp_path / "home", credentials=credentials))

    assert result.returncode == 0, result.stderr
    dest = raw_dir(tmp_path) / COMPETITION
    assert {p.name: p.read_text() for p in dest.iterdir()} == DIGIT_FILES
    assert [p.name for p in raw_dir(tmp_path).iterdir()] == [COMPETITION]  # no temp dirs
    (call,) = fake.api_calls("DownloadDataFiles")
    assert call.json["competitionName"] == COMPETITION
    assert call.headers["authorization"].startswith("Basic ")
    assert call.basic_auth == (TEST_USERNAME, TEST_KEY)
    assert [r.path for r in fake.requests if r.method == "GET"] == [f"/files/{COMPETITION}.zip"]


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, ["401", "kaggle.json", "KAGGLE_USERNAME"]),
        (403, ["403", f"https://www.kaggle.com/competitions/{COMPETITION}/rules"]),
        (429, ["429", "daily submission limit", COMPETITION]),
    ],
)
def test_kaggle_http_errors_become_one_line_without_the_key(tmp_path, fake, status, expected):
    fake.status = status
    write_fetch_params(tmp_path, source="kaggle")
    result = run_fetch(tmp_path, fake.client_env(tmp_path / "home", credentials="env"))

    line = error_line(result)
    for text in expected:
        assert text in line
    assert TEST_KEY not in result.stdout + result.stderr
    assert fake.api_calls("DownloadDataFiles")  # it did ask, and was refused
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("status", [None, 401])
def test_kaggle_access_token_is_used_and_a_stale_one_is_a_user_error(tmp_path, fake, status):
    fake.status = status
    write_fetch_params(tmp_path, source="kaggle")
    result = run_fetch(tmp_path, fake.client_env(tmp_path / "home", credentials="token"))

    # The client checks a token online before any download: a 401 comes from there.
    assert fake.api_calls("IntrospectToken")[0].headers["authorization"] == f"Bearer {TEST_KEY}"
    if status is None:
        assert result.returncode == 0, result.stderr
        assert (raw_dir(tmp_path) / COMPETITION / "train.csv").is_file()
    else:
        assert "401" in error_line(result)
        assert TEST_KEY not in result.stdout + result.stderr
        assert_nothing_written(tmp_path)


def test_kaggle_without_credentials_explains_and_stays_offline(tmp_path, fake):
    write_fetch_params(tmp_path, source="kaggle")
    result = run_fetch(tmp_path, fake.client_env(tmp_path / "home", credentials=None))

    line = error_line(result)
    assert "no Kaggle credentials" in line
    assert "kaggle.json" in line and "KAGGLE_USERNAME" in line and "data.source: zip" in line
    assert fake.requests == []
    assert_nothing_written(tmp_path)


def test_a_competition_url_is_rejected_when_params_are_read():
    from pipeline.fields import from_dict

    with pytest.raises(UserError, match="short name"):
        from_dict(
            DataParams,
            {"competition": f"https://www.kaggle.com/competitions/{COMPETITION}"},
            "params.yaml: data",
        )


# -- auto ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "env", "files", "expected", "because"),
    [
        (
            DataParams(zip="d.zip"),
            {"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"},
            [],
            "zip",
            "data.zip is set",
        ),
        (
            DataParams(),
            {"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"},
            [],
            "kaggle",
            "credentials found",
        ),
        (DataParams(), {"KAGGLE_API_TOKEN": "t"}, [], "kaggle", "credentials found"),
        (DataParams(), {}, ["kaggle.json"], "kaggle", "credentials found"),
        (DataParams(), {}, ["credentials.json"], "kaggle", "credentials found"),
        (DataParams(), {"KAGGLE_USERNAME": "u"}, [], "embedded", "no Kaggle credentials"),
        (DataParams(), {}, [], "embedded", "no data.zip and no Kaggle credentials"),
        (DataParams(source="embedded", zip="d.zip"), {}, [], "embedded", "data.source is embedded"),
    ],
)
def test_choose_source(tmp_path, data, env, files, expected, because):
    config = tmp_path / "config"
    config.mkdir()
    for name in files:
        (config / name).write_text("{}")
    env = {"HOME": str(tmp_path / "home"), "KAGGLE_CONFIG_DIR": str(config), **env}

    source, reason = choose_source(data, env)

    assert source == expected
    assert because in reason


def test_auto_without_zip_or_credentials_uses_embedded_and_says_why(tmp_path, fake):
    write_fetch_params(tmp_path, source="auto")
    result = run_fetch(tmp_path, fake.client_env(tmp_path / "home", credentials=None))

    assert result.returncode == 0, result.stderr
    chosen = [line for line in result.stderr.splitlines() if line.startswith("fetch: source")]
    assert chosen == [
        "fetch: source embedded (no data.zip and no Kaggle credentials: using the offline digits)"
    ]
    names = sorted(p.name for p in (raw_dir(tmp_path) / COMPETITION).iterdir())
    assert names == ["sample_submission.csv", "test.csv", "train.csv"]
    assert fake.requests == []


# -- embedded --------------------------------------------------------------------------


def test_embedded_has_the_digit_recognizer_layout(tmp_path):
    write_embedded(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "sample_submission.csv",
        "test.csv",
        "train.csv",
    ]
    train = pd.read_csv(tmp_path / "train.csv")
    test = pd.read_csv(tmp_path / "test.csv")
    sample = pd.read_csv(tmp_path / "sample_submission.csv")
    assert list(train.columns) == ["label", *EMBEDDED_COLUMNS]
    assert list(test.columns) == EMBEDDED_COLUMNS
    assert list(sample.columns) == ["ImageId", "Label"]
    for frame in (train, test):
        pixels = frame[EMBEDDED_COLUMNS]
        assert all(pd.api.types.is_integer_dtype(t) for t in pixels.dtypes)
        assert pixels.min().min() == 0 and pixels.max().max() == 255
    assert pd.api.types.is_integer_dtype(train["label"])
    assert sorted(train["label"].unique()) == list(range(10))
    assert len(train) + len(test) == 1797  # all of scikit-learn's digits, 80/20
    assert len(test) == 1797 // 5
    assert sample["ImageId"].tolist() == list(range(1, len(test) + 1))
    assert pd.api.types.is_integer_dtype(sample["Label"])


# -- zip -------------------------------------------------------------------------------


def _damaged_deflate() -> bytes:
    """A zip whose central directory is fine but whose compressed data is not."""
    name = "train.csv"
    data = bytearray(make_zip({name: "label,pixel0\n" + "1,2\n" * 2000}))
    start = 30 + len(name)  # local file header, no extra field
    for i in range(start + 1, start + 9):
        data[i] ^= 0xFF
    return bytes(data)


@pytest.mark.parametrize(
    "content",
    [
        b"PK\x03\x04 this is not really a zip",
        make_zip(DIGIT_FILES)[:100],
        _damaged_deflate(),
    ],
    ids=["garbage", "truncated", "damaged-deflate"],
)
def test_corrupt_zip_fails_cleanly_and_keeps_the_previous_output(tmp_path, content):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(content)
    dest = tmp_path / "raw" / COMPETITION
    dest.mkdir(parents=True)
    (dest / "train.csv").write_text("good,old\n")

    with pytest.raises(UserError, match="download it again"):
        fetch(DataParams(source="zip", zip=str(bad)), Paths(raw=str(tmp_path / "raw")), env={})

    assert [p.name for p in (tmp_path / "raw").iterdir()] == [COMPETITION]
    assert [p.name for p in dest.iterdir()] == ["train.csv"]
    assert (dest / "train.csv").read_text() == "good,old\n"


def test_a_zip_without_test_csv_keeps_the_previous_output(tmp_path):
    partial = tmp_path / "partial.zip"
    partial.write_bytes(make_zip({k: v for k, v in DIGIT_FILES.items() if k != "test.csv"}))
    dest = tmp_path / "raw" / COMPETITION
    dest.mkdir(parents=True)
    (dest / "train.csv").write_text("good,old\n")

    with pytest.raises(UserError, match=r"gave no test.csv .* is left as it was"):
        fetch(DataParams(source="zip", zip=str(partial)), Paths(raw=str(tmp_path / "raw")), env={})

    assert [p.name for p in dest.iterdir()] == ["train.csv"]
    assert (dest / "train.csv").read_text() == "good,old\n"


def test_corrupt_zip_exits_2(tmp_path, fake):
    (tmp_path / "bad.zip").write_bytes(b"not a zip at all")
    write_fetch_params(tmp_path, source="zip", zip="bad.zip")
    result = run_fetch(tmp_path, fake.client_env(tmp_path / "home", credentials=None))

    assert "bad.zip: not a valid zip file" in error_line(result)
    assert_nothing_written(tmp_path)


def test_missing_zip_exits_2(tmp_path, fake):
    write_fetch_params(tmp_path, source="zip", zip="nowhere/competition.zip")
    result = run_fetch(tmp_path, fake.client_env(tmp_path / "home", credentials=None))

    line = error_line(result)
    assert "nowhere/competition.zip: zip file not found" in line and "data.zip" in line
    assert_nothing_written(tmp_path)


def test_zip_source_without_a_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data.zip is not set"):
        fetch(DataParams(source="zip"), Paths(raw=str(tmp_path / "raw")), env={})
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "members",
    [
        {f"{COMPETITION}/{name}": text for name, text in DIGIT_FILES.items()},
        {
            **{f"{COMPETITION}/{name}": text for name, text in DIGIT_FILES.items()},
            f"__MACOSX/{COMPETITION}/._train.csv": "resource fork",
        },
    ],
    ids=["one-folder", "one-folder-and-macosx"],
)
def test_zip_with_one_top_level_folder_is_flattened(tmp_path, members):
    archive = tmp_path / "download.zip"
    archive.write_bytes(make_zip(members))

    dest = fetch(DataParams(source="zip", zip=str(archive)), Paths(raw=str(tmp_path / "raw")), {})

    assert dest == tmp_path / "raw" / COMPETITION
    for name, text in DIGIT_FILES.items():
        assert (dest / name).read_text() == text
    assert not (dest / COMPETITION).exists()


def test_nested_zips_are_unpacked_once_and_keep_their_folders(tmp_path):
    archive = tmp_path / "download.zip"
    archive.write_bytes(
        make_zip(
            {
                "train.csv.zip": make_zip({"train.csv": DIGIT_FILES["train.csv"]}),
                "images.zip": make_zip({"images/1.png": b"png", "images/2.png": b"png"}),
                "test.csv": DIGIT_FILES["test.csv"],
            }
        )
    )
    dest = tmp_path / "out"
    dest.mkdir()

    extract_zip(archive, dest)

    assert sorted(p.name for p in dest.iterdir()) == ["images", "test.csv", "train.csv"]
    assert (dest / "train.csv").read_text() == DIGIT_FILES["train.csv"]
    assert sorted(p.name for p in (dest / "images").iterdir()) == ["1.png", "2.png"]


def test_zip_with_an_escaping_member_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(make_zip({"../escape.csv": "x\n"}))
    dest = tmp_path / "out" / "deep"
    dest.mkdir(parents=True)

    with pytest.raises(UserError, match="unsafe member path"):
        extract_zip(archive, dest)
    assert not (tmp_path / "out" / "escape.csv").exists()


# -- params ----------------------------------------------------------------------------


def test_unknown_source_names_the_key_and_the_choices(tmp_path, fake):
    write_fetch_params(tmp_path, source="s3")
    result = run_fetch(tmp_path, fake.client_env(tmp_path / "home", credentials=None))

    line = error_line(result)
    assert "data.source" in line and "'s3'" in line
    assert "auto, kaggle, zip, embedded" in line
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name", [".", "..", "../x", "a b", ""])
def test_a_competition_name_is_a_plain_name(name):
    from pipeline.fields import from_dict

    with pytest.raises(UserError, match="letters, digits and hyphens"):
        from_dict(DataParams, {"competition": name}, "params.yaml: data")
