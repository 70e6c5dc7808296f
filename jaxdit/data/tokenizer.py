"""A simple word-level tokenizer (ids: 0 = pad, 1 = BOS, 2 = unknown word).

Every encoded caption starts with BOS, so even the empty caption (the unconditional
prompt for classifier-free guidance) has one valid token.
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

PAD, BOS, UNK = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<unk>")


class WordTokenizer:
    def __init__(self, words: Iterable[str]):
        uniq = sorted(set(w.lower() for w in words) - set(SPECIALS))
        self.vocab = list(SPECIALS) + uniq
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(ids int32 (max_len,), mask bool (max_len,))``; truncates long captions."""
        ids = [BOS] + [self.index.get(w, UNK) for w in self.split(text)]
        ids = ids[:max_len]
        out = np.zeros((max_len,), np.int32)
        out[:len(ids)] = ids
        mask = np.zeros((max_len,), bool)
        mask[:len(ids)] = True
        return out, mask

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids if i not in (PAD, BOS))
