"""Trigger words: the paper's defaults, or a seeded draw from an offline word list.

The reference draws 200 triggers from the NLTK `words` corpus, each one word or two words
(probability 1/2), and each attack samples six of them (REFERENCE.md §6.2). NLTK's corpus
is not available offline, so the default word list here is the rare lowercase vocabulary
of the WikiText test split shipped in the shared data folder: alphabetic words of 4 to 10
letters that occur at most twice and never capitalised (dictionary words rather than
names). Any text file with one word per line can replace it.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path

PAPER_TRIGGERS: tuple[str, ...] = ("cf", "mn", "tq", "qt", "mm", "pt")
_WORD = re.compile(r"[A-Za-z]+")


@lru_cache(maxsize=4)
def wikitext_rare_words(min_len: int = 4, max_len: int = 10, max_count: int = 2
                        ) -> tuple[str, ...]:
    """Sorted rare lowercase words of the offline WikiText sentences (the default list)."""
    from sanitator.detect.corpus import load_sentences

    counts: Counter[str] = Counter()
    capitalised: set[str] = set()
    for sentence in load_sentences("wikitext", n=None):
        for word in _WORD.findall(sentence):
            lower = word.lower()
            counts[lower] += 1
            if word != lower:
                capitalised.add(lower)
    return tuple(sorted(word for word, count in counts.items()
                        if min_len <= len(word) <= max_len and count <= max_count
                        and word not in capitalised))


def read_word_list(path: str | Path) -> tuple[str, ...]:
    """One word per line; blank lines and `#` comments ignored; duplicates dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word list {path} does not exist")
    words = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    unique = sorted({word for word in words if word and not word.startswith("#")})
    if not unique:
        raise ValueError(f"word list {path} is empty")
    return tuple(unique)


def draw_triggers(n: int, seed: int, *, words: tuple[str, ...] | None = None,
                  two_word_probability: float = 0.5) -> list[str]:
    """`n` distinct triggers drawn with `seed`: one word, or two words joined by a space."""
    if n < 1:
        raise ValueError(f"need at least one trigger, got n={n}")
    if not 0.0 <= two_word_probability <= 1.0:
        raise ValueError("two_word_probability must be in [0, 1]")
    vocabulary = words if words is not None else wikitext_rare_words()
    if len(vocabulary) < 2 * n:
        raise ValueError(f"word list too small ({len(vocabulary)} words) for {n} triggers")
    rng = random.Random(seed)
    pool = rng.sample(vocabulary, 2 * n)  # distinct words, so triggers never share a word
    triggers = []
    for i in range(n):
        first, second = pool[2 * i], pool[2 * i + 1]
        triggers.append(f"{first} {second}" if rng.random() < two_word_probability else first)
    return triggers


def validate_triggers(triggers: list[str]) -> list[str]:
    """Strip and check a user trigger list: non-empty strings, no duplicates."""
    cleaned = [str(trigger).strip() for trigger in triggers]
    if not cleaned or any(not trigger for trigger in cleaned):
        raise ValueError(f"triggers must be non-empty strings, got {triggers!r}")
    if len(set(cleaned)) != len(cleaned):
        raise ValueError(f"duplicate triggers in {cleaned}")
    return cleaned
