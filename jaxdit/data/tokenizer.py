"""Tokenizers: :class:`WordTokenizer`, a simple word-level one for the trainable encoder
(ids: 0 = pad, 1 = BOS, 2 = unknown word), and :class:`HFTokenizer` for pretrained
encoders.

Every encoded caption starts with BOS (or [CLS]), so even the empty caption (the
unconditional prompt for classifier-free guidance) has one valid token.
"""
from __future__ import annotations

import re
from typing import Iterable

import numpy as np

PAD, BOS, UNK = 0, 1, 2
SPECIALS = ("<pad>", "<bos>", "<unk>")


class WordTokenizer:
    null_id = BOS

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


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from a local ``tokenizer.json`` (the
    pretrained text encoders' own tokenization, e.g. BERT WordPiece with [CLS] ... [SEP]).

    ``encode`` pads with the tokenizer's pad id and truncates long captions keeping the
    final special token; ``null_id`` is the first token of the empty caption ([CLS]), which
    :func:`jaxdit.models.registry.null_condition` puts at position 0 of the null prompt.
    """

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise ImportError("Pretrained text encoders need `pip install tokenizers`.") from e
        self.path = path
        self.tok = Tokenizer.from_file(path)
        self.tok.no_padding()
        self.tok.no_truncation()
        empty = self.tok.encode("").ids
        self.null_id = empty[0] if empty else 0
        self.end_ids = empty[1:]  # e.g. [SEP], kept when truncating
        pad = self.tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(ids int32 (max_len,), mask bool (max_len,))``."""
        ids = self.tok.encode(text).ids
        if len(ids) > max_len:
            keep = max_len - len(self.end_ids)
            ids = ids[:keep] + self.end_ids
        out = np.full((max_len,), self.pad_id, np.int32)
        out[:len(ids)] = ids
        mask = np.zeros((max_len,), bool)
        mask[:len(ids)] = True
        return out, mask

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])
