"""Ground facts every room shares, torch-free: statuses, the monitor threshold, data paths."""

from sanitator.core.constants import MONITOR_THRESHOLD
from sanitator.core.status import (
    GATE_STATUSES,
    SCANNED_STATUSES,
    SKIPPED_STATUSES,
    STATUSES,
    VERDICT_STATUSES,
    Status,
)

__all__ = ["GATE_STATUSES", "MONITOR_THRESHOLD", "SCANNED_STATUSES", "SKIPPED_STATUSES",
           "STATUSES", "VERDICT_STATUSES", "Status"]
