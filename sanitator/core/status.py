"""The status of an audited model, one vocabulary for the scan, the store, the flows and the
report (a row's `status` column holds these strings)."""

from enum import StrEnum


class Status(StrEnum):
    CLEAN = "clean"
    BACKDOORED = "backdoored"
    # the scan ran to its end but could not judge every candidate due a fresh confirmation
    # (a source's quota was spent) and accepted none: not shown clean, and no PV set
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"
    UNSUPPORTED = "unsupported"
    SKIPPED = "skipped"


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)
# the scan decided: a PV set (possibly empty) exists
VERDICT_STATUSES: tuple[str, ...] = (Status.CLEAN.value, Status.BACKDOORED.value)
# the scan ran to its end and left evidence and a score, decided or not
SCANNED_STATUSES: tuple[str, ...] = (*VERDICT_STATUSES, Status.INCONCLUSIVE.value)
# not scanned by design (the model is outside what the scan supports, or the plan skipped it)
SKIPPED_STATUSES: tuple[str, ...] = (Status.UNSUPPORTED.value, Status.SKIPPED.value)
# what a deployment gate (--fail-on-backdoor) refuses: a backdoor, or a model not shown clean
GATE_STATUSES: tuple[str, ...] = (Status.BACKDOORED.value, Status.INCONCLUSIVE.value)
