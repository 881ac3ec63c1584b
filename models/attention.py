"""Attention and positions for the Transformer (`models/transformer.py`).

Full attention (Vaswani et al. 2017), through torch's `scaled_dot_product_attention`:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k) + B) V        B: mask (-inf) and position bias

Sparse patterns, computed blockwise (`blocked_attention`: n (3w + g + r) scores instead of n^2):
  sliding   query i sees keys |i - j| < window
  bigbird   sliding window + `n_global` tokens that see and are seen by all + `n_random` random keys per query
  (`pattern_mask` gives the same patterns as a mask over the full scores: the reference, and the path taken
  with a position bias)
Linear-cost kinds:
  performer FAVOR+ (Choromanski et al. 2021): softmax(q.k) ~ phi(q).phi(k), with positive random features
            phi(x) = exp(w_r.x - |x|^2 / 2) / sqrt(m), w_r orthogonal Gaussian; attention becomes
            D^-1 phi(Q) (phi(K)^T V), D = diag(phi(Q) phi(K)^T 1); causal use takes prefix sums over t
  linformer (Wang et al. 2020): K and V projected along the sequence, K' = E K, V' = F V (E, F: k x n),
            softmax(Q K'^T / sqrt(d_k)) V'; it mixes all positions, so it is bidirectional only

Positions:
  sinusoidal  P[i, 2k] = sin(i / 10000^(2k/d)),  P[i, 2k+1] = cos(i / 10000^(2k/d)), added to embeddings
  rotary      rotate each pair (q_2k, q_2k+1) of queries and keys by angle i * 10000^(-2k/d_k)
  relative    a learned scalar per head and bucket of j - i (T5: exact buckets near, log-spaced far),
              added to the scores as B
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

AttentionKind = Literal["full", "sliding", "bigbird", "performer", "linformer"]
PositionKind = Literal["sinusoidal", "learned", "relative", "rotary"]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    """torch's `scaled_dot_product_attention`, in fp32 under CPU autocast: torch 2.13's CPU flash kernel
    takes about twice as long for forward + backward in bf16 as in fp32 (`benchmarks/lm_step.py`, rows
    bf16-sdpa-bf16 and bf16), so on CPU only the projections around it run in bf16."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            mask = kwargs.get("attn_mask")
            if mask is not None and mask.is_floating_point():
                kwargs["attn_mask"] = mask.float()
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    """P (n, d): P[i, 2k] = sin(i / 10000^(2k/d)), P[i, 2k+1] = cos(i / 10000^(2k/d))."""
    pos = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    freq = torch.pow(10000.0, -torch.arange(0, d, 2, dtype=torch.float32) / d)  # 10000^(-2k/d)
    P = torch.zeros(n, d)
    P[:, 0::2] = torch.sin(pos * freq)
    P[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return P


def rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_2k, x_2k+1) at position i by i * 10000^(-2k/d). x: (B, H, T, d) with d even."""
    T, d = x.shape[-2], x.shape[-1]
    angle = torch.arange(T, dtype=torch.float32, device=x.device).unsqueeze(1) * torch.pow(
        10000.0, -torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)  # (T, d/2)
    cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class RelativeBias(nn.Module):
    """T5's relative position bias: B[h, i, j] = b[h, bucket(j - i)]."""

    def __init__(self, n_heads: int, n_buckets: int = 32, max_distance: int = 128, causal: bool = True) -> None:
        super().__init__()
        self.bias = nn.Embedding(n_buckets, n_heads)
        self.n_buckets, self.max_distance, self.causal = n_buckets, max_distance, causal

    def bucket(self, rel: torch.Tensor) -> torch.Tensor:
        """rel = j - i. Half the buckets (all, when causal) hold exact distances, the rest log-spaced ones."""
        n = self.n_buckets
        if self.causal:
            offset, dist = torch.zeros_like(rel), (-rel).clamp(min=0)
        else:
            n //= 2
            offset, dist = (rel > 0).long() * n, rel.abs()
        exact = n // 2
        far = exact + (torch.log(dist.float().clamp(min=1) / exact) / math.log(self.max_distance / exact)
                       * (n - exact)).long()
        return offset + torch.where(dist < exact, dist, far.clamp(max=n - 1))

    def forward(self, T: int, device: torch.device) -> torch.Tensor:  # -> (H, T, T)
        pos = torch.arange(T, device=device)
        return self.bias(self.bucket(pos.unsqueeze(0) - pos.unsqueeze(1))).permute(2, 0, 1)


def pattern_mask(kind: str, T: int, causal: bool, window: int, n_global: int, random_keys: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor:
    """Boolean (T, T) mask, True where query i may attend to key j."""
    i = torch.arange(T, device=device).unsqueeze(1)
    j = torch.arange(T, device=device).unsqueeze(0)
    allowed = torch.ones(T, T, dtype=torch.bool, device=device)
    if kind in ("sliding", "bigbird"):
        allowed = (i - j).abs() < window
    if kind == "bigbird":
        allowed = allowed | (i < n_global) | (j < n_global)
        if random_keys is not None:
            allowed = allowed.scatter(1, random_keys[:T] % T, True)
    return allowed & (j <= i) if causal else allowed


def masked_attention(q, k, v, mask: torch.Tensor, bias: torch.Tensor | None, dropout: float) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_k) + B) V with B = bias, and -inf where mask is False. q, k, v: (B, H, T, d_k)."""
    B = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    if bias is not None:
        B = B + bias.to(q.dtype)
    return sdpa(q, k, v, attn_mask=B, dropout_p=dropout)


def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:  # (B, H, T_p, d) -> (B, H, T_p / b, b, d)
    return x.view(*x.shape[:2], x.shape[2] // b, b, x.shape[3])


def _neighbours(x: torch.Tensor) -> torch.Tensor:  # (B, H, m, b, d) -> (B, H, m, 3b, d): blocks m-1, m, m+1
    pad = F.pad(x, (0, 0, 0, 0, 1, 1))
    return torch.cat([pad[:, :, :-2], pad[:, :, 1:-1], pad[:, :, 2:]], dim=3)


def blocked_attention(q, k, v, window: int, causal: bool, n_global: int = 0, random_keys: torch.Tensor | None = None,
                      dropout: float = 0.0) -> torch.Tensor:
    """The sliding-window and BigBird patterns of `pattern_mask`, computed blockwise: blocks of b = window
    queries score only their own key block and the two beside it (|i - j| < w lies within them), plus the
    n_global first keys and each query's random keys, so scores take n (3w + g + r) entries, not n^2. Each
    key counts once per query: a global or random key already in the window (or drawn twice) is masked. The
    global queries attend to every key, as rows of full attention. q, k, v: (B, H, T, d_k) -> (B, H, T, d_k)."""
    T, b = q.shape[2], window
    n_global, pad = min(n_global, T), -T % b
    qp, kp, vp = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    qb = _blocks(qp, b) / math.sqrt(q.shape[-1])                                # (B, H, m, b, d)
    i = torch.arange(T + pad, device=q.device).view(-1, b, 1)                   # query positions (m, b, 1)
    j = i.new_tensor(range(-b, 2 * b)).view(1, 1, -1) + (i[:, :1] - i[:, :1] % b)  # key positions (m, 1, 3b)
    allowed = [((i - j).abs() < window) & (j >= 0) & (j < T)]
    scores = [qb @ _neighbours(_blocks(kp, b)).transpose(-1, -2)]               # (B, H, m, b, 3b)
    values = [_neighbours(_blocks(vp, b))]
    if n_global:
        g = torch.arange(n_global, device=q.device)
        allowed.append((i - g).abs() >= window)                                 # (m, b, g)
        scores.append(qb @ k[:, :, :n_global].transpose(-1, -2).unsqueeze(2))   # (B, H, m, b, g)
        values.append(v[:, :, :n_global].unsqueeze(2))
    if random_keys is not None:
        r = F.pad(random_keys[:T] % T, (0, 0, 0, pad)).view(-1, b, random_keys.shape[1])  # (m, b, r)
        seen = torch.stack([(r[..., :s] == r[..., s:s + 1]).any(-1) for s in range(r.shape[-1])], -1)
        allowed.append(((i - r).abs() >= window) & (r >= n_global) & ~seen)
        kr, vr = (x[:, :, r.flatten()].view(*x.shape[:2], *r.shape, x.shape[-1]) for x in (k, v))  # (B, H, m, b, r, d)
        scores.append((qb.unsqueeze(-2) * kr).sum(-1))
        values.append(vr)
    if causal:
        keys = [j, torch.arange(n_global, device=q.device), r if random_keys is not None else None]
        allowed = [a & (key <= i) for a, key in zip(allowed, keys, strict=False)]
    s = torch.cat([sc.masked_fill(~a, float("-inf")) for sc, a in zip(scores, allowed, strict=True)], -1)
    p = F.dropout(torch.softmax(s, -1), dropout)
    parts = p.split([sc.shape[-1] for sc in scores], -1)
    out = parts[0] @ values[0]
    if n_global:
        out = out + parts[1] @ values[1]
    if random_keys is not None:
        out = out + (parts[-1].unsqueeze(-1) * values[-1]).sum(-2)
    out = out.flatten(2, 3)[:, :, :T]
    if n_global:  # the global queries see every key (causal: every earlier one)
        rows = torch.ones(n_global, T, dtype=torch.bool, device=q.device)
        if causal:
            rows = rows.tril()
        out = torch.cat([sdpa(q[:, :, :n_global], k, v, attn_mask=rows, dropout_p=dropout),
                         out[:, :, n_global:]], dim=2)
    return out


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """m x d rows: blocks of orthogonal directions with chi(d)-distributed norms, as FAVOR+ draws them."""
    blocks = []
    for _ in range(math.ceil(m / d)):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
        blocks.append(q.T)
    W = torch.cat(blocks)[:m]
    norms = torch.randn(m, d, generator=generator).norm(dim=1, keepdim=True)
    return W * norms


def favor_features(x: torch.Tensor, W: torch.Tensor, is_query: bool) -> torch.Tensor:
    """phi(x) = exp(W x - |x|^2/2) / sqrt(m) for x already scaled by d^-1/4. A max is subtracted inside
    the exp for stability (per row for queries, globally for keys): it cancels in the normalisation."""
    proj = x @ W.T  # (B, H, T, m)
    sq = (x * x).sum(-1, keepdim=True) / 2
    stab = proj.amax(-1, keepdim=True) if is_query else proj.amax(dim=(-2, -1), keepdim=True)
    return torch.exp(proj - sq - stab.detach()) / math.sqrt(W.shape[0]) + 1e-6


def performer_attention(q, k, v, W: torch.Tensor, causal: bool) -> torch.Tensor:
    """FAVOR+: D^-1 phi(Q) (phi(K)^T V); linear in T. q, k, v: (B, H, T, d_k); W: (m, d_k)."""
    scale = q.shape[-1] ** -0.25
    qf, kf = favor_features(q * scale, W, True), favor_features(k * scale, W, False)  # (B, H, T, m)
    if causal:  # prefix sums: S_t = sum_{s<=t} phi(k_s) v_s^T, z_t = sum_{s<=t} phi(k_s)
        S = torch.cumsum(kf.unsqueeze(-1) * v.unsqueeze(-2), dim=2)  # (B, H, T, m, d_k)
        num = (qf.unsqueeze(-2) @ S).squeeze(-2)
        den = (qf * torch.cumsum(kf, dim=2)).sum(-1, keepdim=True)
    else:
        num = qf @ (kf.transpose(-2, -1) @ v)  # (B, H, T, d_k)
        den = qf @ kf.sum(2).unsqueeze(-1)  # (B, H, T, 1)
    return num / den


class Attention(nn.Module):
    """Multi-head attention: heads_h = Attention(X W_q^h, X W_k^h, X W_v^h), out = [heads] W_o."""

    def __init__(self, d_model: int, n_heads: int, kind: AttentionKind, causal: bool, max_len: int, *,
                 dropout: float = 0.0, window: int = 64, n_global: int = 2, n_random: int = 2, n_features: int = 64,
                 proj_len: int = 64, rotary: bool = False, seed: int = 0, blockwise: bool = True) -> None:
        super().__init__()
        self.n_heads, self.kind, self.causal, self.dropout = n_heads, kind, causal, dropout
        self.blockwise = blockwise  # sparse kinds: blocked_attention (False: the mask over all T x T scores)
        self.window, self.n_global, self.rotary = window, n_global, rotary
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))
        d_k = d_model // n_heads
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("random_keys", torch.randint(0, 1 << 30, (max_len, n_random), generator=g)
                             if kind == "bigbird" and n_random else None, persistent=False)
        self.register_buffer("W_features", orthogonal_gaussian(n_features, d_k, g) if kind == "performer" else None)
        if kind == "linformer":
            self.E = nn.Parameter(torch.randn(proj_len, max_len) / math.sqrt(proj_len))
            self.F = nn.Parameter(torch.randn(proj_len, max_len) / math.sqrt(proj_len))

    def heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, H, T, d_k)
        B, T, D = x.shape
        return x.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, D)
        B, T, D = x.shape
        q, k, v = self.heads(self.q(x)), self.heads(self.k(x)), self.heads(self.v(x))
        if self.rotary:
            q, k = rotary(q), rotary(k)
        p = self.dropout if self.training else 0.0
        if self.kind == "performer":
            out = performer_attention(q, k, v, self.W_features, self.causal)
        elif self.kind == "linformer":
            E, F_ = self.E[:, :T], self.F[:, :T]  # (k, T)
            out = sdpa(q, E @ k, F_ @ v, dropout_p=p)
        elif self.kind == "full" and bias is None:
            out = sdpa(q, k, v, is_causal=self.causal, dropout_p=p)
        elif self.kind in ("sliding", "bigbird") and bias is None and self.blockwise:
            n_global = self.n_global if self.kind == "bigbird" else 0
            out = blocked_attention(q, k, v, self.window, self.causal, n_global, self.random_keys, p)
        else:
            mask = pattern_mask(self.kind, T, self.causal, self.window, self.n_global, self.random_keys, x.device)
            out = masked_attention(q, k, v, mask, bias, p)
        return self.o(out.transpose(1, 2).reshape(B, T, D))
