"""Clean text for mining, attacks and evaluation: WikiText by default, any Parquet/text file."""

from __future__ import annotations

import functools
import random
import re
from pathlib import Path

import pyarrow.parquet as pq

from sanitator.core.paths import DataNotFoundError, data_dir

# Named corpora inside the shared data folder (see its README).
NAMED_CORPORA: dict[str, tuple[str, str]] = {
    "wikitext": ("wikitext/wikitext2_test_sentences.parquet", "text"),
    "wikitext-paragraphs": ("wikitext/wikitext2_test_paragraphs.parquet", "text"),
    "sst2": ("sst2/train.parquet", "sentence"),
    "sms_spam": ("sms_spam/train.parquet", "sms"),
    "enron_spam": ("enron_spam/train.parquet", "text"),
    "ag_news": ("ag_news/test.parquet", "text"),
    "yelp": ("yelp_sentiment_shen2017/validation.parquet", "text"),
}
TEXT_COLUMN_GUESSES = ("text", "sentence", "sms", "premise", "content")


class CorpusError(ValueError):
    """A corpus could not be read as a list of sentences."""


def _read_column(path: Path, column: str | None) -> list[str]:
    if path.suffix in {".txt", ".text"}:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    if path.suffix != ".parquet":
        raise CorpusError(f"{path}: expected a .parquet or .txt file")
    names = pq.read_schema(path).names
    if column is None:
        column = next((name for name in TEXT_COLUMN_GUESSES if name in names), None)
        if column is None:
            raise CorpusError(f"{path}: no text column among {names}; pass column=")
    elif column not in names:
        raise CorpusError(f"{path}: missing column {column!r} (has {names})")
    return [str(value) for value in pq.read_table(path, columns=[column]).column(0).to_pylist()
            if value is not None]


def resolve_corpus(source: str | Path | None) -> tuple[Path, str | None]:
    """A corpus name (`wikitext`, `sst2`, ...) or a file path -> (file, text column)."""
    if source is None:
        source = "wikitext"
    if isinstance(source, str) and source in NAMED_CORPORA:
        relative, column = NAMED_CORPORA[source]
        return data_dir() / relative, column
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataNotFoundError(
            f"corpus {source!r} is neither a file nor one of {sorted(NAMED_CORPORA)}")
    return path, None


def load_sentences(source: str | Path | None = None, n: int | None = 2000, *,
                   seed: int = 42, column: str | None = None, min_words: int = 5) -> list[str]:
    """`n` clean sentences (all when None), a seeded shuffle of the corpus's usable rows."""
    path, default_column = resolve_corpus(source)
    rows = [text for text in _read_column(path, column or default_column)
            if len(text.split()) >= min_words]
    if not rows:
        raise CorpusError(f"{path}: no sentence with at least {min_words} words")
    random.Random(seed).shuffle(rows)
    return rows if n is None else rows[:n]


def distinct_sentences(tokenizer, sentences: list[str], max_tokens: int) -> list[str]:
    """The first of every group of sentences that read as the same tokens once cut to
    `max_tokens` (what a scan row holds), in order: so no sentence can sit both among a
    scan's fresh rows and elsewhere."""
    encoded = tokenizer(sentences, truncation=True, max_length=max_tokens)["input_ids"]
    seen: dict[tuple[int, ...], str] = {}
    for sentence, ids in zip(sentences, encoded, strict=True):
        seen.setdefault(tuple(ids), sentence)
    return list(seen.values())


# Word lists for trigger attribution: real words a backdoor could be keyed on. Enron's mail
# headers and the paragraph copy of WikiText add size, not vocabulary.
WORD_LIST_CORPORA: tuple[str, ...] = ("wikitext", "sst2", "sms_spam", "ag_news", "yelp")
_WORD = re.compile(r"[^\W\d_]{3,}")


def corpus_words(texts: list[str] | None = None, *, max_words: int = 100_000) -> list[str]:
    """Distinct lower-cased words (letters only, 3+ characters) of `texts` and of the
    offline corpora that are present, in first-seen order, at most `max_words`."""
    seen: dict[str, None] = {}
    for word in _WORD.findall(" ".join(texts or []).lower()):
        seen.setdefault(word)
    for word in _offline_words():
        if len(seen) >= max_words:
            break
        seen.setdefault(word)
    return list(seen)[:max_words]


@functools.cache
def _offline_words() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for name in WORD_LIST_CORPORA:
        try:
            path, column = resolve_corpus(name)
            rows = _read_column(path, column)
        except (DataNotFoundError, CorpusError, OSError):
            continue  # the word list is best effort: a missing corpus narrows it
        for word in _WORD.findall(" ".join(rows).lower()):
            seen.setdefault(word)
    return tuple(seen)
