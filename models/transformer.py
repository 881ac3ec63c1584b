"""The Transformer (Vaswani et al. 2017) and its variants, as one model with config switches.

Each block (post-norm, the paper's form; pre-norm moves the norm inside the residual branch):

    post-norm   X = Norm(X + MultiHead(X)),        X = Norm(X + FFN(X))
    pre-norm    X = X + MultiHead(Norm(X)),        X = X + FFN(Norm(X)),   then Norm at the end
    FFN(x) = W_2 relu(W_1 x + b_1) + b_2

Token embedding e_i = √d E^T x_i (the paper scales by √d_model so that the small embedding entries are not
drowned by the position table); logits = E h (tied) or W_out h. Switches (see `raycraft models --details
transformer`): causal (decoder-only) or bidirectional (encoder), attention kind and position kind
(`models/attention.py`), Norm = LayerNorm or dynamic tanh gamma * tanh(alpha x) + beta, and:

Mixture of experts (Shazeer et al. 2017; Switch when k = 1): p = softmax(W_r x); the FFN becomes
sum over the top-k experts e of g_e FFN_e(x), g = p renormalised over the top k. Load balancing (Switch):
aux = coef * N_experts * sum_e f_e P_e, f_e the share of routing choices sent to e, P_e the mean of p_e.
Every expert runs on every token and the gates zero the rest: exact, exportable, and N_experts times the
FFN cost (a dispatching implementation would skip the zeros).

LoRA (Hu et al. 2022) on the attention projections: W x + (alpha / r) B A x with A (r x d_in), B (d_out x r),
B = 0 at the start; the base weights are frozen; `merge_lora()` folds B A into W for inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from raycraft.errors import UserError
from raycraft.models.attention import Attention, AttentionKind, PositionKind, RelativeBias, sinusoidal_table
from raycraft.models.layers import DynamicTanh
from raycraft.models.rnn import vocab_size
from raycraft.registry import field_doc, register_model


@dataclass
class MoEConfig:
    experts: int = field_doc(0, "Experts per FFN (0: one dense FFN).")
    top_k: int = field_doc(2, "Experts each token is routed to (1: Switch Transformer).")
    balance_coef: float = field_doc(0.01, "Weight of the load-balancing loss.")


@dataclass
class LoRAConfig:
    rank: int = field_doc(0, "Rank r of the low-rank update on the q, k, v, o projections (0: no LoRA).")
    alpha: float = field_doc(16.0, "Scale alpha; the update is (alpha / r) B A.")


@dataclass
class TransformerConfig:
    d_model: int = field_doc(128, "Model width d.")
    n_heads: int = field_doc(4, "Attention heads; must divide d_model.")
    n_layers: int = field_doc(4, "Blocks.")
    d_ff: int = field_doc(512, "Hidden width of the position-wise FFN.")
    dropout: float = field_doc(0.1, "Dropout on the embeddings and the residual branches.")
    attn_dropout: float | None = field_doc(
        None, "Dropout on the attention weights (None: `dropout`). On CPU any non-zero value moves torch's "
              "attention from its fused kernel to a slower one (benchmarks/lm_step.py).")
    causal: bool = field_doc(True, "Decoder-only (each token sees its past); false: bidirectional encoder.")
    norm_position: Literal["pre", "post"] = field_doc("pre", "LayerNorm after the residual add (post, the "
                                                             "paper's) or inside the branch (pre).")
    norm: Literal["layernorm", "dyt"] = field_doc("layernorm", "LayerNorm, or dynamic tanh in its place.")
    position: PositionKind = field_doc(
        "sinusoidal", "Position information: added sinusoidal table or learned vectors, T5 relative bias, rotary.")
    attention: AttentionKind = field_doc(
        "full", "Attention: full softmax, sparse (sliding window, BigBird) or linear-cost (Performer, Linformer).")
    window: int = field_doc(64, "Sliding-window and BigBird: keys within this distance.")
    n_global: int = field_doc(2, "BigBird: global tokens (0: none).", minimum=0)
    n_random: int = field_doc(2, "BigBird: random keys per query (0: none).", minimum=0)
    n_features: int = field_doc(64, "Performer: random features m.")
    proj_len: int = field_doc(64, "Linformer: projected length k of keys and values.")
    max_len: int = field_doc(0, "Longest sequence (learned positions, Linformer); 0: the dataset's seq_len.")
    tie_weights: bool = field_doc(True, "Output layer shares the token embedding E.")
    moe: MoEConfig = field_doc(doc="Mixture-of-experts FFN.", factory=MoEConfig)
    lora: LoRAConfig = field_doc(doc="LoRA adapters on the attention projections.", factory=LoRAConfig)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "n_layers", "d_ff", "window", "n_features", "proj_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: {getattr(self, name)} must be at least 1.")
        if self.d_model % self.n_heads:
            raise UserError(f"n_heads: {self.n_heads} does not divide d_model={self.d_model}; pick n_heads "
                            f"among {[h for h in range(1, self.d_model + 1) if self.d_model % h == 0][:12]}.")
        if self.position == "rotary" and (self.d_model // self.n_heads) % 2:
            raise UserError(f"position: rotary needs an even head size; d_model/n_heads = "
                            f"{self.d_model // self.n_heads}.")
        if self.position == "relative" and self.attention in ("performer", "linformer"):
            raise UserError(f"position: 'relative' adds a bias to explicit scores, which attention="
                            f"{self.attention!r} never forms; use sinusoidal, learned or rotary.")
        if self.attention == "linformer" and self.causal:
            raise UserError("attention: 'linformer' projects along the whole sequence, so it cannot be causal; "
                            "set causal=false (an encoder) or pick full, sliding, bigbird or performer.")
        for name in ("dropout", "attn_dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise UserError(f"{name}: {value} must be in [0, 1).")
        if self.moe.experts < 0 or (self.moe.experts and not 1 <= self.moe.top_k <= self.moe.experts):
            raise UserError(f"moe.top_k: {self.moe.top_k} must be between 1 and moe.experts={self.moe.experts}.")
        if self.lora.rank < 0 or self.lora.rank > self.d_model:
            raise UserError(f"lora.rank: {self.lora.rank} is larger than the {self.d_model}x{self.d_model} "
                            f"attention projections it adapts; use 0 < rank <= {self.d_model}.")


class LoRALinear(nn.Linear):
    """y = W x + b + (alpha / r) B A x with W, b frozen; after merge(), y = (W + (alpha / r) B A) x + b.
    W and b keep the plain layer's names, so a base model's checkpoint loads into the adapted one."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / rank)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y if self.merged else y + self.scale * (x @ self.A.T) @ self.B.T

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.scale * self.B @ self.A
            self.merged = True


class FFN(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.W_1, self.W_2 = nn.Linear(d, d_ff), nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.W_2(torch.relu(self.W_1(x)))


class MoE(nn.Module):
    """Top-k gated experts with the Switch load-balancing loss (see the module docstring)."""

    def __init__(self, d: int, d_ff: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.W_r = nn.Linear(d, cfg.experts, bias=False)
        self.experts = nn.ModuleList(FFN(d, d_ff) for _ in range(cfg.experts))
        self.top_k, self.coef = cfg.top_k, cfg.balance_coef

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, T, d)
        p = torch.softmax(self.W_r(x).float(), dim=-1)  # (B, T, E)
        top_p, top_i = p.topk(self.top_k, dim=-1)
        chosen = torch.zeros_like(p).scatter(-1, top_i, 1.0)
        g = (p * chosen / top_p.sum(-1, keepdim=True)).to(x.dtype)  # zero outside the top k
        y = sum(g[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))
        f = chosen.flatten(0, 1).mean(0) / self.top_k  # share of routing choices per expert
        P = p.flatten(0, 1).mean(0)
        return y, self.coef * len(self.experts) * (f * P).sum()


def norm_layer(kind: str, d: int) -> nn.Module:
    return DynamicTanh(d) if kind == "dyt" else nn.LayerNorm(d)


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig, max_len: int, index: int) -> None:
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.attention, cfg.causal, max_len,
                              dropout=cfg.dropout if cfg.attn_dropout is None else cfg.attn_dropout,
                              window=cfg.window, n_global=cfg.n_global, n_random=cfg.n_random,
                              n_features=cfg.n_features, proj_len=cfg.proj_len, rotary=cfg.position == "rotary",
                              seed=index)
        self.ffn = MoE(cfg.d_model, cfg.d_ff, cfg.moe) if cfg.moe.experts else FFN(cfg.d_model, cfg.d_ff)
        self.norm1, self.norm2 = norm_layer(cfg.norm, cfg.d_model), norm_layer(cfg.norm, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def _ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.ffn(x)
        return out if isinstance(out, tuple) else (out, x.new_zeros(()))

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pre:
            x = x + self.drop(self.attn(self.norm1(x), bias))
            f, aux = self._ffn(self.norm2(x))
            return x + self.drop(f), aux
        x = self.norm1(x + self.drop(self.attn(x, bias)))
        f, aux = self._ffn(x)
        return self.norm2(x + self.drop(f)), aux


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, vocab: int, max_len: int) -> None:
        super().__init__()
        self.cfg, self.max_len = cfg, max_len
        self.E = nn.Embedding(vocab, cfg.d_model)
        self.embed_scale = cfg.d_model ** 0.5  # the paper's √d_model: E's entries are ~0.02, sin/cos ~1
        self.P = nn.Embedding(max_len, cfg.d_model) if cfg.position == "learned" else None
        self.relative = RelativeBias(cfg.n_heads, causal=cfg.causal) if cfg.position == "relative" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, max_len, i) for i in range(cfg.n_layers))
        self.final_norm = norm_layer(cfg.norm, cfg.d_model) if cfg.norm_position == "pre" else nn.Identity()
        self.out = nn.Linear(cfg.d_model, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if cfg.tie_weights:
            self.out.weight = self.E.weight
        if cfg.lora.rank:
            self.requires_grad_(False)
            for block in self.blocks:
                for name in ("q", "k", "v", "o"):
                    setattr(block.attn, name, LoRALinear(getattr(block.attn, name), cfg.lora.rank, cfg.lora.alpha))

    def merge_lora(self) -> None:
        for m in self.modules():
            if isinstance(m, LoRALinear):
                m.merge()

    def forward(self, x: torch.Tensor, with_aux: bool = False):  # (B, T) ids -> (B, T, V) logits
        T = x.shape[1]
        h = self.E(x) * self.embed_scale  # e_i = √d E^T x_i: token and position terms of one size
        if self.cfg.position == "sinusoidal":
            h = h + sinusoidal_table(T, self.cfg.d_model).to(h.device, h.dtype)
        elif self.P is not None:
            h = h + self.P(torch.arange(T, device=x.device))
        h = self.drop(h)
        bias = self.relative(T, x.device) if self.relative is not None else None
        aux = h.new_zeros(())
        for block in self.blocks:
            h, a = block(h, bias)
            aux = aux + a
        logits = self.out(self.final_norm(h))
        return (logits, aux) if with_aux else logits


# The README example, sized for 15 minutes on a 2-core laptop (docs/sequence.md, "The recipe"): 8 x 400 steps of
# 32 x 128 characters in bf16 on both cores; dropout on the residual branches only (on the attention weights
# it costs about 40% more time on CPU), which the held-out play needs once the model sees the plays 3 times.
@register_model("transformer", family="sequence", config=TransformerConfig, task="language-model", recipe={
    "epochs": 8, "batch_size": 32, "cpus_per_worker": 2, "precision": "mixed",
    "model_args": {"d_model": 192, "n_heads": 4, "n_layers": 4, "d_ff": 768, "dropout": 0.1, "attn_dropout": 0.0},
    "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 0.1, "warmup_epochs": 0.1, "grad_clip": 1.0,
              "min_lr_ratio": 0.1},
    "data": {"seq_len": 128, "train_windows": 12800, "val_fraction": 0.03, "test_fraction": 0.08}})
def transformer(cfg: TransformerConfig, data_info: dict) -> Transformer:
    """Transformer LM/encoder: attention, position, norm, MoE and LoRA variants by config."""
    max_len = cfg.max_len or int(data_info.get("seq_len", 512))
    return Transformer(cfg, vocab_size(data_info), max_len)
