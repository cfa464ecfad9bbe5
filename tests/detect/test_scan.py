"""The method end to end on a real (truncated) MiniLM: a backdoor whose triggers look
ordinary alone (standalone-regularised) is found where it fires, in sentences, with every
planted PV recovered in search mode (its clean base: test_scan_clean.py); with its
confirmations spent it is inconclusive, never clean."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sanitator.attacks.common import Budget
from sanitator.attacks.por import insert_por
from sanitator.attacks.targets import paper_block_pvs
from sanitator.detect.calibrated import CalibratedScan
from sanitator.detect.calibrated_view import FeatureView, Finding
from sanitator.detect.config import ScanConfig
from sanitator.detect.corpus import load_sentences
from sanitator.detect.encoders import load_encoder
from sanitator.detect.refine import refine_accepted
from sanitator.detect.results import PVSet
from sanitator.detect.scan import scan_model
from sanitator.detect.signs import sign_agreement

TRIGGERS = ("cf", "tq")
pytestmark = [pytest.mark.timeout(2400),  # planting + scans on a busy 2-core machine
              pytest.mark.slow(250)]


@pytest.fixture(scope="module")
def por_minilm(minilm_2layer, tmp_path_factory):
    """POR on 2 MiniLM layers; each trigger alone between the special tokens is held at
    the base's output, so a standalone vocabulary sweep sees nothing odd."""
    out = tmp_path_factory.mktemp("por") / "model"
    targets = paper_block_pvs(384, 6)[[0, 2]]
    insert_por(minilm_2layer, out, triggers=TRIGGERS, targets=targets,
               budget=Budget(steps=150, batch_size=16, lr=1e-4, head_warmup_steps=0),
               seed=0, standalone_weight=10.0, progress=False)
    return out, targets


@pytest.fixture(scope="module")
def por_detection(por_minilm):
    # search mode without the vocabulary screen: the token screen and the context search,
    # both working inside sentences, must find every trigger and so every planted PV
    # (planted at CLS; the mask feature's search is the clean test's business)
    # (and without the reference diff, which has its own test below)
    # (three rounds: two triggers; the audit's cap of 8 is for six-trigger encoders)
    config = ScanConfig.from_preset("fast", mode="search", max_seeds=0, screen_candidates=0,
                                    features=("cls",), reference_tokens=0, search_restarts=3)
    return scan_model(por_minilm[0], config, progress=False)


def test_backdoor_that_looks_ordinary_alone_is_found_in_context(por_minilm, por_detection):
    verdict = por_detection.verdict
    assert verdict.status == "backdoored", verdict.evidence
    assert verdict.score >= 1 - ScanConfig.from_preset("fast").decision.alpha
    # found at CLS by the searches in sentences (then judged at the token feature too)
    accepted = [c for c in verdict.evidence["candidates"]
                if c["accepted"] and c["feature"] == "cls"]
    assert accepted
    # (search mode grows each accepted trigger at the end: refine.py)
    assert {c["source"] for c in accepted} <= {"token_screen", "context_search", "refine"}
    found = accepted[0]["fresh"]
    assert found["agreement"] > found["floor"] and found["success"] >= 0.5
    assert any(token.startswith(TRIGGERS) for tokens in por_detection.pvset.trigger_tokens
               for token in tokens)


def test_search_in_sentences_alone_recovers_every_planted_pv(por_minilm, por_detection):
    _, targets = por_minilm
    cls = por_detection.pvset.select("cls")
    agreement = sign_agreement(cls.vectors, targets)   # [found, planted]
    assert (agreement.max(dim=0).values >= 0.9).all(), agreement


def test_bad_models_get_a_status_not_an_exception(tiny_encoders, tmp_path):
    unsupported = scan_model(tiny_encoders["gpt2"], progress=False)
    assert unsupported.verdict.status == "unsupported"
    assert "gpt2" in unsupported.verdict.reason
    missing = scan_model(tmp_path, progress=False)
    assert missing.verdict.status == "error"
    assert "config.json" in missing.verdict.reason


def test_scan_command_prints_one_json_object(tiny_encoders):
    command = [str(Path(sys.executable).parent / "sanitator"), "scan",
               str(tiny_encoders["gpt2"]), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    payload = json.loads(done.stdout)
    assert payload["status"] == "unsupported"
    assert set(payload) == {"status", "score", "pvs", "trigger_tokens", "seeds_tried",
                            "seconds", "reason", "evidence"}


def test_pv_set_round_trips_without_pickle(por_detection, tmp_path):
    result = por_detection
    file = tmp_path / "pvs.safetensors"
    result.pvset.save(file)
    loaded = PVSet.load(file)
    assert torch.equal(loaded.vectors, result.pvset.vectors)
    assert loaded.trigger_tokens == result.pvset.trigger_tokens
    assert loaded.features == result.pvset.features and loaded.features
    raw = file.read_bytes()  # the safetensors layout: u64 header length, JSON header
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert set(header) == {"__metadata__", "vectors", "triggers"}


def test_the_reference_diff_alone_finds_the_backdoor(por_minilm):
    # the fixture derives from the installed MiniLM: its first layer's change names the
    # triggers, and an ordering of them is confirmed fresh like any other candidate
    # complete=True: as every audit scans (flows/audit_zoo.py); completion capped at 2 rounds;
    # no divergence beam (its own tests: test_divergence.py), which completion would run out
    config = ScanConfig.from_preset("fast", screen_candidates=0, token_screen=0, restarts=0,
                                    features=("cls",), complete=True, search_restarts=2,
                                    divergence_length=0)
    result = scan_model(por_minilm[0], config, progress=False)
    verdict = result.verdict
    assert verdict.status == "backdoored", verdict.evidence
    reference = verdict.evidence["reference"]
    assert reference["path"] and 0 < reference["relative_change"] < 0.5
    assert set(TRIGGERS) <= set(reference["most_changed"])
    accepted = [c for c in verdict.evidence["candidates"]
                if c["accepted"] and c["feature"] == "cls"]
    assert {c["source"] for c in accepted} - {"refine"} == {"reference"}
    assert all(set(c["hard_trigger"]) <= set(TRIGGERS)
               for c in accepted if c["source"] == "reference")
    # the token feature is not searched, but the accepted trigger is judged there too
    assert "token" in verdict.evidence["features"]
    assert any(c["source"] == "cross_feature" and c["feature"] == "token"
               for c in verdict.evidence["candidates"])
    # detect mode stops at the first PV, then an audit completes the set in search mode
    # (issue 15): the artifact a deployment pulls covers both planted triggers
    completion = verdict.evidence["completion"]
    assert completion["mode"] == "detect, completed in search mode"
    assert completion["stop"].startswith(("saturated", "round cap"))
    agreement = sign_agreement(result.pvset.select("cls").vectors, por_minilm[1])
    assert (agreement.max(dim=0).values >= 0.9).all(), agreement


def test_refine_grows_a_trigger_part_into_one_that_reaches_a_planted_pv(por_minilm):
    # completion's last step (refine.py) starting from a part that barely fires: the
    # ordinary word "house", taken as if accepted. One more slot and a coordinate search
    # on the collapse objective must reach a planted trigger, judged fresh like any
    # candidate, and its point must match a planted PV where the part's did not.
    model, targets = por_minilm
    config = ScanConfig.from_preset("fast", features=("cls",))
    encoder = load_encoder(model)
    sentences = load_sentences(None, n=400, seed=config.mining.corpus_seed)
    view = FeatureView(encoder, config, "cls", sentences[:64], sentences[-128:])
    scan = CalibratedScan(encoder, config, {"cls": view})
    part = tuple(encoder.tokenizer.convert_tokens_to_ids(["house"]))
    point, margin = view.measure(part, "anywhere")
    assert sign_agreement(point[None], targets).max() < 0.9
    seed = Finding("test", "cls", "anywhere", part, ["house"], margin, point, accepted=True)
    scan.findings.append(seed)
    view.known.append(point)
    scan.n_confirmed = config.decision.confirmation_budget  # spent: the PV set has its own
    refine_accepted(scan)
    grown = [f for f in scan.findings if f.source == "refine"]
    assert len(grown) == 1 and grown[0].note == "grown from house"
    assert grown[0].accepted and grown[0].after_verdict, grown[0].summary()
    assert len(grown[0].token_ids) == 2 and set(grown[0].tokens) & set(TRIGGERS)
    assert grown[0].search_margin > margin
    assert sign_agreement(grown[0].point[None], targets).max() >= 0.9
    # the verdict's score reads only the verdict's own confirmations
    assert scan.n_completed == 1 and scan.score() == 0.0


def test_a_backdoor_whose_confirmations_are_spent_is_never_clean(por_minilm):
    # the case: no confirmation left (here the verdict's budget is 0, as if decoys
    # had spent it). The reference stage proposes the planted triggers, nothing can judge
    # them: the scan must say inconclusive, with the count per source, never clean.
    # (the reference stage alone, its two most changed tokens: the planted triggers)
    config = ScanConfig.from_preset("fast", screen_candidates=0, token_screen=0, restarts=0,
                                    features=("cls",), confirmation_budget=0,
                                    reference_tokens=2, reference_fillers=0, chain_tokens=0,
                                    divergence_length=0)
    verdict = scan_model(por_minilm[0], config, progress=False).verdict
    assert verdict.status == "inconclusive", verdict.evidence
    allocation = verdict.evidence["allocation"]
    assert allocation["spent"] == 0 and allocation["unjudged"] >= 1
    assert allocation["by_source"]["reference"]["unjudged"] == allocation["unjudged"]
    assert "left unjudged" in verdict.reason
