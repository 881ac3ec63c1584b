"""Ray Data ingest (`data.ingest=ray_data`) against the in-memory path, measured in one run on one machine.

Ray starts here, private and local, with its object store capped (--object-store-mb); every run below trains
on it through `raycraft.runner.run_training`, while a thread samples the memory of Ray's processes.
  (a) `mnist5k`, 1 worker: the in-memory path (every worker loads the dataset) and Ray Data's (the driver puts
      it into the object store in blocks, the worker streams its shard), alternated, (a) first and last. The
      ratio is the Ray Data run's train samples/s over the mean of its two neighbouring in-memory runs (this
      machine's speed drifts), each the median over the epochs after the first, which leave out Ray Data's
      start of reading and the first epoch's warm-up.
  (b) a synthetic `image_folder` of PNGs written to a temporary folder, N images whose decoded float32 pixels
      are several times the object store, and one of --scale x N, each trained for one epoch through Ray Data
      (decoding and resizing run as Ray Data tasks); its samples/s includes the pipeline's start. Then the
      in-memory path on the N-image folder, for contrast (--skip-memory-folder leaves it out).
Printed per run: train samples/s (the loop's own `samples_per_s`), the peak RSS of the Ray Train worker
process, and the peak over time of the private memory (RSS less shared pages) summed over all of Ray's
processes, above Ray's idle (Ray Data's tasks and actors included; the object store's shared pages are
bounded by its cap instead).

    python benchmarks/ingest.py [--images N --size 64 --scale 4 --object-store-mb 128 --workers 1 --gpu]

Goals (issue #20): the worker's peak RSS bounded independently of the dataset's size (it grows by under 15%
from N to --scale x N images); Ray Data's samples/s >= 0.9x the in-memory path's at 1 worker on mnist5k.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import ray
from PIL import Image

from raycraft.cluster import RAY_ENV, free_port, single_node_ray
from raycraft.config import build
from raycraft.data.base import split_order
from raycraft.runner import run_training
from raycraft.train.config import TrainConfig

MIB = 2**20
CLASSES = 10
DISTINCT = 32  # encoded images per class, written again and again: the files differ only in name
TRAINER = "RayTrainWorker"  # in the process title of every Ray Train worker (`ray::RayTrainWorker.<method>`)


def start_ray(cpus: int, store_mb: int) -> None:
    """A private local Ray as `raycraft.cluster` starts one (127.0.0.1, its own GCS port, Ray Train's fast
    polling), but with the object store capped at `store_mb`: `run_training` then joins it."""
    port = free_port()
    env = {**RAY_ENV, "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        with single_node_ray():
            ray.init(address="local", _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1", num_cpus=cpus,
                     object_store_memory=store_mb * MIB, logging_config=ray.LoggingConfig(log_level="WARNING"),
                     runtime_env={"env_vars": env})
    finally:
        del os.environ["RAY_GCS_SERVER_PORT"]


def write_images(root: Path, n: int, size: int) -> int:
    """`n` RGB PNGs of size x size in CLASSES class folders under `root`: noise around a per-class grey level
    (learnable, and incompressible as photos are). The decoded float32 bytes of the dataset."""
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        encoded = []
        for _ in range(DISTINCT):
            pixels = np.clip(rng.normal(25 * c + 15, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            encoded.append(buf.getvalue())
        for i in range(c, n, CLASSES):
            (folder / f"{i:07d}.png").write_bytes(encoded[i % DISTINCT])
    return n * 3 * size * size * 4


class PeakMemory:
    """Samples, every `interval` s on a thread, the RSS of this process's Ray Train workers and the private
    memory (RSS less shared pages) of all its Ray processes; keeps the peaks, in bytes, the latter over its
    first sample's (Ray idle: its daemons, the dashboard, idle workers)."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval, self.trainer, self.private = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me, idle = psutil.Process(), None
        while not self._stop.wait(self.interval):
            private = 0
            for p in me.children(recursive=True):
                try:
                    mem, title = p.memory_info(), " ".join(p.cmdline()[:1])
                except psutil.Error:  # the process ended between listing and reading
                    continue
                private += mem.rss - mem.shared
                if TRAINER in title:
                    self.trainer = max(self.trainer, mem.rss)
            idle = private if idle is None else idle
            self.private = max(self.private, private - idle)


@dataclass
class Result:
    path: str
    dataset: str
    rows: int
    data_bytes: int
    rates: list[float] = field(default_factory=list)
    trainer_rss: int = 0
    ray_private: int = 0

    def samples_per_s(self) -> float:
        """Median over the epochs after the first, or the one epoch's."""
        return statistics.median(self.rates[1:] or self.rates)


def train(tmp: Path, keys: dict, ingest: str, overrides: list[str], n: int, data_bytes: int) -> Result:
    """One `run_training` of `keys` (a dataset of `n` examples) with `data.ingest=ingest`, its memory sampled
    meanwhile."""
    cfg, _ = build(TrainConfig, [{**keys, "storage_path": str(tmp / "ray_results")}],
                   [f"data.ingest={ingest}", "optim.schedule=constant", "optim.warmup_epochs=0", *overrides])
    result = Result(ingest, keys["dataset"], len(split_order(n, cfg.data)[0]), data_bytes)
    with PeakMemory() as peak:
        run_training(cfg, tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                           on_epoch=lambda m: result.rates.append(m["samples_per_s"]))
    result.trainer_rss, result.ray_private = peak.trainer, peak.private
    return result


def mnist_runs(tmp: Path, a: argparse.Namespace) -> tuple[list[Result], list[Result]]:
    """(in-memory runs, Ray Data runs) on mnist5k, alternated, in-memory first and last."""
    keys = {"model": a.model, "dataset": "mnist5k", "epochs": a.epochs, "batch_size": a.batch_size,
            "workers": a.workers, "gpu": a.gpu}
    n, mnist_bytes = 5000, 5000 * 28 * 28 * 4
    memory = [train(tmp, keys, "memory", a.set, n, mnist_bytes)]
    streamed = []
    for _ in range(a.repeats):
        streamed.append(train(tmp, keys, "ray_data", a.set, n, mnist_bytes))
        memory.append(train(tmp, keys, "memory", a.set, n, mnist_bytes))
    return memory, streamed


def folder_runs(tmp: Path, a: argparse.Namespace) -> list[Result]:
    """One epoch through Ray Data on N and on scale x N synthetic images (and, with --memory-folder, the
    in-memory path on N), each folder written just before its run and removed after."""
    plan = [(a.images, "ray_data"), (a.images * a.scale, "ray_data")]
    if not a.skip_memory_folder:
        plan.append((a.images, "memory"))
    results = []
    for n, ingest in plan:
        root = tmp / f"images{n}"
        start = time.perf_counter()
        data_bytes = write_images(root, n, a.size)
        print(f"wrote {n} {a.size}x{a.size} PNGs in {time.perf_counter() - start:.0f} s", flush=True)
        keys = {"model": a.model, "dataset": "image_folder", "epochs": 1, "batch_size": a.batch_size,
                "workers": a.workers, "gpu": a.gpu, "data": {"data_dir": str(root), "image_size": a.size}}
        results.append(train(tmp, keys, ingest, a.set, n, data_bytes))
        results[-1].dataset = f"image_folder {n}"
        shutil.rmtree(root)
    return results


def report(a: argparse.Namespace, memory: list[Result], streamed: list[Result], folders: list[Result]) -> None:
    """The table, then each goal's figures."""
    print(f"\n{a.model}, batch {a.batch_size}, {a.workers} worker(s){' on GPU' if a.gpu else ''}, "
          f"{os.cpu_count()} CPUs, object store capped at {a.object_store_mb} MiB")
    print(f"{'path':9} {'dataset':20} {'train rows':>10} {'decoded MiB':>11} {'x store':>7} {'samples/s':>10} "
          f"{'trainer peak RSS MiB':>21} {'Ray private peak over idle MiB':>31}")
    for r in [*memory, *streamed, *folders]:
        print(f"{r.path:9} {r.dataset:20} {r.rows:10d} {r.data_bytes / MIB:11.0f} "
              f"{r.data_bytes / MIB / a.object_store_mb:7.1f} {r.samples_per_s():10.0f} "
              f"{r.trainer_rss / MIB:21.0f} {r.ray_private / MIB:31.0f}")
    ratios = [s.samples_per_s() / statistics.mean(m.samples_per_s() for m in memory[i:i + 2])
              for i, s in enumerate(streamed)]
    ratio = statistics.median(ratios)
    print(f"\nmnist5k, ray_data / memory train samples/s (each against its neighbouring memory runs; median of "
          f"epochs 2..{a.epochs}): {', '.join(f'{x:.2f}' for x in ratios)}; median {ratio:.2f} "
          f"-> {'meets' if ratio >= 0.9 else 'misses'} the goal >= 0.9")
    small, large = folders[0], folders[1]
    growth = large.trainer_rss / small.trainer_rss
    print(f"image_folder, trainer peak RSS at {a.scale}x the images: {growth:.2f}x "
          f"({small.trainer_rss / MIB:.0f} -> {large.trainer_rss / MIB:.0f} MiB) for data of "
          f"{small.data_bytes / MIB:.0f} -> {large.data_bytes / MIB:.0f} MiB decoded "
          f"({large.data_bytes / large.trainer_rss:.1f}x the peak RSS) "
          f"-> {'meets' if growth < 1.15 else 'misses'} the goal: bounded independently of the dataset's size")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5, help="mnist5k epochs per run")
    ap.add_argument("--repeats", type=int, default=1, help="mnist5k Ray Data runs (in-memory: one more)")
    ap.add_argument("--images", type=int, default=0,
                    help="synthetic images N (default: decoded, 4x the object store)")
    ap.add_argument("--size", type=int, default=64, help="synthetic images' side, also data.image_size")
    ap.add_argument("--scale", type=int, default=4, help="the second folder holds scale x N images")
    ap.add_argument("--object-store-mb", type=int, default=128, help="Ray's minimum is about 75")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker")
    ap.add_argument("--skip-memory-folder", action="store_true",
                    help="leave out the in-memory path on N images (which loads them all, in the driver too)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run, e.g. data.shuffle_buffer=0")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (MLflow store, results)")
    a = ap.parse_args()
    a.images = a.images or 4 * a.object_store_mb * MIB // (3 * a.size * a.size * 4)
    return a


def main() -> None:
    a = parse_args()
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    tmp = Path(tempfile.mkdtemp(prefix="raycraft-ingest-"))
    try:
        start_ray(max(os.cpu_count() or 1, a.workers + 1), a.object_store_mb)
        memory, streamed = mnist_runs(tmp, a)
        folders = folder_runs(tmp, a)
        report(a, memory, streamed, folders)
    finally:
        ray.shutdown()
        if a.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
