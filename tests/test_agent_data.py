"""Data validation at the agent (issue 9): CSV and NPZ, every problem named, counted, located.

A table of bad inputs (each problem alone, in both formats), a property test that injects random
problems into random data and checks that exactly the clean rows are kept and every bad row is
reported once, the IDX reader under random bytes, and ``fedwarden agent --strict``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedwarden.clients.agent import Agent, AgentError
from fedwarden.data.datasets import feature_range, read_idx
from fedwarden.data.validation import DataError, LocalData, load_csv, load_data, load_npz, validate
from fedwarden.errors import UsageError
from fedwarden.protocol.connection import Connection
from tests.deploy_helpers import run_fedwarden

SHAPE, CLASSES, RANGE = (2, 3), 4, (0.0, 1.0)
FEATURES = 6
EXAMPLES = 1000 if os.environ.get("FEDWARDEN_HEAVY") == "1" else 100
PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def clean(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, *SHAPE)).astype(np.float32), np.arange(n) % CLASSES


def write_csv(path: Path, x: np.ndarray, y: np.ndarray, label_at: int = 0) -> Path:
    names = [f"f{i}" for i in range(FEATURES)]
    names.insert(label_at, "label")
    lines = [",".join(names)]
    for row, label in zip(x.reshape(len(x), -1), y):
        cells = [repr(float(v)) for v in row]
        cells.insert(label_at, str(label))
        lines.append(",".join(cells))
    path.write_text("\n".join(lines) + "\n")
    return path


def check(path: Path):
    return validate(load_data(path), SHAPE, CLASSES, RANGE)


# -- one problem at a time -------------------------------------------------------------------

ROW_PROBLEMS = {
    # name: (how to damage clean (x, y), check, rows)
    "NaN": (lambda x, y: x.__setitem__((3, 0, 1), np.nan), "non_finite", [3]),
    "Inf": (lambda x, y: x.__setitem__((5, 1, 2), -np.inf), "non_finite", [5]),
    "out of range": (lambda x, y: x.__setitem__((slice(7, 9), 0, 0), 1.5), "out_of_range", [7, 8]),
    "label outside the classes": (lambda x, y: y.__setitem__([2, 10], [4, -1]), "label_range", [2, 10]),  # noqa: E501
    "duplicated rows": (lambda x, y: (x.__setitem__(9, x[1]), y.__setitem__(9, y[1])), "duplicate", [9]),  # noqa: E501
}  # fmt: skip


@pytest.mark.parametrize("fmt", ["npz", "csv"])
@pytest.mark.parametrize("problem", list(ROW_PROBLEMS))
def test_a_bad_row_is_reported_with_its_place_and_count_and_skipped(tmp_path, fmt, problem):
    damage, name, rows = ROW_PROBLEMS[problem]
    x, y = clean()
    x, y = x.astype(np.float64), y.copy()
    damage(x, y)
    if fmt == "npz":
        np.savez(tmp_path / "d.npz", x=x, y=y)
        checked = check(tmp_path / "d.npz")
        place = f"row {rows[0]}"
    else:
        checked = check(write_csv(tmp_path / "d.csv", x, y, label_at=2))
        place = f"line {rows[0] + 2}"
    (p,) = checked.problems
    assert (p.check, p.count, p.first_row, list(p.rows)) == (name, len(rows), rows[0], rows)
    assert p.message.startswith(f"{len(rows)} ") and f"(first: {place}" in p.message
    assert checked.skipped == len(rows) and len(checked.y) == 12 - len(rows)
    assert not checked.fatal and checked.x.dtype == np.float32 and checked.y.dtype == np.int64
    kept = np.delete(np.arange(12), rows)
    np.testing.assert_array_equal(checked.x, x[kept].astype(np.float32))
    assert str(len(rows)) in checked.report() and "skipped" in checked.report()


def test_csv_cells_that_do_not_parse_are_row_problems(tmp_path):
    x, y = clean()
    path = write_csv(tmp_path / "d.csv", x, y)
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[2], "abc", 1)  # line 4: text in a feature
    lines[5] = ",".join(lines[5].split(",")[:-1])  # line 6: a field missing
    lines[6] = lines[6].replace(lines[6].split(",")[1], "", 1)  # line 7: an empty cell
    lines[8] = "2.5," + lines[8].split(",", 1)[1]  # line 9: a label that is not a whole number
    path.write_text("\n".join(lines) + "\n")
    checked = check(path)
    found = {p.check: (p.count, [r + 2 for r in p.rows]) for p in checked.problems}
    assert found == {"ragged": (1, [6]), "not_numeric": (2, [4, 7]), "dtype": (1, [9])}
    assert "f1 = 'abc'" in checked.describe() and "(first: line 4" in checked.describe()
    assert checked.total == 12 and len(checked.y) == 8


FILE_PROBLEMS = {
    "npz without y": (lambda d: np.savez(d / "f.npz", x=clean()[0]), "f.npz", "missing y"),
    "npz of int pixels": (lambda d: np.savez(d / "f.npz", x=(clean()[0] * 255).astype(np.uint8), y=clean()[1]), "f.npz", "dtype uint8"),  # noqa: E501
    "npz of the wrong shape": (lambda d: np.savez(d / "f.npz", x=clean()[0].reshape(12, 6), y=clean()[1]), "f.npz", "expects (2, 3)"),  # noqa: E501
    "npz with labels as text": (lambda d: np.savez(d / "f.npz", x=clean()[0], y=np.array(["a"] * 12)), "f.npz", "labels must be integers"),  # noqa: E501
    "npz lengths differ": (lambda d: np.savez(d / "f.npz", x=clean()[0], y=clean()[1][:5]), "f.npz", "12 examples but y has 5"),  # noqa: E501
    "not an npz": (lambda d: (d / "f.npz").write_bytes(b"PK\x03\x04 not really"), "f.npz", "cannot read"),  # noqa: E501
    "csv without a label column": (lambda d: (d / "f.csv").write_text("a,b\n1,2\n"), "f.csv", "'label' column (missing"),  # noqa: E501
    "csv with too few features": (lambda d: (d / "f.csv").write_text("label,a,b\n1,0.1,0.2\n"), "f.csv", "2 feature columns"),  # noqa: E501
    "empty csv": (lambda d: (d / "f.csv").write_text(""), "f.csv", "empty"),
    "csv that is not text": (lambda d: (d / "f.csv").write_bytes(b"\xff\xfe\x00label"), "f.csv", "not UTF-8"),  # noqa: E501
    "csv of nothing but bad rows": (lambda d: (d / "f.csv").write_text("label,a,b,c,d,e,f\nx,1,1,1,1,1,1\n"), "f.csv", "no examples"),  # noqa: E501
}  # fmt: skip


@pytest.mark.parametrize("problem", list(FILE_PROBLEMS))
def test_a_whole_file_problem_refuses_every_row(tmp_path, problem):
    make, name, message = FILE_PROBLEMS[problem]
    make(tmp_path)
    try:
        checked = check(tmp_path / name)
    except DataError as exc:
        assert message in str(exc)
        return
    assert checked.fatal and len(checked.y) == 0 and message in checked.describe()


# -- random data with random problems --------------------------------------------------------


@PROPERTY
@given(
    n=st.integers(2, 40),
    seed=st.integers(0, 2**16),
    bad=st.lists(
        st.tuples(st.integers(0, 39), st.sampled_from(["nan", "inf", "range", "label", "dup"])),
        max_size=12,
    ),
    fmt=st.sampled_from(["npz", "csv"]),
)
def test_exactly_the_clean_rows_are_kept_and_each_bad_row_is_reported_once(
    tmp_path_factory, n, seed, bad, fmt
):
    x, y = clean(n, seed)
    x = x.astype(np.float64)
    rng = np.random.default_rng(seed)
    damaged: set[int] = set()
    for row, kind in bad:
        row %= n
        if kind == "nan":
            x[row, rng.integers(2), rng.integers(3)] = np.nan
        elif kind == "inf":
            x[row, 0, 0] = np.inf
        elif kind == "range":
            x[row, 1, 1] = -0.5
        elif kind == "label":
            y[row] = CLASSES + int(rng.integers(3))
        elif row > 0:  # a copy of an earlier row
            source = int(rng.integers(row))
            x[row], y[row] = x[source], y[source]
        damaged.add(row)
    directory = tmp_path_factory.mktemp("data")
    if fmt == "npz":
        np.savez(directory / "d.npz", x=x, y=y)
        checked = check(directory / "d.npz")
    else:
        checked = check(write_csv(directory / "d.csv", x, y))
    reported = {r for p in checked.problems for r in p.rows}
    # a row shows up once per problem it has (a NaN and a bad label: twice), never twice for one
    assert all(len(set(p.rows)) == len(p.rows) for p in checked.problems)
    assert len({p.check for p in checked.problems}) == len(checked.problems)
    rows_problems = [p for p in checked.problems if p.per_row]
    assert all(p.count == len(p.rows) and p.first_row == p.rows[0] for p in rows_problems)
    if checked.fatal:  # every row had a problem
        assert [p.check for p in checked.fatal] == ["empty"] and reported == set(range(n))
    assert checked.skipped == len(reported) and checked.total == n
    kept = sorted(set(range(n)) - reported)
    np.testing.assert_array_equal(checked.y, y[kept])
    np.testing.assert_array_equal(checked.x, x[kept].astype(np.float32))
    # what is kept is clean, and what was not damaged is kept (unless it repeats a kept row)
    assert np.isfinite(checked.x).all() and ((checked.x >= 0) & (checked.x <= 1)).all()
    assert ((checked.y >= 0) & (checked.y < CLASSES)).all()
    assert len({(r.tobytes(), int(c)) for r, c in zip(checked.x, checked.y)}) == len(kept)
    for row in set(range(n)) - damaged:
        if row not in kept:
            (p,) = [p for p in checked.problems if row in p.rows]
            assert p.check == "duplicate"


@PROPERTY
@given(dims=st.lists(st.integers(0, 5), max_size=3), extra=st.integers(-3, 3), gz=st.booleans())
def test_idx_files_round_trip_and_damaged_ones_are_refused(tmp_path_factory, dims, extra, gz):
    data = np.arange(int(np.prod(dims)), dtype=np.uint8) % 251
    raw = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    raw += data.tobytes() + (b"\x07" * extra if extra > 0 else b"")
    if extra < 0:
        raw = raw[:extra]
    path = tmp_path_factory.mktemp("idx") / ("f.gz" if gz else "f")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    if extra == 0:
        assert np.array_equal(read_idx(path), data.reshape(dims))
    else:
        with pytest.raises(UsageError, match="truncated|padded|bad magic"):
            read_idx(path)


@PROPERTY
@given(raw=st.binary(max_size=64))
def test_random_bytes_are_never_an_idx_file_by_accident(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("idx") / "f"
    path.write_bytes(raw)
    try:
        array = read_idx(path)
    except UsageError:
        return
    assert array.dtype == np.uint8 and array.size == len(raw) - 4 - 4 * raw[3]


# -- the agent: --strict refuses, the default trains on the valid rows -----------------------


def agent_for(path: Path, strict: bool) -> Agent:
    return Agent(Connection("127.0.0.1:1", client_id="c00", insecure=True), str(path), strict=strict)  # fmt: skip


@pytest.fixture
def bad_csv(tmp_path) -> Path:
    x, y = clean(20)
    x[4, 0, 0], y[6], x[9, 1, 2] = np.nan, 7, 3.0
    return write_csv(tmp_path / "bad.csv", x, y)


def test_strict_refuses_before_connecting_and_the_default_reports_what_it_skips(
    bad_csv, monkeypatch, caplog
):
    from fedwarden.protocol.convert import TrainingSpec

    spec = TrainingSpec("tests.tiny_model:linear", "synthetic", SHAPE, CLASSES, ((6, 4), (4,)), 0.1, 8, 1)  # fmt: skip
    assert feature_range("synthetic") == RANGE
    strict = agent_for(bad_csv, strict=True)
    with pytest.raises(AgentError, match=r"refusing to train: .*bad\.csv: 1 rows of x hold NaN"):
        strict.run()  # refused before connecting (the NaN is visible without the task)
    strict._raw = load_data(bad_csv)
    with pytest.raises(AgentError, match=r"labels are outside \[0, 4\) \(first: line 8, label 7\)"):  # noqa: E501
        strict._prepare(spec)
    default = agent_for(bad_csv, strict=False)
    default._raw = load_data(bad_csv)
    monkeypatch.setattr(Agent, "_build_trainer", lambda self, spec: "trainer")
    default._prepare(spec)
    assert len(default._data[1]) == 17 and default.data_report["skipped"] == 3
    assert {p["check"]: p["rows"] for p in default.data_report["problems"]} == {
        "non_finite": [4],
        "label_range": [6],
        "out_of_range": [9],
    }
    assert "20 rows, 3 skipped, 17 kept" in caplog.text


def test_agent_cli_strict_exits_2_with_the_problem(bad_csv):
    proc = run_fedwarden("agent", "--server", "127.0.0.1:1", "--client-id", "c00", "--data",
                         str(bad_csv), "--insecure", "--strict", timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "bad.csv: 1 rows of x hold NaN" in proc.stderr and "--strict" in proc.stderr
    assert "--strict" in run_fedwarden("agent", "--help").stdout


def test_validation_report_is_json(bad_csv):
    report = validate(load_csv(bad_csv), SHAPE, CLASSES, RANGE).to_dict()
    assert json.loads(json.dumps(report))["kept"] == 17


def test_npz_loader_keeps_its_old_contract(tmp_path):
    x, y = clean()
    np.savez(tmp_path / "a.npz", x=x, y=y)
    lx, ly = load_npz(tmp_path / "a.npz")
    assert np.array_equal(lx, x) and np.array_equal(ly, y)
    np.save(tmp_path / "b.npz", x)  # a single array under an .npz name
    (tmp_path / "b.npz.npy").rename(tmp_path / "b.npz")
    with pytest.raises(DataError, match="single array"):
        load_npz(tmp_path / "b.npz")
    assert (
        validate(LocalData(x, y, "a"), SHAPE, CLASSES, RANGE).report()
        == "a: 12 rows, all fit the task"
    )  # noqa: E501
