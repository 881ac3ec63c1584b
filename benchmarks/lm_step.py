"""Training-step time of the Shakespeare transformer under each speed option of its recipe, in one run.

One step = forward, cross-entropy, backward, global-norm clipping and AdamW on a (batch, seq_len) batch of
random character ids, as `raycraft train transformer --dataset shakespeare` trains. Each row changes one
thing against the row it names, all measured in this process one after the other:

    fp32-1thread     the recipe's model in fp32 on one torch thread (raycraft's default of one CPU a worker)
    fp32             the same on `--threads` threads (the recipe's cpus_per_worker)
    bf16-sdpa-bf16   bf16 autocast (precision=mixed) with attention's softmax(QK^T)V in bf16 too
    bf16             bf16 autocast with attention in fp32 (`models/attention.sdpa`, what the model does)
    bf16-compiled    the same model under torch.compile
    bf16-rotary      rotary positions instead of the sinusoidal table
    bf16-attn-drop   dropout on the attention weights too (attn_dropout = dropout), which moves torch's CPU
                     attention off its fused kernel
    old-recipe       the recipe before this benchmark (3 layers of d=128, no dropout, fp32, one thread)

    python benchmarks/lm_step.py [--threads 2 --seconds 15 --batch 32 --seq-len 128]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import raycraft.models  # noqa: F401  (registers the models)
from raycraft.models import attention
from raycraft.models.transformer import TransformerConfig
from raycraft.registry import create_model, model_spec

VOCAB = 80  # characters in the Shakespeare plays


def recipe_config() -> TransformerConfig:
    return TransformerConfig(**model_spec("transformer").recipe["model_args"])


VARIANTS = {  # name: (config change, threads: "one" or "all", bf16 autocast, attention in bf16, compile)
    "fp32-1thread": ({}, "one", False, False, False),
    "fp32": ({}, "all", False, False, False),
    "bf16-sdpa-bf16": ({}, "all", True, True, False),
    "bf16": ({}, "all", True, False, False),
    "bf16-compiled": ({}, "all", True, False, True),
    "bf16-rotary": ({"position": "rotary"}, "all", True, False, False),
    "bf16-attn-drop": ({"attn_dropout": None}, "all", True, False, False),
    "old-recipe": ({"d_model": 128, "n_heads": 4, "d_ff": 512, "n_layers": 3, "dropout": 0.0}, "one", False, False,
                   False),
}


def step_seconds(cfg: TransformerConfig, batch: int, seq_len: int, bf16: bool, compile_: bool,
                 seconds: float) -> float:
    """Mean seconds of one training step over `seconds` of steps, after five warm-up steps."""
    torch.manual_seed(0)
    model = create_model("transformer", cfg, {"vocab_size": VOCAB, "seq_len": seq_len})
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    x, y = torch.randint(0, VOCAB, (batch, seq_len)), torch.randint(0, VOCAB, (batch, seq_len))

    def step() -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x).flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(5):
        step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return (time.perf_counter() - start) / n


@contextlib.contextmanager
def attention_in_autocast_dtype():
    """Attention's core as torch runs it under autocast, without the model's fp32 detour on CPU."""
    kept = attention.sdpa
    attention.sdpa = F.scaled_dot_product_attention
    try:
        yield
    finally:
        attention.sdpa = kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=model_spec("transformer").recipe.get("cpus_per_worker", 1))
    parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per variant")
    parser.add_argument("--batch", type=int, default=model_spec("transformer").recipe["batch_size"])
    parser.add_argument("--seq-len", type=int, default=model_spec("transformer").recipe["data"]["seq_len"])
    args = parser.parse_args()
    base = recipe_config()
    print(f"recipe model: d_model {base.d_model}, {base.n_layers} layers, {base.n_heads} heads, d_ff {base.d_ff}; "
          f"batch {args.batch} x {args.seq_len} tokens; threads: one or {args.threads}")
    print(f"{'variant':<16} {'ms/step':>8} {'tokens/s':>10} {'vs fp32-1thread':>16}")
    first = None
    for name, (change, threads, bf16, sdpa_bf16, compile_) in VARIANTS.items():
        torch.set_num_threads(1 if threads == "one" else args.threads)
        with attention_in_autocast_dtype() if sdpa_bf16 else contextlib.nullcontext():
            s = step_seconds(replace(base, **change), args.batch, args.seq_len, bf16, compile_, args.seconds)
        first = first or s
        print(f"{name:<16} {s * 1000:>8.1f} {args.batch * args.seq_len / s:>10,.0f} {first / s:>15.2f}x")


if __name__ == "__main__":
    main()
