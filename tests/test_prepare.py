"""The `prepare` stage: both CSV layouts, every rejected input, and real competition zips."""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.dataset import load_prepared
from pipeline.params import PrepareParams
from pipeline.prepare import prepare

RAW = Path("data/raw/digit-recognizer")
PREPARED = Path("data/prepared")
METRICS = Path("metrics/data.json")
MNIST10K_ZIP = (
    Path(__file__).parents[1]
    / ".."
    / "shared"
    / "data"
    / "digit-recognizer-mnist10k"
    / "digit-recognizer.zip"
).resolve()


@pytest.fixture
def workdir(tmp_path, monkeypatch, write_params):
    """`tmp_path` as the working directory, with a `params.yaml` using the default paths."""
    monkeypatch.chdir(tmp_path)
    # The CLI sets this with os.environ.setdefault; let monkeypatch undo it afterwards.
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    write_params(tmp_path / "params.yaml", data={"source": "embedded"})
    return tmp_path


def _ablate(*args: str) -> int:
    return main([*args, "--params", "params.yaml"])


def _sorted_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(label, pixels...) rows in a canonical order, to compare data sets as multisets."""
    rows = np.column_stack([y, x.reshape(len(x), -1)])
    return rows[np.lexsort(rows.T[::-1])]


# --- (a) both layouts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "side", "n_classes", "per_class"),
    [("digit-recognizer", 4, 3, 10), ("kannada", 8, 10, 5)],
)
def test_prepare_builds_images_split_and_meta(
    make_competition, tmp_path, layout, side, n_classes, per_class
):
    comp = make_competition(
        tmp_path / "raw", layout, side=side, n_classes=n_classes, per_class=per_class, n_test=7
    )
    data, metrics = prepare(comp.folder, "some-comp", PrepareParams(val_fraction=0.2))

    n = n_classes * per_class
    n_val = math.ceil(0.2 * n)
    for x, rows in ((data.x_train, n - n_val), (data.x_val, n_val), (data.x_test, 7)):
        assert x.shape == (rows, side, side, 1)
        assert x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
    for y in (data.y_train, data.y_val):
        assert np.issubdtype(y.dtype, np.integer)
    # Stratified: classes are balanced in the input, so they stay balanced on both sides.
    assert np.bincount(data.y_val, minlength=n_classes).tolist() == [n_val // n_classes] * n_classes
    assert np.bincount(data.y_train, minlength=n_classes).tolist() == (
        [per_class - n_val // n_classes] * n_classes
    )

    # No row lost, duplicated, or separated from its label; pixels scaled by 1/255.
    pixels = comp.train.filter(like="pixel").to_numpy() / 255.0
    expected = _sorted_rows(pixels.astype(np.float32), comp.train["label"].to_numpy())
    got = _sorted_rows(
        np.concatenate([data.x_train, data.x_val]), np.concatenate([data.y_train, data.y_val])
    )
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # Test rows keep the file's order.
    test_pixels = comp.test.filter(like="pixel").to_numpy() / 255.0
    np.testing.assert_allclose(data.x_test.reshape(7, -1), test_pixels, rtol=0, atol=1e-6)

    meta = data.meta
    assert (meta.competition, meta.n_classes, meta.image_shape) == (
        "some-comp",
        n_classes,
        (side, side, 1),
    )
    if layout == "digit-recognizer":
        assert (meta.id_column, meta.label_column, meta.explicit_ids) == ("ImageId", "Label", False)
        assert data.test_ids.tolist() == list(range(1, 8))
    else:
        assert (meta.id_column, meta.label_column, meta.explicit_ids) == ("id", "label", True)
        assert data.test_ids.tolist() == list(range(7))

    assert metrics == {
        "rows": {"train": n - n_val, "val": n_val, "holdout": 0, "test": 7},
        "class_counts": {str(c): per_class for c in range(n_classes)},
        "image_side": side,
        "n_classes": n_classes,
    }


def test_a_holdout_split_is_stratified_disjoint_and_saved(make_competition, tmp_path):
    from pipeline.dataset import labelled_for_refit, save_prepared

    comp = make_competition(tmp_path / "raw", n_classes=3, per_class=20)
    params = PrepareParams(val_fraction=0.2, holdout_fraction=0.1)
    data, metrics = prepare(comp.folder, "c", params)

    assert metrics["rows"] == {"train": 42, "val": 12, "holdout": 6, "test": 6}
    assert np.bincount(data.y_holdout).tolist() == [2, 2, 2]
    everything = _sorted_rows(
        np.concatenate([data.x_train, data.x_val, data.x_holdout]).reshape(60, -1),
        np.concatenate([data.y_train, data.y_val, data.y_holdout]),
    )
    pixels = comp.train.filter(like="pixel").to_numpy(np.float32) / 255.0
    np.testing.assert_allclose(
        everything, _sorted_rows(pixels, comp.train["label"].to_numpy()), atol=1e-6
    )
    without, _ = prepare(comp.folder, "c", PrepareParams(val_fraction=0.2))
    assert data.meta.data_hash != without.meta.data_hash

    save_prepared(data, tmp_path / "prepared")
    loaded = load_prepared(tmp_path / "prepared")
    np.testing.assert_array_equal(loaded.y_holdout, data.y_holdout)
    refit = labelled_for_refit(loaded)
    assert (len(refit.y_train), len(refit.y_val)) == (54, 0)


def test_explicit_test_ids_are_kept_as_written(make_competition, tmp_path):
    ids = [907, 13, 500, 2, 77]
    comp = make_competition(tmp_path / "raw", "kannada", n_test=5, test_ids=ids)
    # The sample submission may list the same ids in another order.
    comp.sample.iloc[::-1].to_csv(comp.sample_path, index=False)
    data, _ = prepare(comp.folder, "k", PrepareParams())
    assert data.test_ids.tolist() == ids


def test_split_is_reproducible_and_follows_the_seed(make_competition, tmp_path):
    comp = make_competition(tmp_path / "raw", per_class=20)
    first, _ = prepare(comp.folder, "c", PrepareParams(seed=1))
    again, _ = prepare(comp.folder, "c", PrepareParams(seed=1))
    other, _ = prepare(comp.folder, "c", PrepareParams(seed=2))
    np.testing.assert_array_equal(first.y_val, again.y_val)
    assert first.meta.data_hash == again.meta.data_hash
    assert first.meta.data_hash != other.meta.data_hash


@pytest.mark.parametrize("layout", ["digit-recognizer", "kannada"])
def test_cli_prepare_writes_outputs_that_load_back(workdir, make_competition, layout):
    comp = make_competition(workdir / RAW, layout)
    assert _ablate("prepare") == 0

    params = load_config(Path("params.yaml")).prepare
    expected, metrics = prepare(comp.folder, "digit-recognizer", params)
    loaded = load_prepared(PREPARED)
    for name in ("x_train", "y_train", "x_val", "y_val", "x_holdout", "y_holdout", "x_test"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(expected, name))
    np.testing.assert_array_equal(loaded.test_ids, expected.test_ids)
    assert loaded.meta == expected.meta
    assert json.loads(METRICS.read_text()) == metrics
    assert sorted(p.name for p in PREPARED.iterdir()) == [
        "holdout.npz",
        "meta.json",
        "test.npz",
        "train.npz",
        "val.npz",
    ]


def test_outputs_follow_the_users_umask(workdir, make_competition):
    make_competition(workdir / RAW, "digit-recognizer")
    old = os.umask(0o027)
    try:
        assert _ablate("prepare") == 0
    finally:
        os.umask(old)
    assert PREPARED.stat().st_mode & 0o777 == 0o750
    assert {p.stat().st_mode & 0o777 for p in PREPARED.iterdir()} == {0o640}
    assert METRICS.stat().st_mode & 0o777 == 0o640


def test_embedded_digits_prepare(embedded_raw):
    data, metrics = prepare(embedded_raw, "digit-recognizer", PrepareParams())
    assert data.meta.image_shape == (8, 8, 1)
    assert data.meta.n_classes == 10
    assert sum(metrics["rows"].values()) == 1797
    assert data.test_ids.tolist() == list(range(1, metrics["rows"]["test"] + 1))


# --- (b) bad input ----------------------------------------------------------------------
# Each case breaks one file of a good competition. Cells are addressed by file line
# (line 1 is the header), the way the error message reports them.


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _save(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def set_column(path: Path, column: str, value: str) -> None:
    lines = _lines(path)
    col = lines[0].split(",").index(column)
    for i in range(1, len(lines)):
        cells = lines[i].split(",")
        cells[col] = value
        lines[i] = ",".join(cells)
    _save(path, lines)


def set_cell(path: Path, line: int, column: str, value: str) -> None:
    lines = _lines(path)
    col = lines[0].split(",").index(column)
    cells = lines[line - 1].split(",")
    cells[col] = value
    lines[line - 1] = ",".join(cells)
    _save(path, lines)


def drop_column(path: Path, column: str) -> None:
    rows = [line.split(",") for line in _lines(path)]
    col = rows[0].index(column)
    _save(path, [",".join(r[:col] + r[col + 1 :]) for r in rows])


def add_column(path: Path, name: str, value: str = "0") -> None:
    lines = _lines(path)
    _save(path, [f"{lines[0]},{name}"] + [f"{line},{value}" for line in lines[1:]])


def rename_column(path: Path, old: str, new: str) -> None:
    lines = _lines(path)
    lines[0] = ",".join(new if c == old else c for c in lines[0].split(","))
    _save(path, lines)


def edit_lines(path: Path, change: Callable[[list[str]], list[str]]) -> None:
    _save(path, change(_lines(path)))


def number_from_zero(lines: list[str]) -> list[str]:
    """Sample submission rows numbered 0..N-1 where digit-recognizer's test implies 1..N."""
    return [lines[0]] + [f"{i},0" for i in range(len(lines) - 1)]


def keep_classes(path: Path, rows_per_class: dict[int, int]) -> None:
    """Keep only the first `n` train rows of each class."""
    lines = _lines(path)
    kept, seen = [lines[0]], dict.fromkeys(rows_per_class, 0)
    for line in lines[1:]:
        label = int(line.split(",")[0])
        if seen.get(label, 0) < rows_per_class.get(label, 0):
            seen[label] += 1
            kept.append(line)
    _save(path, kept)


@dataclass(frozen=True)
class Bad:
    """A broken input: `breaks(folder)` damages a good competition; the message must
    contain every string in `expect`."""

    name: str
    breaks: Callable[[Path], None]
    expect: tuple[str, ...]
    layout: str = "digit-recognizer"
    prepare: dict = field(default_factory=dict)


def _p(folder: Path, name: str = "train") -> Path:
    return folder / ("sample_submission.csv" if name == "sample" else f"{name}.csv")


BAD_INPUTS = [
    Bad("missing-train", lambda f: _p(f).unlink(), ("train.csv", "not found")),
    Bad(
        "missing-sample", lambda f: _p(f, "sample").unlink(), ("sample_submission.csv", "not found")
    ),
    Bad("empty-test", lambda f: _p(f, "test").write_text(""), ("test.csv", "empty")),
    Bad(
        "header-only-train",
        lambda f: edit_lines(_p(f), lambda ls: ls[:1]),
        ("train.csv", "no rows"),
    ),
    Bad(
        "train-without-header",
        lambda f: edit_lines(_p(f), lambda ls: ls[1:]),
        ("train.csv", "header"),
    ),
    Bad(
        "test-without-header",
        lambda f: edit_lines(_p(f, "test"), lambda ls: ls[1:]),
        ("test.csv", "header"),
    ),
    Bad(
        "sample-without-header",
        lambda f: edit_lines(_p(f, "sample"), lambda ls: ls[1:]),
        ("sample_submission.csv", "header"),
    ),
    Bad(
        "unexpected-column",
        lambda f: add_column(_p(f, "test"), "extra"),
        ("test.csv", "header", "'extra'"),
    ),
    Bad("misnamed-pixel", lambda f: rename_column(_p(f), "pixel3", "pix3"), ("train.csv", "pixel")),
    Bad(
        "pixels-out-of-order",
        lambda f: rename_column(_p(f), "pixel0", "pixel99"),
        ("train.csv", "pixel"),
    ),
    Bad(
        "non-numeric-pixel",
        lambda f: set_cell(_p(f), 5, "pixel2", "abc"),
        ("train.csv", "line 5", "column pixel2", "'abc'"),
    ),
    Bad(
        "pixel-above-255",
        lambda f: set_cell(_p(f, "test"), 3, "pixel7", "256"),
        ("test.csv", "line 3", "column pixel7", "0..255"),
    ),
    Bad(
        "negative-pixel",
        lambda f: set_cell(_p(f), 9, "pixel0", "-1"),
        ("train.csv", "line 9", "column pixel0", "0..255"),
    ),
    Bad(
        "empty-cell",
        lambda f: set_cell(_p(f), 4, "pixel15", ""),
        ("train.csv", "line 4", "column pixel15", "missing"),
    ),
    Bad(
        "not-a-square",
        lambda f: [drop_column(_p(f, n), "pixel15") for n in ("train", "test")],
        ("train.csv", "15", "square"),
    ),
    Bad(
        "train-test-sizes-differ",
        lambda f: drop_column(_p(f, "test"), "pixel15"),
        ("test.csv", "15", "16"),
    ),
    Bad(
        "image-size-disagrees",
        lambda f: None,
        ("train.csv", "image_size"),
        prepare={"image_size": 3},
    ),
    Bad("label-missing-from-train", lambda f: drop_column(_p(f), "label"), ("train.csv", "label")),
    Bad("label-in-test", lambda f: add_column(_p(f, "test"), "Label", "3"), ("test.csv", "label")),
    Bad(
        "one-class-only",
        lambda f: set_column(_p(f), "label", "3"),
        ("train.csv", "column label", "classes [0, 1, 2] have no row"),
    ),
    Bad(
        "bad-label",
        lambda f: set_cell(_p(f), 6, "label", "1.5"),
        ("train.csv", "line 6", "column label: 1.5 "),
    ),
    Bad(
        "duplicate-test-id",
        lambda f: set_cell(_p(f, "test"), 5, "id", "1"),
        ("test.csv", "line 5", "column id", "duplicate id 1;"),
        layout="kannada",
    ),
    Bad(
        "duplicate-sample-id",
        lambda f: set_cell(_p(f, "sample"), 4, "ImageId", "2"),
        ("sample_submission.csv", "line 4", "column ImageId", "duplicate id 2;"),
    ),
    Bad(
        "test-row-missing",
        lambda f: edit_lines(_p(f, "test"), lambda ls: ls[:-1]),
        ("test.csv", "sample_submission.csv", "5 rows", "6"),
    ),
    Bad(
        "sample-id-not-in-test",
        lambda f: set_cell(_p(f, "sample"), 2, "id", "99"),
        ("sample_submission.csv: id 99 has no row", "test.csv"),
        layout="kannada",
    ),
    Bad(
        "ids-start-at-zero",
        lambda f: edit_lines(_p(f, "sample"), number_from_zero),
        ("sample_submission.csv: id 0 has no row", "test.csv"),
    ),
    Bad(
        "sample-three-columns",
        lambda f: add_column(_p(f, "sample"), "Extra"),
        ("sample_submission.csv", "two columns"),
    ),
    Bad(
        "ragged-row",
        lambda f: edit_lines(_p(f), lambda ls: ls[:4] + [ls[4] + ",7"] + ls[5:]),
        ("train.csv", "malformed", "line 5"),
    ),
    Bad(
        "short-row",
        lambda f: edit_lines(_p(f), lambda ls: ls[:6] + ["1,2,3"] + ls[7:]),
        ("train.csv", "line 7", "column pixel2"),
    ),
    Bad(
        "binary-file",
        lambda f: _p(f, "test").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe"),
        ("test.csv", "not a text CSV"),
    ),
    Bad(
        "single-row-class",
        lambda f: keep_classes(_p(f), {0: 10, 1: 10, 2: 1}),
        ("train.csv", "class 2"),
    ),
    Bad(
        "too-few-rows-to-split",
        lambda f: keep_classes(_p(f), {0: 2, 1: 2, 2: 2}),
        ("train.csv", "3 classes", "_fraction"),
    ),
]


def _break(case: Bad, workdir: Path, write_params, make_competition) -> None:
    make_competition(workdir / RAW, case.layout)
    if case.prepare:
        write_params(workdir / "params.yaml", data={"source": "embedded"}, prepare=case.prepare)
    case.breaks(workdir / RAW)


def _assert_one_line_error(err: str, case: Bad) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in err
    assert "np." not in lines[0], "numpy repr leaked into the message"
    for fragment in case.expect:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c.name)
def test_bad_input_is_rejected(workdir, make_competition, write_params, capsys, case):
    _break(case, workdir, write_params, make_competition)
    capsys.readouterr()

    assert _ablate("prepare") == 2
    _assert_one_line_error(capsys.readouterr().err, case)
    assert not PREPARED.exists()
    assert not METRICS.exists()
    assert not any(p.name.startswith(".prepared") for p in Path("data").iterdir())


def test_stray_labels_are_refused_unless_the_user_keeps_them(
    workdir, embedded_raw, write_params, capsys
):
    """Six rows labelled 10 among the digits 0..9 make an eleventh class of 6 rows against
    about 144 per class: refused by default, naming the class; kept on request."""
    for line in range(2, 8):
        set_cell(_p(embedded_raw), line, "label", "10")
    capsys.readouterr()

    assert _ablate("prepare") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    for fragment in ("train.csv", "column label", "class 10 (6 rows)", "prepare.min_class_share"):
        assert fragment in err
    assert not PREPARED.exists()

    write_params(
        workdir / "params.yaml", data={"source": "embedded"}, prepare={"min_class_share": 0}
    )
    assert _ablate("prepare") == 0
    assert json.loads(METRICS.read_text())["n_classes"] == 11


def _snapshot(*roots: Path) -> dict[str, bytes]:
    files = [p for root in roots for p in ([root] if root.is_file() else root.rglob("*"))]
    return {str(p): p.read_bytes() for p in files if p.is_file()}


@pytest.mark.parametrize(
    "case",
    [
        c
        for c in BAD_INPUTS
        if c.name in {"missing-train", "non-numeric-pixel", "duplicate-test-id", "test-row-missing"}
    ],
    ids=lambda c: c.name,
)
def test_bad_input_leaves_previous_output_untouched(
    workdir, make_competition, write_params, capsys, case
):
    make_competition(workdir / RAW, case.layout, seed=7)
    assert _ablate("prepare") == 0
    before = _snapshot(PREPARED, METRICS)

    _break(case, workdir, write_params, make_competition)
    assert _ablate("prepare") == 2
    assert _snapshot(PREPARED, METRICS) == before
    assert sorted(p.name for p in Path("data").iterdir()) == ["prepared", "raw"]


@pytest.mark.parametrize(
    "case",
    [c for c in BAD_INPUTS if c.name in {"missing-train", "non-numeric-pixel"}],
    ids=lambda c: c.name,
)
def test_bad_input_exit_code_from_the_real_command(
    workdir, make_competition, write_params, run_cmd, case
):
    _break(case, workdir, write_params, make_competition)
    result = run_cmd(["ablate", "prepare", "--params", "params.yaml"], cwd=workdir)
    assert result.returncode == 2, result.stderr
    _assert_one_line_error(result.stderr, case)
    assert not PREPARED.exists()
    assert not METRICS.exists()


# --- (c, d) competition zips through fetch + prepare ------------------------------------


@pytest.mark.skipif(not MNIST10K_ZIP.is_file(), reason=f"{MNIST10K_ZIP} not present")
def test_mnist10k_zip_fetch_and_prepare(workdir, write_params):
    write_params(workdir / "params.yaml", data={"source": "zip", "zip": str(MNIST10K_ZIP)})
    assert _ablate("fetch") == 0
    assert _ablate("prepare") == 0

    data = load_prepared(PREPARED)
    held = load_config(Path("params.yaml")).prepare.holdout_fraction
    assert len(data.y_train) + len(data.y_val) + len(data.y_holdout) == 8000
    assert (len(data.y_val), len(data.y_holdout)) == (1600, math.ceil(8000 * held))
    assert data.x_train.shape[1:] == data.x_test.shape[1:] == (28, 28, 1)
    assert data.x_test.shape[0] == 2000
    assert data.test_ids.tolist() == list(range(1, 2001))
    assert data.meta.n_classes == 10
    assert (data.meta.id_column, data.meta.label_column) == ("ImageId", "Label")
    rows = json.loads(METRICS.read_text())["rows"]
    assert rows == {
        "train": 6400 - len(data.y_holdout),
        "val": 1600,
        "holdout": len(data.y_holdout),
        "test": 2000,
    }


def test_kannada_style_zip_fetch_and_prepare(workdir, write_params, make_competition):
    comp = make_competition(
        workdir / "build" / "Kannada-MNIST", "kannada", side=8, n_classes=10, per_class=10, n_test=5
    )
    # Like the real download: an extra file prepare must ignore, inside one top folder.
    (comp.folder / "Dig-MNIST.csv").write_text(comp.train_path.read_text())
    archive = workdir / "Kannada-MNIST.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in comp.folder.iterdir():
            zf.write(path, f"Kannada-MNIST/{path.name}")
    write_params(
        workdir / "params.yaml",
        data={"source": "zip", "zip": str(archive), "competition": "Kannada-MNIST"},
    )

    assert _ablate("fetch") == 0
    assert _ablate("prepare") == 0

    data = load_prepared(PREPARED)
    assert data.meta.competition == "Kannada-MNIST"
    assert (data.meta.id_column, data.meta.label_column, data.meta.explicit_ids) == (
        "id",
        "label",
        True,
    )
    assert data.meta.image_shape == (8, 8, 1)
    assert len(data.y_train) + len(data.y_val) + len(data.y_holdout) == 100
    assert data.test_ids.tolist() == [0, 1, 2, 3, 4]
