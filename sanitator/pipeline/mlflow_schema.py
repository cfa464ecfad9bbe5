"""A new sqlite MLflow database starts as a copy of an empty schema cached per MLflow version.

MLflow builds a new database by running its whole chain of migrations: 1.6 s of CPU on a
2-core machine, paid by the first audit of every store (and by every test that makes one),
on the flow's critical path before the first model is submitted. The schema depends only
on the MLflow version, so it is built once into the cache folder
(`$SANITATOR_CACHE_DIR`, else `$XDG_CACHE_HOME/sanitator`, else `~/.cache/sanitator`) and
copied. The template holds tables only: MLflow still creates the default experiment (with
the store's own artifact root) when it first opens the copy, as with a database it built.
An existing database is never touched, a damaged cache file is built again, and any
failure leaves MLflow to build the schema itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import uuid
from contextlib import closing
from pathlib import Path

log = logging.getLogger(__name__)

_SQLITE = "sqlite:///"
# what opening a tracker on a sqlite file imports (2.3 s here): a command imports them
# while its Prefect API and cluster start, instead of on the flow's path afterwards
CLIENT_MODULES = ("mlflow.tracking.client", "mlflow.store.tracking.sqlalchemy_store")


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a plain sqlite tracking URI, or None for anything else."""
    if not tracking_uri.startswith(_SQLITE) or "?" in tracking_uri:
        return None
    path = tracking_uri[len(_SQLITE):]
    return Path(path) if path and path != ":memory:" else None


def cache_dir() -> Path:
    if os.environ.get("SANITATOR_CACHE_DIR"):
        return Path(os.environ["SANITATOR_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sanitator"


def _new_file(folder: Path, name: str) -> Path:
    """A new empty file beside where `name` will be, with the mode a plain create gives
    (0666 less the umask, as MLflow's own file would have)."""
    path = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return path


def _usable(path: Path) -> bool:
    """A sqlite file with MLflow's tables and its version stamp (a damaged cache file is
    built again rather than copied into a store)."""
    try:
        with closing(sqlite3.connect(path)) as db:
            tables = {name for (name,) in db.execute(
                "select name from sqlite_master where type = 'table'")}
            stamps = db.execute("select count(*) from alembic_version").fetchone()[0] \
                if "alembic_version" in tables else 0
    except sqlite3.Error:
        return False
    return {"experiments", "runs"} <= tables and stamps == 1


def template() -> Path:
    """The cached empty schema of the installed MLflow, built on first use."""
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    path = cache_dir() / f"mlflow-{mlflow.__version__}-schema.db"
    if path.is_file() and _usable(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file(path.parent, path.name)
    try:
        engine = sqlalchemy.create_engine(f"{_SQLITE}{tmp}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        if not _usable(tmp):
            raise RuntimeError("the schema MLflow built is not as expected")
        os.replace(tmp, path)  # atomic: a concurrent builder's copy is just as good
    finally:
        tmp.unlink(missing_ok=True)
    return path


def seed(tracking_uri: str) -> Path | None:
    """Create the sqlite database of `tracking_uri` from the template if it does not exist
    yet; returns the file it created, or None (not sqlite, already there, or failed)."""
    target = sqlite_path(tracking_uri)
    if target is None or target.exists() or not target.parent.is_dir():
        return None
    try:
        source = template()
        tmp = _new_file(target.parent, target.name)
        try:
            shutil.copyfile(source, tmp)
            os.link(tmp, target)  # all at once, and never over a database made meanwhile
        finally:
            tmp.unlink()
    except Exception as exc:  # MLflow builds the schema itself
        log.debug("MLflow schema template not used for %s: %s", target, exc)
        return None
    return target
