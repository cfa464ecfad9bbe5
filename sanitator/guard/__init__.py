"""Deployment-side defence: the sign monitor, input purging, `MonitoredEncoder`, the
per-token monitor of taggers (`MonitoredTagger`), and the PV artifact format they read
(docs/deployment.md).
"""

from sanitator.core.lazy import lazy_exports

_EXPORTS = {
    "MonitoredEncoder": "monitor",
    "MonitoredTagger": "token_monitor",
    "PVArtifact": "pv_artifact",
    "PVArtifactError": "pv_artifact",
    "SignMonitor": "monitor",
    "TOKEN_FEATURE": "token_monitor",
    "read_pv_artifact": "pv_artifact",
    "write_pv_artifact": "pv_artifact",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
