"""Local data for an agent: loading and validation, before any of it reaches training.

Two file formats:

- ``.npz`` with arrays ``x`` (features, one example per row, floating point, shaped like the
  task's input, e.g. ``(N, 8, 8, 1)``) and ``y`` (integer class labels, shape ``(N,)``).
- ``.csv`` with a header line, one column named ``label`` (the integer class index) and every
  other column a feature, in file order: ``prod(input_shape)`` of them (64 for digits' 8x8
  images), flattened row-major, values as decimal numbers. Rows are reported by their line in
  the file (the header is line 1).

Every problem is reported with what is wrong, how many rows it affects and where (the first
offending row, and the full list in ``DataProblem.rows``); nothing is ever dropped silently.
Problems of single rows (NaN or Inf, values outside the task's range, labels outside its
classes or not whole numbers, duplicated rows, and in CSV non-numeric cells or rows with the
wrong number of fields) make those rows skippable: ``validate`` keeps the other rows and says
what it skipped. Problems of the whole file (missing arrays or columns, wrong shape or dtype of
an array, no rows) are fatal. An agent with ``--strict`` refuses to train on any problem.

Example::

    data = load_data("data/c00.csv")
    checked = validate(data, input_shape=(8, 8, 1), num_classes=10, value_range=(0.0, 1.0))
    if checked.fatal:
        raise DataError(checked.describe())
    print(checked.report())      # "data/c00.csv: 120 rows, 3 skipped: ..."
    x, y = checked.x, checked.y  # float32 features, int64 labels, valid rows only
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LABEL_COLUMN = "label"
MAX_LABEL = 2**31  # labels are class indices; without a task's num_classes, below this
SHOWN_ROWS = 5  # rows listed in a report line; DataProblem.rows holds them all


class DataError(ValueError):
    """Local data is missing, malformed or does not fit the task (the message says how)."""


@dataclass(frozen=True)
class DataProblem:
    check: str  # "shape", "dtype", "non_finite", "label_range", "out_of_range", "duplicate", ...
    count: int  # rows affected (or 1 for a whole-array problem)
    first_row: int | None  # first offending row, when the problem is per row
    message: str
    rows: tuple[int, ...] = field(default=(), compare=False)  # every offending row (per row)

    @property
    def per_row(self) -> bool:
        """True when skipping ``rows`` removes the problem; False for a whole-file problem."""
        return bool(self.rows)


@dataclass
class LocalData:
    """A data file as read: arrays as stored, plus the rows that could not even be parsed.

    ``index[i]`` is the file's row number of array row ``i`` (rows that failed to parse are
    left out of the arrays and reported in ``problems``).
    """

    x: np.ndarray
    y: np.ndarray
    source: str
    problems: list[DataProblem] = field(default_factory=list)
    index: np.ndarray | None = None
    first_line: int = 0  # CSV: 2 (row i of the body is line i + 2; the header is line 1)
    flat: bool = False  # CSV: x is (N, features), reshaped to the task's input shape

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = np.arange(len(self.y) if self.y.ndim else 0)

    def row_name(self, row: int) -> str:
        """How the file counts row ``row``: ``row 5`` (arrays) or ``line 7`` (CSV)."""
        return f"line {row + self.first_line}" if self.first_line else f"row {row}"


def load_data(path: str | os.PathLike) -> LocalData:
    """Reads an ``.npz`` or ``.csv`` data file (by its suffix); raises DataError if it cannot."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        return load_csv(path)
    x, y = load_npz(path)
    return LocalData(x, y, str(path))


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an .npz file, as stored (validate them with ``validate``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise DataError(f"{path} holds a single array, not an .npz archive of x and y")
        with data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise DataError(
                    f"{path} must hold arrays 'x' and 'y'; missing {', '.join(missing)} "
                    f"(found: {', '.join(data.files) or 'nothing'})"
                )
            x, y = data["x"], data["y"]
            if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
                raise DataError(f"{path}: 'x' and 'y' must be .npy arrays in the archive")
            return x, y
    except DataError:
        raise
    except Exception as exc:  # a damaged archive fails in zipfile, zlib or numpy's header parser
        raise DataError(f"cannot read {path} as .npz: {type(exc).__name__}: {exc}") from None


def load_csv(path: str | os.PathLike) -> LocalData:
    """A CSV file of the documented schema; rows that do not parse become per-row problems."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from None
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise DataError(f"{path} is not valid CSV: {exc}") from None
    if not rows:
        raise DataError(f"{path} is empty; it needs a header line naming a '{LABEL_COLUMN}' column")
    names = [name.strip() for name in rows[0]]
    if names.count(LABEL_COLUMN) != 1:
        found = "twice" if names.count(LABEL_COLUMN) > 1 else "missing"
        raise DataError(
            f"{path}: the header needs exactly one '{LABEL_COLUMN}' column ({found}; header: "
            f"{','.join(names)[:200]!r}); the other columns are the features"
        )
    label_at = names.index(LABEL_COLUMN)
    parsed: list[list[float]] = []
    index: list[int] = []
    ragged: list[int] = []
    text_cells: list[int] = []
    first_text = ""
    for i, row in enumerate(rows[1:]):
        if len(row) != len(names):
            ragged.append(i)
            continue
        try:
            values = [float(cell) for cell in row]
        except ValueError:
            text_cells.append(i)
            if not first_text:
                j, cell = next((j, c) for j, c in enumerate(row) if not _is_number(c))
                first_text = f"{names[j]} = {cell[:20]!r}"
            continue
        parsed.append(values)
        index.append(i)
    table = np.array(parsed, np.float64).reshape(len(parsed), len(names))
    data = LocalData(
        np.delete(table, label_at, axis=1),
        table[:, label_at],
        str(path),
        index=np.array(index, np.int64),
        first_line=2,
        flat=True,
    )
    if ragged:
        what = f"rows do not have the header's {len(names)} fields"
        data.problems.append(_per_row("ragged", ragged, data.row_name, what))
    if text_cells:
        what = "rows hold an empty or non-numeric cell"
        data.problems.append(_per_row("not_numeric", text_cells, data.row_name, what, first_text))
    return data


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _listed(rows: tuple[int, ...], name: Callable[[int], str]) -> str:
    """`` [rows 4, 9, 11]`` for several rows (the first SHOWN_ROWS), else ``""``."""
    if len(rows) < 2:
        return ""
    word, _ = name(rows[0]).split()
    shown = ", ".join(name(r).split()[1] for r in rows[:SHOWN_ROWS])
    return f" [{word}s {shown}{', ...' if len(rows) > SHOWN_ROWS else ''}]"


def _per_row(
    check: str,
    rows: list[int] | np.ndarray,
    name: Callable[[int], str],
    what: str,
    value: str = "",
) -> DataProblem:
    """``3 <what> (first: row 4, <value>) [rows 4, 9, 11]``."""
    rows = tuple(int(r) for r in rows)
    first = name(rows[0]) + (f", {value}" if value else "")
    message = f"{len(rows)} {what} (first: {first}){_listed(rows, name)}"
    return DataProblem(check, len(rows), rows[0], message, rows)


def _row(i: int) -> str:
    return f"row {i}"


def check_features(
    x: np.ndarray, input_shape: tuple[int, ...] | None = None, name: Callable[[int], str] = _row
) -> list[DataProblem]:
    """Shape, dtype and finiteness of the feature array (one example per row)."""
    if x.ndim == 0 or len(x) == 0:
        return [DataProblem("empty", 1, None, f"x holds no examples (shape {x.shape})")]
    problems = []
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        shape = ", ".join(str(d) for d in input_shape)
        problems.append(
            DataProblem(
                "shape",
                len(x),
                None,
                f"x has examples of shape {tuple(x.shape[1:])}; the task "
                f"expects ({shape}) (x shape (N, {shape}))",
            )
        )
    if not np.issubdtype(x.dtype, np.floating):
        problems.append(
            DataProblem(
                "dtype",
                len(x),
                None,
                f"x has dtype {x.dtype}; the task expects floating-point "
                "features (convert, and scale to the range the task uses)",
            )
        )
        return problems
    flat = x.reshape(len(x), -1)
    with np.errstate(over="ignore"):
        bad = ~(np.isfinite(flat) & np.isfinite(flat.astype(np.float32))).all(axis=1)
    if bad.any():
        what = "rows of x hold NaN or Inf values (or values too large for float32)"
        problems.append(_per_row("non_finite", np.flatnonzero(bad), name, what))
    return problems


def check_labels(
    y: np.ndarray, num_classes: int | None = None, name: Callable[[int], str] = _row
) -> list[DataProblem]:
    """Integer class labels in ``[0, num_classes)``, one per example."""
    if y.ndim != 1:
        return [
            DataProblem(
                "shape",
                len(y) if y.ndim else 1,
                None,
                f"y must be one label per example, shape (N,); received shape {y.shape}",
            )
        ]
    if len(y) == 0:
        return [DataProblem("empty", 1, None, "y holds no labels")]
    problems = []
    whole = np.ones(len(y), bool)
    if np.issubdtype(y.dtype, np.floating):
        whole = np.isfinite(y) & (np.floor(y) == y)
        if not whole.all():
            rows = np.flatnonzero(~whole)
            value = f"value {y[rows[0]]!r}"
            problems.append(_per_row("dtype", rows, name, "labels are not whole numbers", value))
    elif not np.issubdtype(y.dtype, np.integer):
        return [
            DataProblem("dtype", len(y), None, f"y has dtype {y.dtype}; labels must be integers")
        ]
    upper = MAX_LABEL if num_classes is None else num_classes
    with np.errstate(invalid="ignore"):
        bad = whole & ((y < 0) | (y >= upper))
    if bad.any():
        rows = np.flatnonzero(bad)
        accepted = f"[0, {upper})"
        label = y[rows[0]].item()
        label = int(label) if float(label).is_integer() else label
        what = f"labels are outside {accepted}"
        problems.append(_per_row("label_range", rows, name, what, f"label {repr(label)[:20]}"))
    return problems


def check_arrays(
    x: np.ndarray,
    y: np.ndarray,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    name: Callable[[int], str] = _row,
) -> list[DataProblem]:
    """Every problem of a (features, labels) pair against the task; empty when the data is fit."""
    problems = check_features(x, input_shape, name) + check_labels(y, num_classes, name)
    if x.ndim and y.ndim == 1 and len(x) != len(y):
        problems.append(
            DataProblem(
                "length",
                abs(len(x) - len(y)),
                None,
                f"x has {len(x)} examples but y has {len(y)} labels",
            )
        )
    return problems


def check_range(
    x: np.ndarray, value_range: tuple[float, float], name: Callable[[int], str] = _row
) -> list[DataProblem]:
    """Rows with a finite feature outside ``[low, high]`` (or too large for float32)."""
    low, high = value_range
    flat = x.reshape(len(x), -1)
    with np.errstate(invalid="ignore"):
        outside = np.isfinite(flat) & ((flat < low) | (flat > high))
    rows = np.flatnonzero(outside.any(axis=1))
    if not len(rows):
        return []
    value = f"value {float(flat[rows[0]][outside[rows[0]]][0]):g}"
    what = f"rows of x hold values outside [{low:g}, {high:g}]"
    return [_per_row("out_of_range", rows, name, what, value)]


def check_duplicates(
    x: np.ndarray, y: np.ndarray, name: Callable[[int], str] = _row
) -> list[DataProblem]:
    """Rows whose features and label repeat an earlier row exactly (the first copy is kept)."""
    if len(x) < 2:
        return []
    table = np.column_stack([x.reshape(len(x), -1).astype(np.float64), y.astype(np.float64)])
    table = np.ascontiguousarray(table)
    keys = table.view(np.dtype((np.void, table.dtype.itemsize * table.shape[1]))).ravel()
    _, first = np.unique(keys, return_index=True)
    repeated = np.ones(len(x), bool)
    repeated[first] = False
    if not repeated.any():
        return []
    return [
        _per_row("duplicate", np.flatnonzero(repeated), name, "rows repeat an earlier row exactly")
    ]


@dataclass
class Validation:
    """The outcome of ``validate``: the rows fit for training and every problem found."""

    source: str
    total: int  # rows in the file
    problems: list[DataProblem]
    x: np.ndarray  # float32, the rows kept (none when a problem is fatal)
    y: np.ndarray  # int64

    @property
    def fatal(self) -> list[DataProblem]:
        """Whole-file problems: no row can be used."""
        return [p for p in self.problems if not p.per_row]

    @property
    def skipped(self) -> int:
        return self.total - len(self.y)

    def describe(self) -> str:
        """``source: problem; problem`` (every problem, as one line)."""
        return f"{self.source}: " + "; ".join(p.message for p in self.problems)

    def report(self) -> str:
        """What was kept and what was skipped, and why (one line)."""
        if not self.problems:
            return f"{self.source}: {self.total} rows, all fit the task"
        return (
            f"{self.source}: {self.total} rows, {self.skipped} skipped, {len(self.y)} kept: "
            + "; ".join(p.message for p in self.problems)
        )

    def to_dict(self) -> dict:
        problems = [
            {
                "check": p.check,
                "count": p.count,
                "first_row": p.first_row,
                "rows": list(p.rows),
                "message": p.message,
            }
            for p in self.problems
        ]
        return {
            "source": self.source,
            "rows": self.total,
            "kept": len(self.y),
            "skipped": self.skipped,
            "problems": problems,
        }


def validate(
    data: LocalData,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    value_range: tuple[float, float] | None = None,
) -> Validation:
    """Checks ``data`` against the task and keeps the rows without a problem.

    Checks run in stages, each on the rows the earlier ones kept, so a row is reported once,
    for its first problem: parsing (CSV), then finiteness and labels, then the value range,
    then duplicates. A whole-file problem (``Validation.fatal``) keeps no row.
    """
    index = data.index
    rows_in_file = len(index) + sum(p.count for p in data.problems if p.per_row)
    problems = list(data.problems)
    x, y = data.x, data.y

    def refuse(*found: DataProblem) -> Validation:
        empty = np.zeros((0, *x.shape[1:]) if x.ndim else (0,), np.float32)
        found_problems = [*problems, *found]
        return Validation(data.source, rows_in_file, found_problems, empty, np.zeros(0, np.int64))

    if data.flat and input_shape is not None:
        features = int(np.prod(input_shape))
        if x.ndim != 2 or x.shape[1] != features:
            return refuse(
                DataProblem(
                    "schema",
                    1,
                    None,
                    f"{x.shape[1] if x.ndim == 2 else 0} feature columns besides "
                    f"'{LABEL_COLUMN}'; the task's input {tuple(input_shape)} needs {features}",
                )
            )
        x = x.reshape(len(x), *input_shape)
    whole = check_arrays(x, y, input_shape, num_classes)
    if any(not p.per_row for p in whole):
        return refuse(*whole)  # every problem named, though no row can be used
    keep = np.ones(len(index), bool)
    stages: list[Callable[[np.ndarray, np.ndarray, Callable[[int], str]], list[DataProblem]]] = [
        lambda xs, ys, name: check_arrays(xs, ys, input_shape, num_classes, name)
    ]
    if value_range is not None:
        stages.append(lambda xs, ys, name: check_range(xs, value_range, name))
    stages.append(check_duplicates)
    for stage in stages:
        rows = np.flatnonzero(keep)  # array rows still kept; stage rows index into them
        sub_x, sub_y = (x, y) if len(rows) == len(keep) else (x[rows], y[rows])

        def name(i: int, rows=rows) -> str:
            return data.row_name(int(index[rows[i]]))

        for p in stage(sub_x, sub_y, name):
            local = rows[list(p.rows)]
            keep[local] = False
            in_file = tuple(int(r) for r in index[local])
            problems.append(DataProblem(p.check, p.count, in_file[0], p.message, in_file))
        if not keep.any():
            return refuse(DataProblem("empty", 1, None, "no row is fit for training"))
    return Validation(
        data.source,
        rows_in_file,
        problems,
        x[keep].astype(np.float32),
        y[keep].astype(np.int64),
    )


def prepare(
    x: np.ndarray,
    y: np.ndarray,
    input_shape: tuple[int, ...],
    num_classes: int,
    source: str = "data",
    value_range: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Validated copies in the training dtypes (float32 features, int64 labels), all or nothing.

    Raises DataError naming every problem found, with counts and first offending rows.
    """
    checked = validate(LocalData(x, y, source), input_shape, num_classes, value_range)
    if checked.problems:
        raise DataError(checked.describe())
    return checked.x, checked.y
