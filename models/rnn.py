"""Recurrent language models: Elman RNN, LSTM and AWD-LSTM, written step by step as the survey's equations.

Elman RNN:   h_t = tanh(W_xh x_t + W_hh h_{t-1} + b),          y_t = W_hy h_t + c
LSTM:        f_t = sigma(W_f x_t + U_f h_{t-1} + b_f)            forget gate
             i_t = sigma(W_i x_t + U_i h_{t-1} + b_i)            input gate
             g_t = tanh (W_g x_t + U_g h_{t-1} + b_g)            candidate cell
             o_t = sigma(W_o x_t + U_o h_{t-1} + b_o)            output gate
             c_t = f_t * c_{t-1} + i_t * g_t                     cell update
             h_t = o_t * tanh(c_t)                               hidden update
AWD-LSTM (Merity et al. 2018): DropConnect on the hidden-to-hidden weights U (one mask per sequence),
variational dropout (one mask per sequence, shared over time) on embeddings and between layers, and
the decoder tied to the embedding (W_hy = E).

Input tokens enter as e_t = E^T x_t (an embedding lookup). Truncated BPTT: a window of data.seq_len
tokens is one update; within it, `bptt` detaches the state every `bptt` steps so gradients reach back at
most that far while the state itself carries across the window.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from raycraft.errors import UserError
from raycraft.registry import field_doc, register_model


class ElmanLayer(nn.Module):
    def __init__(self, d_in: int, d_hidden: int) -> None:
        super().__init__()
        self.W_xh = nn.Linear(d_in, d_hidden)  # its bias is b
        self.W_hh = nn.Linear(d_hidden, d_hidden, bias=False)

    def forward(self, x: torch.Tensor, bptt: int | None = None) -> torch.Tensor:  # (B, T, d_in) -> (B, T, H)
        xs = self.W_xh(x)  # W_xh x_t + b for every t at once
        h = x.new_zeros(x.shape[0], self.W_hh.in_features)
        out = []
        for t in range(x.shape[1]):
            if bptt and t % bptt == 0:
                h = h.detach()
            h = torch.tanh(xs[:, t] + self.W_hh(h))
            out.append(h)
        return torch.stack(out, dim=1)


class LSTMLayer(nn.Module):
    """Stacked gate weights: rows [input | forget | candidate | output] of W (d_in) and U (H), the layout
    torch.nn.LSTM uses, so its weights copy over one to one."""

    def __init__(self, d_in: int, d_hidden: int, weight_drop: float = 0.0) -> None:
        super().__init__()
        self.W = nn.Linear(d_in, 4 * d_hidden)  # W_i, W_f, W_g, W_o and the biases b_*
        self.U = nn.Parameter(torch.empty(4 * d_hidden, d_hidden))  # U_i, U_f, U_g, U_o
        self.weight_drop = weight_drop
        bound = d_hidden ** -0.5
        nn.init.uniform_(self.W.weight, -bound, bound)
        nn.init.uniform_(self.W.bias, -bound, bound)
        nn.init.uniform_(self.U, -bound, bound)

    def forward(self, x: torch.Tensor, bptt: int | None = None) -> torch.Tensor:  # (B, T, d_in) -> (B, T, H)
        H = self.U.shape[1]
        U = F.dropout(self.U, self.weight_drop, self.training) if self.weight_drop else self.U  # DropConnect
        wx = self.W(x)  # (B, T, 4H): W x_t + b for every t at once
        h = x.new_zeros(x.shape[0], H)
        c = x.new_zeros(x.shape[0], H)
        out = []
        for t in range(x.shape[1]):
            if bptt and t % bptt == 0:
                h, c = h.detach(), c.detach()
            z = wx[:, t] + h @ U.T
            input_gate = torch.sigmoid(z[:, :H])
            forget_gate = torch.sigmoid(z[:, H:2 * H])
            candidate = torch.tanh(z[:, 2 * H:3 * H])
            output_gate = torch.sigmoid(z[:, 3 * H:])
            c = forget_gate * c + input_gate * candidate
            h = output_gate * torch.tanh(c)
            out.append(h)
        return torch.stack(out, dim=1)


def variational_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """One dropout mask per sequence, shared over all time steps: x (B, T, D) * m (B, 1, D) / (1 - p)."""
    if not training or p == 0:
        return x
    mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1 - p) / (1 - p)
    return x * mask


@dataclass
class RNNConfig:
    d_embed: int = field_doc(256, "Size of the token embedding e_t = E^T x_t.")
    hidden: int = field_doc(512, "Hidden units per layer (the last layer has d_embed units when tied).")
    layers: int = field_doc(1, "Stacked recurrent layers.")
    dropout: float = field_doc(0.1, "Variational dropout on embeddings, between layers and before the decoder.")
    bptt: int = field_doc(0, "Detach the state every bptt steps inside a window (0: backprop the whole window).")
    tie_weights: bool = field_doc(False, "Decoder W_hy shares the embedding E (needs the last layer = d_embed).")

    def __post_init__(self) -> None:
        for name in ("d_embed", "hidden", "layers"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: {getattr(self, name)} must be at least 1.")
        if not 0 <= self.dropout < 1:
            raise UserError(f"dropout: {self.dropout} must be in [0, 1).")
        if self.bptt < 0:
            raise UserError(f"bptt: {self.bptt} must be >= 0.")


@dataclass
class AWDLSTMConfig(RNNConfig):
    layers: int = field_doc(3, "Stacked LSTM layers.")
    hidden: int = field_doc(512, "Hidden units of the inner layers (the last has d_embed units, for tying).")
    dropout: float = field_doc(0.25, "Variational dropout on embeddings, between layers and before the decoder.")
    weight_drop: float = field_doc(0.3, "DropConnect probability on each hidden-to-hidden matrix U.")
    tie_weights: bool = field_doc(True, "Decoder W_hy shares the embedding E.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.weight_drop < 1:
            raise UserError(f"weight_drop: {self.weight_drop} must be in [0, 1).")


class RNNLanguageModel(nn.Module):
    def __init__(self, cell: str, cfg: RNNConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.E = nn.Embedding(vocab_size, cfg.d_embed)
        sizes = [cfg.d_embed] + [cfg.hidden] * cfg.layers
        if cfg.tie_weights:
            sizes[-1] = cfg.d_embed
        weight_drop = getattr(cfg, "weight_drop", 0.0)
        self.layers = nn.ModuleList(
            ElmanLayer(a, b) if cell == "elman" else LSTMLayer(a, b, weight_drop)
            for a, b in pairwise(sizes))
        self.W_hy = nn.Linear(sizes[-1], vocab_size)  # its bias is c
        if cfg.tie_weights:
            self.W_hy.weight = self.E.weight

    def forward(self, x: torch.Tensor, with_aux: bool = False):  # (B, T) ids -> (B, T, V) logits
        h = variational_dropout(self.E(x), self.cfg.dropout, self.training)
        for layer in self.layers:
            h = variational_dropout(layer(h, self.cfg.bptt or None), self.cfg.dropout, self.training)
        logits = self.W_hy(h)
        return (logits, logits.new_zeros(())) if with_aux else logits


def vocab_size(data_info: dict) -> int:
    if "vocab_size" not in data_info:
        raise UserError("dataset: sequence models need a text dataset (one that reports vocab_size).")
    return int(data_info["vocab_size"])





# Trainer defaults for the README examples on `shakespeare`: one play for validation, three for test,
# 3 epochs of `train_windows` random windows (the LSTM's: about 15 minutes on one CPU core).
def _recipe(lr: float, seq_len: int, batch_size: int, train_windows: int, **optim) -> dict:
    return {"epochs": 3, "batch_size": batch_size,
            "optim": {"name": "adamw", "lr": lr, "grad_clip": 1.0, "warmup_epochs": 0.05, "min_lr_ratio": 0.1,
                      **optim},
            "data": {"seq_len": seq_len, "train_windows": train_windows, "val_fraction": 0.03,
                     "test_fraction": 0.08}}


@register_model("elman_rnn", family="sequence", config=RNNConfig, task="language-model",
                recipe=_recipe(2e-3, 64, 64, 6400))
def elman_rnn(cfg: RNNConfig, data_info: dict) -> RNNLanguageModel:
    """Elman RNN: h_t = tanh(W_xh x_t + W_hh h_{t-1} + b), y_t = W_hy h_t + c."""
    return RNNLanguageModel("elman", cfg, vocab_size(data_info))


@register_model("lstm", family="sequence", config=RNNConfig, task="language-model",
                recipe={**_recipe(4e-3, 64, 64, 10000), "model_args": {"hidden": 256, "d_embed": 64, "dropout": 0.0}})
def lstm(cfg: RNNConfig, data_info: dict) -> RNNLanguageModel:
    """LSTM written gate by gate (forget, input, candidate, output; cell and hidden updates)."""
    return RNNLanguageModel("lstm", cfg, vocab_size(data_info))


@register_model("awd_lstm", family="sequence", config=AWDLSTMConfig, task="language-model",
                recipe=_recipe(3e-3, 64, 64, 6400, weight_decay=1.2e-6))
def awd_lstm(cfg: AWDLSTMConfig, data_info: dict) -> RNNLanguageModel:
    """AWD-LSTM: LSTM with DropConnect on U, variational dropout and tied embedding/decoder weights."""
    return RNNLanguageModel("lstm", cfg, vocab_size(data_info))
