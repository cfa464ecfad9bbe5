"""Stand-in scanners for flow tests that need control over time (timeouts, killed workers).

Importable by Dask workers: LocalCluster worker processes inherit the test's sys.path.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sanitator.detect.encoders import ModelInfo, preflight
from sanitator.detect.results import PVSet, Verdict


@dataclass
class FakeScanResult:
    verdict: Verdict
    pvset: PVSet
    info: ModelInfo | None


def _result(path: Path, backdoored: bool, seconds: float) -> FakeScanResult:
    info = preflight(path)
    if not backdoored:
        return FakeScanResult(Verdict("clean", score=0.02, seeds_tried=2, seconds=seconds),
                              PVSet.empty(8), info)
    vectors = torch.tensor([[1.0, -2.0, 3.0, -4.0, 0.5, 0.0, -0.1, 9.0],
                            [-1.0, 2.0, -3.0, 4.0, -0.5, 1.0, 0.1, -9.0]])
    pvset = PVSet(vectors, torch.ones(2, 3, 4), seeds=[3, 5],
                  losses=[{"distance": -0.9, "diversity": -3.4}, {"distance": -0.8}],
                  trigger_tokens=[["cf", "mn"], ["bb"]])
    return FakeScanResult(Verdict("backdoored", score=0.97, seeds_tried=4, steps=100,
                                  seconds=seconds, evidence={"support": 3}), pvset, info)


MARKERS_ENV = "FAKE_SCAN_MARKERS"
# folder-name word -> seconds of work in 0.1 s (interruptible) steps
DURATIONS = {"slow": 4.0, "lazy": 30.0}


def by_name(path: Any, config: Any, **_: Any) -> FakeScanResult:
    """Decide by the folder name: `stuck` never returns in time (one long uninterruptible
    sleep, like a stuck C call), `slow`/`lazy` work for a while in small interruptible steps,
    `backdoor` is backdoored, anything else clean. When FAKE_SCAN_MARKERS names a folder,
    each scan first drops a `<pid>-<name>` file there so a test can see who runs what."""
    path = Path(path)
    name = path.name
    markers = os.environ.get(MARKERS_ENV)
    if markers:
        (Path(markers) / f"{os.getpid()}-{name}").touch()
    if "stuck" in name:
        time.sleep(600)
    seconds = next((s for word, s in DURATIONS.items() if word in name), 0.0)
    for _ in range(int(seconds * 10)):
        time.sleep(0.1)
    return _result(path, "backdoor" in name, seconds)


def with_references(path: Any, config: Any, references: Any = None, **_: Any
                    ) -> FakeScanResult:
    """`by_name`'s verdict, with the references it was handed recorded the way the scan
    records the one it chose (the first) in `evidence.reference`."""
    path = Path(path)
    result = _result(path, "backdoor" in path.name, 0.0)
    offered = [candidate.describe() for candidate in references or []]
    result.verdict.evidence = {
        "reference": {**offered[0], "relative_change": 0.01} if offered else {"path": None},
        "offered": offered}
    return result
