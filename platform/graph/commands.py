"""`raycraft oversmoothing`: the survey's over-smoothing phenomenon as an MLflow run.

Node states of a deep message-passing stack converge to the same vector, up to the degree scaling of
D̃^{1/2} 1, so they stop telling nodes apart. The measure is the Dirichlet energy of the last layer's
states, relative to their squared norm (so weight scale does not count):

    E(H) = Σ_{(u,v)∈E} || h_u / sqrt(1 + d_u) - h_v / sqrt(1 + d_v) ||² / (2 ||H||_F²)

It is computed for stacks of increasing depth at initialisation, with and without residual links, and
logged per depth (step = depth) with a plot.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import torch
import typer

from raycraft import tracking
from raycraft.console import TrackingOpt, console
from raycraft.data.base import DataConfig
from raycraft.errors import UserError
from raycraft.models.gnn import GNNConfig
from raycraft.plots import lines_png
from raycraft.registry import check_compatible, create_model, load_dataset, model_spec

app = typer.Typer()


def dirichlet_energy(h: torch.Tensor, edge_index: torch.Tensor) -> float:
    src, dst = edge_index
    deg = torch.bincount(dst, minlength=len(h)).to(h.dtype)
    scaled = h / torch.sqrt(1 + deg)[:, None]
    return float(((scaled[src] - scaled[dst]) ** 2).sum() / (2 * (h ** 2).sum().clamp(min=1e-30)))


@torch.no_grad()
def oversmoothing_curve(model: str, dataset: str, depths: list[int], residual: bool, seed: int = 0,
                        hidden: int = 16) -> list[float]:
    """Relative Dirichlet energy of the node states of `model` stacks of each depth, at initialisation."""
    splits = load_dataset(dataset, DataConfig())
    x, edge_index, edge_attr, *_ = splits.train[torch.arange(len(splits.train))]
    energies = []
    for depth in depths:
        torch.manual_seed(seed)
        net = create_model(model, GNNConfig(layers=depth, hidden=hidden, residual=residual, dropout=0.0),
                           splits.info).eval()
        energies.append(dirichlet_energy(net.embed(x, edge_index, edge_attr), edge_index))
    return energies


@app.command("oversmoothing")
def oversmoothing(
    model: Annotated[str, typer.Option(help="Graph model: gcn, mpnn or gin.")] = "gcn",
    dataset: Annotated[str, typer.Option(help="Graph dataset.")] = "karate",
    depths: Annotated[str, typer.Option(help="Comma-separated depths.")] = "1,2,4,8,16,32,64",
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "raycraft",
    tracking_uri: TrackingOpt = None,
):
    """Dirichlet energy of node states against depth, with and without residual links, logged to MLflow."""
    if model_spec(model).family != "graph":
        raise UserError(f"--model: {model!r} is not a graph model; use gcn, mpnn or gin.")
    check_compatible(model, dataset)
    try:
        ds = sorted({int(d) for d in depths.split(",")})
    except ValueError:
        raise UserError(f"--depths: {depths!r} is not a comma-separated list of integers.") from None
    if not ds or ds[0] < 1:
        raise UserError(f"--depths: {depths!r}: depths must be at least 1.")
    curves = {name: oversmoothing_curve(model, dataset, ds, residual)
              for name, residual in (("plain", False), ("residual", True))}
    uri = tracking.resolve_tracking_uri(tracking_uri)
    params = {"model": model, "dataset": dataset, "depths": ",".join(map(str, ds))}
    run = tracking.Run.start(uri, experiment, f"oversmoothing-{model}-{dataset}", params,
                             {"raycraft.kind": "oversmoothing"}, "")
    for i, d in enumerate(ds):
        run.log_metrics({f"dirichlet_energy_{name}": es[i] for name, es in curves.items()}, step=d)
    with tempfile.TemporaryDirectory() as tmp:
        lines_png(ds, curves, Path(tmp) / "oversmoothing.png", "depth (layers)", "relative Dirichlet energy",
                  f"over-smoothing: {model} on {dataset}", logy=True)
        run.log_artifacts(tmp, "plots")
    run.end()
    for d, *es in zip(ds, *curves.values(), strict=True):
        console.print(f"depth {d:3d}  plain {es[0]:.3e}  residual {es[1]:.3e}")
    console.print(f"MLflow run {run.run_id}")
