"""Datasets for the CLI and the examples: scikit-learn's digits (bundled), MNIST and Fashion-MNIST (local .npz).

``load_dataset(name)`` returns ``(train, test, meta)``: two ``TensorDataset``s of
``(images [N, 1, H, W] float32, labels [N] int64)`` and a dict describing them. Nothing is downloaded.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

DATASETS = ("digits", "mnist", "fashion-mnist")

# Per-pixel mean / std of the training images after scaling to [0, 1] (the usual published values).
NORMALISATION = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}

_FILES = {"mnist": "mnist.npz", "fashion-mnist": "fashion_mnist.npz"}
_SOURCES = {
    "mnist": "http://yann.lecun.com/exdb/mnist/ (or Keras' ready-made "
             "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz)",
    "fashion-mnist": "https://github.com/zalandoresearch/fashion-mnist",
}
_KEYS = ("x_train", "y_train", "x_test", "y_test")

NUM_CLASSES = 10

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0


def load_dataset(name: str, data_dir: Optional[str] = None,
                 limit: Optional[int] = None) -> Tuple[TensorDataset, TensorDataset, dict]:
    """Load ``name`` ("digits", "mnist" or "fashion-mnist") as ``(train, test, meta)``.

    Args:
        name: the dataset. ``digits`` is scikit-learn's bundled 8x8 digits (1797 images), split
            80/20 into train/test with a fixed seed and scaled to [0, 1]. ``mnist`` and
            ``fashion-mnist`` are read from ``<data_dir>/mnist.npz`` / ``<data_dir>/fashion_mnist.npz``
            (uint8 arrays ``x_train [60000, 28, 28]``, ``y_train``, ``x_test [10000, 28, 28]``, ``y_test``)
            and normalised to mean 0 / std 1 with the fixed constants in ``NORMALISATION``.
        data_dir: folder holding the .npz files; default ``$FASTDP_DATA_DIR``, else ``./data``.
            Not used for ``digits``.
        limit: keep only the first ``limit`` training samples (quick runs); the test set is unchanged.

    Returns:
        ``train``, ``test``: ``TensorDataset(x [N, 1, H, W] float32, y [N] int64)``.
        ``meta``: ``{"name", "image_shape": (1, H, W), "num_classes", "train_size", "test_size"}``.

    Raises:
        ValueError: unknown ``name``, bad ``limit``, or a data file that cannot be used (not a readable .npz
            archive, a missing or unreadable array, images not ``uint8 [N, H, W]``, labels not integers in
            ``0..num_classes-1``, an empty split, train and test images of different sizes); the message names the
            file, the array and what is wrong. Everything is checked here, before any training.
        FileNotFoundError: the .npz file is missing (the message names the path and where to get it).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    if name == "digits":
        x_train, y_train, x_test, y_test = _digits()
        source = "scikit-learn's digits"
    else:
        x_train, y_train, x_test, y_test, source = _npz(name, data_dir)
    _check_splits(source, x_train, y_train, x_test, y_test)
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    train, test = TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)
    meta = {"name": name, "image_shape": tuple(x_train.shape[1:]), "num_classes": NUM_CLASSES,
            "train_size": len(train), "test_size": len(test)}
    return train, test, meta


def _digits():
    """scikit-learn's digits: x [N, 1, 8, 8] in [0, 1] (pixel values 0..16 divided by 16), y [N]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, d.target, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=d.target)
    return (torch.from_numpy(np.ascontiguousarray(x_train)), torch.from_numpy(y_train).long(),
            torch.from_numpy(np.ascontiguousarray(x_test)), torch.from_numpy(y_test).long())


def default_data_dir() -> str:
    return os.environ.get("FASTDP_DATA_DIR", "data")


def _npz(name: str, data_dir: Optional[str]):
    """MNIST-format archive: x [N, 1, 28, 28] normalised float32, y [N] int64 for train and test."""
    data_dir = default_data_dir() if data_dir is None else os.fspath(data_dir)
    path = os.path.join(data_dir, _FILES[name])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{name} data not found: {os.path.abspath(path)} does not exist. Pass --data-dir (or data_dir=) pointing "
            f"at the folder that holds {_FILES[name]}: a numpy .npz archive with uint8 arrays x_train [60000, 28, 28], "
            f"y_train, x_test [10000, 28, 28], y_test, made from the original IDX files at {_SOURCES[name]}.")
    arrays = _read_npz(path)
    mean, std = NORMALISATION[name]
    out = []
    for (kx, ky) in (("x_train", "y_train"), ("x_test", "y_test")):
        x, y = arrays[kx], arrays[ky]
        if x.dtype != np.uint8:  # the normalisation below assumes 0-255 pixels
            raise ValueError(f"{path}: {kx} must be uint8 (0-255) as in the original IDX files, got {x.dtype}")
        if x.ndim != 3:
            raise ValueError(f"{path}: {kx} must be images [N, H, W], got shape {x.shape}")
        _check_labels(path, ky, y, len(x), kx)
        xt = torch.from_numpy(x).to(torch.float32).div_(255.0).sub_(mean).div_(std).unsqueeze(1)
        out += [xt, torch.from_numpy(y.astype(np.int64))]
    return (*out, path)


def _read_npz(path: str) -> dict:
    """The four arrays of an .npz archive, or a ValueError naming the file (and the array) and what is wrong."""
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # empty, truncated or garbage file: EOFError, BadZipFile, "pickled data"...
        raise ValueError(f"{path}: not a readable .npz archive ({type(err).__name__}: {err}); expected a numpy .npz "
                         f"with the arrays {list(_KEYS)}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, not an .npz archive with the arrays {list(_KEYS)}")
    with archive as d:
        missing = [k for k in _KEYS if k not in d.files]
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}; expected {list(_KEYS)}")
        arrays = {}
        for k in _KEYS:
            try:
                arrays[k] = d[k]
            except Exception as err:  # bad CRC, damaged header, Python objects (pickled data)...
                raise ValueError(f"{path}: array {k!r} cannot be read ({type(err).__name__}: {err}); the file is damaged "
                                 "or holds Python objects instead of numeric arrays") from None
    return arrays


def _check_labels(source: str, key: str, y, n: int, images_key: str) -> None:
    """Labels ``key`` of ``source``: integers in 0..NUM_CLASSES-1, one per image of ``images_key`` (``n`` of them)."""
    y = np.asarray(y)
    if y.dtype == np.bool_ or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{source}: {key} must hold integer class labels 0..{NUM_CLASSES - 1}, got dtype {y.dtype} "
                         "(float labels would be truncated)")
    if y.ndim != 1:
        raise ValueError(f"{source}: {key} must be one label per image (shape [N]), got shape {y.shape}")
    if len(y) != n:
        raise ValueError(f"{source}: {key} has {len(y)} labels for {n} images in {images_key}")
    if len(y) and (y.min() < 0 or y.max() >= NUM_CLASSES):
        raise ValueError(f"{source}: {key} holds labels {y.min()}..{y.max()}, outside 0..{NUM_CLASSES - 1} "
                         f"({NUM_CLASSES} classes)")


def _check_splits(source: str, x_train, y_train, x_test, y_test) -> None:
    """Checks shared by every dataset, before any training: non-empty splits, one image size, labels in range."""
    for kx, ky, x, y in (("x_train", "y_train", x_train, y_train), ("x_test", "y_test", x_test, y_test)):
        if len(x) == 0:
            raise ValueError(f"{source}: {kx} is empty (no {'training' if kx == 'x_train' else 'test'} images)")
        if min(x.shape[1:]) < 1:
            raise ValueError(f"{source}: {kx} has images of size {_size(x)}")
        _check_labels(source, ky, y.numpy() if isinstance(y, torch.Tensor) else y, len(x), kx)
    if tuple(x_train.shape[1:]) != tuple(x_test.shape[1:]):
        raise ValueError(f"{source}: x_test has images of size {_size(x_test)}, x_train of {_size(x_train)}: both "
                         "splits must have the same image size")


def _size(x) -> str:
    """``HxW`` of images [N, C, H, W] (``CxHxW`` when C > 1)."""
    dims = tuple(x.shape[1:])
    return "x".join(map(str, dims[1:] if dims[0] == 1 else dims))
