"""Graph datasets. A batch is the disjoint union of some graphs, as six tensors:

    x (V, f) float32 node features, edge_index (2, E) int64 (row 0 source u, row 1 target v),
    edge_attr (E, d_e) float32 (d_e may be 0), graph_index (V,) int64, y and mask

with y, mask per node (`level` 'node': a split scores the nodes its mask marks) or per graph (`level`
'graph'). `GraphDataset[idx]` builds that union for an index tensor, so the one loop batches graphs
like any other examples; a node-level dataset is one graph, one item per split.

`karate` (networkx) and `wl_pairs` (synthetic) ship here; `edge_list` reads your files; `from_pyg`
converts a PyTorch Geometric `Data` object.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from raycraft.data.base import DataConfig, DataSplits
from raycraft.errors import UserError
from raycraft.models.gnn import check_graph
from raycraft.registry import register_dataset


@dataclass
class Graph:
    x: torch.Tensor           # (V, f)
    edge_index: torch.Tensor  # (2, E)
    edge_attr: torch.Tensor   # (E, d_e)
    y: torch.Tensor           # (V,) node labels, or (1,) the graph's label
    mask: torch.Tensor        # like y: which labels a split scores

    def __post_init__(self) -> None:
        check_graph(len(self.x), self.edge_index, self.edge_attr)


def undirected(edges: torch.Tensor) -> torch.Tensor:
    """(E, 2) pairs -> (2, 2E) edge_index with both directions."""
    return torch.cat([edges.T, edges.T.flip(0)], 1)


class GraphDataset(Dataset):
    """ds[idx] -> (x, edge_index, edge_attr, graph_index, y, mask) of the disjoint union of graphs idx."""

    def __init__(self, graphs: list[Graph]) -> None:
        self.graphs = graphs

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, idx) -> tuple[torch.Tensor, ...]:
        gs = [self.graphs[int(i)] for i in torch.as_tensor(idx).reshape(-1)]
        offsets = torch.tensor([0] + [len(g.x) for g in gs]).cumsum(0)
        return (torch.cat([g.x for g in gs]),
                torch.cat([g.edge_index + off for g, off in zip(gs, offsets, strict=False)], 1),
                torch.cat([g.edge_attr for g in gs]),
                torch.cat([torch.full((len(g.x),), i) for i, g in enumerate(gs)]),
                torch.cat([g.y for g in gs]), torch.cat([g.mask for g in gs]))


def node_splits(g: Graph, labelled: torch.Tensor, val_share: float, seed: int, name: str,
                class_names: list[str]) -> DataSplits:
    """One graph; train on the `labelled` nodes; of the other nodes with a label, `val_share` validate
    and the rest test."""
    rest = torch.nonzero(~labelled & (g.y >= 0)).squeeze(1)
    rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))]
    n_val = int(round(len(rest) * val_share))
    if not labelled.any() or n_val >= len(rest):
        raise UserError(f"data: graph {name!r} leaves no labelled nodes to train on or none to test "
                        f"(validation share {val_share:.2f}).")

    def split(nodes: torch.Tensor) -> GraphDataset:
        mask = torch.zeros(len(g.x), dtype=torch.bool)
        mask[nodes] = True
        return GraphDataset([replace(g, mask=mask)])

    info = {"level": "node", "num_features": g.x.shape[1], "edge_dim": g.edge_attr.shape[1],
            "num_classes": len(class_names), "class_names": class_names, "name": name}
    return DataSplits(split(labelled), split(rest[:n_val]), split(rest[n_val:]), info)


def graph_splits(graphs: list[Graph], cfg: DataConfig, class_names: list[str]) -> DataSplits:
    perm = torch.randperm(len(graphs), generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
    n_test = int(round(len(graphs) * cfg.test_fraction))
    n_val = int(round((len(graphs) - n_test) * cfg.val_fraction))
    parts = [perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]]
    test, val, train = (GraphDataset([graphs[i] for i in p]) for p in parts)
    g = graphs[0]
    info = {"level": "graph", "num_features": g.x.shape[1], "edge_dim": g.edge_attr.shape[1],
            "num_classes": len(class_names), "class_names": class_names}
    return DataSplits(train, val, test, info)


def _networkx():
    """networkx, on first use: it is the `ssm` extra, and registering the graph datasets must not need it."""
    import networkx  # the `ssm` extra, which a core install lacks

    return networkx


def karate_graph() -> tuple[Graph, list[str]]:
    """Zachary's karate club: 34 members, 78 friendships weighted by shared activities, label = the club
    each member joined after the split; features are one-hot member ids (as in Kipf & Welling 2017)."""
    G = _networkx().karate_club_graph()
    clubs = sorted({G.nodes[v]["club"] for v in G})
    y = torch.tensor([clubs.index(G.nodes[v]["club"]) for v in G])
    pairs = torch.tensor(list(G.edges()))
    weight = torch.tensor([G.edges[e].get("weight", 1) for e in G.edges()], dtype=torch.float32)
    edge_attr = torch.cat([weight, weight])[:, None] / weight.max()
    return Graph(torch.eye(len(y)), undirected(pairs), edge_attr, y, torch.ones(len(y), dtype=torch.bool)), clubs


@register_dataset("karate", task="graph", extra="ssm")
def karate(cfg: DataConfig) -> DataSplits:
    """Zachary's karate club (networkx): which club each of 34 members joins, 2 labelled per club."""
    g, clubs = karate_graph()
    labelled = torch.zeros(len(g.y), dtype=torch.bool)
    labelled[[0, 1, 32, 33]] = True  # the two leaders and one close follower of each
    return node_splits(g, labelled, cfg.val_fraction, cfg.split_seed, "karate", clubs)


def regular_graph(n: int, degree: int, seed: int, split_cycle: bool = False) -> Graph:
    """An unlabelled `degree`-regular graph on n nodes, constant features; with degree 2, one n-cycle or
    (split_cycle) two n/2-cycles: 1-WL gives every node of both the same colour at every round."""
    nx = _networkx()
    if degree == 2:
        G = nx.disjoint_union(nx.cycle_graph(n // 2), nx.cycle_graph(n // 2)) if split_cycle else nx.cycle_graph(n)
    else:
        G = nx.random_regular_graph(degree, n, seed=seed)
    pairs = torch.tensor(list(G.edges()))
    return Graph(torch.ones(n, 1), undirected(pairs), torch.zeros(2 * len(pairs), 0),
                 torch.tensor([degree - 2]), torch.ones(1, dtype=torch.bool))


@register_dataset("wl_pairs", task="graph", extra="ssm")
def wl_pairs(cfg: DataConfig) -> DataSplits:
    """Synthetic: 400 featureless 2-regular vs 3-regular graphs (6-16 nodes); a mean or max aggregator cannot
    tell them apart, sum can; 1-WL-indistinguishable pairs (C_n vs two C_n/2) sit inside a class."""
    rng = np.random.default_rng(cfg.split_seed)
    graphs = []
    for i in range(400):
        n = int(rng.choice([6, 8, 10, 12, 14, 16]))
        graphs.append(regular_graph(n, 2, i, split_cycle=bool(i % 4 == 0)) if i % 2 == 0
                      else regular_graph(n, 3, i))
    return graph_splits(graphs, cfg, ["2-regular", "3-regular"])


def from_pyg(data, labelled: torch.Tensor | None = None) -> Graph:
    """A PyTorch Geometric `Data` (x, edge_index, optional edge_attr, y) as a raycraft Graph."""
    n = int(data.num_nodes)
    x = data.x.float() if data.x is not None else torch.ones(n, 1)
    ea = data.edge_attr
    ea = torch.zeros(data.edge_index.shape[1], 0) if ea is None else ea.float().reshape(len(ea), -1)
    y = data.y.long() if data.y is not None else torch.full((n,), -1)
    return Graph(x, data.edge_index.long(), ea, y, y >= 0 if labelled is None else labelled)


def read_edge_list(folder: Path) -> tuple[Graph, list[str]]:
    """edges.txt: 'u v [edge features...]' per line (ids 0..V-1, undirected); labels.txt: 'node label' per
    line; optional features.txt: one row of node features per node, else one-hot node ids."""
    def rows(name: str) -> np.ndarray:
        try:
            return np.atleast_2d(np.loadtxt(folder / name, comments="#"))
        except (OSError, ValueError) as exc:
            raise UserError(f"--data-dir: cannot read {folder / name}: {exc}") from None

    edges, labels = rows("edges.txt"), rows("labels.txt")
    if edges.shape[1] < 2 or labels.shape[1] != 2:
        raise UserError("--data-dir: edges.txt needs 'u v' per line and labels.txt 'node label' per line.")
    n = int(max(edges[:, :2].max(), labels[:, 0].max())) + 1
    x = torch.as_tensor(rows("features.txt"), dtype=torch.float32) if (folder / "features.txt").is_file() \
        else torch.eye(n)
    names = sorted({str(int(v)) for v in labels[:, 1]})
    y = torch.full((len(x),), -1)
    y[torch.as_tensor(labels[:, 0]).long()] = torch.tensor([names.index(str(int(v))) for v in labels[:, 1]])
    feats = torch.as_tensor(edges[:, 2:], dtype=torch.float32)
    return Graph(x, undirected(torch.as_tensor(edges[:, :2]).long()), torch.cat([feats, feats]), y,
                 y >= 0), names


@register_dataset("edge_list", task="graph", needs_data_dir=True)
def edge_list(cfg: DataConfig) -> DataSplits:
    """Your graph from --data-dir (edges.txt, labels.txt, optional features.txt); node classification."""
    g, names = read_edge_list(Path(cfg.data_dir or ""))
    known = torch.nonzero(g.y >= 0).squeeze(1)
    known = known[torch.randperm(len(known), generator=torch.Generator().manual_seed(cfg.split_seed))]
    labelled = torch.zeros(len(g.y), dtype=torch.bool)
    held_out = cfg.val_fraction + cfg.test_fraction
    labelled[known[int(round(len(known) * held_out)):]] = True
    return node_splits(g, labelled, cfg.val_fraction / max(held_out, 1e-9), cfg.split_seed, "edge_list", names)
