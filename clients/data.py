"""Local data for an agent: loading and validation, before any of it reaches training.

Every check reports what is wrong, how many rows are affected and the first offending row, and
nothing is ever dropped silently: bad data stops the agent with a message, and the user fixes
the file. The checks are plain functions over arrays, so any loader (.npz here, CSV elsewhere)
can reuse them.

Example::

    x, y = load_npz("data/c00.npz")
    problems = check_arrays(x, y, input_shape=(8, 8, 1), num_classes=10)
    if problems:
        raise DataError("data/c00.npz: " + "; ".join(p.message for p in problems))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Local data is missing, malformed or does not fit the task (the message says how)."""


@dataclass(frozen=True)
class DataProblem:
    check: str  # "shape", "dtype", "non_finite", "label_range", "empty", "length"
    count: int  # rows affected (or 1 for a whole-array problem)
    first_row: int | None  # first offending row, when the problem is per row
    message: str


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an .npz file, as stored (validate them with ``check_arrays``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("x", "y") if k not in data.files]
            if missing:
                raise DataError(
                    f"{path} must hold arrays 'x' and 'y'; missing {', '.join(missing)} "
                    f"(found: {', '.join(data.files) or 'nothing'})"
                )
            return data["x"], data["y"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"cannot read {path} as .npz: {exc}") from None


def check_features(x: np.ndarray, input_shape: tuple[int, ...] | None = None) -> list[DataProblem]:
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
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        problems.append(
            DataProblem(
                "non_finite",
                len(rows),
                int(rows[0]),
                f"{len(rows)} rows of x hold NaN or Inf values (first: row {int(rows[0])})",
            )
        )
    return problems


def check_labels(y: np.ndarray, num_classes: int | None = None) -> list[DataProblem]:
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
    if np.issubdtype(y.dtype, np.floating):
        whole = np.isfinite(y) & (np.floor(y) == y)
        if not whole.all():
            rows = np.flatnonzero(~whole)
            return [
                DataProblem(
                    "dtype",
                    len(rows),
                    int(rows[0]),
                    f"{len(rows)} labels are not whole numbers "
                    f"(first: row {int(rows[0])}, value {y[rows[0]]!r})",
                )
            ]
    elif not np.issubdtype(y.dtype, np.integer):
        return [
            DataProblem("dtype", len(y), None, f"y has dtype {y.dtype}; labels must be integers")
        ]
    upper = np.inf if num_classes is None else num_classes
    bad = (y < 0) | (y >= upper)
    if bad.any():
        rows = np.flatnonzero(bad)
        accepted = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        return [
            DataProblem(
                "label_range",
                len(rows),
                int(rows[0]),
                f"{len(rows)} labels are outside {accepted} "
                f"(first: row {int(rows[0])}, label {y[rows[0]]!r})",
            )
        ]
    return []


def check_arrays(
    x: np.ndarray,
    y: np.ndarray,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> list[DataProblem]:
    """Every problem of a (features, labels) pair against the task; empty when the data is fit."""
    problems = check_features(x, input_shape) + check_labels(y, num_classes)
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


def prepare(
    x: np.ndarray,
    y: np.ndarray,
    input_shape: tuple[int, ...],
    num_classes: int,
    source: str = "data",
) -> tuple[np.ndarray, np.ndarray]:
    """Validated copies in the training dtypes (float32 features, int64 labels).

    Raises DataError naming every problem found, with counts and first offending rows.
    """
    problems = check_arrays(x, y, input_shape, num_classes)
    if problems:
        raise DataError(f"{source}: " + "; ".join(p.message for p in problems))
    x32 = x.astype(np.float32)
    if x.dtype != np.float32 and not np.isfinite(x32).all():
        raise DataError(
            f"{source}: some values of x overflow float32 (largest magnitude "
            f"{float(np.max(np.abs(x))):.3g}); scale the features"
        )
    return x32, y.astype(np.int64)
