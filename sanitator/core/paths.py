"""Where bundled and shared data live."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "SANITATOR_DATA_DIR"


class DataNotFoundError(FileNotFoundError):
    """A dataset the caller asked for is not on disk."""


def data_dir() -> Path:
    """The folder of offline Parquet datasets (WikiText, SST-2, ...).

    `SANITATOR_DATA_DIR` wins; otherwise a `shared/data` folder beside or above the
    current directory or this source tree (the layout of a checkout next to `shared/`).
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataNotFoundError(f"{DATA_DIR_ENV}={env} is not a folder")
        return path
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    raise DataNotFoundError(
        f"no dataset folder found: set {DATA_DIR_ENV} to a folder holding e.g. "
        "wikitext/wikitext2_test_sentences.parquet, or pass a dataset path explicitly"
    )
