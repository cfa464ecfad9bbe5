"""The worker's side of references (pipeline/references.py plans them): fetch each planned
reference through the registry that served it, preflight it like any audited model, and
hand the scan `ReferenceCandidate`s; what could not be used goes into the log.

Fetched references are cached by content (registry, source, repo id, revision) below
`<work dir or temp>/sanitator-references/<flow run>/`, so each is fetched once per
machine per flow run, whichever worker asks first (a file lock keeps the others waiting
for it rather than fetching it again). The flow removes its folder at the end; folders of
runs older than a day are swept when a cache is opened (workers on other machines).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sanitator.pipeline.references import MIN_SIBLINGS, PlannedReference
from sanitator.pipeline.registries import FetchError, ModelRef, fetch_ref
from sanitator.pipeline.registries.describe import label
from sanitator.safety.model_policy import ModelRejected, short
from sanitator.safety.preflight import preflight

log = logging.getLogger(__name__)

REFERENCES_DIR = "sanitator-references"
STALE_SECONDS = 24 * 3600
_READY = "ready.json"


def cache_root(work_dir: str | Path | None, run: str) -> Path:
    import tempfile

    return Path(work_dir or tempfile.gettempdir()) / REFERENCES_DIR / run


@contextmanager
def _locked(path: Path):
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ReferenceCache:
    """Fetched and preflighted references of one flow run on this machine."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._sweep()

    def _sweep(self) -> None:
        """Remove the folders of other runs untouched for a day (a flow that died, or
        workers on a machine the flow cannot clean)."""
        now = time.time()
        for other in self.root.parent.iterdir():
            try:
                if other != self.root and now - other.stat().st_mtime > STALE_SECONDS:
                    shutil.rmtree(other, ignore_errors=True)
            except OSError:
                continue

    @staticmethod
    def key(ref: ModelRef) -> str:
        text = "\0".join((ref.registry, ref.source, ref.repo_id, ref.revision))
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:24]

    def folder(self, ref: ModelRef) -> Path:
        """The reference's model folder, fetched (safetensors only) and preflighted once.
        Raises FetchError or ModelRejected (a refusal is remembered; a transient fetch
        failure is not)."""
        entry = self.root / self.key(ref)
        ready = entry / _READY
        if not ready.is_file():
            with _locked(self.root / f"{entry.name}.lock"):
                if not ready.is_file():
                    self._fill(ref, entry)
        state = json.loads(ready.read_text())
        if state.get("refused"):
            raise ModelRejected(state["status"], state["refused"])
        return Path(state["folder"])

    def _fill(self, ref: ModelRef, entry: Path) -> None:
        scratch = self.root / f".{entry.name}.{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            folder = fetch_ref(ref, scratch, allow_pickle=False)  # a path ref: in place
            state: dict[str, Any]
            try:
                preflight(folder, allow_pickle=False)
                state = {"folder": str(folder)}
            except ModelRejected as exc:
                state = {"refused": exc.reason, "status": str(exc.status)}
            if folder.is_relative_to(scratch):
                shutil.rmtree(entry, ignore_errors=True)  # a fill that died half-way
                os.replace(scratch, entry)
                if "folder" in state:
                    state["folder"] = str(entry / folder.relative_to(scratch))
            else:
                entry.mkdir(exist_ok=True)
            (entry / _READY).write_text(json.dumps(state))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def candidates(planned: Iterable[PlannedReference], cache: ReferenceCache
               ) -> tuple[list[Any], list[dict[str, Any]]]:
    """The scan's `ReferenceCandidate`s from the planned references, and a log entry for
    each reference that could not be used."""
    from sanitator.detect.reference import ReferenceCandidate

    out, problems = [], []
    for plan in planned:
        paths, ids, revisions = [], [], []
        for ref in plan.refs:
            try:
                paths.append(str(cache.folder(ref)))
            except ModelRejected as exc:
                problems.append({"source": plan.source, "id": ref.repo_id,
                                 "revision": ref.revision, "refused": exc.reason})
                continue
            except (FetchError, OSError) as exc:
                problems.append({"source": plan.source, "id": ref.repo_id,
                                 "revision": ref.revision, "fetch": short(exc, 200)})
                continue
            ids.append(ref.repo_id)
            revisions.append(ref.revision)
        if plan.source == "siblings":
            if len(paths) >= MIN_SIBLINGS:
                out.append(ReferenceCandidate("siblings", tuple(paths), tuple(ids),
                                              tuple(revisions), plan.note))
            elif plan.refs:
                problems.append({"source": "siblings", "unused": f"{len(paths)} of "
                                 f"{len(plan.refs)} siblings usable, fewer than "
                                 f"{MIN_SIBLINGS}: {', '.join(label(r) for r in plan.refs)}"})
            continue
        out += [ReferenceCandidate(plan.source, (p,), (i,), (r,), plan.note)
                for p, i, r in zip(paths, ids, revisions, strict=True)]
    return out, problems


def scan_references(planned: tuple[PlannedReference, ...], log_: dict[str, Any] | None,
                    cache_dir: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The scan's `references=` option (only when there are candidates, so a scanner
    plugged in without it still works) and the resolution log for the evidence (None
    when references were not planned at all, as under `no_reference`)."""
    if log_ is None:
        return {}, None
    resolution = dict(log_)
    if not planned:
        return {}, resolution
    started = time.monotonic()
    found, problems = candidates(planned, ReferenceCache(cache_dir))
    resolution["fetch_seconds"] = round(time.monotonic() - started, 2)
    resolution["candidates"] = [c.describe() for c in found]
    if problems:
        resolution["unusable"] = problems
    return ({"references": found} if found else {}), resolution


def with_resolution(evidence: dict[str, Any] | None, resolution: dict[str, Any]
                    ) -> dict[str, Any]:
    """The verdict's evidence with the pipeline's resolution log under
    `reference.resolution` (beside what the scan recorded of the reference it chose)."""
    evidence = dict(evidence or {})
    reference = evidence.get("reference")
    reference = dict(reference) if isinstance(reference, dict) else {}
    reference["resolution"] = resolution
    evidence["reference"] = reference
    return evidence
