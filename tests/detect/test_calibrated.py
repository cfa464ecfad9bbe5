"""Bookkeeping of the calibrated scan that needs no encoder: which candidates are blends of
accepted triggers, and what is left of them once those are taken out."""

import torch

from sanitator.detect.calibrated import CalibratedScan
from sanitator.detect.calibrated_view import Finding
from sanitator.detect.config import ScanConfig


def _finding(ids, feature="cls", accepted=False) -> Finding:
    return Finding("test", feature, "anywhere", tuple(ids), [str(i) for i in ids], 0.1,
                   torch.zeros(4), accepted=accepted)


def test_accepted_triggers_are_taken_out_of_a_candidate_longest_first():
    scan = CalibratedScan(None, ScanConfig(), {})
    scan.findings = [_finding([7], accepted=True), _finding([3, 4], accepted=True),
                     _finding([9], feature="mask", accepted=True), _finding([5])]
    assert scan._without_accepted(_finding([1, 7])) == (1,)
    assert scan._without_accepted(_finding([3, 4, 2, 7])) == (2,)
    assert scan._without_accepted(_finding([4, 3])) == (4, 3)      # order matters
    assert scan._without_accepted(_finding([9, 1])) == (9, 1)      # another feature's
    assert scan._without_accepted(_finding([5, 1])) == (5, 1)      # not accepted
    assert scan._without_accepted(_finding([7])) == (7,)           # itself, not shorter
    assert scan._without_accepted(_finding([7, 3, 4])) == ()
