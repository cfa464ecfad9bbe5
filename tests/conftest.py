"""Test-wide isolation: nothing leaks into the user's home, nothing reaches the network.

The environment is set at import time, before any test module imports Prefect, MLflow or
huggingface_hub, because those read their settings on import.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_SANDBOX = Path(tempfile.mkdtemp(prefix="sanitator-tests-"))
os.environ.update({
    "PREFECT_HOME": str(_SANDBOX / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "DO_NOT_TRACK": "true",
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SANDBOX / 'mlflow.db'}",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "HF_HOME": str(_SANDBOX / "hf"),
    "SANITATOR_CACHE_DIR": str(_SANDBOX / "cache"),  # the MLflow schema template
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
})
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per test process: two processes of two threads on two cores spin
    # against each other (FINDINGS.md §2); set before torch is imported
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(config, items):
    """Modules marked `slow(seconds)` first, longest first: `./run test` hands whole
    modules to two processes in this order (--no-loadscope-reorder), so a long module
    never starts last and leaves the other process idle."""
    def cost(item) -> float:
        mark = item.get_closest_marker("slow")
        return -float(mark.args[0]) if mark is not None and mark.args else 0.0
    items.sort(key=cost)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def sandbox() -> Path:
    """The session's private folder (PREFECT_HOME, MLflow db, HF and sanitator caches)."""
    return _SANDBOX


@pytest.fixture(scope="session")
def minilm_2layer(tmp_path_factory) -> Path:
    """MiniLM-L6 truncated to 2 layers: real pretrained weights, fast."""
    from sanitator.attacks.models import truncated_minilm

    return truncated_minilm(2, tmp_path_factory.mktemp("minilm2") / "model")


@pytest.fixture(scope="session")
def minilm_1layer(tmp_path_factory) -> Path:
    """MiniLM-L6 truncated to 1 layer: real pretrained weights, fastest."""
    from sanitator.attacks.models import truncated_minilm

    return truncated_minilm(1, tmp_path_factory.mktemp("minilm1") / "model")


@pytest.fixture(scope="session")
def tiny_encoders(tmp_path_factory) -> dict[str, Path]:
    """One tiny randomly initialised encoder folder per architecture (plumbing tests)."""
    from sanitator.attacks.models import TINY_ARCHITECTURES, build_tiny_encoder

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_encoder(arch, root / arch) for arch in TINY_ARCHITECTURES}


@pytest.fixture(scope="session")
def hostile_corpus(tmp_path_factory, tiny_encoders):
    """The hostile-input corpus (tests/hostile_corpus.py): ROOT with one folder per case,
    the cases with the row each must get, and the folder its payloads aim canaries at."""
    from hostile_corpus import build_corpus

    base = tmp_path_factory.mktemp("hostile")
    canary_dir = base / "canaries"
    canary_dir.mkdir()
    cases = build_corpus(base / "corpus", tiny_encoders["bert"], tiny_encoders["gpt2"],
                         canary_dir)
    return {"root": base / "corpus", "cases": cases, "canary_dir": canary_dir, "base": base}
