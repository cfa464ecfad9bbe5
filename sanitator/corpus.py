"""Clean text for mining, attacks and evaluation: WikiText by default, any Parquet/text file."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow.parquet as pq

from sanitator.paths import DataNotFoundError, data_dir

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
