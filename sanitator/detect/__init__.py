"""The method (LMSanitator): load a frozen encoder, mine PVs, filter them, attribute hard
triggers, decide. Never imports Prefect, Dask or MLflow (tests/test_layout.py).
"""

from sanitator.core.lazy import lazy_exports

_EXPORTS = {
    "Encoder": "encoders",
    "Feature": "encoders",
    "MONITOR_THRESHOLD": "signs",
    "PVSet": "results",
    "REFERENCE_SOURCES": "reference",
    "ReferenceCandidate": "reference",
    "ScanConfig": "config",
    "ScanResult": "scan",
    "Verdict": "results",
    "load_encoder": "encoders",
    "scan_model": "scan",
    "sign_agreement": "signs",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
