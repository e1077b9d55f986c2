import gzip
from pathlib import Path

import numpy as np
import pytest

from fedwarden.data.datasets import FASHION_MNIST_DIR, load_dataset, read_idx
from fedwarden.data.partition import partition
from fedwarden.errors import UsageError


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_digits_has_a_disjoint_stratified_test_split():
    ds = load_dataset("digits", seed=3)
    assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_test)) == set(range(10))
    train_rows = {r.tobytes() for r in ds.x_train}
    overlap = sum(r.tobytes() in train_rows for r in ds.x_test)
    assert overlap < 5  # a handful of digits images are exact duplicates in the source set


def test_same_seed_same_split_other_seed_other_split():
    a, b, c = (
        load_dataset("digits", seed=1),
        load_dataset("digits", seed=1),
        load_dataset("digits", seed=2),
    )
    assert np.array_equal(a.y_test, b.y_test) and np.array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_idx_round_trip_and_gzip(tmp_path: Path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    plain, packed = tmp_path / "a-idx3-ubyte", tmp_path / "b-idx3-ubyte.gz"
    plain.write_bytes(_idx_bytes(array))
    packed.write_bytes(gzip.compress(_idx_bytes(array)))
    assert np.array_equal(read_idx(plain), array) and np.array_equal(read_idx(packed), array)


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b"\x01" + b[1:], "bad magic number"),
        (lambda b: b[:-3], "truncated"),
        (lambda b: b[:6], "truncated"),
    ],
)
def test_malformed_idx_is_named(tmp_path: Path, mangle, message):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(mangle(_idx_bytes(np.zeros((2, 2, 2)))))
    with pytest.raises(UsageError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_fashion_files_name_the_directory(tmp_path: Path):
    with pytest.raises(UsageError, match=str(tmp_path)):
        load_dataset("fashion_mnist", data_dir=str(tmp_path))


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian's dataset-fashion-mnist not installed"
)
def test_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion_mnist")
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.num_classes == 10 and ds.x_train.dtype == np.float32


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
def test_partitions_cover_each_example_once(scheme):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    parts = partition(labels, 20, scheme, np.random.default_rng(1), alpha=0.5)
    assert len(parts) == 20 and min(len(p) for p in parts) >= 2
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(1000))


def test_dirichlet_small_alpha_skews_labels_more_than_iid():
    labels = np.repeat(np.arange(10), 200)

    def mean_classes(scheme, alpha):
        parts = partition(labels, 10, scheme, np.random.default_rng(0), alpha=alpha)
        return np.mean(
            [
                len(np.unique(labels[p][np.bincount(labels[p], minlength=10)[labels[p]] > 10]))
                for p in parts
            ]
        )

    assert mean_classes("dirichlet", 0.1) < mean_classes("iid", 1.0) - 3


def test_partition_errors_name_the_problem():
    with pytest.raises(UsageError, match="unknown partition 'zipf'"):
        partition(np.zeros(100, int), 5, "zipf", np.random.default_rng(0))
    with pytest.raises(UsageError, match="too few for 60 clients"):
        partition(np.zeros(100, int), 60, "iid", np.random.default_rng(0))
