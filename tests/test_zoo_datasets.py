import gzip
import pickle
import random

import numpy as np
import pytest
import torch

from saliency import zoo
from saliency.zoo import get_dataset, read_idx


def write_idx(path, array, *, gz=False):
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    a = np.asarray(array)
    header = bytes([0, 0, codes[a.dtype.type], a.ndim]) + np.asarray(a.shape, ">i4").tobytes()
    raw = header + a.astype(a.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_mnist(root, *, gz, n_train=12, n_test=5):
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", x, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", y, gz=gz)
        data[prefix] = (x, y)
    return data


def test_registry_names():
    assert set(zoo.available_datasets()) >= {
        "mnist5k",
        "digits",
        "mnist1d",
        "friedman1",
        "mnist",
        "fashion_mnist",
        "cifar10",
    }
    with pytest.raises(ValueError, match="unknown dataset 'nope'.*mnist5k"):
        get_dataset("nope")


def test_register_dataset_rejects_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_dataset("digits")(lambda **kw: None)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("int_type", [np.uint8, np.int32, np.float32])
def test_read_idx_round_trip(tmp_path, gz, int_type):
    a = (np.arange(24).reshape(2, 3, 4) % 7).astype(int_type)
    write_idx(tmp_path / "a", a, gz=gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), a)


def test_read_idx_rejects_other_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"PK\x03\x04hello")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.zeros((3, 2), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_datasets_from_files(tmp_path, gz, name):
    data = write_mnist(tmp_path, gz=gz)
    ds = get_dataset(name, data_root=tmp_path)
    assert ds.task == "classification" and ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    x, y = ds.train.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_allclose(x.numpy()[:, 0], data["train"][0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.test.tensors[1].numpy(), data["t10k"][1])
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_mnist_in_torchvision_layout(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_mnist(raw, gz=True)
    assert len(get_dataset("mnist", data_root=tmp_path).test) == 5


def test_missing_files_are_named(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\]"):
        get_dataset("mnist", data_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory.*train-images-idx3-ubyte"):
        get_dataset("mnist", data_root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs data_root.*ever downloaded"):
        get_dataset("fashion_mnist")
    with pytest.raises(FileNotFoundError, match="data_batch_1.*test_batch"):
        get_dataset("cifar10", data_root=tmp_path)


def test_mismatched_idx_files(tmp_path):
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="labels"):
        get_dataset("mnist", data_root=tmp_path)


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar10_from_python_batches(tmp_path, subdir):
    root = tmp_path / subdir
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, 4)),
            b"batch_label": name.encode(),
        }
        with open(root / name, "wb") as f:
            pickle.dump(d, f)
        batches[name] = d
    ds = get_dataset("cifar10", data_root=tmp_path)
    assert ds.input_shape == (3, 32, 32) and len(ds.train) == 20 and len(ds.test) == 4
    img = batches["data_batch_2"][b"data"][1].reshape(3, 32, 32) / 255.0  # rows: R, G, B planes
    np.testing.assert_allclose(ds.train.tensors[0][5].numpy(), img, rtol=1e-6)
    assert ds.test.tensors[1].tolist() == [int(v) for v in batches["test_batch"][b"labels"]]


def test_mnist5k_stratified_split():
    ds = get_dataset("mnist5k")
    assert ds.input_shape == (1, 28, 28) and len(ds.train) == 4000 and len(ds.test) == 1000
    assert torch.bincount(ds.test.tensors[1]).tolist() == [100] * 10
    x = ds.train.tensors[0]
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    again = get_dataset("mnist5k")
    assert torch.equal(again.test.tensors[0], ds.test.tensors[0])  # fixed split
    other = get_dataset("mnist5k", seed=1)
    assert not torch.equal(other.test.tensors[1], ds.test.tensors[1])
    # train and test are disjoint and together the 5,000 digits
    rows = torch.cat([x.flatten(1), ds.test.tensors[0].flatten(1)])
    assert len(torch.unique(rows, dim=0)) == len(torch.unique(rows[:4000], dim=0)) + len(
        torch.unique(rows[4000:], dim=0)
    )


def test_digits():
    ds = get_dataset("digits")
    assert ds.input_shape == (1, 8, 8) and len(ds.train) + len(ds.test) == 1797
    assert float(ds.train.tensors[0].max()) == 1.0


def test_mnist1d_is_the_published_dataset_and_leaves_global_rng_alone():
    random.seed(5)
    np.random.seed(5)
    expect_py, expect_np = random.random(), np.random.rand()
    random.seed(5)
    np.random.seed(5)
    ds = get_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == (expect_py, expect_np)
    assert ds.input_shape == (1, 40) and len(ds.train) == 4000 and len(ds.test) == 1000
    assert (
        torch.bincount(torch.cat([ds.train.tensors[1], ds.test.tensors[1]])).tolist() == [500] * 10
    )
    # the generator standardizes the whole set
    x = torch.cat([ds.train.tensors[0], ds.test.tensors[0]]).double()
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-3


def test_friedman1_matches_the_tutorial():
    from sklearn.datasets import make_friedman1
    from sklearn.model_selection import train_test_split

    ds = get_dataset("friedman1")
    assert ds.task == "regression" and ds.num_classes is None and ds.input_shape == (10,)
    X, y = make_friedman1(n_samples=10000, n_features=10, random_state=0)
    _, X_test, _, y_test = train_test_split(X, y, test_size=0.33, random_state=42)
    assert len(ds.test) == 3300 and len(ds.train) == 6700
    np.testing.assert_allclose(ds.test.tensors[0].numpy(), X_test, rtol=1e-6)
    np.testing.assert_allclose(ds.test.tensors[1].numpy(), y_test, rtol=1e-6)
    assert ds.train.tensors[1].dtype == torch.float32
