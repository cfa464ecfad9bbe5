"""The status of an audited model, one vocabulary for the scan, the store, the flows and the
report (a row's `status` column holds these strings)."""

from enum import StrEnum


class Status(StrEnum):
    CLEAN = "clean"
    BACKDOORED = "backdoored"
    ERROR = "error"
    UNSUPPORTED = "unsupported"
    SKIPPED = "skipped"


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
# the scan decided: a PV set (possibly empty) exists
VERDICT_STATUSES: tuple[str, ...] = (Status.CLEAN.value, Status.BACKDOORED.value)
# not scanned by design (the model is outside what the scan supports, or the plan skipped it)
SKIPPED_STATUSES: tuple[str, ...] = (Status.UNSUPPORTED.value, Status.SKIPPED.value)
