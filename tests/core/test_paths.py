import pytest

from sanitator.core.paths import DATA_DIR_ENV, DataNotFoundError, data_dir


def test_env_variable_wins(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path


def test_env_variable_pointing_nowhere_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataNotFoundError, match="not a folder"):
        data_dir()
