"""The trainable text encoder's word vocabulary, taken from the data it trains on.

The shapes data has a closed grammar (:data:`jaxdit.data.shapes.VOCAB`). An image folder or
a TFDS dataset does not: its vocabulary is built from the *training* captions (the
``text.vocab_max_words`` most frequent words, ties in alphabetical order) and written into
the run's config as ``text.vocab``, so the checkpoint, ``config.json``, sampling and a
resumed run all use the same words whatever happens to the data later. How many caption
words the vocabulary misses is reported on the training and validation captions, with a
warning above :data:`OOV_WARN`.
"""
from __future__ import annotations

import collections
from typing import Iterable, Sequence

from jaxdit.data.pipeline import make_source, make_tokenizer
from jaxdit.data.tokenizer import SPECIALS, WordTokenizer

# Captions read to build the vocabulary and to measure its coverage (the first ones of each
# split: a TFDS dataset with a caption feature is read whole per example).
MAX_CAPTIONS = 50_000
OOV_WARN = 0.05  # out-of-vocabulary share of the validation words that gets a warning
CAPTIONED_SOURCES = ("folder", "tfds")


def build_vocabulary(captions: Iterable[str], max_words: int) -> list[str]:
    """The ``max_words`` most frequent words of ``captions`` (split as
    :meth:`WordTokenizer.split` does), most frequent first, ties alphabetical."""
    counts = collections.Counter(w for c in captions for w in WordTokenizer.split(c))
    for special in SPECIALS:
        counts.pop(special, None)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:max_words]]


def oov_rate(tokenizer: WordTokenizer, captions: Sequence[str]) -> float:
    """Share of the words of ``captions`` that ``tokenizer`` maps to ``<unk>`` (0 when
    there are no words)."""
    words = [w for c in captions for w in tokenizer.split(c)]
    if not words:
        return 0.0
    return sum(w not in tokenizer.index for w in words) / len(words)


def needs_vocabulary(config) -> bool:
    """Whether ``text.vocab`` is still to be built from the data: a trainable encoder on a
    captioned source (folder / TFDS) with no vocabulary given or inherited."""
    return (config.text.kind == "trainable" and config.data.source in CAPTIONED_SOURCES
            and not config.text.vocab)


def coverage_line(tokenizer: WordTokenizer, train: Sequence[str], val: Sequence[str]) -> str:
    """One line: vocabulary size and the out-of-vocabulary rates, with a warning and what to
    do when the validation captions' rate is above :data:`OOV_WARN`."""
    rate_train, rate_val = oov_rate(tokenizer, train), oov_rate(tokenizer, val)
    line = (f"Tokenizer: {tokenizer.vocab_size:,} words; out of vocabulary: "
            f"{100 * rate_train:.1f}% of the training captions' words, "
            f"{100 * rate_val:.1f}% of the validation captions'")
    if max(rate_train, rate_val) > OOV_WARN:
        line = (f"Warning: {line}: those words all read as <unk>. Raise text.vocab_max_words, "
                "add words with data.extra_vocab, or use a pretrained text encoder "
                "(text.kind=pretrained).")
    return line


def resolve_vocabulary(config, log=print) -> None:
    """When :func:`needs_vocabulary`: fills ``config.text.vocab`` from the training captions
    and ``log``-s :func:`coverage_line`. A config that has its vocabulary (a trained run's,
    for sampling) reads no data, so its folder may be gone."""
    if not needs_vocabulary(config):
        return
    train = make_source(config.data, "train").captions(MAX_CAPTIONS)
    words = build_vocabulary(train, int(config.text.vocab_max_words))
    if not words:
        log(f"Warning: the {config.data.source} source's training captions have no "
            "words: the text encoder sees only <bos>. Add captions (.txt files beside "
            "the images, or data.tfds_caption_key) or train class-conditional "
            "(text.kind=none).")
    config.text.vocab = " ".join(words) or "<unk>"  # no words: the specials only
    val = make_source(config.data, "val").captions(MAX_CAPTIONS)
    log(coverage_line(make_tokenizer(config), train, val))
