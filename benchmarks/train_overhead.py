"""Training-loop overhead of raycraft against a bare PyTorch loop, measured in one run on one machine.

Same model, data, batch size and epochs for
  (a) a bare PyTorch loop in this process (one torch thread),
  (b) `raycraft train` with 1 worker (1 CPU),
  (c) `raycraft train` with 2 workers (1 CPU each, data parallel over gloo), and
  (d) `raycraft train --in-process` (Ray Train's local mode: the loop runs in the CLI's process), and
  (e) (d) started from a warm process (`raycraft warm start`: imports done once, a fork per command).
This machine's speed drifts by tens of percent within minutes, so (a) runs before and after each raycraft
setup, and each setup's ratio is against the mean of its two neighbouring (a) runs. Printed per setup:
training-phase samples/s (median over epochs after the first, the loop's own `samples_per_s`), wall
samples/s (epoch to epoch, with evaluation, checkpoint and MLflow logging), and the fixed cost: for
raycraft, CLI process start to first training batch, less `ray.init`, with the MLflow store already
created (as for every run but a user's first); for (a), a bare PyTorch script's
process start to the end of its first batch, the floor of any training program here. Last, Ray Train's
own start: `TorchTrainer.fit()` to the first line of an empty training function, on a local Ray started
as raycraft starts it.

    python benchmarks/train_overhead.py [--model lenet5 --dataset mnist5k --epochs 4 --batch-size 64]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F


def bare_pytorch(model_name: str, dataset: str, epochs: int, batch_size: int) -> dict[str, float]:
    """What a user writes without raycraft: shuffle, forward, loss, backward, step; evaluate each epoch."""
    from raycraft.data.base import DataConfig
    from raycraft.registry import create_model, load_dataset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    splits = load_dataset(dataset, DataConfig())
    x, y = splits.train.tensors
    vx, vy = splits.val.tensors
    model = create_model(model_name, None, splits.info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rates, walls = [], []
    for _ in range(epochs):
        wall = time.perf_counter()
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(x) / (time.perf_counter() - wall))
        model.eval()
        with torch.no_grad():
            for i in range(0, len(vx), 256):
                F.cross_entropy(model(vx[i:i + 256]), vy[i:i + 256])
        walls.append(len(x) / (time.perf_counter() - wall))
    return {"samples_per_s": statistics.median(rates[1:]), "wall_samples_per_s": statistics.median(walls[1:])}


BARE_SCRIPT = """
import sys, time
import torch
import torch.nn.functional as F
from raycraft.data.base import DataConfig
from raycraft.registry import create_model, load_dataset
torch.set_num_threads(1)
splits = load_dataset(sys.argv[1], DataConfig())
x, y = splits.train.tensors
model = create_model(sys.argv[2], None, splits.info)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
loss = F.cross_entropy(model(x[:int(sys.argv[3])]), y[:int(sys.argv[3])])
opt.zero_grad(set_to_none=True)
loss.backward()
opt.step()
print(time.time())
"""


def bare_startup(model: str, dataset: str, batch_size: int) -> float:
    """Seconds from starting a bare PyTorch script's process to the end of its first batch: the floor
    any Python training program pays here (interpreter, torch and its optimizer imports, data, model)."""
    start = time.time()
    out = subprocess.run([sys.executable, "-c", BARE_SCRIPT, dataset, model, str(batch_size)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1]) - start


RAY_TRAIN_START = """
import sys, time, ray, ray.train
from ray.train.torch import TorchTrainer
from raycraft.cluster import init_ray
init_ray()
def first_line(config):
    open(config["stamp"], "w").write(str(time.time()))
start = time.time()
TorchTrainer(first_line, train_loop_config={"stamp": sys.argv[1] + "/stamp"},
             scaling_config=ray.train.ScalingConfig(num_workers=1),
             run_config=ray.train.RunConfig(storage_path=sys.argv[1])).fit()
print(float(open(sys.argv[1] + "/stamp").read()) - start)
"""


def ray_train_start() -> float:
    """Seconds from `TorchTrainer.fit()` to the first line of an empty training function (controller,
    placement group and worker processes, their imports, the process group): Ray Train's own start."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-c", RAY_TRAIN_START, tmp], capture_output=True, text=True,
                             check=True, cwd=tmp)
    return float(out.stdout.split()[-1])


def raycraft_cli(model: str, dataset: str, epochs: int, batch_size: int, workers: int, n_train: int,
                 warm: bool = False) -> dict[str, float]:
    """`raycraft train` with `workers` Ray Train workers (0: --in-process), from a warm process if `warm`.
    Its MLflow store exists beforehand, as it does for every run but a user's first."""
    from mlflow.tracking import MlflowClient

    from raycraft.tracking import experiment_id

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # the new store's schema lines
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        experiment_id(uri, "raycraft")
        exe = os.path.join(os.path.dirname(sys.executable), "raycraft")
        env = {**os.environ, "RAYCRAFT_WARM_DIR": f"{tmp}/warm"}  # a private warm process, or none
        cmd = [exe, "train", model, "--dataset", dataset, "--epochs", str(epochs), "--batch-size", str(batch_size),
               *(["--workers", str(workers)] if workers else ["--in-process"]),
               "--tracking-uri", uri, "--set", "optim.schedule=constant", "--set", "optim.warmup_epochs=0"]
        if warm:
            subprocess.run([exe, "warm", "start"], env=env, capture_output=True, check=True)
        try:
            out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True)
        finally:
            if warm:
                subprocess.run([exe, "warm", "stop"], env=env, capture_output=True, check=True)
        if out.returncode:
            raise RuntimeError(out.stdout[-2000:] + out.stderr[-4000:])
        run_id = re.search(r"run id: (\w+)", out.stdout).group(1)
        client = MlflowClient(uri)
        rates = [m.value for m in sorted(client.get_metric_history(run_id, "samples_per_s"), key=lambda m: m.step)]
        stamps = sorted(m.timestamp for m in client.get_metric_history(run_id, "epoch"))
        metrics = client.get_run(run_id).data.metrics
        wall_epoch = (stamps[-1] - stamps[0]) / 1000 / max(len(stamps) - 1, 1)
        return {"samples_per_s": statistics.median(rates[1:]), "wall_samples_per_s": n_train / wall_epoch,
                "startup_s": metrics["startup_s"], "ray_init_s": metrics["ray_init_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=64)
    a = ap.parse_args()
    from raycraft.data.base import DataConfig
    from raycraft.registry import load_dataset

    n_train = len(load_dataset(a.dataset, DataConfig()).train)
    bare_runs = [bare_pytorch(a.model, a.dataset, a.epochs, a.batch_size)]
    results = {}
    for name, workers, warm in (("(b) raycraft, 1 worker", 1, False), ("(c) raycraft, 2 workers", 2, False),
                                ("(d) raycraft, in-process", 0, False), ("(e) warm, in-process", 0, True)):
        results[name] = raycraft_cli(a.model, a.dataset, a.epochs, a.batch_size, workers, n_train, warm)
        bare_runs.append(bare_pytorch(a.model, a.dataset, a.epochs, a.batch_size))
        results[name]["baseline"] = {k: statistics.mean(r[k] for r in bare_runs[-2:]) for k in bare_runs[-1]}
    print("(a) bare PyTorch before, between and after: train samples/s "
          + ", ".join(f"{r['samples_per_s']:.0f}" for r in bare_runs))
    base = {k: statistics.median(r[k] for r in bare_runs) for k in bare_runs[0]}
    base.update(startup_s=bare_startup(a.model, a.dataset, a.batch_size), ray_init_s=0.0, baseline=base)
    results = {"(a) bare PyTorch": base, **results}
    print(f"{a.model} on {a.dataset}, {a.epochs} epochs, batch {a.batch_size}, {os.cpu_count()} CPUs; "
          "ratios against the mean of the neighbouring (a) runs")
    print(f"{'setup':26} {'train samples/s':>16} {'ratio':>6} {'wall samples/s':>15} {'ratio':>6} "
          f"{'fixed cost s':>13} {'over (a) s':>11} {'ray.init s':>11}")
    for name, r in results.items():
        fixed = r["startup_s"] - r["ray_init_s"]
        print(f"{name:26} {r['samples_per_s']:16.0f} {r['samples_per_s'] / r['baseline']['samples_per_s']:6.2f} "
              f"{r['wall_samples_per_s']:15.0f} {r['wall_samples_per_s'] / r['baseline']['wall_samples_per_s']:6.2f} "
              f"{fixed:13.1f} {fixed - base['startup_s']:11.1f} {r['ray_init_s']:11.1f}")
    print(f"Ray Train's own start, fit() to an empty training function: {ray_train_start():.1f} s")
    print("goals: (b)/(a) train samples/s >= 0.95; fixed cost <= 3 s")


if __name__ == "__main__":
    main()
