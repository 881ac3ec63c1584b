"""Graph layers against references (PyG's GCNConv, dense formulas), graph data, bad graphs, 1-WL."""

from __future__ import annotations

import pytest
import torch

from raycraft.data.base import DataConfig
from raycraft.data.graphs import Graph, GraphDataset, from_pyg, regular_graph
from raycraft.errors import UserError
from raycraft.models.gnn import GCNLayer, GINLayer, GNNConfig, MPNNLayer, scatter
from raycraft.registry import create_model, load_dataset


def _random_graph(V: int, E: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (2, E), generator=g)


def test_gcn_layer_equals_pyg_gcnconv():
    pyg = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    V, d_in, d_out = 30, 7, 5
    edge_index = _random_graph(V, 90)
    edge_index[:, :3] = torch.tensor([[4, 5, 6], [4, 5, 6]])  # existing self loops are not doubled
    x = torch.randn(V, d_in)
    ref = pyg.GCNConv(d_in, d_out)
    ours = GCNLayer(d_in, d_out)
    with torch.no_grad():
        ref.bias.normal_()
        ours.lin.weight.copy_(ref.lin.weight)
        ours.bias.copy_(ref.bias)
    assert torch.allclose(ours(x, edge_index, torch.zeros(90, 0)), ref(x, edge_index), atol=1e-5)


def test_gcn_layer_equals_the_dense_formula():
    torch.manual_seed(1)
    V = 12
    A = (torch.rand(V, V) < 0.3).float().triu(1)
    A = A + A.T
    x = torch.randn(V, 4)
    layer = GCNLayer(4, 3)
    A_tilde = A + torch.eye(V)
    D_inv_sqrt = torch.diag(A_tilde.sum(1).rsqrt())
    dense = D_inv_sqrt @ A_tilde @ D_inv_sqrt @ x @ layer.lin.weight.T + layer.bias
    assert torch.allclose(layer(x, A.nonzero().T, torch.zeros(int(A.sum()), 0)), dense, atol=1e-5)


@pytest.mark.parametrize("aggr", ["sum", "mean", "max"])
def test_mpnn_aggregators_match_a_per_node_loop(aggr):
    torch.manual_seed(2)
    V, E = 9, 25
    edge_index, edge_attr, h = _random_graph(V, E, 3), torch.randn(E, 2), torch.randn(V, 4)
    layer = MPNNLayer(4, 6, 2, aggr)
    out = layer(h, edge_index, edge_attr)
    reduce = {"sum": lambda m: m.sum(0), "mean": lambda m: m.mean(0), "max": lambda m: m.max(0).values}[aggr]
    for v in range(V):
        incoming = (edge_index[1] == v).nonzero().squeeze(1)
        msgs = torch.relu(layer.W_msg(torch.cat([h[edge_index[0, incoming]], edge_attr[incoming]], -1)))
        m_v = reduce(msgs) if len(incoming) else torch.zeros(6)
        assert torch.allclose(out[v], layer.W_upd(torch.cat([h[v], m_v])), atol=1e-5)


def test_gin_layer_is_mlp_of_self_plus_neighbour_sum():
    torch.manual_seed(3)
    V = 8
    edge_index, h = _random_graph(V, 20, 4), torch.randn(V, 3)
    layer = GINLayer(3, 5, "sum")
    with torch.no_grad():
        layer.eps.fill_(0.25)
    A = torch.zeros(V, V).index_put_((edge_index[1], edge_index[0]), torch.ones(20), accumulate=True)
    assert torch.allclose(layer(h, edge_index, None), layer.mlp(1.25 * h + A @ h), atol=1e-5)


def test_scatter_scales_to_100k_edges():
    """A 3-layer residual MPNN with edge features, forward and backward on 20k nodes / 100k edges."""
    V, E = 20_000, 100_000
    info = {"num_features": 8, "edge_dim": 2, "num_classes": 3, "level": "node"}
    model = create_model("mpnn", GNNConfig(layers=3, hidden=16, residual=True), info)
    x, edge_index, edge_attr = torch.randn(V, 8), _random_graph(V, E, 5), torch.randn(E, 2)
    logits = model(x, edge_index, edge_attr, torch.zeros(V, dtype=torch.long))
    logits.logsumexp(-1).mean().backward()
    assert logits.shape == (V, 3) and all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert torch.allclose(scatter(torch.ones(E, 1), edge_index[1], V)[:, 0], torch.bincount(edge_index[1], minlength=V)
                          .float())


def test_bad_graphs_are_user_errors():
    model = create_model("gcn", GNNConfig(), {"num_features": 2, "num_classes": 2, "level": "node"})
    x = torch.randn(4, 2)
    with pytest.raises(UserError, match="node id 4 is out of range for a graph of 4 nodes"):
        model(x, torch.tensor([[0, 1], [1, 4]]), torch.zeros(2, 0), torch.zeros(4, dtype=torch.long))
    with pytest.raises(UserError, match="node id -1"):
        Graph(x, torch.tensor([[0, -1], [1, 2]]), torch.zeros(2, 0), torch.zeros(4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(UserError, match=r"expected shape \(2, E\)"):
        Graph(x, torch.tensor([0, 1, 2]), torch.zeros(3, 0), torch.zeros(4), torch.ones(4, dtype=torch.bool))
    with pytest.raises(UserError, match="edge_attr: 3 rows for 2 edges"):
        Graph(x, torch.tensor([[0, 1], [1, 2]]), torch.zeros(3, 1), torch.zeros(4), torch.ones(4, dtype=torch.bool))


def test_karate_and_wl_pairs_batch_through_index_tensors():
    s = load_dataset("karate", DataConfig())
    x, edge_index, edge_attr, graph_index, y, mask = s.train[torch.tensor([0])]
    assert x.shape == (34, 34) and edge_index.shape == (2, 156) and edge_attr.shape == (156, 1)
    assert mask.sum() == 4 and s.info["level"] == "node" and s.info["num_classes"] == 2
    masks = [d.graphs[0].mask for d in (s.train, s.val, s.test)]
    assert sum(m.long() for m in masks).max() == 1 and sum(int(m.sum()) for m in masks) == 34
    w = load_dataset("wl_pairs", DataConfig())
    x, edge_index, _, graph_index, y, mask = w.train[torch.tensor([0, 5, 7])]
    assert graph_index.max() == 2 and y.shape == (3,) and edge_index.max() < len(x)
    assert len(w.train) + len(w.val) + len(w.test) == 400 and w.info["level"] == "graph"


def test_from_pyg_and_edge_list(tmp_path):
    pyg_data = pytest.importorskip("torch_geometric.data")
    d = pyg_data.Data(x=torch.randn(3, 2), edge_index=torch.tensor([[0, 1], [1, 2]]), y=torch.tensor([0, 1, 1]))
    g = from_pyg(d)
    assert g.edge_attr.shape == (2, 0) and g.mask.all() and torch.equal(g.y, torch.tensor([0, 1, 1]))
    (tmp_path / "edges.txt").write_text("0 1 0.5\n1 2 1.0\n2 3 2.0\n3 4 1.0\n4 5 1.0\n5 0 1.0\n")
    (tmp_path / "labels.txt").write_text("".join(f"{v} {v % 2}\n" for v in range(6)))
    s = load_dataset("edge_list", DataConfig(data_dir=str(tmp_path), val_fraction=0.2, test_fraction=0.4))
    x, edge_index, edge_attr, *_ = s.train[torch.tensor([0])]
    assert x.shape == (6, 6) and edge_index.shape == (2, 12) and edge_attr[:, 0].tolist()[:2] == [0.5, 1.0]
    (tmp_path / "features.txt").write_text("1 0\n" * 6)  # six nodes, so node 9 is out of range
    (tmp_path / "edges.txt").write_text("0 9\n")
    with pytest.raises(UserError, match="node id 9 is out of range for a graph of 6 nodes"):
        load_dataset("edge_list", DataConfig(data_dir=str(tmp_path)))


def wl_colours(g: Graph, rounds: int = 3) -> list[tuple]:
    """1-WL colour refinement: each round a node's colour becomes (colour, sorted multiset of neighbours')."""
    colours = [()] * len(g.x)
    for _ in range(rounds):
        colours = [(c, tuple(sorted(colours[u] for u in g.edge_index[0][g.edge_index[1] == v].tolist())))
                   for v, c in enumerate(colours)]
    return sorted(colours)


def test_1wl_limit_every_message_passing_network_confuses_what_1wl_confuses():
    """C_6 and two triangles: 1-WL gives the same colours, so even a sum GIN embeds them identically;
    a 3-regular graph differs from both for 1-WL and for sum aggregation, but not for mean or max."""
    hexagon, triangles, cubic = regular_graph(6, 2, 0), regular_graph(6, 2, 0, split_cycle=True), regular_graph(6, 3, 0)
    assert wl_colours(hexagon) == wl_colours(triangles) != wl_colours(cubic)
    info = {"num_features": 1, "num_classes": 2, "level": "graph"}
    torch.manual_seed(0)

    def embed(model, g):
        x, ei, ea, gi, *_ = GraphDataset([g])[torch.tensor([0])]
        return model.eval()(x, ei, ea, gi)

    for aggr in ("sum", "mean", "max"):
        model = create_model("gin", GNNConfig(aggr=aggr, hidden=8, readout="mean"), info)
        assert torch.allclose(embed(model, hexagon), embed(model, triangles))
        same_as_cubic = torch.allclose(embed(model, hexagon), embed(model, cubic))
        assert same_as_cubic == (aggr != "sum")


def test_oversmoothing_deep_gcn_states_collapse_and_residual_links_slow_it():
    from raycraft.graph.commands import oversmoothing_curve

    depths = [1, 4, 16, 32]
    plain = oversmoothing_curve("gcn", "karate", depths, residual=False)
    residual = oversmoothing_curve("gcn", "karate", depths, residual=True)
    assert plain == sorted(plain, reverse=True) and plain[-1] < 1e-3 * plain[0]
    assert all(r > p for r, p in zip(residual[1:], plain[1:], strict=True))


def test_oversmoothing_command_logs_a_run(mlflow_uri):
    from mlflow.tracking import MlflowClient
    from typer.testing import CliRunner

    from raycraft.cli import app

    result = CliRunner().invoke(app, ["oversmoothing", "--depths", "1,2,8", "--tracking-uri", mlflow_uri])
    assert result.exit_code == 0, result.output
    run_id = result.output.split("MLflow run ")[1].split()[0]
    client = MlflowClient(mlflow_uri)
    assert [m.step for m in client.get_metric_history(run_id, "dirichlet_energy_plain")] == [1, 2, 8]
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/oversmoothing.png"]
