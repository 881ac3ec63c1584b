"""Bad data and bad model sizes through the installed `raycraft` executable: each is caught when the job is
validated, before Ray starts and before an MLflow run exists (exit 2, a message naming the file or key and
the problem); and `raycraft eval --dataset` refuses a dataset whose shapes the run's model was not built for."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import RAYCRAFT, assert_refused

RNG = np.random.default_rng(0)


def idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + np.array(arr.shape, dtype=">u4").tobytes() + arr.astype(np.uint8).tobytes()


def mnist(train_labels: np.ndarray | None = None, test_labels: np.ndarray | None = None) -> dict[str, bytes]:
    """A valid MNIST-format folder (20 training, 10 test images) unless labels are given."""
    return {"train-images-idx3-ubyte": idx(RNG.integers(0, 256, (20, 28, 28))),
            "train-labels-idx1-ubyte": idx(np.arange(20) % 10 if train_labels is None else train_labels),
            "t10k-images-idx3-ubyte": idx(RNG.integers(0, 256, (10, 28, 28))),
            "t10k-labels-idx1-ubyte": idx(np.arange(10) if test_labels is None else test_labels)}


def cifar_batch(labels: np.ndarray) -> bytes:
    pixels = RNG.integers(0, 256, (len(labels), 3072))
    return np.concatenate([labels[:, None], pixels], axis=1).astype(np.uint8).tobytes()


def png(colour: tuple[int, int, int]) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 12), colour).save(buf, "PNG")
    return buf.getvalue()


def truncated_gzip_images() -> dict[str, bytes]:
    files = mnist()
    images = gzip.compress(files.pop("train-images-idx3-ubyte"))
    return {**files, "train-images-idx3-ubyte.gz": images[:len(images) // 2]}


def truncated_idx_images() -> dict[str, bytes]:
    files = mnist()
    return {**files, "train-images-idx3-ubyte": files["train-images-idx3-ubyte"][:-100]}


def idx_count_mismatch() -> dict[str, bytes]:
    return {**mnist(), "train-labels-idx1-ubyte": idx(np.arange(19) % 10)}


def two_classes(extra: dict[str, bytes]) -> dict[str, bytes]:
    return {f"{c}/{i}.png": png(colour) for c, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255)))
            for i in range(6)} | extra


# case: (files to write into the data folder, dataset, words the error must hold)
DATA_CASES = {
    "truncated CIFAR batch": ({"data_batch_1.bin": cifar_batch(np.arange(20) % 10)[:-500],
                               "test_batch.bin": cifar_batch(np.arange(10))},
                              "cifar10", ["data_batch_1.bin", "truncated"]),
    "CIFAR label out of range": ({"data_batch_1.bin": cifar_batch(np.array([1, 200] * 10)),
                                  "test_batch.bin": cifar_batch(np.arange(10))},
                                 "cifar10", ["data_batch_1.bin", "label 200", "[0, 10)"]),
    "truncated IDX file": (truncated_idx_images(), "mnist_idx", ["train-images-idx3-ubyte", "truncated"]),
    "truncated gzip": (truncated_gzip_images(), "mnist_idx", ["train-images-idx3-ubyte.gz", "truncated"]),
    "image/label count mismatch": (idx_count_mismatch(), "mnist_idx",
                                   ["train-images-idx3-ubyte", "20 images", "train-labels-idx1-ubyte", "19 labels"]),
    "test label out of range": (mnist(test_labels=np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12])), "mnist_idx",
                                ["t10k-labels-idx1-ubyte", "label 12", "[0, 10)"]),
    "corrupt image": (two_classes({"dogs/broken.png": b"\x89PNG\r\n\x1a\n not really a png"}), "image_folder",
                      ["broken.png", "corrupt"]),
    "one class": ({f"cats/{i}.png": png((255, 0, 0)) for i in range(6)}, "image_folder",
                  ["image_folder", "1 class", "cats", "at least 2 classes"]),
}
SIZE_CASES = {
    "zero hidden width": (["mlp", "--set", "hidden=[0]"], ["mlp.hidden", "[0]", ">= 1"]),
    "negative width": (["resnet18", "--set", "width=-8"], ["resnet18.width", "-8", ">= 1"]),
    "NaN learning rate": (["lenet5", "--set", "optim.lr=nan"], ["optim.lr", "nan", "finite"]),
}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`raycraft ARGS` in `cwd`, with its own MLflow store and its own Ray temp folder there."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "RAY_TMPDIR": str(cwd)}
    return subprocess.run([str(RAYCRAFT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def data_case(root: Path, name: str) -> tuple[list[str], Path]:
    files, dataset, _ = DATA_CASES[name]
    cwd = root / re.sub(r"\W+", "-", name)
    for rel, raw in files.items():
        (cwd / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        (cwd / "data" / rel).write_bytes(raw)
    return ["train", "mlp", "--dataset", dataset, "--data-dir", str(cwd / "data")], cwd


def size_case(root: Path, name: str) -> tuple[list[str], Path]:
    cwd = root / re.sub(r"\W+", "-", name)
    cwd.mkdir()
    return ["train", *SIZE_CASES[name][0], "--dataset", "digits"], cwd


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("data-validation")
    jobs = {name: data_case(root, name) for name in DATA_CASES} | {name: size_case(root, name) for name in SIZE_CASES}
    with ThreadPoolExecutor(2) as pool:
        outs = dict(zip(jobs, pool.map(lambda job: run(*job), jobs.values()), strict=True))
    return {name: (outs[name], jobs[name][1]) for name in jobs}


@pytest.mark.parametrize("case", [*DATA_CASES, *SIZE_CASES])
def test_bad_input_stops_before_ray_and_mlflow(case, results):
    out, cwd = results[case]
    assert_refused(out, DATA_CASES[case][2] if case in DATA_CASES else SIZE_CASES[case][1])
    assert not (cwd / "mlflow.db").exists(), "an MLflow store (and run) was created"
    assert not (cwd / "ray").exists(), "Ray was started"


def test_eval_on_a_dataset_of_other_shapes_is_a_user_error(tmp_path):
    train = run(["train", "mlp", "--dataset", "digits", "--in-process", "--epochs", "1"], tmp_path)
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
    run_id = re.search(r"run id: (\w{32})", train.stdout).group(1)
    out = run(["eval", run_id, "--dataset", "mnist5k"], tmp_path)
    assert_refused(out, ("'digits'", "'mnist5k'", "input_shape", "(1, 8, 8)", "(1, 28, 28)"))
