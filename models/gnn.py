"""Graph neural networks as message passing, implemented with scatter (index_add / scatter_reduce) over
an edge list, so memory and time grow with the number of edges E, not V^2:

    h_v^(k) = update( h_v^(k-1), aggregate({ (h_u^(k-1), e_uv) : u in N(v) }) )

GCN (Kipf & Welling 2017):  H' = σ( D̃^{-1/2} Ã D̃^{-1/2} H Θ ),  Ã = A + I,  D̃_vv = Σ_u Ã_vu
MPNN (Gilmer et al. 2017):  m_v = AGG_{u∈N(v)} ReLU(W_msg [h_u ; e_uv]),  h_v' = ReLU(W_upd [h_v ; m_v]),
                            AGG in {sum, mean, max}
GIN (Xu et al. 2019):       h_v' = MLP( (1 + ε) h_v + Σ_{u∈N(v)} h_u )
Residual option:            h^(k) = h^(k-1) + layer(h^(k-1)) where the widths agree.

Node-level data gets per-node logits from a linear head; graph-level data pools the last layer's node
states per graph (sum or mean readout) first. Edges run from edge_index[0] (u) to edge_index[1] (v).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from raycraft.errors import UserError
from raycraft.registry import field_doc, register_model


def check_graph(num_nodes: int, edge_index: torch.Tensor, edge_attr: torch.Tensor | None = None) -> None:
    """UserError unless edge_index is (2, E) integer node ids in [0, num_nodes) and edge_attr has E rows."""
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise UserError(f"edge_index: expected shape (2, E), got {tuple(edge_index.shape)}.")
    if edge_index.dtype.is_floating_point or edge_index.dtype == torch.bool:
        raise UserError(f"edge_index: node ids must be integers, got {edge_index.dtype}.")
    if edge_index.numel():
        lo, hi = int(edge_index.min()), int(edge_index.max())
        if lo < 0 or hi >= num_nodes:
            bad = lo if lo < 0 else hi
            raise UserError(f"edge_index: node id {bad} is out of range for a graph of {num_nodes} nodes "
                            f"(valid ids 0..{num_nodes - 1}).")
    if edge_attr is not None and edge_attr.shape[0] != edge_index.shape[1]:
        raise UserError(f"edge_attr: {edge_attr.shape[0]} rows for {edge_index.shape[1]} edges.")


REDUCE = {"mean": "mean", "max": "amax"}


def scatter(src: torch.Tensor, index: torch.Tensor, num: int, reduce: str = "sum") -> torch.Tensor:
    """out[i] = reduce over {src[e] : index[e] = i} for rows src (E, d); rows no edge reaches are 0."""
    out = src.new_zeros(num, src.shape[-1])
    if reduce == "sum":
        return out.index_add_(0, index, src)
    return out.scatter_reduce_(0, index[:, None].expand_as(src), src, REDUCE[reduce], include_self=False)


class GCNLayer(nn.Module):
    """H' = D̃^{-1/2} Ã D̃^{-1/2} H Θ + b (the activation σ is applied by the network)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)   # Θ
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        V = h.shape[0]
        src, dst = edge_index[:, edge_index[0] != edge_index[1]]  # Ã = A + I: exactly one self loop per node
        loops = torch.arange(V, device=h.device)
        src, dst = torch.cat([src, loops]), torch.cat([dst, loops])
        deg = torch.zeros(V, device=h.device, dtype=h.dtype).index_add_(0, dst, torch.ones_like(dst, dtype=h.dtype))
        norm = deg[src].rsqrt() * deg[dst].rsqrt()                # D̃^{-1/2}_vv D̃^{-1/2}_uu per edge
        hw = self.lin(h)                                          # H Θ: (V, d_out)
        return scatter(hw[src] * norm[:, None], dst, V) + self.bias


class MPNNLayer(nn.Module):
    """m_v = AGG_u ReLU(W_msg [h_u ; e_uv]),  h_v' = W_upd [h_v ; m_v]."""

    def __init__(self, d_in: int, d_out: int, edge_dim: int, aggr: str) -> None:
        super().__init__()
        self.W_msg = nn.Linear(d_in + edge_dim, d_out)
        self.W_upd = nn.Linear(d_in + d_out, d_out)
        self.aggr = aggr

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index
        messages = torch.relu(self.W_msg(torch.cat([h[src], edge_attr], -1)))  # (E, d_out)
        m = scatter(messages, dst, h.shape[0], self.aggr)                        # (V, d_out)
        return self.W_upd(torch.cat([h, m], -1))


class GINLayer(nn.Module):
    """h_v' = MLP((1 + ε) h_v + AGG_u h_u), AGG = sum in GIN proper."""

    def __init__(self, d_in: int, d_out: int, aggr: str) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.zeros(()))
        self.mlp = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Linear(d_out, d_out))
        self.aggr = aggr

    def forward(self, h: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        src, dst = edge_index
        return self.mlp((1 + self.eps) * h + scatter(h[src], dst, h.shape[0], self.aggr))


@dataclass
class GNNConfig:
    hidden: int = field_doc(16, "Width of every message-passing layer.")
    layers: int = field_doc(2, "Number of message-passing layers (depth k).")
    aggr: Literal["sum", "mean", "max"] = field_doc("sum", "Neighbour aggregator (mpnn and gin; gcn always sums "
                                                          "with symmetric normalisation).")
    residual: bool = field_doc(False, "Add each layer's input to its output where the widths agree.")
    dropout: float = field_doc(0.5, "Dropout on the input of every layer.")
    readout: Literal["sum", "mean"] = field_doc("sum", "Pooling of node states per graph (graph-level data).")

    def __post_init__(self) -> None:
        if self.layers < 1 or self.hidden < 1:
            raise UserError(f"layers={self.layers}, hidden={self.hidden}: both must be at least 1.")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout: {self.dropout} must be in [0, 1).")


class GNN(nn.Module):
    """forward(x (V, f), edge_index (2, E), edge_attr (E, d_e), graph_index (V,)) -> logits per node or graph."""

    def __init__(self, kind: str, cfg: GNNConfig, data_info: dict[str, Any]) -> None:
        super().__init__()
        d, edge_dim = int(data_info["num_features"]), int(data_info.get("edge_dim", 0))
        self.convs = nn.ModuleList()
        for _ in range(cfg.layers):
            self.convs.append(GCNLayer(d, cfg.hidden) if kind == "gcn" else
                              MPNNLayer(d, cfg.hidden, edge_dim, cfg.aggr) if kind == "mpnn" else
                              GINLayer(d, cfg.hidden, cfg.aggr))
            d = cfg.hidden
        self.head = nn.Linear(d, int(data_info["num_classes"]))
        self.graph_level = data_info.get("level") == "graph"
        self.cfg = cfg

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
        """Node states after the last layer, (V, hidden)."""
        check_graph(len(x), edge_index, edge_attr)
        h = x
        for conv in self.convs:
            out = torch.relu(conv(nn.functional.dropout(h, self.cfg.dropout, self.training), edge_index, edge_attr))
            h = h + out if self.cfg.residual and h.shape == out.shape else out
        return h

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_attr: torch.Tensor,
                graph_index: torch.Tensor) -> torch.Tensor:
        h = self.embed(x, edge_index, edge_attr)
        if self.graph_level:
            h = scatter(h, graph_index, int(graph_index.max()) + 1, self.cfg.readout)
        return self.head(h)


GNN_RECIPE = {"epochs": 100, "optim": {"name": "adam", "lr": 0.01, "weight_decay": 5e-4}}


@register_model("gcn", family="graph", config=GNNConfig, task="graph", recipe=GNN_RECIPE)
def gcn(cfg: GNNConfig, data_info: dict) -> GNN:
    """Graph convolutional network: H' = relu(D^-1/2 (A+I) D^-1/2 H W), scatter-based."""
    return GNN("gcn", cfg, data_info)


@register_model("mpnn", family="graph", config=GNNConfig, task="graph",
                recipe={**GNN_RECIPE, "model_args": {"dropout": 0.0, "hidden": 32}})
def mpnn(cfg: GNNConfig, data_info: dict) -> GNN:
    """Message-passing GNN with edge features and sum, mean or max aggregation."""
    return GNN("mpnn", cfg, data_info)


@register_model("gin", family="graph", config=GNNConfig, task="graph",
                recipe={**GNN_RECIPE, "model_args": {"dropout": 0.0, "hidden": 32}})
def gin(cfg: GNNConfig, data_info: dict) -> GNN:
    """Graph isomorphism network: sum aggregation and an MLP update, as powerful as 1-WL."""
    return GNN("gin", cfg, data_info)
