"""Words of texts: normalisation, overlap with a vocabulary, and the training vocabulary of a corpus."""

from __future__ import annotations

import re
import string

from dimba.data.corpora import load_corpus, split_text

_STRIP = str.maketrans("", "", string.punctuation + "\u2018\u2019\u201c\u201d")


def normalize_words(text: str) -> list[str]:
    """Whitespace-separated words, lower-cased, punctuation stripped, empty ones dropped."""
    words = (w.lower().translate(_STRIP) for w in re.split(r"\s+", text))
    return [w for w in words if w]


def word_overlap(text: str, vocabulary: set[str]) -> float:
    """Fraction of the words of ``text`` that occur in ``vocabulary`` (1.0 for an empty text)."""
    words = normalize_words(text)
    if not words:
        return 1.0
    return sum(w in vocabulary for w in words) / len(words)


def training_vocabulary(corpus: str, val_fraction: float = 0.05) -> set[str]:
    """The normalised words of the training split of a corpus."""
    train, _ = split_text(load_corpus(corpus), val_fraction)
    return set(normalize_words("\n".join(train)))
