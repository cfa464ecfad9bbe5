"""sanitator: audit pretrained language encoders for task-agnostic backdoors (LMSanitator)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sanitator")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+src"

__all__ = ["__version__"]
