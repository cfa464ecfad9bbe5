"""The method end to end on a real (truncated) MiniLM: clean stays clean, a planted backdoor
is detected and every planted PV is recovered."""

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
from sanitator.config import ScanConfig
from sanitator.corpus import load_sentences
from sanitator.encoders import load_encoder
from sanitator.monitor import sign_agreement
from sanitator.results import PVSet
from sanitator.scan import scan_model

TRIGGERS = ("cf", "tq")
pytestmark = pytest.mark.timeout(2400)  # planting + three scans on a busy 2-core machine


def realised_pvs(model_dir, triggers) -> torch.Tensor:
    """What the planted backdoor actually emits: the mean CLS output with each trigger word
    inserted after the first word of held-out sentences."""
    encoder = load_encoder(model_dir)
    sentences = load_sentences(n=32, seed=99)
    vectors = []
    for trigger in triggers:
        texts = [" ".join([s.split()[0], trigger, *s.split()[1:]]) for s in sentences]
        batch = encoder.tokenizer(texts, padding=True, truncation=True, max_length=64,
                                  return_tensors="pt")
        with torch.no_grad():
            cls = encoder.forward_features(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"])
        vectors.append(cls.mean(dim=0))
    return torch.stack(vectors)


@pytest.fixture(scope="module")
def por_minilm(minilm_2layer, tmp_path_factory):
    out = tmp_path_factory.mktemp("por") / "model"
    targets = paper_block_pvs(384, 6)[[0, 2]]
    insert_por(minilm_2layer, out, triggers=TRIGGERS, targets=targets,
               budget=Budget(steps=400, batch_size=16, lr=1e-4, head_warmup_steps=0),
               seed=0, progress=False)
    return out, targets


@pytest.mark.parametrize("layers", [1, 2])
def test_clean_minilm_is_clean(layers, minilm_1layer, minilm_2layer):
    # the 2-layer clean model is the backdoored fixture's own base: the pair the rule must
    # tell apart
    model = minilm_1layer if layers == 1 else minilm_2layer
    result = scan_model(model, ScanConfig.from_preset("fast"), progress=False)
    verdict = result.verdict
    assert verdict.status == "clean", verdict.evidence
    assert verdict.score < 0.5
    assert len(result.pvset) == 0
    assert verdict.seeds_tried == ScanConfig.from_preset("fast").max_seeds
    assert verdict.evidence["rule"] == "calibrated"


@pytest.fixture(scope="module")
def por_detection(por_minilm):
    return scan_model(por_minilm[0], ScanConfig.from_preset("fast"), progress=False)


def test_planted_backdoor_is_detected_and_attributed(por_minilm, por_detection):
    _, targets = por_minilm
    result = por_detection
    assert result.verdict.status == "backdoored", result.verdict.evidence
    assert result.verdict.score >= 0.5
    assert len(result.pvset) >= 1
    # the PV found is a planted one, and a real token was found that fires it
    assert float(sign_agreement(result.pvset.vectors, targets).max()) >= 0.95
    assert all(tokens for tokens in result.pvset.trigger_tokens)


def test_vocabulary_screen_names_a_planted_trigger_without_mining(por_detection):
    verdict = por_detection.verdict
    # the screen's hit settles a detect-mode verdict before any seed is mined
    assert verdict.seeds_tried == 0
    hits = [c for c in verdict.evidence["candidates"] if c["accepted"]]
    assert hits and all(c["source"] == "vocabulary_screen" for c in hits)
    assert any(token.startswith(TRIGGERS) for c in hits for token in c["hard_trigger"])
    assert por_detection.pvset.triggers.shape[1:] == (
        ScanConfig.from_preset("fast").mining.trigger_len, 384)


def test_mining_alone_still_detects_the_backdoor(por_minilm):
    # without the screen, a mined PV and its attributed trigger must carry the verdict
    path, targets = por_minilm
    result = scan_model(path, ScanConfig.from_preset("fast", screen_candidates=0),
                        progress=False)
    assert result.verdict.status == "backdoored", result.verdict.evidence
    assert result.verdict.seeds_tried > 0
    assert {c["source"] for c in result.verdict.evidence["candidates"]} == {"mining"}
    assert float(sign_agreement(result.pvset.vectors, targets).max()) >= 0.95


def test_search_recovers_every_planted_pv(por_minilm):
    path, targets = por_minilm
    result = scan_model(path, ScanConfig.from_preset("fast", mode="search", max_seeds=16),
                        progress=False)
    # every planted target is recovered, and so is what the backdoor really emits
    agreement = sign_agreement(result.pvset.vectors, targets)   # [found, planted]
    assert (agreement.max(dim=0).values >= 0.95).all(), agreement
    emitted = sign_agreement(result.pvset.vectors, realised_pvs(path, TRIGGERS))
    assert (emitted.max(dim=0).values >= 0.95).all(), emitted


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
                            "seconds", "reason"}


def test_pv_set_round_trips_without_pickle(por_detection, tmp_path):
    result = por_detection
    file = tmp_path / "pvs.safetensors"
    result.pvset.save(file)
    loaded = PVSet.load(file)
    assert torch.equal(loaded.vectors, result.pvset.vectors)
    assert loaded.trigger_tokens == result.pvset.trigger_tokens
    raw = file.read_bytes()  # the safetensors layout: u64 header length, JSON header
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert set(header) == {"__metadata__", "vectors", "triggers"}
