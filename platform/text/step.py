"""Language modelling: next-token cross-entropy through the one loop, and sampling from a trained model.

    loss = -(1/N) sum_t log p(x_{t+1} | x_{<=t}),   perplexity = exp(loss)

A model takes token ids (B, T) and returns logits (B, T, V); called with `with_aux=True` it returns
(logits, aux_loss), where aux_loss holds auxiliary terms such as a mixture-of-experts balancing loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raycraft.models import tokenizers
from raycraft.train.step import Step, Sums, Update

SAMPLE_PROMPT = "ROMEO:"
SAMPLE_TOKENS = 300
TOKENIZER_FILE = "tokenizer.json"


@torch.no_grad()
def generate(model: nn.Module, prompt_ids: list[int], n_tokens: int, context: int, temperature: float = 1.0,
             top_k: int | None = None, generator: torch.Generator | None = None,
             progress: Callable[[int], None] | None = None) -> list[int]:
    """Sample n_tokens after the prompt: x_{t+1} ~ softmax(logits_t / temperature), restricted to the
    top_k most likely tokens when given. The model sees the last `context` tokens; `progress(1)` is called
    after each token."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    out = []
    for _ in range(n_tokens):
        logits = model(ids[:, -context:])[0, -1].float()
        if temperature == 0:
            nxt = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, len(logits))).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        out.append(int(nxt))
        if progress:
            progress(1)
    model.train(was_training)
    return out


def sample_text(model: nn.Module, info: dict[str, Any], prompt: str = SAMPLE_PROMPT,
                n_tokens: int = SAMPLE_TOKENS, seed: int = 0) -> str:
    tok = tokenizers.from_dict(info["tokenizer"])
    if not tok.covers(prompt):
        prompt = "\n"
    g = torch.Generator().manual_seed(seed)
    ids = generate(model, tok.encode(prompt), n_tokens, info["seq_len"], temperature=0.8, top_k=None, generator=g)
    return prompt + tok.decode(ids)


class LanguageModelStep(Step):
    """Next-token cross-entropy; metrics loss (nats per token), perplexity and tokens/s (per worker)."""

    def _sums(self, loss: torch.Tensor, y: torch.Tensor, seconds: float | None = None) -> Sums:
        n = y.new_tensor(y.numel())
        sums = {"loss": loss.detach() * n, "n": n}
        if seconds is not None:  # summed seconds over summed tokens: the loop's mean is s/token
            sums["s_per_token"] = torch.tensor(seconds, dtype=torch.float64)
        return sums

    def train_batch(self, model: nn.Module, batch: Any, update: Update) -> Sums:
        start = time.perf_counter()
        x, y = batch
        logits, aux = model(x, with_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        update("main", loss + aux)
        return self._sums(loss, y, time.perf_counter() - start)

    @torch.no_grad()
    def eval_batch(self, model: nn.Module, batch: Any) -> Sums:
        x, y = batch
        return self._sums(F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()), y)

    def finalize(self, means: dict[str, float]) -> dict[str, float]:
        out = {k: v for k, v in means.items() if k != "s_per_token"}
        if "loss" in means:
            out["perplexity"] = math.exp(min(means["loss"], 700.0))
        if means.get("s_per_token"):
            out["tokens_per_s"] = 1.0 / means["s_per_token"]
        return out

    def input_about(self, info: dict[str, Any]) -> str:
        return (f"token ids of the run's tokenizer (plots/{TOKENIZER_FILE}), up to {info['seq_len']} a row; it "
                "answers the next token's logits at each position")

    def epoch_artifacts(self, model: nn.Module, epoch: int, info: dict[str, Any], out_dir: Path) -> None:
        (out_dir / "sample.txt").write_text(sample_text(model, info, seed=epoch))

    def artifacts(self, model: nn.Module, test_batches: Iterable[Any], info: dict[str, Any],
                  out_dir: Path) -> None:
        tokenizers.save(tokenizers.from_dict(info["tokenizer"]), out_dir / TOKENIZER_FILE)


STEP = LanguageModelStep
