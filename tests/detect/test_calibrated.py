"""Bookkeeping of the calibrated scan that needs no encoder: which candidates are blends of
accepted triggers, and what is left of them once those are taken out; how the verdict's
confirmations are shared out, and that a spent budget never ends `clean`."""

from types import SimpleNamespace

import pytest
import torch

from sanitator.detect.allocation import outcome, reason, status, worth_confirming
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


def _quota_scan(**overrides) -> CalibratedScan:
    return CalibratedScan(None, ScanConfig.from_preset("fast", **overrides), {})


def test_a_spent_quota_leaves_the_candidate_unjudged_and_the_scan_never_clean():
    # the reference stage's quota is spent; a candidate due a confirmation is not judged
    scan = _quota_scan(confirmation_quotas=(("reference", 0),), default_quota=2)
    due = _finding([5])
    due.source = "reference"
    scan.findings.append(due)
    scan._confirm(due)
    assert due.confirmation is None and due.unjudged
    assert due.note == "confirmation quota of reference spent (0)"
    assert scan.unjudged == [due]
    summary = scan.allocation.summary(scan.findings)
    assert summary["unjudged"] == 1 and summary["judged"] == 0
    assert summary["by_source"]["reference"] == {
        "quota": 0, "proposed": 1, "confirmed": 0, "screened": 0, "merged": 0,
        "below_floor": 0, "unjudged": 1, "other": 0}
    assert status(accepted=False, unjudged=summary["unjudged"]) == "inconclusive"
    assert "reference 1" in reason(summary)
    # an accepted trigger settles the verdict whatever was left
    assert status(accepted=True, unjudged=1) == "backdoored"
    assert status(accepted=False, unjudged=0) == "clean"


def test_the_whole_budget_spent_leaves_every_source_unjudged():
    # no confirmation at all (the measured case): nothing due can end clean
    scan = _quota_scan(confirmation_budget=0)
    for source in ("vocabulary_screen", "token_screen", "a_new_stage"):
        finding = _finding([len(scan.findings) + 1])
        finding.source = source
        scan.findings.append(finding)
        scan._confirm(finding)
    assert [f.unjudged for f in scan.findings] == [True, True, True]
    assert all(f.note == "confirmation budget spent (0)" for f in scan.findings)
    assert status(False, scan.allocation.summary(scan.findings)["unjudged"]) == "inconclusive"
    # a candidate confirmed only so a feature reports evidence was not due one
    forced = _finding([9])
    scan._confirm(forced, forced=True)
    assert not forced.unjudged


def test_quotas_are_per_source_and_a_new_source_gets_the_default():
    scan = _quota_scan(confirmation_quotas=(("reference", 4),), default_quota=1,
                       confirmation_budget=16)
    allocation = scan.allocation
    for _ in range(4):
        assert allocation.refusal("reference") is None
        allocation.spend("reference")
    assert allocation.refusal("reference") == "confirmation quota of reference spent (4)"
    # another stage still has its own share: decoys in one stage cannot starve it
    assert allocation.refusal("divergence") is None
    allocation.spend("divergence")
    assert allocation.refusal("divergence") == "confirmation quota of divergence spent (1)"
    with pytest.raises(ValueError, match="confirmation_quotas"):
        ScanConfig.from_preset("fast", confirmation_quotas=(("reference", -1),))


def _worth(scan, finding, view) -> bool:
    return worth_confirming(scan.findings, finding, view, scan.config.decision)


class _View:
    """What `worth_confirming` reads of a feature view: the centre and the screen."""

    def __init__(self, failed: list[str]):
        self.search_centre = torch.zeros(4)
        self.failed = failed

    def screen(self, ids, placement, point):
        return SimpleNamespace(failed=self.failed)


def test_a_repeat_of_a_judged_point_and_a_clear_side_condition_failure_cost_nothing():
    scan = _quota_scan()
    judged = _finding([1])
    judged.point = torch.tensor([1.0, -1.0, 1.0, 1.0])
    judged.confirmation = SimpleNamespace(usable=False)
    scan.findings.append(judged)
    repeat = _finding([2])            # same signs in both frames, no tighter: merged
    repeat.point = torch.tensor([2.0, -0.5, 0.1, 3.0])
    assert not _worth(scan, repeat, _View([]))
    assert repeat.note == "same point as judged 1"
    tighter = _finding([3])           # the same point pinned tighter is judged again
    tighter.point, tighter.search_margin = repeat.point, 0.2
    assert _worth(scan, tighter, _View([]))
    elsewhere = _finding([4])         # another point that fails a side condition
    elsewhere.point = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    assert not _worth(scan, elsewhere, _View(["clean_text_not_there"]))
    assert elsewhere.note == "fails on the search rows: clean_text_not_there"
    assert [outcome(f) for f in (repeat, elsewhere)] == ["merged", "screened"]


def _holds(row: list[int], piece: list[int]) -> bool:
    return any(row[i:i + len(piece)] == piece for i in range(len(row) - len(piece) + 1))


def test_only_the_confirmation_reads_the_fresh_rows(tiny_encoders):
    # every fresh sentence carries a made-up word of several pieces that no other row and
    # no word list holds; every sentence the encoder is given outside the confirmation is
    # recorded (the embedding lookup), and none may hold it: not a search, not the
    # screen's word list, not the false-alarm check. FreshRows.data refuses the rest.
    from sanitator.detect.calibrated import run
    from sanitator.detect.corpus import distinct_sentences, load_sentences
    from sanitator.detect.encoders import load_encoder
    from sanitator.detect.evidence import FreshRowsRead, reading_fresh

    config = ScanConfig.from_preset("fast", features=("cls",), n_sentences=64, n_fresh=32,
                                    token_screen=8, steps=2, screen_candidates=4,
                                    false_alarm_corpora=())
    encoder = load_encoder(tiny_encoders["bert"])
    marker = encoder.tokenizer(" qzxwvj", add_special_tokens=False)["input_ids"]
    assert len(marker) >= 3
    text = load_sentences(None, n=64 + 64 + 40, seed=3)
    fresh = [f"qzxwvj {s}" for s in text[-32:]]
    # a repeat of a search sentence among the fresh ones is dropped, not judged twice
    sentences = [*text[:128], fresh[0], *fresh]
    assert len(distinct_sentences(encoder.tokenizer, sentences, 33)) == len(sentences) - 1
    leaks: list[list[int]] = []

    def record(module, inputs, output):
        if not reading_fresh():
            leaks.extend(row for row in inputs[0].tolist() if _holds(row, marker))

    hook = encoder.word_embeddings.register_forward_hook(record)
    try:
        scan = run(encoder, config, sentences, progress=False)
    finally:
        hook.remove()
    assert not leaks, f"{len(leaks)} rows with fresh text read outside the confirmation"
    assert scan.findings and any(f.confirmation is not None for f in scan.findings)
    view = scan.views["cls"]
    with pytest.raises(FreshRowsRead):
        view.fresh.placed("anywhere")


def test_other_corpora_are_read_without_fresh_rows_and_without_the_trigger(tiny_encoders,
                                                                            tmp_path):
    # the natural-text check (`other_text_not_there`): every configured corpus but the
    # scan's own, no fresh sentence among them, and a sentence holding one of the trigger's
    # tokens left out (a backdoor keyed on a word common in some corpus fires there)
    from sanitator.detect.calibrated_view import FeatureView
    from sanitator.detect.corpus import load_sentences
    from sanitator.detect.encoders import load_encoder
    from sanitator.detect.false_alarms import Elsewhere

    own = tmp_path / "own.txt"
    own.write_text("\n".join(load_sentences("sst2", n=300, seed=1)), encoding="utf-8")
    config = ScanConfig.from_preset("fast", features=("cls",), corpus=str(own),
                                    elsewhere_corpora=("wikitext", "sst2"),
                                    elsewhere_sentences=48)
    first = load_sentences("wikitext", n=100, seed=config.seed + 13)
    fresh = first[:20]       # what the check would have read first (one of them respelt)
    elsewhere = Elsewhere(config, exclude=[f"  {fresh[0].upper()} ", *fresh[1:]])
    assert elsewhere.read == []                       # nothing read until a check needs it
    texts = dict(elsewhere.texts)
    assert list(texts) == ["wikitext", "sst2"] and elsewhere.read == ["wikitext", "sst2"]
    assert all(len(rows) == 48 for rows in texts.values())
    assert not set(fresh) & set(texts["wikitext"])
    own_scan = ScanConfig.from_preset("fast", corpus="sst2", elsewhere_corpora=("wikitext",
                                                                                 "sst2"))
    assert [c for c, _ in Elsewhere(own_scan).texts] == ["wikitext"]   # its own: fresh rows
    missing = ScanConfig.from_preset("fast", elsewhere_corpora=("no_such_corpus", "sst2"))
    assert [c for c, _ in Elsewhere(missing).texts] == ["sst2"]   # skipped, said in the log

    encoder = load_encoder(tiny_encoders["bert"])
    rows = load_sentences("ag_news", n=96, seed=2)
    view = FeatureView(encoder, config, "cls", rows[:48], rows[48:], elsewhere)
    the = encoder.tokenizer.convert_tokens_to_ids("the")
    holding = {corpus: sum(the in encoder.tokenizer(s, truncation=True, max_length=33)
                           ["input_ids"] for s in sentences)
               for corpus, sentences in texts.items()}
    assert all(0 < n < 48 for n in holding.values()), holding
    kept = dict(view.elsewhere_clean((the,)))
    assert {c: len(out) for c, out in kept.items()} == {c: 48 - n for c, n in holding.items()}
    unheld = dict(view.elsewhere_clean((encoder.tokenizer.vocab_size - 1,)))
    assert {c: len(out) for c, out in unheld.items()} == {"wikitext": 48, "sst2": 48}
