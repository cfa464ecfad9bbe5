"""Scripts that are not a package (benchmarks/, deployments/, docs/examples/) loaded as
modules by the tests that exercise them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str | None = None):
    """The module at ROOT/relative, registered under `name` (dataclasses look their module
    up in sys.modules while being defined)."""
    path = ROOT / relative
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
