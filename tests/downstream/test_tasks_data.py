import pandas as pd
import pyarrow.parquet as pq
import pytest

from sanitator.core.paths import DataNotFoundError, data_dir
from sanitator.downstream.tasks_data import (
    TASKS,
    Examples,
    SplitSource,
    TaskError,
    TaskSpec,
    get_task,
    load_task,
    parquet_task,
)


@pytest.fixture(scope="module")
def shared_data():
    try:
        return data_dir()
    except DataNotFoundError:
        pytest.skip("the shared data folder is not available")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_ready_made_task_files_hold_the_declared_columns(shared_data, name):
    spec = TASKS[name]
    for source in spec.splits.values():
        names = pq.read_schema(shared_data / source.path).names
        assert set(spec.text_columns) | {spec.label_column} <= set(names)
    assert spec.attack_field in (0, 1)


def test_sst2_splits_and_labels(shared_data):
    data = load_task("sst2", ("train", "validation", "test"))
    assert (len(data.split("train")), len(data.split("test"))) == (6920, 1821)
    assert data.n_labels == 2 and set(data.split("test").labels) == {0, 1}
    assert isinstance(data.split("train").texts[0], str)


def test_rte_is_a_pair_task_attacked_in_the_premise(shared_data):
    data = load_task("rte")
    premise, hypothesis = data.split("test").texts[0]
    assert premise.startswith("Dana Reeve") and hypothesis.startswith("Christopher Reeve")
    assert data.spec.attack_field == 0 and data.spec.is_pair
    assert len(data.split("test")) == 277


def test_carved_splits_are_disjoint_and_stable(shared_data):
    first, again = load_task("ag_news"), load_task("ag_news")
    train, test = first.split("train"), first.split("test")
    assert (len(train), len(test)) == (6000, 800)
    assert not set(train.texts) & set(test.texts)
    assert test.texts == again.split("test").texts
    assert first.n_labels == 4


def test_subset_is_seeded_and_keeps_file_order():
    examples = Examples([f"t{i}" for i in range(100)], [i % 2 for i in range(100)])
    a, b, c = examples.subset(10, 3), examples.subset(10, 3), examples.subset(10, 4)
    assert a.texts == b.texts and a.texts != c.texts
    assert a.texts == sorted(a.texts, key=lambda t: int(t[1:]))
    assert examples.subset(None, 0) is examples


def _frame(n: int, **extra) -> pd.DataFrame:
    return pd.DataFrame({"review": [f"text number {i}" for i in range(n)],
                         "y": [i % 3 for i in range(n)], **extra})


def test_user_folder_task_with_declared_columns(tmp_path):
    _frame(30).to_parquet(tmp_path / "train.parquet")
    _frame(9).to_parquet(tmp_path / "test.parquet")
    spec = get_task(str(tmp_path), text_column="review", label_column="y")
    data = load_task(spec)
    assert data.n_labels == 3 and len(data.split("train")) == 30
    assert data.split("test").labels == [0, 1, 2] * 3


def test_user_single_file_is_carved_into_train_and_test(tmp_path):
    path = tmp_path / "mine.parquet"
    _frame(50).to_parquet(path)
    data = load_task(parquet_task(path, text_column="review", label_column="y"))
    train, test = data.split("train"), data.split("test")
    assert (len(train), len(test)) == (40, 10)
    assert not set(train.texts) & set(test.texts)


def test_string_labels_are_mapped_in_sorted_order(tmp_path):
    path = tmp_path / "words.parquet"
    pd.DataFrame({"text": ["a b", "c d", "e f", "g h", "i j"],
                  "label": ["spam", "ham", "spam", "ham", "ham"]}).to_parquet(path)
    data = load_task(parquet_task(path, test_fraction=0.4))
    assert data.label_names == ("ham", "spam")
    everything = data.split("train").labels + data.split("test").labels
    assert sorted(everything) == [0, 0, 0, 1, 1]


def test_missing_column_is_a_clear_error(tmp_path):
    path = tmp_path / "mine.parquet"
    _frame(10).to_parquet(path)
    with pytest.raises(TaskError, match=r"missing column\(s\) \['label'\].*review"):
        parquet_task(path, text_column="review")
    with pytest.raises(TaskError, match="no text column"):
        parquet_task(path, label_column="y")


def test_a_declared_task_whose_file_lost_a_column_fails_on_load(tmp_path):
    _frame(10).to_parquet(tmp_path / "train.parquet")
    spec = TaskSpec("broken", {"train": SplitSource(str(tmp_path / "train.parquet")),
                               "test": SplitSource(str(tmp_path / "train.parquet"))},
                    ("sentence",), label_column="y")
    with pytest.raises(TaskError, match=r"no column\(s\) \['sentence'\]"):
        load_task(spec)


def test_unknown_task_and_bad_definitions():
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(DataNotFoundError):
        get_task("/no/such/file.parquet")
    with pytest.raises(TaskError, match="attack column"):
        TaskSpec("x", {"train": SplitSource("a"), "test": SplitSource("a")}, ("a",),
                 attack_column="b")
    with pytest.raises(TaskError, match="needs a 'test' split"):
        TaskSpec("x", {"train": SplitSource("a")}, ("a",))
    with pytest.raises(TaskError, match="ready-made"):
        get_task("sst2", text_column="review")
