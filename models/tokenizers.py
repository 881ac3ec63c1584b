"""Tokenizers: characters, and byte-pair encoding (Sennrich et al. 2016) as the survey describes it.

BPE: split each word into characters plus an end-of-word marker `</w>`, count adjacent symbol pairs
weighted by word frequency, merge the most frequent pair into a new symbol, and repeat until the
vocabulary has the target size. Encoding applies the learned merges in the order they were learned.

A word here is a run of non-space characters; when one space follows it, that space is the word's `</w>`
(so `</w>` decodes to " "). Any other whitespace (newlines, runs of spaces) is its own one-character
word. Decoding concatenates each token's text, so `decode(encode(s)) == s` for any `s` over the alphabet.

Training keeps the pair counts incrementally: a merge touches only the words that hold its pair, and
a heap with lazy deletion yields the most frequent pair (ties: the smaller symbol ids, so earlier
symbols first), so no merge rescans the corpus.
"""

from __future__ import annotations

import heapq
import json
import re
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

from raycraft.errors import UserError

EOW = "</w>"
_WORDS = re.compile(r"\S+ ?|\s")


class CharTokenizer:
    """One token per character of a fixed alphabet."""

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        self.tokens = list(chars)
        self.ids = {c: i for i, c in enumerate(self.tokens)}

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def covers(self, text: str) -> bool:
        return set(text) <= self.ids.keys()

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.ids.keys())
        if unknown:
            raise UserError(f"--prompt: characters {''.join(unknown)!r} are not in the model's character "
                            f"vocabulary ({self.vocab_size} characters: {''.join(self.tokens)!r}).")
        return [self.ids[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.tokens[i] for i in ids)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.tokens}


class BPETokenizer:
    """Byte-pair encoding over characters plus `</w>`. `symbols[i]` shows token i (e.g. 'lo', 'w</w>');
    `merges[k] = (a, b)` made token `len(alphabet) + k` from tokens a and b."""

    kind = "bpe"

    def __init__(self, alphabet: list[str], merges: list[tuple[int, int]]) -> None:
        self.alphabet = list(alphabet)
        self.merges = [tuple(m) for m in merges]
        self.symbols = [*self.alphabet, EOW]
        for a, b in self.merges:
            self.symbols.append(self.symbols[a] + self.symbols[b])
        self.text = [s.replace(EOW, " ") for s in self.symbols]
        self.char_id = {c: i for i, c in enumerate(self.alphabet)}
        self.eow = len(self.alphabet)
        self.rank = {pair: k for k, pair in enumerate(self.merges)}
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def covers(self, text: str) -> bool:
        return set(text) <= self.char_id.keys()

    def _word_symbols(self, word: str) -> list[int]:
        body = word[:-1] if word.endswith(" ") and len(word) > 1 else word
        ids = [self.char_id[c] for c in body]
        return ids + [self.eow] if body is not word else ids

    @classmethod
    def train(cls, text: str, vocab_size: int, alphabet: list[str] | None = None) -> BPETokenizer:
        alphabet = sorted(set(text) | set(alphabet or ()))
        if vocab_size <= len(alphabet) + 1:
            raise UserError(f"--vocab-size: {vocab_size} must exceed the alphabet plus </w> "
                            f"({len(alphabet) + 1} symbols).")
        tok = cls(alphabet, [])
        counts = Counter(_WORDS.findall(text))
        words = [tok._word_symbols(w) for w in counts]
        freq = list(counts.values())
        pairs: Counter[tuple[int, int]] = Counter()
        where: dict[tuple[int, int], set[int]] = defaultdict(set)
        for i, w in enumerate(words):
            for pair in pairwise(w):
                pairs[pair] += freq[i]
                where[pair].add(i)
        heap = [(-c, pair) for pair, c in pairs.items()]
        heapq.heapify(heap)
        merges: list[tuple[int, int]] = []
        next_id = len(alphabet) + 1
        while next_id < vocab_size and heap:
            neg, pair = heapq.heappop(heap)
            if pairs.get(pair, 0) != -neg or -neg <= 0:
                continue  # stale heap entry
            merges.append(pair)
            changed: set[tuple[int, int]] = set()
            for i in list(where.pop(pair, ())):
                w, f = words[i], freq[i]
                for p in pairwise(w):  # remove this word's old pairs ...
                    pairs[p] -= f
                    changed.add(p)
                merged, j = [], 0
                while j < len(w):
                    if j + 1 < len(w) and (w[j], w[j + 1]) == pair:
                        merged.append(next_id)
                        j += 2
                    else:
                        merged.append(w[j])
                        j += 1
                words[i] = merged
                for p in pairwise(merged):  # ... and add its new ones
                    pairs[p] += f
                    where[p].add(i)
                    changed.add(p)
            pairs.pop(pair, None)
            for p in changed:
                if pairs.get(p, 0) > 0:
                    heapq.heappush(heap, (-pairs[p], p))
            next_id += 1
        return cls(alphabet, merges)

    def _encode_word(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        ids = self._word_symbols(word)
        while len(ids) > 1:
            ranked = [(self.rank.get(p, len(self.rank)), j) for j, p in enumerate(pairwise(ids))]
            best, _ = min(ranked)
            if best == len(self.rank):
                break
            pair, new, out, j = self.merges[best], self.eow + 1 + best, [], 0
            while j < len(ids):
                if j + 1 < len(ids) and (ids[j], ids[j + 1]) == pair:
                    out.append(new)
                    j += 2
                else:
                    out.append(ids[j])
                    j += 1
            ids = out
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.char_id.keys())
        if unknown:
            raise UserError(f"--prompt: characters {''.join(unknown)!r} are not in the tokenizer's alphabet.")
        return [i for w in _WORDS.findall(text) for i in self._encode_word(w)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.text[i] for i in ids)

    def merge_strings(self) -> list[str]:
        """The merges as the survey writes them: 'l o', 'lo w', ..."""
        return [f"{self.symbols[a]} {self.symbols[b]}" for a, b in self.merges]

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "alphabet": self.alphabet, "merges": [list(m) for m in self.merges]}


Tokenizer = CharTokenizer | BPETokenizer


def from_dict(data: dict[str, Any]) -> Tokenizer:
    if data["kind"] == "char":
        return CharTokenizer(data["chars"])
    return BPETokenizer(data["alphabet"], data["merges"])


def save(tok: Tokenizer, path: str | Path) -> None:
    Path(path).write_text(json.dumps(tok.to_dict(), ensure_ascii=False))


def load(path: str | Path) -> Tokenizer:
    return from_dict(json.loads(Path(path).read_text()))
