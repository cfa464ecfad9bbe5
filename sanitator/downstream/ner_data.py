"""Token-classification (NER) tasks: sentences as word lists with one BIO tag per word.

The ready-made task is CoNLL04 (REFERENCE.md §7.2: the reference's own train / dev / test
files, BIO over Loc, Org, Peop, Other) in the shared data folder; any folder holding
`train.parquet` and `test.parquet` with a word-list column and a tag-list column works too.
`get_any_task` is the one lookup for every task: a token task, else a classification task
of `tasks_data`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from sanitator.core.paths import DataNotFoundError, data_dir
from sanitator.downstream.tasks_data import SPLITS, SplitSource, TaskError, TaskSpec, get_task

TOKENS_COLUMN, TAGS_COLUMN = "tokens", "ner_tags"
CONLL04_TAGS = ("O", "B-Loc", "I-Loc", "B-Org", "I-Org", "B-Other", "I-Other", "B-Peop",
                "I-Peop")


@dataclass(frozen=True)
class TokenTaskSpec:
    """A tagging task: one tag per word, tag names with `O` first (ids index this tuple)."""

    name: str
    splits: Mapping[str, SplitSource]
    tokens_column: str = TOKENS_COLUMN
    tags_column: str = TAGS_COLUMN
    tag_names: tuple[str, ...] | None = None   # None: the tags found, `O` first, then sorted
    max_length: int = 128
    description: str = ""

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            if split not in self.splits:
                raise TaskError(f"task {self.name!r}: needs a {split!r} split")
        if self.tag_names is not None and (not self.tag_names or self.tag_names[0] != "O"):
            raise TaskError(f"task {self.name!r}: the tag names must start with 'O'")


TOKEN_TASKS: dict[str, TokenTaskSpec] = {spec.name: spec for spec in (
    TokenTaskSpec("conll04", {split: SplitSource(f"conll04/{split}.parquet") for split in SPLITS},
                  tag_names=CONLL04_TAGS, max_length=128,
                  description="CoNLL04 entities, BIO over Loc/Org/Peop/Other (922 / 231 / 288)"),
)}


@dataclass
class TaggedSentences:
    """The rows of one split: word lists and tag ids (one per word)."""

    sentences: list[list[str]]
    tags: list[list[int]]

    def __len__(self) -> int:
        return len(self.sentences)

    def subset(self, n: int | None, seed: int) -> TaggedSentences:
        """`n` rows drawn with a seeded shuffle (all rows, in file order, when n is None)."""
        if n is None or n >= len(self.sentences):
            return self
        order = list(range(len(self.sentences)))
        random.Random(seed).shuffle(order)
        keep = sorted(order[:n])
        return TaggedSentences([self.sentences[i] for i in keep], [self.tags[i] for i in keep])


@dataclass
class TokenTaskData:
    spec: TokenTaskSpec
    splits: dict[str, TaggedSentences]
    tag_names: tuple[str, ...]

    def split(self, name: str) -> TaggedSentences:
        if name not in self.splits:
            raise TaskError(f"task {self.spec.name!r} has no {name!r} split")
        return self.splits[name]


def _read(spec: TokenTaskSpec, source: SplitSource) -> tuple[list[list[str]], list[list[str]]]:
    path = Path(source.path).expanduser()
    path = path if path.is_absolute() else data_dir() / path
    if not path.is_file():
        raise DataNotFoundError(f"task {spec.name!r}: data file {path} not found")
    table = pq.read_table(path)
    missing = [c for c in (spec.tokens_column, spec.tags_column) if c not in table.column_names]
    if missing:
        raise TaskError(f"task {spec.name!r}: {path} has no column(s) {missing}; its columns "
                        f"are {table.column_names}")
    words = table.column(spec.tokens_column).to_pylist()
    tags = table.column(spec.tags_column).to_pylist()
    for row, (w, t) in enumerate(zip(words, tags, strict=True)):
        if w is None or t is None or len(w) != len(t):
            raise TaskError(f"task {spec.name!r}: {path} row {row} needs as many tags as words")
    return [[str(x) for x in w] for w in words], [[str(x) for x in t] for t in tags]


def load_token_task(spec: TokenTaskSpec | str, splits: tuple[str, ...] = ("train", "test")
                    ) -> TokenTaskData:
    """Read the requested splits, with tags mapped to ids of the task's tag names."""
    if isinstance(spec, str):
        found = get_any_task(spec)
        if not isinstance(found, TokenTaskSpec):
            raise TaskError(f"{spec!r} is not a token-classification task")
        spec = found
    raw = {split: _read(spec, spec.splits[split]) for split in splits if split in spec.splits}
    seen = {tag for _, tags in raw.values() for row in tags for tag in row}
    names = spec.tag_names or ("O", *sorted(seen - {"O"}))
    unknown = sorted(seen - set(names))
    if unknown:
        raise TaskError(f"task {spec.name!r}: tags {unknown} outside {list(names)}")
    bad = sorted(t for t in names[1:] if t[:2] not in ("B-", "I-"))
    if bad:
        raise TaskError(f"task {spec.name!r}: tags {bad} are not BIO (B-TYPE, I-TYPE or O)")
    index = {name: i for i, name in enumerate(names)}
    data = {split: TaggedSentences(words, [[index[t] for t in row] for row in tags])
            for split, (words, tags) in raw.items()}
    return TokenTaskData(spec, data, tuple(names))


def _is_token_folder(path: Path) -> bool:
    """A task folder whose train file holds list columns `tokens` and `ner_tags`."""
    train = path / "train.parquet"
    if not (path.is_dir() and train.is_file() and (path / "test.parquet").is_file()):
        return False
    schema = pq.read_schema(train)
    return all(name in schema.names and pa.types.is_list(schema.field(name).type)
               for name in (TOKENS_COLUMN, TAGS_COLUMN))


def get_any_task(name_or_path: str, **columns) -> TokenTaskSpec | TaskSpec:
    """A ready-made token task, a user folder of token-task files (list columns `tokens`
    and `ner_tags`), else a classification task (`tasks_data.get_task`)."""
    if name_or_path in TOKEN_TASKS:
        if any(value is not None for value in columns.values()):
            raise TaskError(f"{name_or_path!r} is a ready-made task; column options apply to "
                            "user Parquet files only")
        return TOKEN_TASKS[name_or_path]
    path = Path(name_or_path).expanduser()
    if not any(value is not None for value in columns.values()) and _is_token_folder(path):
        path = path.resolve()
        splits = {split: SplitSource(str(path / f"{split}.parquet")) for split in SPLITS
                  if (path / f"{split}.parquet").is_file()}
        return TokenTaskSpec(path.name, splits, description=f"user data {path}")
    return get_task(name_or_path, **columns)
