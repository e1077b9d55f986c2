"""Datasets for simulations, each with a held-out test split no client sees.

Images come as float32 in [0, 1] shaped (N, H, W, 1); the synthetic set as (N, F) features in [0, 1].
Nothing is downloaded: digits ships with scikit-learn, Fashion-MNIST is read from IDX files
(Debian's ``dataset-fashion-mnist`` puts them in /usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedwarden.errors import UsageError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FEATURE_RANGES = {"digits": (0.0, 1.0), "fashion_mnist": (0.0, 1.0), "synthetic": (0.0, 1.0)}
"""The range of every feature of the built-in datasets (agents check their local data with it)."""


def feature_range(name: str) -> tuple[float, float] | None:
    """``(low, high)`` of a built-in dataset's features; None for a dataset from files."""
    return FEATURE_RANGES.get(name)


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_dataset(name: str, data_dir: str | None = None, seed: int = 0) -> Dataset:
    if name == "digits":
        return _digits(seed)
    if name == "fashion_mnist":
        return _fashion_mnist(Path(data_dir or FASHION_MNIST_DIR))
    if name == "synthetic":
        return _synthetic(seed)
    if name.endswith(".npz"):
        return _npz(Path(name), seed)
    raise UsageError(
        f"unknown dataset {name!r}. Accepted values: digits, fashion_mnist, synthetic, "
        "or a path to a .npz file with arrays x and y"
    )


def _split(
    name: str, x: np.ndarray, y: np.ndarray, seed: int, test_fraction: float = 0.25
) -> Dataset:
    """A stratified held-out split, fixed by the seed."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test_idx.append(idx[: int(round(len(idx) * test_fraction))])
    test = np.zeros(len(y), bool)
    test[np.concatenate(test_idx)] = True
    return Dataset(name, x[~test], y[~test], x[test], y[test], int(y.max()) + 1)


def _digits(seed: int) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[..., None]
    return _split("digits", x, bunch.target.astype(np.int64), seed)


def _synthetic(seed: int, n: int = 4000, features: int = 20, classes: int = 4) -> Dataset:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n,
        n_features=features,
        n_informative=10,
        n_classes=classes,
        n_clusters_per_class=1,
        class_sep=1.5,
        random_state=seed,
    )
    x = (x - x.min(0)) / (x.max(0) - x.min(0))
    return _split("synthetic", x.astype(np.float32), y.astype(np.int64), seed)


def _npz(path: Path, seed: int) -> Dataset:
    """A dataset file, checked as an agent checks its data (``fedwarden/data/validation.py``).

    A problem (NaN or Inf, a label that is not a class index, a wrong shape or dtype, ...)
    refuses the file with the offending rows named, rather than training on them or dropping
    them quietly. Rows that repeat an earlier one are kept: a dataset may hold them.
    """
    from fedwarden.data.validation import DataError, LocalData, load_npz, validate

    if not path.is_file():
        raise UsageError(f"dataset file not found: {path}")
    try:
        x, y = load_npz(path)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    checked = validate(LocalData(x, y, str(path)), tuple(x.shape[1:]) if x.ndim > 1 else None)
    problems = [p.message for p in checked.problems if p.check != "duplicate"]
    if problems:
        raise UsageError(f"{path}: {'; '.join(problems)}; fix or remove these rows")
    return _split(path.stem, x.astype(np.float32), y.astype(np.int64), seed)


def read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes; errors name the file and the problem."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as exc:
        raise UsageError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UsageError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"{path} is truncated: header needs {header} bytes, file has {len(raw)}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise UsageError(
            f"{path} is truncated or padded: dimensions {dims} need {expected} bytes, "
            f"file has {len(raw)}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"Fashion-MNIST file {stem}[.gz] not found in {directory}; install Debian's "
        "dataset-fashion-mnist or pass --data-dir"
    )


def _fashion_mnist(directory: Path) -> Dataset:
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(directory, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(directory, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UsageError(
                f"Fashion-MNIST {split} files in {directory} disagree: images "
                f"{images.shape}, labels {labels.shape}"
            )
        # float32 division gives the same values as float64 then rounding, without the float64
        # copy (376 MB for the training images).
        arrays[split] = ((images / np.float32(255.0))[..., None], labels.astype(np.int64))
    (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
    return Dataset("fashion_mnist", x_train, y_train, x_test, y_test, 10)
