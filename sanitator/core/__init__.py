"""Ground facts every room shares, torch-free: statuses, the monitor threshold, data paths."""

from sanitator.core.constants import MONITOR_THRESHOLD
from sanitator.core.status import SKIPPED_STATUSES, STATUSES, VERDICT_STATUSES, Status

__all__ = ["MONITOR_THRESHOLD", "SKIPPED_STATUSES", "STATUSES", "VERDICT_STATUSES", "Status"]
