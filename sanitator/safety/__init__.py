"""Everything checked before a model is built: what an audited model may be
(`model_policy`), where its files may be and what they may hold (`weight_files`), and the
preflight that runs every check (`preflight`). Lowest room after core: it reads files, never
builds a model.
"""

from sanitator.core.lazy import lazy_exports

_EXPORTS = {
    "ModelInfo": "preflight",
    "ModelRejected": "model_policy",
    "SUPPORTED_MODEL_TYPES": "model_policy",
    "inspect_model": "preflight",
    "preflight": "preflight",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
