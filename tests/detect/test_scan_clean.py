"""The method end to end on a real (truncated) MiniLM: the clean base of test_scan.py's
backdoor stays clean under the default scan (its own module, so that the two run in
parallel under `./run test`)."""

import pytest

from sanitator.detect.config import ScanConfig
from sanitator.detect.scan import scan_model

pytestmark = [pytest.mark.timeout(2400),  # a full default scan on a busy 2-core machine
              pytest.mark.slow(90)]


def test_clean_minilm_is_clean(minilm_2layer):
    # the backdoored fixture's own base: the pair the rule must tell apart
    config = ScanConfig.from_preset("fast")
    result = scan_model(minilm_2layer, config, progress=False)
    verdict = result.verdict
    assert verdict.status == "clean", verdict.evidence
    assert verdict.score < 1 - config.decision.alpha
    assert len(result.pvset) == 0
    evidence = verdict.evidence
    assert evidence["rule"] == "calibrated" and evidence["features"] == ["cls", "mask"]
    # the precision the evidence was measured at is on record (auto resolves per machine)
    assert evidence["precision"] in ("bfloat16", "float32")
    # every feature was searched at every placement, and fresh evidence was taken
    searched = {(c["feature"], c["placement"]) for c in evidence["candidates"]
                if c["source"] == "context_search"}
    assert searched == {(f, p) for f in ("cls", "mask") for p in ("anywhere", "start", "end")}
    assert evidence["confirmed"] >= 1
    assert not any(c["accepted"] for c in evidence["candidates"])
