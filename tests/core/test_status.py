"""One home per shared fact: the status vocabulary and the monitor threshold."""

import json

import torch

from sanitator.core import (
    GATE_STATUSES,
    MONITOR_THRESHOLD,
    SCANNED_STATUSES,
    SKIPPED_STATUSES,
    STATUSES,
    VERDICT_STATUSES,
    Status,
)
from sanitator.detect.signs import MONITOR_THRESHOLD as SCAN_THRESHOLD
from sanitator.detect.signs import sign_agreement
from sanitator.guard.monitor import SignMonitor
from sanitator.pipeline.store import VERDICT_FINAL
from sanitator.report import REPORT_SCHEMA
from sanitator.report import STATUSES as REPORT_STATUSES


def test_one_status_vocabulary():
    assert set(STATUSES) == {"clean", "backdoored", "inconclusive", "error", "unsupported",
                             "skipped"}
    assert {*SCANNED_STATUSES, *SKIPPED_STATUSES, Status.ERROR} == set(STATUSES)
    # inconclusive was scanned but decided nothing: no PV set, and a gate refuses it
    assert set(SCANNED_STATUSES) - set(VERDICT_STATUSES) == {"inconclusive"}
    assert set(GATE_STATUSES) == {"backdoored", "inconclusive"}
    assert Status.CLEAN == "clean" and f"{Status.ERROR}" == "error"
    assert json.dumps({"status": Status.BACKDOORED}) == '{"status": "backdoored"}'
    # the report orders them for reading (what needs attention first) but adds none
    assert sorted(REPORT_STATUSES) == sorted(STATUSES)
    assert REPORT_STATUSES[:2] == ("backdoored", "inconclusive")
    assert json.dumps(list(REPORT_STATUSES)) in json.dumps(REPORT_SCHEMA)
    # an inconclusive row never settles its key: every run audits it again
    assert {*VERDICT_STATUSES, "unsupported"} == VERDICT_FINAL


def test_one_monitor_threshold():
    assert SCAN_THRESHOLD is MONITOR_THRESHOLD == 0.8
    assert SignMonitor(torch.ones(1, 4)).threshold == MONITOR_THRESHOLD


def test_sign_agreement_counts_zero_as_positive():
    pvs = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    outputs = torch.tensor([[0.0, -2.0, 3.0, 4.0], [-1.0, 1.0, -1.0, 1.0]])
    assert sign_agreement(outputs, pvs).flatten().tolist() == [0.75, 0.0]
