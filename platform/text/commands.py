"""`raycraft generate` (sample text from a trained language model) and `raycraft tokenizer train`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from raycraft import tracking
from raycraft.console import TrackingOpt, console, progress_bar
from raycraft.data.base import DataConfig
from raycraft.data.text import DOCUMENTS, train_text, write_token_shards
from raycraft.errors import UserError, check_count, invalid_choice
from raycraft.evaluate import rebuild_model, run_config
from raycraft.models import tokenizers
from raycraft.text.step import TOKENIZER_FILE, generate

app = typer.Typer()
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and inspect BPE tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")
MAX_TOKENS = 1_000_000  # hours of sampling on a CPU, one token per forward pass; more is a typo, not a plan
PROGRESS_TOKENS = 1_000  # from here generation takes long enough to want a progress bar


def load_language_model(run_id: str, uri: str):
    """Rebuild a run's model from its config.yaml and final checkpoint (weights_only), with its tokenizer.
    LoRA adapters are merged into the weights."""
    cfg, _ = run_config(uri, run_id, "language-model", "`raycraft generate`")
    with tempfile.TemporaryDirectory() as tmp:
        tok = tokenizers.load(tracking.download_artifact(uri, run_id, f"plots/{TOKENIZER_FILE}", tmp))
    info = {"vocab_size": tok.vocab_size, "seq_len": cfg.data.seq_len, "tokenizer": tok.to_dict()}
    model = rebuild_model(uri, run_id, cfg, info)
    if hasattr(model, "merge_lora"):
        model.merge_lora()
    return model.eval(), tok, cfg.data.seq_len


@app.command("generate")
def generate_cmd(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a language-model `raycraft train` run.")],
    prompt: Annotated[str, typer.Option(help="Text to continue.")] = "\n",
    tokens: Annotated[int, typer.Option(help="Tokens to sample.")] = 200,
    temperature: Annotated[float, typer.Option(help="Softmax temperature; 0 picks the most likely token.")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Sample among the k most likely tokens.")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    tracking_uri: TrackingOpt = None,
):
    """Print PROMPT continued by TOKENS tokens sampled from the model logged by RUN_ID."""
    check_count("--tokens", tokens, MAX_TOKENS)
    if temperature < 0:
        raise UserError(f"--temperature: {temperature} must be >= 0.")
    if top_k is not None:
        check_count("--top-k", top_k)
    if not prompt:
        raise UserError("--prompt: give at least one character to start from.")
    torch.set_num_threads(1)
    model, tok, context = load_language_model(run_id, tracking.resolve_tracking_uri(tracking_uri))
    with progress_bar(f"generating {tokens:,} tokens", tokens, show=tokens >= PROGRESS_TOKENS) as advance:
        ids = generate(model, tok.encode(prompt), tokens, context, temperature, top_k,
                       torch.Generator().manual_seed(seed), advance)
    console.print(prompt + tok.decode(ids), highlight=False, markup=False)


@tokenizer_app.command("shards")
def tokenizer_shards(
    out: Annotated[Path, typer.Option("--out", help="Folder to write train/, val/, test/ and meta.json into.")],
    dataset: Annotated[str, typer.Option("--dataset", help="Text dataset (shakespeare, text_folder).")] = "shakespeare",
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Folder of .txt files (text_folder).")] = None,
    tokenizer: Annotated[str, typer.Option("--tokenizer", help="char or bpe.")] = "char",
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="BPE vocabulary size.")] = 4096,
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", help="Tokens per shard file.")] = 10_000_000,
):
    """Tokenise a text dataset once into binary shards that `--dataset token_shards --data-dir OUT` trains on
    (copy OUT to s3:// to stream it from there), so no run re-tokenises the corpus."""
    if dataset not in DOCUMENTS:
        raise invalid_choice("--dataset", dataset, DOCUMENTS)
    if tokenizer not in ("char", "bpe"):
        raise invalid_choice("--tokenizer", tokenizer, ["char", "bpe"])
    if dataset == "text_folder" and not (data_dir and Path(data_dir).is_dir()):
        raise UserError(f"--data-dir: {data_dir!r} is not a folder of .txt files.")
    check_count("--shard-tokens", shard_tokens)
    counts = write_token_shards(dataset, DataConfig(data_dir=data_dir, tokenizer=tokenizer, vocab_size=vocab_size),
                                out, shard_tokens)
    console.print(f"wrote {', '.join(f'{n:,} {split} tokens' for split, n in counts.items())} to {out}")


@tokenizer_app.command("train")
def tokenizer_train(
    dataset: Annotated[str, typer.Option("--dataset", help="Text dataset (shakespeare, text_folder).")] = "shakespeare",
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Target vocabulary size.")] = 4096,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Folder of .txt files (text_folder).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the tokenizer JSON here.")] = None,
):
    """Learn BPE merges on the dataset's training split; print the first merges and the compression."""
    if dataset not in DOCUMENTS:
        raise invalid_choice("--dataset", dataset, DOCUMENTS)
    if dataset == "text_folder" and not (data_dir and Path(data_dir).is_dir()):
        raise UserError(f"--data-dir: {data_dir!r} is not a folder of .txt files.")
    cfg = DataConfig(data_dir=data_dir, tokenizer="bpe", vocab_size=vocab_size)
    text, corpus = train_text(dataset, cfg)
    start = time.perf_counter()
    tok = tokenizers.BPETokenizer.train(text, vocab_size, alphabet=sorted(set(corpus)))
    seconds = time.perf_counter() - start
    n_tokens = len(tok.encode(text))
    console.print(f"BPE on {dataset}'s training split ({len(text):,} characters): {tok.vocab_size} tokens, "
                  f"{len(tok.merges)} merges in {seconds:.1f} s; {len(text) / n_tokens:.2f} characters per token.")
    console.print("first merges: " + ", ".join(repr(m) for m in tok.merge_strings()[:10]), highlight=False)
    if out:
        tokenizers.save(tok, out)
        console.print(f"saved to {out}")
