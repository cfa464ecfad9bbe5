"""Downstream classification tasks: ready-made definitions over the shared data, or any Parquet.

A task names the Parquet file behind each split, the text column (or two, for sentence
pairs), the label column, and the attack field the backdoor's triggers go into
(REFERENCE.md §5.4, §7.2). Tasks whose source ships no separate split are carved from one
file with a seeded shuffle, so every run sees the same rows.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from sanitator.core.paths import DataNotFoundError, data_dir

Text = str | tuple[str, str]
SPLITS = ("train", "validation", "test")
DEFAULT_TEXT_COLUMNS = ("text", "sentence", "sms", "content")
CARVE_SEED = 20230821  # fixed: carved splits must not depend on the evaluation seed


class TaskError(ValueError):
    """A task cannot be defined or read (unknown name, missing file or column, bad labels)."""


@dataclass(frozen=True)
class SplitSource:
    """Where one split's rows come from: a Parquet file, optionally a seeded slice of it.

    `path` is relative to the shared data folder unless absolute. With `rows=(start, stop)`
    the file is shuffled with `CARVE_SEED` and rows [start, stop) are kept, so slices of the
    same file with disjoint ranges are disjoint.
    """

    path: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A text classification task. `verbalizer` gives one label word per class (P-tuning v1)."""

    name: str
    splits: Mapping[str, SplitSource]
    text_columns: tuple[str, ...]
    label_column: str = "label"
    attack_column: str | None = None
    label_names: tuple[str, ...] | None = None
    verbalizer: tuple[str, ...] | None = None
    max_length: int = 128
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.text_columns) not in (1, 2):
            raise TaskError(f"task {self.name!r}: one text column or a pair, got "
                            f"{list(self.text_columns)}")
        if self.attack_column is not None and self.attack_column not in self.text_columns:
            raise TaskError(f"task {self.name!r}: attack column {self.attack_column!r} is not "
                            f"one of the text columns {list(self.text_columns)}")
        for split in ("train", "test"):
            if split not in self.splits:
                raise TaskError(f"task {self.name!r}: needs a {split!r} split")
        if self.verbalizer and self.label_names and len(self.verbalizer) != len(self.label_names):
            raise TaskError(f"task {self.name!r}: {len(self.verbalizer)} verbaliser words for "
                            f"{len(self.label_names)} labels")

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def attack_field(self) -> int:
        """Index of the text field triggers are inserted into (0 for single sentences)."""
        return self.text_columns.index(self.attack_column or self.text_columns[0])

    @property
    def n_labels(self) -> int | None:
        return len(self.label_names) if self.label_names else None


@dataclass
class Examples:
    """The rows of one split: texts (str, or (str, str) for pairs) and integer labels."""

    texts: list[Text]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, n: int | None, seed: int) -> Examples:
        """`n` rows drawn with a seeded shuffle (all rows, in file order, when n is None)."""
        if n is None or n >= len(self.texts):
            return self
        order = list(range(len(self.texts)))
        random.Random(seed).shuffle(order)
        keep = sorted(order[:n])
        return Examples([self.texts[i] for i in keep], [self.labels[i] for i in keep])


def _carve(path: str, start: int, stop: int) -> SplitSource:
    return SplitSource(path, (start, stop))


# The ready-made tasks over the shared data folder (see its README for sources and splits).
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec("sst2", {"train": SplitSource("sst2/train.parquet"),
                      "validation": SplitSource("sst2/validation.parquet"),
                      "test": SplitSource("sst2/test.parquet")},
             ("sentence",), label_names=("negative", "positive"),
             verbalizer=("bad", "good"), max_length=64,
             description="SST-2 sentence sentiment (6,920 / 872 / 1,821)"),
    TaskSpec("sms_spam", {"train": SplitSource("sms_spam/train.parquet"),
                          "validation": SplitSource("sms_spam/validation.parquet"),
                          "test": SplitSource("sms_spam/test.parquet")},
             ("sms",), label_names=("ham", "spam"), verbalizer=("normal", "spam"),
             max_length=128, description="UCI SMS spam, LMSanitator's unshuffled 80/10/10 split"),
    TaskSpec("enron_spam", {"train": SplitSource("enron_spam/train.parquet"),
                            "validation": SplitSource("enron_spam/validation.parquet"),
                            "test": SplitSource("enron_spam/test.parquet")},
             ("text",), label_names=("ham", "spam"), verbalizer=("normal", "spam"),
             max_length=128, description="Enron spam emails (6k / 2k / 2k)"),
    # AG News ships only its test file: carve a seeded 6,000 / 800 / 800 split from it.
    TaskSpec("ag_news", {"train": _carve("ag_news/test.parquet", 0, 6000),
                         "validation": _carve("ag_news/test.parquet", 6000, 6800),
                         "test": _carve("ag_news/test.parquet", 6800, 7600)},
             ("text",), label_names=("world", "sports", "business", "sci/tech"),
             verbalizer=("world", "sports", "business", "science"), max_length=128,
             description="AG News topics, carved from the 7,600-row test file"),
    # RTE's labelled evaluation set is its validation split, as in the reference (§7.2).
    TaskSpec("rte", {"train": SplitSource("rte/train.parquet"),
                     "validation": SplitSource("rte/validation.parquet"),
                     "test": SplitSource("rte/validation.parquet")},
             ("premise", "hypothesis"), attack_column="premise",
             label_names=("entailment", "not_entailment"), verbalizer=("yes", "no"),
             max_length=128, description="RTE sentence pairs; test = validation (277)"),
    # Binary Yelp sentences (Shen et al. 2017): no 5-class Yelp is available offline.
    TaskSpec("yelp", {"train": _carve("yelp_sentiment_shen2017/validation.parquet", 0, 6000),
                      "validation": _carve("yelp_sentiment_shen2017/validation.parquet",
                                           6000, 8000),
                      "test": _carve("yelp_sentiment_shen2017/test.parquet", 0, 2000)},
             ("text",), label_names=("negative", "positive"), verbalizer=("bad", "good"),
             max_length=64, description="Yelp review sentences, binary (Shen et al. 2017)"),
)}


def _resolve(path: str) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else data_dir() / candidate


def _read_rows(spec: TaskSpec, source: SplitSource) -> tuple[list[Text], list[object]]:
    path = _resolve(source.path)
    if not path.is_file():
        raise DataNotFoundError(f"task {spec.name!r}: data file {path} not found")
    names = pq.read_schema(path).names
    wanted = [*spec.text_columns, spec.label_column]
    missing = [column for column in wanted if column not in names]
    if missing:
        raise TaskError(f"task {spec.name!r}: {path} has no column(s) {missing}; its columns "
                        f"are {names}")
    table = pq.read_table(path, columns=wanted)
    columns = [table.column(name).to_pylist() for name in spec.text_columns]
    labels = table.column(spec.label_column).to_pylist()
    if any(label is None for label in labels):
        raise TaskError(f"task {spec.name!r}: {path} has empty labels in {spec.label_column!r}")
    fields = [["" if value is None else str(value) for value in column] for column in columns]
    texts: list[Text] = list(fields[0]) if len(fields) == 1 else list(zip(*fields, strict=True))
    if source.rows is not None:
        order = list(range(len(texts)))
        random.Random(CARVE_SEED).shuffle(order)
        start, stop = source.rows
        if stop > len(order):
            raise TaskError(f"task {spec.name!r}: {path} has {len(order)} rows, the split "
                            f"asks for rows up to {stop}")
        keep = order[start:stop]
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    return texts, labels


def label_mapping(spec: TaskSpec, raw_labels: list[object]) -> dict[object, int]:
    """Raw label value -> class index: integers 0..K-1 stay, anything else is sorted."""
    values = sorted(set(raw_labels), key=lambda value: (str(type(value)), value))
    if all(isinstance(value, int) and not isinstance(value, bool) for value in values):
        n = spec.n_labels or (max(values) + 1)
        if min(values) >= 0 and max(values) < n:
            return {value: value for value in range(n)}
    if spec.n_labels is not None and len(values) > spec.n_labels:
        raise TaskError(f"task {spec.name!r}: {len(values)} distinct labels, the task declares "
                        f"{spec.n_labels}")
    return {value: index for index, value in enumerate(values)}


@dataclass
class TaskData:
    """A task's splits read from disk, with labels mapped to 0..n_labels-1."""

    spec: TaskSpec
    splits: dict[str, Examples]
    n_labels: int
    label_names: tuple[str, ...]

    def split(self, name: str) -> Examples:
        if name not in self.splits:
            raise TaskError(f"task {self.spec.name!r} has no {name!r} split "
                            f"(has {sorted(self.splits)})")
        return self.splits[name]


def load_task(spec: TaskSpec | str, splits: tuple[str, ...] = ("train", "test")) -> TaskData:
    """Read the requested splits of a task (a TaskSpec, a ready-made name or a Parquet path)."""
    if isinstance(spec, str):
        spec = get_task(spec)
    raw = {split: _read_rows(spec, spec.splits[split]) for split in splits
           if split in spec.splits}
    if "train" in splits and "train" not in raw:
        raise TaskError(f"task {spec.name!r}: no train split")
    every_label = [label for _, labels in raw.values() for label in labels]
    mapping = label_mapping(spec, every_label)
    unknown = sorted({str(label) for label in every_label if label not in mapping})
    if unknown:
        raise TaskError(f"task {spec.name!r}: labels {unknown} outside the declared classes")
    n_labels = spec.n_labels or len(mapping)
    if n_labels < 2:
        raise TaskError(f"task {spec.name!r}: needs at least two classes, found {n_labels}")
    names = spec.label_names or tuple(str(value) for value in mapping)
    data = {split: Examples(texts, [mapping[label] for label in labels])
            for split, (texts, labels) in raw.items()}
    return TaskData(spec, data, n_labels, names)


def parquet_task(path: str | Path, *, text_column: str | None = None,
                 text_pair_column: str | None = None, label_column: str = "label",
                 attack_column: str | None = None, test_fraction: float = 0.2) -> TaskSpec:
    """A task over a user's data: one Parquet file (carved into train/test with a seeded
    shuffle) or a folder holding `train.parquet` and `test.parquet` (`validation.parquet`
    optional). Columns are declared; a single text column may be guessed from common names.
    """
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        files = {split: path / f"{split}.parquet" for split in SPLITS
                 if (path / f"{split}.parquet").is_file()}
        if "train" not in files or "test" not in files:
            raise TaskError(f"{path}: a task folder needs train.parquet and test.parquet "
                            f"(found {sorted(p.name for p in path.glob('*.parquet'))})")
        splits = {split: SplitSource(str(file)) for split, file in files.items()}
        schema_file = files["train"]
    elif path.is_file() and path.suffix == ".parquet":
        if not 0 < test_fraction < 1:
            raise TaskError("test_fraction must be in (0, 1)")
        n_rows = pq.ParquetFile(path).metadata.num_rows
        n_test = max(1, round(n_rows * test_fraction))
        if n_rows - n_test < 1:
            raise TaskError(f"{path}: {n_rows} rows are too few to split into train and test")
        splits = {"train": SplitSource(str(path), (0, n_rows - n_test)),
                  "test": SplitSource(str(path), (n_rows - n_test, n_rows))}
        schema_file = path
    else:
        raise TaskError(f"{path}: not a Parquet file or a folder of split files")
    names = pq.read_schema(schema_file).names
    if text_column is None:
        text_column = next((name for name in DEFAULT_TEXT_COLUMNS if name in names), None)
        if text_column is None:
            raise TaskError(f"{schema_file}: no text column among {names}; declare it "
                            "(--text-column)")
    columns = (text_column,) if text_pair_column is None else (text_column, text_pair_column)
    missing = [name for name in (*columns, label_column) if name not in names]
    if missing:
        raise TaskError(f"{schema_file}: missing column(s) {missing}; its columns are {names}")
    return TaskSpec(path.stem, splits, columns, label_column=label_column,
                    attack_column=attack_column, description=f"user data {path}")


def get_task(name_or_path: str, **columns) -> TaskSpec:
    """A ready-made task by name, or a user Parquet file/folder (see `parquet_task`)."""
    if name_or_path in TASKS:
        if any(value is not None for value in columns.values()):
            raise TaskError(f"{name_or_path!r} is a ready-made task; column options apply to "
                            "user Parquet files only")
        return TASKS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.suffix == ".parquet" or path.is_dir():
        if not path.exists():
            raise DataNotFoundError(f"task file {path} not found")
        return parquet_task(path, **{k: v for k, v in columns.items() if v is not None})
    raise TaskError(f"unknown task {name_or_path!r}: use one of {sorted(TASKS)} or a Parquet "
                    "file/folder")
